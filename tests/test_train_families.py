"""Every model family through the trainer's model code on the CPU, with tiny shapes.

For Qwen3, Gemma-2, Gemma-3 (text) and Phi-3 (Llama as the reference): random weights built
layer by layer (qlora with real bitsandbytes, and lora), one forward + backward; the chunked
loss equals the HF model's own loss on the same batch (this is what catches a missing
Gemma-2 final-logit soft-cap); a save_pretrained folder loads; the family's init rule holds.
Each shape is written here as a config.json folder: hidden 64, 2 layers, every linear's
in_features a multiple of 64 (bitsandbytes' CPU 4-bit needs whole blocks per row).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from orchestrator import modeling as M
from orchestrator.spec import load_job
from tests.train_helpers import tiny_job

CPU = torch.device("cpu")
COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}

# head_dim 32 (not hidden / heads = 16): q_dim 128, so o_proj reads 128 features.
CONFIGS = {
    "llama": {"model_type": "llama", **COMMON},
    "qwen3": {"model_type": "qwen3", **COMMON, "head_dim": 32, "tie_word_embeddings": False},
    # Weights of std 0.5 give logits of std ~4, which a final soft-cap of 2 bends hard, so the
    # capped loss is far from the uncapped one; the sliding window (8) is shorter than the rows (32).
    "gemma2": {"model_type": "gemma2", **COMMON, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
               "attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0, "initializer_range": 0.5},
    "gemma3_text": {"model_type": "gemma3_text", **COMMON, "head_dim": 32, "query_pre_attn_scalar": 32,
                    "sliding_window": 8, "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0},
    # Phi3Config puts pad/eos at 32000, outside a 512-token vocabulary.
    "phi3": {"model_type": "phi3", **COMMON, "sliding_window": 8, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
}
# Gemma-2 has no sdpa in transformers (soft-capping): the spec asks for eager there.
ATTN = {"gemma2": "eager"}


def _folder(tmp_path: Path, family: str) -> Path:
    folder = tmp_path / family
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIGS[family]))
    return folder


def _job(tmp_path: Path, family: str, method: str, weights: str = "random", folder: Path | None = None):
    model = {"name": str(folder or _folder(tmp_path, family)), "weights": weights,
             "attn_implementation": ATTN.get(family, "sdpa")}
    return load_job(tiny_job(tmp_path, f"{family}-{method}", method=method, model=model), for_training=True)


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 259, (2, 32), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt, as the data pipeline makes
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]  # what HF's loss does with labels: predict token t+1 at t
    pos = torch.arange(32).repeat(2, 1)
    return ids, pos, labels, targets


FAMILIES = list(CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_the_hf_models_own_loss(tmp_path, family):
    # full finetune (fp32, every weight random and trainable): orch's chunked LM-head loss, as the
    # sum of token losses / tokens, against HF's forward(labels=...) loss, and the same gradient.
    job = _job(tmp_path, family, "full")
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    ids, pos, labels, targets = _batch()
    tokens = (targets != -100).sum()
    ours = M.CausalLMLoss(loaded.model, loaded.base, chunk_tokens=7)(ids, pos, targets, 1.0 / tokens)
    ours.backward()
    our_grad = loaded.base.model.layers[0].mlp.down_proj.weight.grad.clone()
    loaded.base.zero_grad()
    theirs = loaded.base(input_ids=ids, position_ids=pos, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_grad, loaded.base.model.layers[0].mlp.down_proj.weight.grad, rtol=1e-4, atol=1e-7)


def test_gemma2_softcap_changes_the_loss(tmp_path):
    # The equality above would hold trivially if the cap did nothing at these logit sizes.
    job = _job(tmp_path, "gemma2", "full")
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    ids, pos, _, targets = _batch()
    capped = M.CausalLMLoss(loaded.model, loaded.base, chunk_tokens=0)
    uncapped = M.CausalLMLoss(loaded.model, loaded.base, chunk_tokens=0)
    uncapped.softcap = 0.0
    assert capped.softcap == 2.0
    with torch.no_grad():
        a, b = capped(ids, pos, targets, 1.0), uncapped(ids, pos, targets, 1.0)
    assert abs(a - b) / b > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_random_qlora_quantizes_the_family_linears_and_trains(tmp_path, family, bnb_cpu_path):
    job = _job(tmp_path, family, "qlora")
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    shape = job.shape()
    # every decoder linear of the family, in both layers, is 4-bit (Phi-3: its 4 fused ones)
    assert loaded.quantized_modules == 2 * len(shape.linear_names())
    for name, (fan_in, fan_out) in shape.linear_shapes().items():
        found = [m for n, m in loaded.base.model.layers[0].named_modules() if n.rsplit(".", 1)[-1] == name]
        assert len(found) == 1, name
        base_layer = getattr(found[0], "base_layer", found[0])
        assert isinstance(base_layer, bnb.nn.Linear4bit), name
        assert (base_layer.in_features, base_layer.out_features) == (fan_in, fan_out), name
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in loaded.model.named_parameters()
               if p.requires_grad and ".lora_A" in n}
    assert adapted == set(shape.linear_names())  # 'all-linear': the family's own module names
    ids, pos, _, targets = _batch()
    loss = M.CausalLMLoss(loaded.model, loaded.base, chunk_tokens=16)(ids, pos, targets, torch.tensor(1.0))
    loss.backward()
    grads = [p.grad for n, p in loaded.model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_lora_init_rule_and_rotary(tmp_path, family):
    job = _job(tmp_path, family, "lora")
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    base = loaded.base
    norms = [p for n, p in base.named_parameters() if "norm" in n]
    # Gemma's norms compute x * (1 + w): HF initializes w to 0; the others multiply by w = 1.
    want = 0.0 if family.startswith("gemma") else 1.0
    assert norms and all(torch.all(p == want) for p in norms)
    # Qwen3 and Gemma-3 norm q and k over head_dim; Gemma has 4 norms per layer
    layer = base.model.layers[0]
    assert hasattr(layer.self_attn, "q_norm") == (family in ("qwen3", "gemma3_text"))
    family_facts = job.shape().family
    assert sum("norm" in n for n, _ in layer.named_parameters()) == family_facts.norms_per_layer + 2 * family_facts.qk_norm
    if family.startswith("gemma"):
        assert base.model.embed_tokens.embed_scale.item() == pytest.approx(64 ** 0.5)
    # rotary frequencies were computed, not left as uninitialized memory: they equal a fresh module's
    for name, child in base.model.named_children():
        if "RotaryEmbedding" in type(child).__name__:
            fresh = type(child)(config=child.config)
            for (bn, b), (_, f) in zip(child.named_buffers(), fresh.named_buffers()):
                torch.testing.assert_close(b, f, msg=bn)
    ids, pos, _, targets = _batch()
    loss = M.CausalLMLoss(loaded.model, loaded.base, chunk_tokens=0)(ids, pos, targets, torch.tensor(1.0))
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_folder_loads(tmp_path, family):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CONFIGS[family])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN.get(family, "sdpa"))
    folder = tmp_path / "pre"
    reference.save_pretrained(folder)
    job = _job(tmp_path, family, "qlora", weights="pretrained", folder=folder)
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    assert loaded.quantized_modules == 2 * len(job.shape().linear_names())
    lora = M.load_model(_job(tmp_path, family, "lora", weights="pretrained", folder=folder), "single_gpu", CPU, seed=0)
    # the saved weights came back: same embedding as the model that wrote them
    torch.testing.assert_close(lora.base.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    ids, pos, _, targets = _batch()
    loss = M.CausalLMLoss(loaded.model, loaded.base, chunk_tokens=0)(ids, pos, targets, torch.tensor(1.0))
    assert torch.isfinite(loss)


def test_gemma3_zero3_random_build_matches_one_process(tmp_path):
    # ZeRO-3 builds random weights inside deepspeed.zero.Init (real DeepSpeed, 2 CPU processes):
    # Gemma's module must be imported before zero.Init patches torch.Tensor, and transformers'
    # own init (which zeroes the padding row of an empty shard) must not run. Same seed, same losses.
    from tests.train_helpers import check, losses, out_dir, run_trainer

    model = {"name": str(_folder(tmp_path, "gemma3_text"))}
    short = {"max_steps": 2}
    one = tiny_job(tmp_path, "g3-one", method="lora", model=model, training=short)
    two = tiny_job(tmp_path, "g3-z3", method="lora", strategy="zero3", model=model, training=short)
    check(run_trainer(one))
    check(run_trainer(two, nprocs=2))
    a, b = losses(out_dir(one)), losses(out_dir(two))
    assert list(a) == list(b) == [1, 2]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_multimodal_gemma3_folder_builds_its_text_decoder(tmp_path):
    # a gemma3 (multimodal) config.json: orch builds Gemma3ForCausalLM from its text_config, no vision tower
    folder = tmp_path / "mm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "text_config": CONFIGS["gemma3_text"],
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}}))
    job = _job(tmp_path, "gemma3_text", "lora", folder=folder)
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    assert type(loaded.base).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in n for n, _ in loaded.base.named_parameters())
    assert sum(p.numel() for n, p in loaded.base.named_parameters() if "lora_" not in n) == job.shape().num_params()
