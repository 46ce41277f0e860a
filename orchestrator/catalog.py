"""Built-in model shapes and GPU facts.

Everything here is plain data: `orch plan` reads it without importing torch or
touching the network. A model is either a named preset (exact shapes copied from
the published Hugging Face ``config.json`` of that model) or a local folder with
a ``config.json``; both become a :class:`ModelShape`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 1024**3
MIB = 1024**2

# Model families orch knows how to build and estimate (decoder-only, RMSNorm,
# SwiGLU MLP, rotary positions, optional GQA).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer: all the memory model needs."""

    model_type: str
    """Hugging Face ``model_type``: llama, mistral or qwen2."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    """Input embedding and lm_head share one matrix (Llama 3.2 1B/3B)."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    head_dim: int = 0
    """0 means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    source: str = "preset"
    """Where the shape came from: 'preset' or the config.json path."""

    @property
    def head_dim_(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim_

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim_

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer inside one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_params(self) -> int:
        """Weight elements of the linear layers of one decoder layer (no biases)."""
        return sum(a * b for a, b in self.linear_shapes().values())

    def layer_other_params(self) -> int:
        """Elements in one decoder layer that are not linear weights: norms and biases."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0
        return 2 * self.hidden_size + bias

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
        """A config.json dict that transformers' AutoConfig accepts for this shape."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        cfg = {
            "architectures": [arch[self.model_type]],
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
            "hidden_act": "silu",
            "head_dim": self.head_dim_,
        }
        if self.model_type == "llama":
            cfg["attention_bias"] = self.attention_bias
        return cfg


def _llama3(h: int, i: int, n: int, heads: int, vocab: int = 128256, tie: bool = False, head_dim: int = 0) -> ModelShape:
    return ModelShape("llama", h, i, n, heads, 8, vocab, tie, head_dim=head_dim,
                      max_position_embeddings=131072, rope_theta=500000.0)


# Shapes from each model's published config.json.
PRESETS: dict[str, ModelShape] = {
    "llama3-1b": _llama3(2048, 8192, 16, 32, tie=True, head_dim=64),  # Llama-3.2-1B
    "llama3-3b": _llama3(3072, 8192, 28, 24, tie=True, head_dim=128),  # Llama-3.2-3B
    "llama3-8b": _llama3(4096, 14336, 32, 32),  # Llama-3.1-8B
    "llama3-70b": _llama3(8192, 28672, 80, 64),  # Llama-3.1-70B
    "llama3-405b": _llama3(16384, 53248, 126, 128),  # Llama-3.1-405B
    "llama2-7b": ModelShape("llama", 4096, 11008, 32, 32, 32, 32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": ModelShape("llama", 5120, 13824, 40, 40, 40, 32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    # Mistral-7B-v0.3 (v0.1 differs only in vocab_size 32000 and rope_theta).
    "mistral-7b": ModelShape("mistral", 4096, 14336, 32, 32, 8, 32768, max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-7b": ModelShape("qwen2", 3584, 18944, 28, 28, 4, 152064, attention_bias=True,
                             max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-72b": ModelShape("qwen2", 8192, 29568, 80, 64, 8, 152064, attention_bias=True,
                              max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6),
    # Not a published model: a 2-layer Llama for CPU demos and tests. Every width is a multiple
    # of 64, like real models': bitsandbytes' CPU 4-bit kernels need whole quantization blocks
    # per row (modeling.check_cpu_4bit_shapes), and its AVX512-BF16 layout multiples of 32.
    "tiny-llama": ModelShape("llama", 64, 192, 2, 4, 2, 512, max_position_embeddings=2048),
}


def load_config_json(folder: Path) -> ModelShape:
    """Read a Hugging Face config.json from a local folder. Raises ValueError with a one-line reason."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        hidden = _size(raw, "hidden_size", path)
        heads = _size(raw, "num_attention_heads", path)
        kv_heads = _size(raw, "num_key_value_heads", path) if raw.get("num_key_value_heads") is not None else heads
        head_dim = _size(raw, "head_dim", path) if raw.get("head_dim") is not None else 0
        if not head_dim and hidden % heads:
            raise ValueError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and no head_dim given)")
        if heads % kv_heads:
            raise ValueError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        rope_parameters = raw.get("rope_parameters")
        rope = raw.get("rope_theta") or (rope_parameters.get("rope_theta") if isinstance(rope_parameters, dict) else None) or 10000.0
        return ModelShape(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=_size(raw, "intermediate_size", path),
            num_hidden_layers=_size(raw, "num_hidden_layers", path),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=_size(raw, "vocab_size", path),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            head_dim=head_dim,
            max_position_embeddings=_size(raw, "max_position_embeddings", path) if "max_position_embeddings" in raw else 8192,
            rope_theta=float(rope),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            source=str(path),
        )
    except (TypeError, ValueError, OverflowError) as exc:
        message = str(exc)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None


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


def shape_dict(shape: ModelShape) -> dict:
    return asdict(shape)
