"""Model presets and config.json loading, checked against transformers' own models.

Each preset is built by transformers on the meta device (shapes only, no memory)
from `ModelShape.to_hf_config()`; its parameter count and linear layer shapes
must equal what the catalog computes without torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from orchestrator import catalog

PRESET_NAMES = ["llama3-1b", "llama3-3b", "llama3-8b", "llama3-70b", "llama3-405b",
                "llama2-7b", "llama2-13b", "mistral-7b", "qwen2.5-7b", "qwen2.5-72b",
                "qwen3-8b", "gemma2-9b", "gemma3-1b", "gemma3-12b", "phi3-mini", "tiny-llama"]


def test_presets_are_the_documented_set() -> None:
    assert list(catalog.PRESETS) == PRESET_NAMES


@pytest.fixture(scope="module")
def meta_models() -> dict:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    models = {}
    for name, shape in catalog.PRESETS.items():
        cfg = dict(shape.to_hf_config())
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            models[name] = transformers.AutoModelForCausalLM.from_config(config)
    return models


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_param_count_matches_transformers(name: str, meta_models: dict) -> None:
    model = meta_models[name]
    hf_params = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter: counted once
    assert catalog.PRESETS[name].num_params() == hf_params


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_linear_shapes_match_transformers(name: str, meta_models: dict) -> None:
    torch = pytest.importorskip("torch")
    shape = catalog.PRESETS[name]
    model = meta_models[name]
    layer = model.model.layers[0]
    # every nn.Linear of a decoder layer, by leaf name (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj)
    modules = {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {k: (m.in_features, m.out_features) for k, m in modules.items()} == shape.linear_shapes()
    assert set(modules) == set(shape.linear_names())
    assert len(model.model.layers) == shape.num_hidden_layers
    first = modules[shape.linear_names()[0]]
    assert (first.bias is not None) == shape.attention_bias
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == shape.tie_word_embeddings
    # sliding-window layout as transformers builds it (Phi3Config has no layer_types: all layers slide)
    types = getattr(model.config, "layer_types", None)
    if shape.model_type != "phi3" and shape.layer_types:
        assert tuple(types) == shape.layer_types
    assert (getattr(model.config, "sliding_window", None) or 0) == shape.sliding_window


def test_published_sizes() -> None:
    # Nominal sizes in the model names ("8B", "70B", ...) as published by Meta, Mistral AI and
    # Qwen on their Hugging Face model cards; the exact counts are checked against transformers above.
    nominal = {"llama3-1b": 1.0, "llama3-3b": 3.0, "llama3-8b": 8.0, "llama3-70b": 70.0, "llama3-405b": 405.0,
               "llama2-7b": 7.0, "llama2-13b": 13.0, "mistral-7b": 7.0, "qwen2.5-7b": 7.0, "qwen2.5-72b": 72.0,
               "qwen3-8b": 8.0, "gemma2-9b": 9.0, "gemma3-1b": 1.0, "gemma3-12b": 12.0, "phi3-mini": 3.8}
    for name, billions in nominal.items():
        # Names round the size: within 25% (Llama 3.2 "1B" is 1.24B because of its 128k vocabulary).
        assert abs(catalog.PRESETS[name].num_params() / 1e9 - billions) / billions < 0.25, name


@pytest.mark.parametrize("name", ["llama3-70b", "qwen3-8b", "gemma2-9b", "gemma3-1b", "gemma3-12b", "phi3-mini"])
def test_example_folder_matches_preset(name: str) -> None:
    # models/<name>/config.json is the published file; the preset copies it field by field
    folder = Path(__file__).resolve().parent.parent / "models" / name
    shape = catalog.load_config_json(folder)
    assert shape.source == str(folder / "config.json")
    if name == "llama3-70b":  # the Llama presets keep ModelShape's default norm epsilon
        assert shape.num_params() == catalog.PRESETS[name].num_params()
    else:
        assert shape == dataclasses.replace(catalog.PRESETS[name], source=shape.source)


def test_format_params() -> None:
    assert catalog.format_params(8_030_261_248) == "8.03B"
    assert catalog.format_params(158_016) == "0.158M"
    assert catalog.format_params(124_000_000) == "124.00M"
    assert "0.00" not in catalog.format_params(catalog.PRESETS["tiny-llama"].num_params())


GOOD = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


def _folder(tmp_path: Path, content: object) -> Path:
    (tmp_path / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return tmp_path


def test_config_json_good(tmp_path: Path) -> None:
    shape = catalog.load_config_json(_folder(tmp_path, GOOD))
    assert shape.num_params() == catalog.PRESETS["tiny-llama"].num_params()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"hidden_size": 64.7}, "hidden_size must be a whole number"),  # was truncated to 64
        ({"hidden_size": -64}, "hidden_size must be a whole number"),  # was accepted
        ({"num_attention_heads": 0}, "num_attention_heads must be a whole number"),  # was ZeroDivisionError later
        ({"vocab_size": True}, "vocab_size must be a whole number"),
        ({"vocab_size": "512"}, "vocab_size must be a whole number"),
        ({"hidden_size": None}, "hidden_size must be a whole number"),
        ({"num_hidden_layers": 10**12}, "num_hidden_layers must be a whole number"),
        ({"hidden_size": 66}, "not a multiple of num_attention_heads"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"rope_theta": "fast"}, "could not convert"),
    ],
)
def test_config_json_bad_values(tmp_path: Path, change: dict, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        catalog.load_config_json(_folder(tmp_path, {**GOOD, **change}))
    assert needle in str(exc.value)
    assert str(exc.value).startswith(str(tmp_path / "config.json"))
    assert "\n" not in str(exc.value)


def test_config_json_missing_key(tmp_path: Path) -> None:
    cfg = dict(GOOD)
    del cfg["vocab_size"]
    with pytest.raises(ValueError, match="lacks 'vocab_size'"):
        catalog.load_config_json(_folder(tmp_path, cfg))


def test_config_json_rope_parameters_not_a_mapping(tmp_path: Path) -> None:
    """Bug fixed: a non-dict rope_parameters crashed with AttributeError (a traceback from orch validate)."""
    shape = catalog.load_config_json(_folder(tmp_path, {**GOOD, "rope_parameters": "x"}))
    assert shape.rope_theta == 10000.0
    shape = catalog.load_config_json(_folder(tmp_path, {**GOOD, "rope_parameters": {"rope_theta": 5e5}}))
    assert shape.rope_theta == 5e5


@pytest.mark.parametrize("content, needle", [("{", "cannot read"), ("[1]", "is not a JSON object")])
def test_config_json_not_an_object(tmp_path: Path, content: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        catalog.load_config_json(_folder(tmp_path, content))


def test_config_json_absent(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        catalog.load_config_json(tmp_path)


# --- families -------------------------------------------------------------------------------------

GEMMA2 = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512}


def test_gemma_defaults_are_transformers_defaults(tmp_path: Path) -> None:
    # A Gemma-2 config.json that leaves keys out means Gemma2Config's defaults: tied embeddings,
    # soft-caps 50 / 30, window 4096 on every other layer (sliding first), attention scalar 256.
    shape = catalog.load_config_json(_folder(tmp_path, GEMMA2))
    assert shape.tie_word_embeddings and shape.lm_head_params() == 0
    assert (shape.attn_logit_softcapping, shape.final_logit_softcapping) == (50.0, 30.0)
    assert shape.sliding_window == 4096 and shape.query_pre_attn_scalar == 256
    assert shape.layer_types == ("sliding_attention", "full_attention") * 2
    assert shape.head_dim_ == 32 and shape.q_dim == 128  # not hidden / heads = 16
    # null soft-caps mean off
    off = catalog.load_config_json(_folder(tmp_path, {**GEMMA2, "attn_logit_softcapping": None,
                                                      "final_logit_softcapping": None, "tie_word_embeddings": False}))
    assert (off.attn_logit_softcapping, off.final_logit_softcapping, off.tie_word_embeddings) == (0.0, 0.0, False)


def test_gemma3_layer_pattern_and_rope_parameters(tmp_path: Path) -> None:
    # transformers 5 writes rope_parameters per layer type and no sliding_window_pattern
    cfg = {**GEMMA2, "model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": 512, "sliding_window_pattern": 3,
           "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    shape = catalog.load_config_json(_folder(tmp_path, cfg))
    assert shape.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert (shape.rope_theta, shape.rope_local_theta) == (1e6, 1e4)
    assert (shape.attn_logit_softcapping, shape.final_logit_softcapping) == (0.0, 0.0)  # Gemma-3 has none
    assert shape.attention_mask_kinds() == 2


def test_gemma3_multimodal_reads_its_text_config(tmp_path: Path) -> None:
    text = {**GEMMA2, "model_type": "gemma3_text"}
    shape = catalog.load_config_json(_folder(tmp_path, {"model_type": "gemma3", "text_config": text,
                                                        "vision_config": {"hidden_size": 1152}}))
    assert shape.model_type == "gemma3_text" and shape.multimodal
    assert shape.num_params() == catalog.load_config_json(_folder(tmp_path, text)).num_params()
    with pytest.raises(ValueError, match="needs a text_config object"):
        catalog.load_config_json(_folder(tmp_path, {"model_type": "gemma3"}))


@pytest.mark.parametrize("use, first, want", [(False, 2, ()), (True, 2, ("full_attention",) * 2 + ("sliding_attention",) * 2)])
def test_qwen_window_only_with_use_sliding_window(tmp_path: Path, use: bool, first: int, want: tuple) -> None:
    cfg = {**GOOD, "model_type": "qwen3", "num_hidden_layers": 4, "sliding_window": 256, "use_sliding_window": use,
           "max_window_layers": first}
    shape = catalog.load_config_json(_folder(tmp_path, cfg))
    assert shape.layer_types == want and shape.sliding_window == (256 if use else 0)


@pytest.mark.parametrize("change, evidence", [
    ({"num_local_experts": 8}, "num_local_experts: 8"),  # Mixtral
    ({"num_experts": 60, "moe_intermediate_size": 1408}, "num_experts: 60"),  # Qwen-MoE
    ({"n_routed_experts": 64}, "n_routed_experts: 64"),  # DeepSeek
    ({"text_config": {"num_experts": 16}}, "num_experts: 16"),  # a multimodal wrapper's decoder
    ({"moe_layer_frequency": 2}, "moe_layer_frequency: 2"),  # any other key naming MoE (Arctic)
    ({"use_moe": True}, "use_moe: True"),
    ({"expert_layer_period": 2}, "expert_layer_period: 2"),  # or experts (Jamba)
])
def test_moe_configs_are_refused_whatever_their_model_type(tmp_path: Path, change: dict, evidence: str) -> None:
    for model_type in ("mistral", "llama", "qwen2"):
        with pytest.raises(ValueError) as exc:
            catalog.load_config_json(_folder(tmp_path, {**GOOD, "model_type": model_type, **change}))
        assert f"a mixture-of-experts model ({evidence})" in str(exc.value) and "\n" not in str(exc.value)


def test_zero_or_null_expert_keys_are_dense(tmp_path: Path) -> None:
    shape = catalog.load_config_json(_folder(tmp_path, {**GOOD, "num_experts": 0, "num_local_experts": None,
                                                        "use_moe": False, "moe_intermediate_size": None,
                                                        "remove_unused_columns": True}))
    assert shape.model_type == "llama"


def test_bad_layer_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layer_types must list 4 entries"):
        catalog.load_config_json(_folder(tmp_path, {**GEMMA2, "layer_types": ["full_attention"]}))
    with pytest.raises(ValueError, match="sliding_window is not set"):
        catalog.load_config_json(_folder(tmp_path, {**GEMMA2, "sliding_window": None}))
