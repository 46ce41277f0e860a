"""Model building for the trainer: load or build, quantize, add LoRA, chunked loss.

Imported only by the trainer (torch, transformers, peft, bitsandbytes).

Loading, per rank and onto that rank's own device (``cuda:<local_rank>`` or the CPU):

* ``weights: pretrained``: ``from_pretrained`` with ``device_map={"": device}`` so
  every rank loads onto its own GPU (never all onto GPU 0); for qlora a
  ``BitsAndBytesConfig`` built from the spec quantizes tensor by tensor while
  the checkpoint shards stream in.
* ``weights: random``: the model is created on the meta device (no memory), then
  materialized one piece at a time -- embeddings, each decoder layer, final norm,
  lm_head -- with seeded random weights; for qlora each decoder layer's linear
  layers are quantized to 4 bit right after that layer is materialized, so the
  load peak is the already-quantized part plus one layer in ``model.dtype``.
  Same seed on every rank -> identical weights on every rank (data parallel
  needs that; DeepSpeed also broadcasts from rank 0).

Under ZeRO-3 with lora/full (``load_model`` gets the DeepSpeed config) the model
is never whole on a rank: random weights are built inside ``deepspeed.zero.Init``
and initialized one gathered piece at a time with the same seeded values
(``build_random`` given the DeepSpeed config); pretrained weights load through ``HfDeepSpeedConfig``.

qlora under ZeRO-3 is never whole on a rank either, though 4-bit weights cannot be
created inside zero.Init: the model is materialized piece by piece as above (random
weights seeded, or pretrained ones read from the safetensors files, only that piece's
tensors), each decoder layer is quantized on the rank's device, and then the piece is
handed to ZeRO-3 (``_partition_``): each rank keeps 1/world of every parameter -- the
packed 4-bit weights included, which is why their storage dtype must equal the param
dtype (a bf16 tensor of packed nibbles) -- and frees the rest before the next piece.
The bitsandbytes quant state (absmax, codes; small) is not a parameter: it stays whole
on every rank, and gathering a weight only swaps its packed data.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from orchestrator.catalog import FAMILIES
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import JobSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


class ModelError(OrchError):
    """A user-facing problem loading the model (one line)."""

    code = Exit.BAD_SPEC


@dataclass
class LoadedModel:
    """What `load_model` returns."""

    model: nn.Module
    """The causal LM (a PEFT model for qlora/lora)."""
    base: nn.Module
    """The underlying HF ``*ForCausalLM`` (its ``.model`` and ``.lm_head`` are used by the chunked loss)."""
    quantized_modules: int
    """How many linear layers are 4-bit (0 unless qlora)."""
    attention: str
    """The attention kernel the model runs (transformers' ``config._attn_implementation``: the spec's
    value, auto resolved for this device by ``attn_implementation``)."""
    zero3_config: object = None
    """The HfDeepSpeedConfig that made transformers load partitioned (pretrained under ZeRO-3);
    kept referenced because transformers only holds a weak reference to it."""


# ---------------------------------------------------------------------------
# config and attention


def hf_config(job: JobSpec):
    """The transformers config of the model trained: a preset's shape, or the folder's
    config.json (local or cached); for a multimodal gemma3 config, its text decoder's."""
    from transformers import AutoConfig

    folder = job.model.folder()
    if folder is None:
        cfg = job.shape().to_hf_config()
        model_type = cfg.pop("model_type")
        cfg.pop("architectures", None)
        return AutoConfig.for_model(model_type, **cfg)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if job.shape().multimodal:
        # Only the decoder is built (the spec allows random weights only for such a folder).
        config = config.text_config
    return config


def attn_implementation(job: JobSpec) -> str:
    """The attention kernel on this process's device: ``levers.attention`` (auto resolved as the
    planner resolves it, for CUDA or the CPU), checked against what is installed.

    flash_attention_2 needs the flash-attn package, a CUDA device and bf16/fp16
    (the spec already rejects fp32). flex_attention needs a GPU: PyTorch has no
    CPU backward for it.
    """
    from orchestrator import levers

    impl = levers.attention(job, job.shape(), cuda=torch.cuda.is_available())
    if impl == "flex_attention" and not torch.cuda.is_available():
        raise ModelError("model.attn_implementation: flex_attention trains only on a GPU (PyTorch has no CPU backward "
                         "for it); use sdpa or auto on the CPU")
    if impl == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise ModelError("model.attn_implementation: flash_attention_2 needs the flash-attn package (pip install flash-attn); or use sdpa")
        if not torch.cuda.is_available():
            raise ModelError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    return impl


def bnb_settings(job: JobSpec, sharded: bool) -> dict:
    """4-bit settings from the spec. ``sharded``: ZeRO-3 partitions the weights."""
    q = job.quantization
    storage = q.storage_for(sharded)
    if sharded and storage != job.model.dtype:
        # ZeRO-3 flattens and partitions params per dtype group next to the
        # model.dtype params; a uint8 (or other) storage would be cast/corrupted.
        raise ModelError(
            f"quantization.storage_dtype: ZeRO-3 shards the 4-bit weights, so the storage dtype must equal "
            f"model.dtype ({job.model.dtype}), got {storage}"
        )
    return {
        "quant_type": q.type,
        "compress_statistics": q.double_quant,
        "compute_dtype": torch_dtype(q.compute_dtype),
        "quant_storage": torch_dtype(storage),
        "blocksize": q.block_size,
    }


def bnb_config(job: JobSpec, sharded: bool):
    from transformers import BitsAndBytesConfig

    s = bnb_settings(job, sharded)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=s["quant_type"],
        bnb_4bit_use_double_quant=s["compress_statistics"],
        bnb_4bit_compute_dtype=s["compute_dtype"],
        bnb_4bit_quant_storage=s["quant_storage"],
        llm_int8_skip_modules=list(job.quantization.skip_modules),
    )


# ---------------------------------------------------------------------------
# random weights, layer by layer


@dataclass(frozen=True)
class InitRule:
    """How a family's freshly materialized pieces are initialized (HF's ``_init_weights`` rule)."""

    std: float
    """Normal std of linear and embedding weights (config.initializer_range)."""
    norm_weight: float
    """RMSNorm weights: 1, or 0 for Gemma's zero-centred norms (applied as 1 + w)."""
    embed_scale: float
    """Value of Gemma's non-persistent embedding multiplier buffer, sqrt(hidden_size), which
    a meta-device build leaves uninitialized (unused by families without it)."""


def init_rule(config) -> InitRule:
    family = FAMILIES.get(config.model_type)
    return InitRule(std=getattr(config, "initializer_range", 0.02),
                    norm_weight=0.0 if family is not None and family.offset_norm else 1.0,
                    embed_scale=config.hidden_size ** 0.5)


def _init_module_(module: nn.Module, rule: InitRule, gen: torch.Generator) -> None:
    """Seeded init of the weights of one materialized piece (the family's init rule)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.data.normal_(0.0, rule.std, generator=gen)
            if sub.bias is not None:
                sub.bias.data.zero_()
        elif isinstance(sub, nn.Embedding):
            sub.weight.data.normal_(0.0, rule.std, generator=gen)
            if sub.padding_idx is not None:  # HF zeroes the padding row (Gemma, Phi-3 have one)
                sub.weight.data[sub.padding_idx].zero_()
            _fill_embed_scale_(sub, rule)
        else:
            for name, p in sub.named_parameters(recurse=False):
                if name == "weight" and p.dim() == 1:  # RMSNorm
                    p.data.fill_(rule.norm_weight)
                else:
                    p.data.zero_()


def _fill_embed_scale_(embedding: nn.Module, rule: InitRule) -> None:
    """Gemma's scaled embedding: its multiplier is a non-persistent buffer (in no checkpoint), which a
    meta-device build leaves uninitialized; its dtype rounds it as HF's does. Other embeddings have none."""
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.fill_(getattr(embedding, "scalar_embed_scale", rule.embed_scale))


def _no_init_weights():
    """transformers' context that skips its weight init (transformers.initialization since 5.0;
    modeling_utils before)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _rebuild_rotary_(inner: nn.Module, device: torch.device) -> None:
    """Re-create the decoder's rotary embeddings on ``device``: their frequencies are
    non-persistent buffers computed from the config, which a meta-device build leaves empty.
    Every ``*RotaryEmbedding`` child is rebuilt from its own config, so Gemma-3's local and
    global RoPE (one module in transformers 5, or rotary_emb and rotary_emb_local before) come
    back with their own bases."""
    for name, child in list(inner.named_children()):
        if "RotaryEmbedding" in type(child).__name__:
            with torch.device(device):
                setattr(inner, name, type(child)(config=child.config))


def _quantize_linears_(layer: nn.Module, settings: dict, skip: list[str], device: torch.device) -> int:
    """Swap every nn.Linear in ``layer`` (not named in ``skip``) for a bitsandbytes Linear4bit.

    The fp weight is quantized on ``device`` and then dropped, so only one
    layer exists in full precision at any time. Returns how many were swapped.
    """
    import bitsandbytes as bnb

    swapped = 0
    for parent_name, parent in list(layer.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or isinstance(child, bnb.nn.Linear4bit):
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if any(s == child_name or full.endswith(s) for s in skip):
                continue
            q = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=settings["compute_dtype"], compress_statistics=settings["compress_statistics"],
                quant_type=settings["quant_type"], quant_storage=settings["quant_storage"], device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, quant_type=settings["quant_type"],
                compress_statistics=settings["compress_statistics"], quant_storage=settings["quant_storage"],
                blocksize=settings["blocksize"],
            )
            q.weight = weight.to(device)  # .to() on an unquantized Params4bit quantizes it
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
            swapped += 1
    return swapped


class _Matmul4bitKeepingParameter(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul (same kernels, same numbers) that keeps the *parameter* for the
    backward pass, through save_for_backward, instead of a view of its data in a ctx attribute as
    bitsandbytes' MatMul4Bit does.

    Why: ZeRO-3 frees a gathered weight by swapping the parameter's ``.data``. The view pinned the
    gathered 4-bit weight of every layer until that layer's backward, and activation checkpointing
    could not drop it (a ctx attribute bypasses the saved-tensor hooks), so every rank held the whole
    4-bit model, gathered, once more at the end of the forward (measured on an H100, 2026-11-24, one
    GPU under ZeRO-3 with parameter offload: 8B 10.8 GiB against a predicted 4.8, 70B 72.1 against
    8.9; benchmarks/results/device/h100-call16). The parameter itself is what DeepSpeed re-gathers
    before the backward (or the checkpoint recomputes), as its own ZeRO-3 linear does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        import bitsandbytes as bnb

        quant_state = weight.quant_state
        ctx.quant_state = quant_state
        ctx.save_for_backward(weight)
        return bnb.matmul_4bit(x, weight, bias=bias, quant_state=quant_state)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        import bitsandbytes.functional as BF

        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ BF.dequantize_4bit(weight.view(-1, 1), ctx.quant_state).to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def _forward_keeping_parameter(self, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward for training (no inference-only CPU repacking: keep_portable_cpu_4bit_) over
    _Matmul4bitKeepingParameter."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)  # as Linear4bit.forward: a weight that lost its quant_state
    dtype = x.dtype
    compute = self.compute_dtype or dtype
    bias = None if self.bias is None else self.bias.to(compute)
    return _Matmul4bitKeepingParameter.apply(x.to(compute), self.weight, bias).to(dtype)


def keep_4bit_parameters_for_backward_(model: nn.Module) -> int:
    """Make every bitsandbytes 4-bit layer of ``model`` keep its parameter, not a view of the
    gathered data, for backward (_Matmul4bitKeepingParameter); returns how many. For ZeRO-3."""
    import types

    changed = 0
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.forward = types.MethodType(_forward_keeping_parameter, m)
            changed += 1
    return changed


def keep_portable_cpu_4bit_(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer on its portable CPU code path, whatever the CPU.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 rewrites a Linear4bit's weight *in place*
    into a packed inference layout the first time it runs in eval mode without grad
    (``Linear4bit.forward``, gated by ``support_avx512bf16_for_cpu`` read at construction).
    That layout needs out_features divisible by 32, and once converted the weight no longer
    dequantizes to the trained values, so a training step after an eval pass would use
    garbage. orch trains and evaluates the same modules, so the switch stays off; on a GPU
    the flag is never read.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def check_cpu_4bit_shapes(model: nn.Module, block_size: int) -> None:
    """Refuse 4-bit layers that bitsandbytes' native CPU kernels dequantize wrongly.

    bitsandbytes 0.50.2's CPU ``dequantize_4bit`` reads the packed weight row by row and is
    only right when every row (in_features elements) is a whole number of quantization
    blocks: a (64, 176) weight with blocks of 64 came back with 26 % relative error instead
    of NF4's ~9 % (seen on an AMD EPYC with AVX512-BF16, 2026-11-24). Real models' widths are
    multiples of 64; the check catches odd test or custom shapes before they train on
    wrong weights. CUDA kernels have no such limit, so only CPU runs are checked.
    """
    for name, m in model.named_modules():
        if type(m).__name__ == "Linear4bit" and m.in_features % block_size:
            raise ModelError(
                f"quantization.block_size: on the CPU, bitsandbytes dequantizes 4-bit weights correctly only when "
                f"in_features is a multiple of the block size ({name}: in_features {m.in_features}, block {block_size}); "
                "use method lora here, or train on a GPU")


@dataclass(frozen=True)
class Piece:
    """One part of the model that is materialized (and, under ZeRO-3, partitioned) at a time."""

    name: str
    """Its module path in the model ('model.embed_tokens', 'model.layers.3', 'model.norm', 'lm_head'):
    the prefix of its tensors in a Hugging Face checkpoint."""
    module: nn.Module
    """The module itself."""
    is_layer: bool
    """A decoder layer: its linears are the ones qlora quantizes."""


def model_pieces(model: nn.Module, config) -> list[Piece]:
    """The pieces in build order: embedding, each decoder layer, final norm, lm_head (unless tied to the
    embedding). Piece i of this list is seeded by (seed, i) in a random build."""
    inner = model.model
    names = {id(m): n for n, m in model.named_modules()}
    modules = [(inner.embed_tokens, False)] + [(layer, True) for layer in inner.layers] + [(inner.norm, False)]
    if not getattr(config, "tie_word_embeddings", False):
        modules.append((model.lm_head, False))
    return [Piece(names[id(m)], m, is_layer) for m, is_layer in modules]


@dataclass
class LiveTensorBytes:
    """Bytes of live CPU tensors at chosen moments of the load, above what lived before it.

    The CPU has no allocator counter (torch.cuda.max_memory_allocated's role on a GPU), so the
    by-piece build samples this where the memory model puts its peaks: each piece whole before
    ZeRO-3 partitions it (a decoder layer with its originals and its 4-bit weights), and the end of
    the build. A sample walks the garbage collector's objects and adds the storage bytes of every
    CPU tensor once (views and shared storages count once). Transients between two samples (a
    partition being copied, a tensor read from disk) are not seen.
    """

    baseline: int
    """Bytes of live CPU tensors when the load began."""
    peak: int = 0
    """The largest sample so far, minus the baseline."""

    @classmethod
    def start(cls) -> "LiveTensorBytes":
        return cls(baseline=live_cpu_tensor_bytes())

    def sample(self) -> None:
        self.peak = max(self.peak, live_cpu_tensor_bytes() - self.baseline)


def live_cpu_tensor_bytes() -> int:
    """Storage bytes of every CPU tensor the garbage collector can reach, each storage once."""
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some module proxies answer with a warning
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu" or obj.is_sparse:
            continue
        try:
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except RuntimeError:  # a FakeTensor or FunctionalTensor left by torch.compile: no memory of its own
            continue
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


def _meta_model(job: JobSpec, config) -> nn.Module:
    """The model with every parameter on the meta device (no storage), in model.dtype."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(job.model.dtype),
                                                attn_implementation=attn_implementation(job))


def _partition_(piece: nn.Module, ds_config: dict, first: Optional[nn.Parameter]) -> nn.Parameter:
    """Hand ``piece``'s parameters to ZeRO-3: each rank keeps its 1/world partition (on its device, or
    in host RAM / NVMe with parameter offload) and frees the whole tensor. Returns ``first``.

    The first piece makes the load's one ``deepspeed.zero.Init(module=...)``, which reads the config's
    offload device and swapper; later pieces go through that same object, reached from a parameter it
    converted (``convert_to_zero_parameters``, what deepspeed.initialize does with parameters added
    after the model was partitioned, as LoRA's are): one NVMe swapper, not one per piece. Every rank
    built the same values; DeepSpeed broadcasts rank 0's anyway. A bitsandbytes Params4bit stays what
    it is: only its ``.data`` (the packed bytes) is partitioned, its quant_state stays whole.
    """
    import deepspeed

    params = list(piece.parameters())
    if first is None:
        deepspeed.zero.Init(module=piece, config_dict_or_path=ds_config)
        return params[0]
    first.convert_to_zero_parameters(params)
    return first


def _materialize_by_piece(job: JobSpec, model: nn.Module, config, device: torch.device,
                          fill: Callable[[int, Piece], None], quant: Optional[dict], ds_config: Optional[dict],
                          probe: Optional[LiveTensorBytes]) -> int:
    """Give every piece of a meta-device ``model`` storage on ``device`` in turn, write its values
    (``fill(index, piece)``), quantize a decoder layer's linears (qlora), and with ``ds_config``
    partition the piece (ZeRO-3) before the next one. Returns how many linears are 4-bit.

    So a rank holds what earlier pieces left (whole pieces, or their partitions and quant states)
    plus one piece in model.dtype and, while a layer is quantized, its 4-bit weights
    (memory.build_peak_bytes counts exactly these).
    """
    skip = list(job.quantization.skip_modules)
    first: Optional[nn.Parameter] = None
    quantized = 0
    for index, piece in enumerate(model_pieces(model, config)):
        piece.module.to_empty(device=device)
        fill(index, piece)
        # _quantize_linears_ holds every original linear of the layer until it returns, so its peak is
        # its last moment; holding the originals here until the sample makes that moment observable.
        originals = list(piece.module.parameters())
        if quant is not None and piece.is_layer:
            quantized += _quantize_linears_(piece.module, quant, skip, device)
        if probe is not None:
            probe.sample()
        del originals
        if ds_config is not None:
            first = _partition_(piece.module, ds_config, first)
    return quantized


def _finish_build(model: nn.Module, config, device: torch.device, quant: Optional[dict]) -> None:
    """What a by-piece build leaves to do: tie the head to the embedding, rebuild the rotary
    frequencies on ``device``, mark a 4-bit model as such for PEFT and HF."""
    inner = model.model
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = inner.embed_tokens.weight
    _rebuild_rotary_(inner, device)
    if quant is not None:
        # What PEFT and HF look at to treat the model as a 4-bit one.
        model.is_loaded_in_4bit = True
        keep_portable_cpu_4bit_(model)


def build_random(job: JobSpec, config, device: torch.device, quant: Optional[dict], seed: int,
                 ds_config: Optional[dict] = None, probe: Optional[LiveTensorBytes] = None) -> tuple[nn.Module, int]:
    """Build the model from ``config`` with random weights, one piece at a time; returns it and its 4-bit count.

    The pieces are the embedding, each decoder layer, the final norm and the lm_head
    (unless tied; ``model_pieces``). Piece i is initialized by ``_init_module_`` (the family's init
    rule) from a generator seeded by (seed, i), so every rank, every world size and every way of
    building below gets the same values.

    * Without ``ds_config``, or with it for qlora (``quant``), the model is created on the meta
      device (no storage); each piece is given storage on ``device`` (``to_empty``), initialized,
      its decoder-layer linears quantized (qlora), and with ``ds_config`` partitioned by ZeRO-3,
      before the next piece is built (``_materialize_by_piece``).
    * With ``ds_config`` for lora/full it is created inside ``deepspeed.zero.Init``,
      so every parameter is split across ranks as its module is constructed and no rank
      ever holds the whole model. Each piece is gathered alone (``GatheredParameters``),
      rank 0 writes the values and DeepSpeed re-partitions it from rank 0's copy.
      transformers' own init is skipped (``_no_init_weights``).

    ``probe`` (CPU runs) samples the live tensor bytes at each piece's peak.
    """
    from transformers import AutoModelForCausalLM

    rule = init_rule(config)
    gen_device = device if device.type == "cuda" else torch.device("cpu")

    def generator(index: int) -> torch.Generator:
        return torch.Generator(device=gen_device).manual_seed(seed * 100_003 + index)

    if ds_config is None or quant is not None:
        model = _meta_model(job, config)
        quantized = _materialize_by_piece(job, model, config, device,
                                          lambda index, piece: _init_module_(piece.module, rule, generator(index)),
                                          quant, ds_config, probe)
        _finish_build(model, config, device, quant)
        return model, quantized

    import deepspeed
    import torch.distributed as dist
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    # Import the model's module before zero.Init patches torch.Tensor's constructor: transformers
    # imports it lazily, and Gemma's module pulls in torch._dynamo, which fails under the patch.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # dtype=None on purpose: zero.Init then takes it from the config (bf16/fp16/else fp32), which
    # matches model.dtype. An explicit dtype is ignored on accelerators without fp16 (the CPU):
    # DeepSpeed 0.19's _set_dtype falls back to bf16 there, silently rounding fp32 weights.
    # transformers' own init is skipped, as its from_pretrained does under ZeRO-3: it would run on
    # empty local shards (Gemma's zeroing of the padding row indexes one and fails), and every
    # piece is written below anyway.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=None), _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(job.model.dtype),
                                                 attn_implementation=attn_implementation(job))
    rank = dist.get_rank() if dist.is_initialized() else 0
    for index, piece in enumerate(model_pieces(model, config)):
        with deepspeed.zero.GatheredParameters(list(piece.module.parameters()), modifier_rank=0):
            if rank == 0:
                _init_module_(piece.module, rule, generator(index))
    _finish_build(model, config, device, None)
    return model, 0


# ---------------------------------------------------------------------------
# pretrained weights, layer by layer (qlora under ZeRO-3)


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` that holds it (from the shard index, or the
    single ``model.safetensors``). Only headers are read."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model.name: cannot read the shard index {index}: {exc}") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {name: single for name in f.keys()}
    raise ModelError(f"model.name: {folder} has no model.safetensors or model.safetensors.index.json; QLoRA under "
                     "ZeRO-3 reads the weights layer by layer from safetensors (save the model with "
                     "save_pretrained(..., safe_serialization=True)), or choose a strategy without ZeRO-3")


def _read_piece_(piece: Piece, files: dict[str, Path], rule: InitRule) -> None:
    """Copy the checkpoint tensors of ``piece`` (named ``<piece.name>.<param>``) into its parameters,
    opening only the files that hold them; each tensor is read to host memory and cast into the
    parameter on its device, so the device never holds more than the piece."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, param in piece.module.named_parameters():
        key = f"{piece.name}.{name}"
        if key not in files:
            raise ModelError(f"model.name: the checkpoint has no tensor {key} (a Hugging Face {type(piece.module).__name__} "
                             "parameter); QLoRA under ZeRO-3 reads the tensors by their transformers names")
        by_file.setdefault(files[key], []).append((key, param))
    for file, wanted in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key, param in wanted:
                tensor = f.get_tensor(key)
                if tensor.shape != param.shape:
                    raise ModelError(f"model.name: {file.name}: {key} has shape {tuple(tensor.shape)}, the model "
                                     f"config gives {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor)
    for sub in piece.module.modules():
        _fill_embed_scale_(sub, rule)


def load_pretrained_by_piece(job: JobSpec, config, device: torch.device, quant: Optional[dict],
                             ds_config: Optional[dict] = None,
                             probe: Optional[LiveTensorBytes] = None) -> tuple[nn.Module, int]:
    """Load the folder's pretrained weights one piece at a time (as ``build_random`` builds them): each
    piece's tensors are read from the safetensors files, its decoder linears quantized (``quant``), and
    with ``ds_config`` the piece is partitioned by ZeRO-3 before the next is read. Tied embeddings are
    read once (the head is tied after the build); ``quantization.skip_modules`` stay in model.dtype.
    Returns the model and its 4-bit count."""
    files = checkpoint_files(job.model.folder())
    rule = init_rule(config)
    model = _meta_model(job, config)
    quantized = _materialize_by_piece(job, model, config, device, lambda index, piece: _read_piece_(piece, files, rule),
                                      quant, ds_config, probe)
    _finish_build(model, config, device, quant)
    return model, quantized


# ---------------------------------------------------------------------------
# the whole load


def load_model(job: JobSpec, strategy: str, device: torch.device, seed: int,
               ds_config: Optional[dict] = None, probe: Optional[LiveTensorBytes] = None) -> LoadedModel:
    """Load/build the model on ``device``, quantize (qlora), add LoRA (qlora/lora) or unfreeze (full).

    ``ds_config``: the DeepSpeed config the trainer will initialize with. Under
    ZeRO-3 it is used to build/load the model already partitioned: lora/full inside
    zero.Init (random) or through HfDeepSpeedConfig (pretrained); qlora piece by piece,
    each piece quantized and then partitioned (random, or read from safetensors).
    ``probe`` (CPU runs) samples the live tensor bytes at the build's peaks and at its end.
    """
    from orchestrator.strategy import STRATEGIES

    sharded = STRATEGIES[strategy].sharded
    partitioned_load = sharded and ds_config is not None
    config = hf_config(job)
    quant = bnb_settings(job, sharded) if job.method == "qlora" else None
    keep_alive = None
    if job.model.weights == "random":
        model, nquant = build_random(job, config, device, quant, seed, ds_config if partitioned_load else None, probe)
    elif partitioned_load and quant is not None:
        model, nquant = load_pretrained_by_piece(job, config, device, quant, ds_config, probe)
    elif partitioned_load:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        # While this object lives, transformers sees ZeRO-3 enabled and loads each checkpoint
        # tensor straight into partitioned params (no device_map: DeepSpeed places the shards).
        keep_alive = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(
            str(job.model.folder()), dtype=torch_dtype(job.model.dtype), attn_implementation=attn_implementation(job),
            local_files_only=True)
        nquant = 0
    else:
        from transformers import AutoModelForCausalLM

        kwargs: dict = dict(dtype=torch_dtype(job.model.dtype), attn_implementation=attn_implementation(job),
                            # this rank's GPU by index (never "auto", which would spread or pile onto GPU 0)
                            device_map={"": device.index if device.type == "cuda" else "cpu"}, local_files_only=True)
        if quant is not None:
            kwargs["quantization_config"] = bnb_config(job, sharded)
        model = AutoModelForCausalLM.from_pretrained(str(job.model.folder()), **kwargs)
        nquant = count_4bit(model)
        keep_portable_cpu_4bit_(model)
    if nquant and device.type == "cpu":
        check_cpu_4bit_shapes(model, job.quantization.block_size)
    if nquant and sharded:  # ZeRO-3 gathers and frees the 4-bit weights: let it free them
        keep_4bit_parameters_for_backward_(model)
    base = model
    model.config.use_cache = False
    if job.training.gradient_checkpointing:
        set_checkpointing(model, True)
    if job.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora(job, model)
    if probe is not None:
        probe.sample()  # the end of the build: PEFT's adapters are whole until deepspeed.initialize
    return LoadedModel(model=model, base=base, quantized_modules=nquant, attention=base.config._attn_implementation,
                       zero3_config=keep_alive)


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation checkpointing of every decoder layer of the HF ``model`` on or off.

    Non-reentrant checkpointing: works with frozen inputs (no enable_input_require_grads hack),
    with ZeRO-3 hooks and with kwargs. transformers >= 5.2x renamed the methods
    activation_checkpointing_enable/disable; 5.17 (GPU image) has the gradient_checkpointing_* names.
    """
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def count_4bit(model: nn.Module) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def lora_target_names(model: nn.Module, job: JobSpec) -> list[str]:
    """Leaf names of the linear layers inside the decoder blocks ('all-linear'), or the spec's list."""
    if job.lora.target_modules != "all-linear":
        return list(job.lora.target_modules)
    names = set()
    for layer in model.model.layers:
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit":
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def add_lora(job: JobSpec, model: nn.Module) -> nn.Module:
    """Freeze the base and add LoRA adapters in model.dtype.

    This is PEFT's ``prepare_model_for_kbit_training`` minus its upcast of every
    non-4-bit weight to fp32 (embeddings and lm_head in fp32 would cost 2x their
    memory): DeepSpeed keeps fp32 master copies of the trainable LoRA weights
    anyway, and layer norms compute in fp32 internally.
    """
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    lcfg = LoraConfig(
        r=job.lora.r, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout,
        target_modules=lora_target_names(model, job), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lcfg, autocast_adapter_dtype=False)
    dtype = torch_dtype(job.model.dtype)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return peft_model


# ---------------------------------------------------------------------------
# loss


class CausalLMLoss(nn.Module):
    """The module DeepSpeed wraps: decoder forward + chunked LM head and cross-entropy.

    ``forward`` returns the *sum* of token losses of the micro batch times
    ``scale`` (the trainer passes scale = grad_accum x world / tokens in the
    optimizer step, so after DeepSpeed's 1/grad_accum and the data-parallel
    average the gradient is that of sum(loss) / all loss tokens of the step --
    the same for any number of processes).

    The LM head runs on ``chunk_tokens`` tokens at a time, each chunk under
    non-reentrant activation checkpointing, so the fp32 logits of the whole
    vocabulary exist for one chunk only (forward and backward). chunk_tokens=0
    computes all logits at once.
    """

    def __init__(self, model: nn.Module, base: nn.Module, chunk_tokens: int):
        super().__init__()
        self.lm = model
        self._base = [base]  # a list: not registered twice as a submodule
        self.chunk_tokens = chunk_tokens
        # Gemma-2 caps its output logits (tanh(z / cap) * cap) before the loss; without it the
        # loss and gradients would be those of another model.
        self.softcap = float(getattr(base.config, "final_logit_softcapping", None) or 0.0)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        base = self._base[0]
        # No attention_mask: with packed rows transformers derives the
        # per-example (block-diagonal causal) mask from position_ids restarting
        # at 0 -- varlen flash attention, or a 4D mask for sdpa/eager.
        hidden = base.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        flat_targets = targets.reshape(-1)
        n = hidden.shape[0]
        chunk = self.chunk_tokens if self.chunk_tokens > 0 else n
        head = base.lm_head
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], flat_targets[start:start + chunk]
            if self.chunk_tokens > 0 and torch.is_grad_enabled():
                part = torch.utils.checkpoint.checkpoint(_chunk_loss, head, h, t, self.softcap, use_reentrant=False)
            else:
                part = _chunk_loss(head, h, t, self.softcap)
            total = total + part
        return total * scale


def _chunk_loss(head: nn.Module, h: torch.Tensor, t: torch.Tensor, softcap: float) -> torch.Tensor:
    logits = head(h)
    if softcap:
        # In the head's dtype and before the fp32 upcast, in the order the HF model applies it.
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits.float(), t, ignore_index=-100, reduction="sum")

