"""Speed levers for the trainer, and what each one changes in memory.

Imported only by the trainer (torch). Three levers, each an option in the spec:

``training.engine`` (auto | deepspeed | plain)
    `orchestrator.engine.PlainEngine` instead of DeepSpeed's engine on one device
    (auto: wherever it can run -- single_gpu in bf16 or fp32). Its memory per
    trainable parameter is tabulated in that module's docstring: the same
    persistent state as DeepSpeed stage 0 (weights, gradients, fp32 masters,
    fp32 Adam moments), but 4 (bf16) / 0 (fp32) bytes of step temporaries
    instead of DeepSpeed's 10 / 4.

``training.compile`` (auto | true | false)
    `compile_decoder_layers`: ``torch.compile`` of every decoder layer in place
    (regional compilation; auto: on for CUDA without ZeRO-3, off on the CPU,
    where inductor compiles slowly and buys little). Measured on an H100 (issue 16): up to 1.33x
    for QLoRA 8B.

``model.attn_implementation: flex_attention``
    Packed rows without a dense mask. transformers sees ``position_ids``
    restarting at 0 (orch's packed rows, ``orchestrator/data.py``) and, with
    ``flex_attention``, builds a BlockMask whose mask_mod allows query q to see
    key k only when both belong to the same example and k <= q
    (``masking_utils.find_packed_sequence_indices`` + ``create_causal_mask``;
    the same path in transformers 5.17, the GPU image, and 5.23, the CPU one).
    Measured on an H100 (issue 16): packed rows 7,453 tok/s with flex vs 6,500
    with sdpa's dense mask (7,228 for unpacked causal rows). PyTorch has no CPU
    backward for flex attention, so orch refuses it on the CPU
    (``modeling.attn_implementation``).

Why regional and per instance
-----------------------------
Each layer gets ``torch.compile(layer._call_impl, fullgraph=True)``, which is
``layer.compile(fullgraph=True)`` (nn.Module.compile) plus a wrapper that turns
dynamo's failures into one line. All layers run the same Python code, and
dynamo keys its cache on the code object, so the first layer's graph serves
all of them (checked: one cache entry for all layers, `check_compiled`);
compiling the whole model instead would also trace the mask construction and
the chunked loss. Compiling the class's forward instead
(``LlamaDecoderLayer.forward = torch.compile(...)``) would compile the same
frame under the same guards -- so no fewer recompiles (believed, not measured)
-- but patch transformers for every model in the process; per instance
touches only this model. (dynamo skips nn.Module._call_impl, a torch file, and
compiles the frame it calls: the layer class's forward, where `check_compiled`
looks for compiled code.)

Gradient checkpointing composes differently in the two transformers versions:
5.17's GradientCheckpointingLayer overrides ``__call__``, so the eager
checkpoint wraps the compiled call; 5.23 wraps ``forward`` at class creation,
so dynamo traces ``torch.utils.checkpoint`` into the graph (a
tag_activation_checkpoint region that AOTAutograd recomputes entirely). Both
keep only the layer input between forward and backward. The CPU tests run 5.23.

No silent fallback to eager
---------------------------
``fullgraph=True``: a graph break inside a layer raises at the first forward
instead of splitting the layer into eagerly-run pieces, and hitting the
recompile limit raises too (dynamo raises FailOnRecompileLimitHit for a
fullgraph frame). The wrapper turns both into a `CompileError` naming
training.compile. What raises nothing is a layer that dynamo never compiled
(TORCHDYNAMO_DISABLE=1, a ``torch.compiler`` stance forcing eager, a frame
dynamo chose to skip): `check_compiled`, called after the first optimizer
step, finds no compiled code for the layer's forward and raises.

The recompile limit is set explicitly (`RECOMPILE_LIMIT`): one graph per
distinct input signature of a layer is expected -- packed rows give a mask,
rows of one example each give none (2), and dynamo recompiles once with
dynamic sizes if a shape changes (orch's shapes are fixed: micro batch x
seq_len) -- so 8 (dynamo's default) leaves room; a run that needs more is
recompiling every step, which is the slow case to stop.

Memory changes (for orchestrator/memory.py)
-------------------------------------------
Verified here on the CPU: compiled layers give the same loss and gradients as
eager (tests/test_speedups.py); flex attention's packed-row output equals each
example run alone and sdpa's masked output (tests/test_packing_attention.py).
The byte figures below are read from the kernels and transformers' code, not
measured on a GPU (issue 16's probe saw peaks of 13.73-13.75 GiB for all of
sdpa, flex and compiled at QLoRA 8B, micro batch 4, seq 2048, with
checkpointing: these changes are small next to the 4-bit weights there).

* flex_attention, per forward: no micro_batch x seq_len^2 mask
  (``memory.attention_mask_bytes``: 4 MiB per row at seq 2048 for sdpa); the
  BlockMask holds int32 block counts and indices, forward and transposed,
  about 4 x micro_batch x (seq_len/128)^2 x 4 bytes (4 KiB per row at 2048),
  plus the int64 example ids and position_ids (16 bytes per token).
* flex_attention, per layer per token (what backward keeps): q, k, v, output
  and the fp32 logsumexp per head, as for sdpa, but without the additive mask
  sdpa rebuilds and saves per call (model dtype x seq_len per token), and with
  k and v at the key/value width (``enable_gqa``) when the number of query
  heads is a power of two (Llama 3 8B/70B: 32/64 heads, 8 kv heads: 2 x d x
  (q_dim - kv_dim) per token less than memory.py's expanded k/v); other head
  counts (Qwen2.5 7B: 28) are expanded with repeat_kv as sdpa's masked path
  does. The backward kernel works block by block: no seq_len^2 scratch.
* compiled layers, with checkpointing: unchanged kept activations (the layer
  inputs). The transient of the layer being recomputed is what AOTAutograd's
  partitioner saves instead of what eager autograd saves: it recomputes
  fusible pointwise work (RMSNorm's fp32 copies, SiLU and the gate product,
  RoPE) in the backward instead of saving it, so the transient is at most
  eager's (believed; not measured). Without checkpointing the same applies to
  every layer's saved activations. Inductor keeps no persistent device
  workspace in the default mode (no CUDA graphs); the compiler itself costs
  host RAM (hundreds of MiB) while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import CodeType
from typing import Sequence, Union

import torch
from torch import nn

from orchestrator import levers
from orchestrator.errors import Exit, OrchError

RECOMPILE_LIMIT = 8
"""Compiled variants allowed per decoder-layer code object (see the module docstring)."""


class CompileError(OrchError):
    """Compiled decoder layers fell back, or would fall back, to eager (one line)."""

    code = Exit.TRAIN_FAILED


def compile_wanted(setting: Union[str, bool], device: torch.device, zero_stage: int) -> bool:
    """``training.compile`` resolved for ``device`` (``levers.compile_wanted``: auto compiles on CUDA
    unless ZeRO-3 partitions the parameters; the planner's memory and speed models use the same rule)."""
    return levers.compile_wanted(setting, device.type == "cuda", zero_stage)


@dataclass(frozen=True)
class CompiledLayers:
    """What `compile_decoder_layers` compiled."""

    layer_type: type
    """The decoder layer class (e.g. LlamaDecoderLayer)."""
    count: int
    """How many layers were compiled."""
    code: CodeType
    """The frame dynamo compiles for them: the layer class's forward (transformers' checkpointing wrapper in 5.2x)."""
    recompile_limit: int
    """torch._dynamo's recompile limit set for the run."""


def compile_decoder_layers(layers: Sequence[nn.Module], recompile_limit: int = RECOMPILE_LIMIT,
                           backend: str = "inductor") -> CompiledLayers:
    """Compile every layer in ``layers`` in place (fullgraph), sharing one compiled graph.

    Sets torch._dynamo's process-wide recompile limit to ``recompile_limit``.
    ``backend`` is inductor for training; tests of the fallback checks use
    "eager", which runs dynamo's tracing and guards without generating code.
    """
    if not layers:
        raise CompileError("training.compile: the model has no decoder layers to compile")
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        names = ", ".join(sorted(k.__name__ for k in kinds))
        raise CompileError(f"training.compile: decoder layers of several classes ({names}); set training.compile=false")
    torch._dynamo.config.recompile_limit = recompile_limit
    for index, layer in enumerate(layers):
        layer._compiled_call_impl = _guarded(torch.compile(layer._call_impl, fullgraph=True, backend=backend), index)
    layer_type = kinds.pop()
    return CompiledLayers(layer_type=layer_type, count=len(layers), code=layer_type.forward.__code__,
                          recompile_limit=recompile_limit)


def _guarded(compiled, index: int):
    """``compiled`` with dynamo's failures (graph break, recompile limit) turned into a one-line CompileError."""
    limit_hit = torch._dynamo.exc.FailOnRecompileLimitHit

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except limit_hit as exc:
            raise CompileError(
                f"training.compile: decoder layer {index} needed more than {torch._dynamo.config.recompile_limit} "
                "compiled variants (torch._dynamo's recompile limit): its inputs keep changing; "
                "set training.compile=false") from exc
        except torch._dynamo.exc.TorchDynamoException as exc:
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise CompileError(f"training.compile: decoder layer {index} cannot run compiled "
                               f"({type(exc).__name__}: {first[:300]}); set training.compile=false") from exc

    return call


def compiled_variants(compiled: CompiledLayers) -> int:
    """How many compiled graphs dynamo holds for the layers' forward (0: it never compiled them)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(compiled.code))


def check_compiled(compiled: CompiledLayers) -> int:
    """Raise CompileError if the layers ran without compiled code; call after the first optimizer step.

    Returns the number of compiled variants (1 for a run whose micro batches all look alike).
    """
    variants = compiled_variants(compiled)
    if variants == 0:
        raise CompileError(
            f"training.compile: the {compiled.count} {compiled.layer_type.__name__} layers ran without compiled code "
            "(torch.compile was disabled or skipped them, e.g. TORCHDYNAMO_DISABLE=1); "
            "set training.compile=false to run them eagerly on purpose")
    return variants
