"""Built-in model shapes and GPU facts.

Everything here is plain data: `orch plan` reads it without importing torch or
touching the network. A model is either a named preset (exact shapes copied from
the published Hugging Face ``config.json`` of that model) or a folder with a
``config.json`` (local, or the cache snapshot of a Hub id: ``hub.py``); both become
a :class:`ModelShape`, whose :class:`Family` says how its architecture differs from Llama's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3
MIB = 1024**2

# ---------------------------------------------------------------------------
# Model families


@dataclass(frozen=True)
class Family:
    """Architecture facts of one Hugging Face ``model_type`` that change shapes or memory.

    Every family is a decoder-only transformer with RMSNorm, a gated MLP
    (act(gate) * up -> down) and rotary positions; these fields say where they differ.
    """

    architecture: str
    """The ``*ForCausalLM`` class transformers builds for it."""
    norms_per_layer: int
    """RMSNorms on the hidden size in one decoder layer: 2 (before attention and MLP), or 4
    (Gemma-2/3 also normalize the attention and MLP outputs)."""
    qk_norm: bool
    """An RMSNorm over head_dim on q and on k before RoPE (Qwen3, Gemma-3)."""
    offset_norm: bool
    """Gemma's RMSNorm: weight stored zero-centred and applied as (1 + w), computed in fp32
    (zero-initialized; the normalized output it saves for the weight gradient is fp32)."""
    fused_linears: bool
    """q/k/v are one ``qkv_proj`` and gate/up one ``gate_up_proj`` (Phi-3)."""
    activation: str
    """The MLP's activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)."""
    activation_key: str
    """The config.json key holding it (Gemma writes hidden_activation)."""
    tie_default: bool
    """tie_word_embeddings when config.json leaves it out (transformers' config default)."""
    bias_default: bool
    """attention_bias when config.json leaves it out (Qwen2 always has q/k/v biases)."""
    eps_default: float
    """rms_norm_eps when config.json leaves it out."""
    sdpa: bool = True
    """transformers can run it with attn_implementation sdpa (Gemma-2 cannot: sdpa has no
    attention-logit soft-capping, so transformers refuses it)."""


_LLAMA_LIKE = dict(norms_per_layer=2, qk_norm=False, offset_norm=False, fused_linears=False,
                   activation="silu", activation_key="hidden_act", tie_default=False, bias_default=False)
_GEMMA = dict(norms_per_layer=4, offset_norm=True, fused_linears=False, activation="gelu_pytorch_tanh",
              activation_key="hidden_activation", tie_default=True, bias_default=False, eps_default=1e-6)

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", eps_default=1e-6, **_LLAMA_LIKE),
    "mistral": Family("MistralForCausalLM", eps_default=1e-6, **_LLAMA_LIKE),
    "qwen2": Family("Qwen2ForCausalLM", eps_default=1e-6, **{**_LLAMA_LIKE, "bias_default": True}),
    "qwen3": Family("Qwen3ForCausalLM", eps_default=1e-6, **{**_LLAMA_LIKE, "qk_norm": True}),
    "gemma2": Family("Gemma2ForCausalLM", qk_norm=False, sdpa=False, **_GEMMA),
    "gemma3_text": Family("Gemma3ForCausalLM", qk_norm=True, **_GEMMA),
    "phi3": Family("Phi3ForCausalLM", eps_default=1e-5, **{**_LLAMA_LIKE, "fused_linears": True}),
}
"""Model families orch builds and estimates, by model_type. A ``gemma3`` (multimodal)
config.json is read as its ``text_config``, a gemma3_text decoder (see load_config_json)."""

SUPPORTED_MODEL_TYPES = tuple(FAMILIES) + ("gemma3",)

# Keys that only mixture-of-experts configs carry (Mixtral, Qwen-MoE, DeepSeek, DBRX, OLMoE, ...).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
            "moe_intermediate_size", "n_shared_experts", "moe_layer_freq", "moe_every_n_layers")

FULL, SLIDING = "full_attention", "sliding_attention"


def every_nth_full(layers: int, n: int) -> tuple[str, ...]:
    """Layer types of Gemma's interleaving: layer i is global (full) when (i + 1) % n == 0,
    sliding otherwise (transformers' rule for Gemma-2, n = 2, and Gemma-3, n = 6)."""
    return tuple(FULL if (i + 1) % n == 0 else SLIDING for i in range(layers))


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer: all the memory model needs."""

    model_type: str
    """Hugging Face ``model_type``, a key of FAMILIES (a multimodal gemma3 config becomes gemma3_text)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    """Input embedding and lm_head share one matrix (Llama 3.2 1B/3B, Gemma)."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    head_dim: int = 0
    """0 means hidden_size // num_attention_heads; Gemma and Qwen3 set it independently
    (Gemma-2 9B: 16 heads x 256 on a hidden size of 3584)."""
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int = 0
    """Tokens a sliding-window layer attends to (0: no sliding-window layers)."""
    layer_types: tuple[str, ...] = ()
    """Per decoder layer, 'full_attention' or 'sliding_attention' (transformers' layer_types);
    empty means every layer is full attention."""
    attn_logit_softcapping: float = 0.0
    """Attention scores become tanh(s / cap) * cap before the softmax (Gemma-2: 50; 0 = off)."""
    final_logit_softcapping: float = 0.0
    """Output logits become tanh(z / cap) * cap before the loss (Gemma-2: 30; 0 = off)."""
    query_pre_attn_scalar: int = 0
    """Gemma's attention scale is query_pre_attn_scalar ** -0.5 (0: not a Gemma config)."""
    rope_local_theta: float = 0.0
    """Gemma-3's RoPE base for its sliding-window layers (0: one base for all layers)."""
    multimodal: bool = False
    """Read from a multimodal (gemma3) config's text_config: only the text decoder is planned
    and built; the vision tower is not."""
    source: str = "preset"
    """Where the shape came from: the Hugging Face repo id of a preset's config.json, or the
    config.json path."""

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim_

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim_

    def attention_mask_kinds(self) -> int:
        """Distinct 4D masks one forward builds for packed rows: one per layer type in use
        (Gemma-2/3 build a full-causal and a sliding-window mask; Phi-3's all-sliding layers one)."""
        return max(1, len(set(self.layer_types)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer inside one decoder layer, by module name.

        Phi-3 fuses q/k/v into ``qkv_proj`` (out q + 2 kv) and gate/up into ``gate_up_proj``
        (out 2 x intermediate): those are the modules qlora quantizes and LoRA adapts there.
        """
        h, i = self.hidden_size, self.intermediate_size
        if self.family.fused_linears:
            return {
                "qkv_proj": (h, self.q_dim + 2 * self.kv_dim),
                "o_proj": (self.q_dim, h),
                "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h),
            }
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_names(self) -> tuple[str, ...]:
        """Module names of the decoder-layer linears (the 'all-linear' LoRA targets)."""
        return tuple(self.linear_shapes())

    def layer_linear_params(self) -> int:
        """Weight elements of the linear layers of one decoder layer (no biases)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    def layer_other_params(self) -> int:
        """Elements in one decoder layer that are not linear weights: norms and biases."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        qk_norms = 2 * self.head_dim_ if self.family.qk_norm else 0
        return self.family.norms_per_layer * self.hidden_size + qk_norms + bias

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """Extra elements of the output head: 0 when tied to the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        """All parameters, counting a tied embedding once (as Hugging Face does)."""
        per_layer = self.layer_linear_params() + self.layer_other_params()
        return (
            self.num_hidden_layers * per_layer
            + self.embedding_params()
            + self.lm_head_params()
            + self.hidden_size  # final norm
        )

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers' AutoConfig accepts for this shape (the text
        decoder's, for a multimodal source). RoPE scaling is not carried: it changes no shape
        and no memory."""
        family = self.family
        cfg = {
            "architectures": [family.architecture],
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            family.activation_key: family.activation,
            "head_dim": self.head_dim_,
        }
        if self.model_type == "llama":
            cfg["attention_bias"] = self.attention_bias
        if self.model_type != "llama":  # explicit even when off: MistralConfig defaults to a 4096 window
            cfg["sliding_window"] = self.sliding_window or None
        if self.sliding_window and self.model_type in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = True
        if self.layer_types and self.model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):  # configs with layer_types
            cfg["layer_types"] = list(self.layer_types)
        if family.offset_norm:  # Gemma: a missing key would mean transformers' default, not "off"
            cfg["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            cfg["attn_logit_softcapping"] = self.attn_logit_softcapping or None
            cfg["final_logit_softcapping"] = self.final_logit_softcapping or None
        if self.rope_local_theta:
            cfg["rope_local_base_freq"] = self.rope_local_theta
        return cfg


# Presets of the families added for issue 15, in keyword form. Each value is copied from the
# config.json of the Hugging Face repo named in ``source`` (for a multimodal one, its
# text_config); what no field carries (RoPE scaling, token ids) changes no shape or memory.
FAMILY_PRESETS: dict[str, ModelShape] = {
    "qwen3-8b": ModelShape(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        source="Qwen/Qwen3-8B"),
    "gemma2-9b": ModelShape(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
        tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
        sliding_window=4096, layer_types=every_nth_full(42, 2), attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=256, source="google/gemma-2-9b"),
    "gemma3-1b": ModelShape(
        model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
        tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6, rope_local_theta=10000.0,
        rms_norm_eps=1e-6, sliding_window=512, layer_types=every_nth_full(26, 6), query_pre_attn_scalar=256,
        source="google/gemma-3-1b-pt"),
    "gemma3-12b": ModelShape(
        model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
        tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=1e6, rope_local_theta=10000.0,
        rms_norm_eps=1e-6, sliding_window=1024, layer_types=every_nth_full(48, 6), query_pre_attn_scalar=256,
        multimodal=True, source="google/gemma-3-12b-pt"),
    "phi3-mini": ModelShape(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=2047,
        layer_types=(SLIDING,) * 32, source="microsoft/Phi-3-mini-4k-instruct"),
}


# The presets: shapes copied from each model's published config.json; ``source`` names the Hugging Face
# repo. Fields left out take the ModelShape defaults (untied, no attention bias, head_dim = hidden / heads).
PRESETS: dict[str, ModelShape] = {
    "llama3-1b": ModelShape(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, source="meta-llama/Llama-3.2-1B"),
    "llama3-3b": ModelShape(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=128,
        max_position_embeddings=131072, rope_theta=500000.0, source="meta-llama/Llama-3.2-3B"),
    "llama3-8b": ModelShape(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        source="meta-llama/Llama-3.1-8B"),
    "llama3-70b": ModelShape(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        source="meta-llama/Llama-3.1-70B"),
    "llama3-405b": ModelShape(
        model_type="llama", hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        source="meta-llama/Llama-3.1-405B"),
    "llama2-7b": ModelShape(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        source="meta-llama/Llama-2-7b-hf"),
    "llama2-13b": ModelShape(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        source="meta-llama/Llama-2-13b-hf"),
    # v0.3; v0.1 differs only in vocab_size 32000 and rope_theta.
    "mistral-7b": ModelShape(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768, rope_theta=1e6,
        source="mistralai/Mistral-7B-v0.3"),
    "qwen2.5-7b": ModelShape(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, attention_bias=True, max_position_embeddings=131072,
        rope_theta=1e6, rms_norm_eps=1e-6, source="Qwen/Qwen2.5-7B"),
    "qwen2.5-72b": ModelShape(
        model_type="qwen2", hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=152064, attention_bias=True, max_position_embeddings=131072,
        rope_theta=1e6, rms_norm_eps=1e-6, source="Qwen/Qwen2.5-72B"),
    **FAMILY_PRESETS,
    # Not a published model: a 2-layer Llama for CPU demos and tests. Every width is a multiple
    # of 64, like real models': bitsandbytes' CPU 4-bit kernels need whole quantization blocks
    # per row (modeling.check_cpu_4bit_shapes), and its AVX512-BF16 layout multiples of 32.
    "tiny-llama": ModelShape(
        model_type="llama", hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, source="orch (test model)"),
}


def load_config_json(folder: Path) -> ModelShape:
    """Read a Hugging Face config.json from a local folder. Raises ValueError with a one-line reason.

    Mixture-of-experts configs are refused by their keys (MOE_KEYS), whatever their
    model_type says: a relabelled Mixtral would otherwise plan as a dense model. A multimodal
    ``gemma3`` config is read as its ``text_config`` (the decoder; multimodal=True).
    Missing keys take transformers' defaults for the family (Gemma ties its embeddings and
    soft-caps Gemma-2's logits unless the file says otherwise).
    """
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    moe = moe_evidence(raw)
    if moe:
        raise ValueError(f"{path}: a mixture-of-experts model ({moe}); orch plans and trains dense models only")
    model_type = raw.get("model_type")
    multimodal = model_type == "gemma3"
    if multimodal:
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{path}: model_type 'gemma3' needs a text_config object (the decoder orch trains)")
        raw, model_type = text, text.get("model_type", "gemma3_text")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    family = FAMILIES[model_type]
    try:
        hidden = _size(raw, "hidden_size", path)
        heads = _size(raw, "num_attention_heads", path)
        kv_heads = _size(raw, "num_key_value_heads", path) if raw.get("num_key_value_heads") is not None else heads
        head_dim = _size(raw, "head_dim", path) if raw.get("head_dim") is not None else 0
        if not head_dim and hidden % heads:
            raise ValueError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and no head_dim given)")
        if heads % kv_heads:
            raise ValueError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        layers = _size(raw, "num_hidden_layers", path)
        window, layer_types = _attention_layout(raw, model_type, layers, path)
        softcap_defaults = (50.0, 30.0) if model_type == "gemma2" else (None, None)
        return ModelShape(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=_size(raw, "intermediate_size", path),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=_size(raw, "vocab_size", path),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", family.tie_default)),
            attention_bias=bool(raw.get("attention_bias", family.bias_default)),
            head_dim=head_dim,
            max_position_embeddings=_size(raw, "max_position_embeddings", path) if "max_position_embeddings" in raw else 8192,
            rope_theta=_rope_theta(raw, FULL, "rope_theta", 10000.0 if model_type != "gemma3_text" else 1e6),
            rms_norm_eps=float(raw.get("rms_norm_eps", family.eps_default)),
            sliding_window=window,
            layer_types=layer_types,
            attn_logit_softcapping=float(raw.get("attn_logit_softcapping", softcap_defaults[0]) or 0.0),
            final_logit_softcapping=float(raw.get("final_logit_softcapping", softcap_defaults[1]) or 0.0),
            query_pre_attn_scalar=_size(raw, "query_pre_attn_scalar", path) if family.offset_norm and raw.get(
                "query_pre_attn_scalar") is not None else (256 if family.offset_norm else 0),
            rope_local_theta=_rope_theta(raw, SLIDING, "rope_local_base_freq", 10000.0) if model_type == "gemma3_text" else 0.0,
            multimodal=multimodal,
            source=str(path),
        )
    except (TypeError, ValueError, OverflowError) as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def moe_evidence(raw: dict) -> str:
    """'key: value' of the first mixture-of-experts key set in a config (or its text_config), else ''.

    The keys of MOE_KEYS are looked at first, then any other key naming experts or MoE
    ("expert" in it, or a "moe" word: moe_layer_frequency, use_moe). A key counts when it
    holds true, a number above 0 (num_experts: 0 or null appears in dense configs of
    MoE-capable families) or a non-empty list or mapping.
    """
    for cfg in (raw, raw.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        others = [k for k in cfg if isinstance(k, str) and k not in MOE_KEYS
                  and ("expert" in k or re.search(r"(^|_)moe(_|$)", k))]
        for key in (*MOE_KEYS, *others):
            value = cfg.get(key)
            if value is None or value is False:
                continue
            if value is True or (isinstance(value, (int, float)) and value > 0) or (
                    isinstance(value, (list, dict, str)) and value):
                return f"{key}: {value!r}"
    return ""


def _rope_theta(raw: dict, layer_type: str, key: str, default: float) -> float:
    """A RoPE base from the top-level key (config.json as published) or from transformers 5's
    rope_parameters (one dict, or one per layer type for Gemma-3)."""
    if raw.get(key) is not None:
        return float(raw[key])
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return default


def _attention_layout(raw: dict, model_type: str, layers: int, path: Path) -> tuple[int, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers resolves them for this family.

    An explicit ``layer_types`` list wins. Otherwise: Gemma-2 alternates sliding/full,
    Gemma-3 makes every ``sliding_window_pattern``-th layer full (6 by default), Qwen slides
    from layer max_window_layers on when use_sliding_window is set, and Mistral/Phi-3 apply a
    configured window to every layer. All-full layouts are stored as () (nothing slides).
    """
    window = raw.get("sliding_window")
    if model_type in ("gemma2", "gemma3_text", "mistral") and "sliding_window" not in raw:
        window = 4096  # the default of Gemma2Config, Gemma3TextConfig and MistralConfig
    if model_type in ("qwen2", "qwen3") and not raw.get("use_sliding_window", False):
        window = None  # transformers ignores the window unless use_sliding_window is set
    if window is not None:
        window = _size(raw, "sliding_window", path) if "sliding_window" in raw else int(window)
    explicit = raw.get("layer_types")
    if explicit is not None:
        if not isinstance(explicit, list) or len(explicit) != layers or any(t not in (FULL, SLIDING) for t in explicit):
            raise ValueError(f"{path}: layer_types must list {layers} entries, each {FULL!r} or {SLIDING!r}")
        types = tuple(explicit)
    elif model_type == "gemma2":
        types = every_nth_full(layers, 2)
    elif model_type == "gemma3_text":
        pattern = raw.get("sliding_window_pattern", raw.get("_sliding_window_pattern", 6))
        types = every_nth_full(layers, _size({"sliding_window_pattern": pattern}, "sliding_window_pattern", path))
    elif model_type in ("qwen2", "qwen3") and window:
        first = raw.get("max_window_layers", 28)
        types = tuple(SLIDING if i >= first else FULL for i in range(layers))
    elif window:
        types = (SLIDING,) * layers
    else:
        types = ()
    if SLIDING not in types:
        return 0, ()
    if not window:
        raise ValueError(f"{path}: layer_types has sliding_attention layers but sliding_window is not set")
    return window, types


# Larger than any real model dimension; keeps a typo (or a hostile file) from
# producing shapes whose byte counts make no sense.
MAX_DIM = 1 << 24


def _size(raw: dict, key: str, path: Path) -> int:
    """A positive integer field of config.json. int() would silently truncate
    64.7 to 64 and accept 0 or -64 (0 heads later divides by zero)."""
    if key not in raw:
        raise ValueError(f"{path} lacks {key!r}")
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or not 1 <= value <= MAX_DIM:
        raise ValueError(f"{path}: {key} must be a whole number from 1 to {MAX_DIM}, got {value!r}")
    return int(value)


def has_weights(folder: Path) -> bool:
    """True when a model folder holds weight files (safetensors or torch bin)."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


@dataclass(frozen=True)
class GPU:
    """A GPU model: usable memory as nvidia-smi reports it, 16-bit peak, and whether it has bf16."""

    memory_mib: int
    peak_tflops: float
    """Dense (no sparsity) 16-bit tensor-core peak from the vendor datasheet: bf16, or fp16 on a GPU without bf16."""
    bf16: bool = True
    """Computes in bf16 (Ampere and newer). Volta (V100) has fp16 tensor cores only."""


GPUS: dict[str, GPU] = {
    "A10G": GPU(23028, 125.0),
    "L4": GPU(23034, 121.0),
    "RTX3090": GPU(24576, 71.0),
    "RTX4090": GPU(24564, 165.0),
    "V100-32GB": GPU(32768, 125.0, bf16=False),  # fp16 tensor-core peak (SXM2)
    "A100-40GB": GPU(40960, 312.0),
    "L40S": GPU(46068, 362.0),
    "A100-80GB": GPU(81920, 312.0),
    "H100-80GB": GPU(81559, 989.0),  # nvidia-smi total on the H100 SXM we measure on
    "H200-141GB": GPU(143771, 989.0),
}


@dataclass
class ModelInfo:
    """What `orch models` prints about one preset."""

    name: str
    shape: ModelShape
    params: int = field(init=False)

    def __post_init__(self) -> None:
        self.params = self.shape.num_params()


def format_params(n: int) -> str:
    """A parameter count for people: 8.03B, 70.55B; M below a billion so the
    tiny demo model reads 0.15M rather than 0.00B."""
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e6:.3f}M"


def model_table() -> list[ModelInfo]:
    return [ModelInfo(name, shape) for name, shape in PRESETS.items()]

