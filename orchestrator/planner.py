"""The planner: which strategies are valid, which fit, which is fastest.

`plan(job)` estimates memory for every strategy valid for the job's method and
hardware (orchestrator.memory), drops those that do not fit with headroom, and
picks the fastest by a small explicit speed model (compute + communication +
offload traffic, constants in :class:`SpeedModel`), so "ZeRO-2 beats ZeRO-3"
and "offload is slowest" come out of the arithmetic instead of a fixed order.
When nothing fits it searches the cheapest change that makes something fit.

Pure and import-light: no torch, so `orch plan` answers in well under a second.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Optional

from orchestrator import levers, memory
from orchestrator.catalog import GIB, ModelShape
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import JobSpec, SpecError, with_overrides
from orchestrator.strategy import STRATEGIES

GPU_HEADROOM = 0.05
"""Fraction of GPU memory kept free beyond the estimate's total (which already has allocator slack and
CUDA/NCCL context): covers what the model does not see (lazy NCCL/cuDNN allocations, other processes)."""
HOST_HEADROOM = 0.10
"""Fraction of host RAM kept free for the OS, page cache and data loading."""


@dataclass(frozen=True)
class SpeedModel:
    """Every constant of the speed model, in one place (``python benchmarks/speed_fit.py`` re-fits them).

    One micro step on one GPU (``micro_step_seconds``) is matmul FLOPs at ``peak_mfu`` (weights)
    or ``attention_mfu`` (attention) of the GPU's dense bf16 peak, plus memory traffic at
    ``hbm_bytes_per_s`` (activations, and for qlora the dequantization of every 4-bit weight in
    every pass), plus a fixed launch overhead per decoder layer per pass. The fixed part does not
    shrink with the micro batch -- the GPU waits for Python and kernel launches, and bitsandbytes
    dequantizes each weight once per pass whatever the batch -- so small micro batches lose, and
    the achieved MFU rises with the micro batch towards its ceiling. Checkpointing adds a forward
    (FLOPs, traffic, a pass of overhead, a dequantization) and saves memory. The micro-batch and
    checkpointing search (``plan``) ranks its combinations by this model.

    The levers (``levers.resolve``: what the trainer uses for the strategy on the job's GPUs) pick
    the constants: eager layers use seconds_per_layer_pass and activation_moves, compiled layers
    compiled_seconds_per_layer_pass and compiled_activation_moves; sdpa and eager attention run
    at attention_mfu, flex attention at flex_attention_mfu.

    Fitted by ``python benchmarks/speed_fit.py`` (least squares on relative step time; each run is
    predicted with the levers it ran with, so each path's constants come from that path's runs):

    * eager layers, sdpa (DeepSpeed's engine): attention_mfu and seconds_per_layer_pass on the
      steady-state runs of benchmarks/results/throughput.json (QLoRA 8B micro batch 1 and 4, LoRA
      8B micro batch 1, seq 2048, checkpointing), the five "calibration" rows of the memory-accuracy
      runs (benchmarks/results/device/h100-call{1,2,3}: QLoRA 1B micro batch 4, QLoRA 8B seq 2048
      and seq 4096 without checkpointing, QLoRA 70B seq 1024, LoRA 8B micro batch 2) and h100-call5's
      q4-ds-eager (QLoRA 8B micro batch 4): median |error| 6.1 % over those 9, worst 34 % (QLoRA 1B,
      measured slower than predicted);
    * compiled layers, flex attention (PlainEngine): flex_attention_mfu and
      compiled_seconds_per_layer_pass on h100-call5's q4-flex and q1-flex (QLoRA 8B micro batch 4
      and 1, seq 2048, checkpointing; two runs, two constants: exact), with compiled_activation_moves
      assumed.

    Checked on runs it was not fitted on: h100-call5's l1-flex (LoRA 8B micro batch 1, compiled,
    flex): -15 % (measured 7,834 tok/s, predicted 6,630: QLoRA's extra time over LoRA on this path,
    0.069 s per micro step measured, is more than the 0.021 s of dequantization traffic the model
    charges, so LoRA comes out too slow); the seven "held_out" memory-accuracy rows and
    benchmarks/results/device/h100-call4 (single_gpu and ZeRO-3 offload, QLoRA and LoRA 8B, eager
    sdpa): median 12.6 % over all 14, worst 38 % (the eager-attention row). The same QLoRA 8B
    micro batch 1 job measured 2,716-3,404 tok/s and LoRA 8B micro batch 1 3,476-4,501 in
    different runs, so 15-25 % is run-to-run noise on that machine. Every run so far has gradient
    accumulation 1, so the per-step cost (seconds_per_step) cannot be told from the per-micro-step
    one yet and is 0; benchmarks/knob_grid.py measures micro batch x checkpointing grids at a fixed
    global batch, which separate them (``--fields ...,seconds_per_step``).
    """

    peak_mfu: float = 0.7
    """Fraction of the dense bf16 peak the weight matmuls reach when launch overhead is amortized.
    Not fitted: cuBLAS reaches about 0.65-0.75 on H100 at these shapes, and the runs so far fit
    equally well with any value from 0.5 to 0.8 (the other terms absorb it)."""
    attention_mfu: float = 0.197
    """Fraction of the dense bf16 peak the attention kernels reach (fitted): packed rows give sdpa a
    block mask, which moves it from the flash kernel to the slower memory-efficient one."""
    flex_attention_mfu: float = 0.796
    """The same for flex_attention (``levers.attention``), on the same full-square FLOP count
    (flops_per_token), although flex skips the blocks outside the packed examples' mask: so this
    is an effective rate, and it depends on the examples' lengths (fitted)."""
    seconds_per_step: float = 0.0
    """Fixed cost per optimizer step: the engine's step, gradient clipping and the optimizer over
    every trainable tensor. 0 until a run with gradient accumulation > 1 tells it apart from the
    per-micro-step overhead (see above); it never changes the knob ranking at a fixed global batch."""
    seconds_per_layer_pass: float = 0.00307
    """Fixed cost per decoder layer per pass unit (forward 1, recompute 1, backward 2: backward
    launches grad-input and grad-weight kernels): Python, autograd and kernel launches of the
    layer's norms, attention, MLP and LoRA modules, which do not grow with the micro batch (fitted)."""
    compiled_seconds_per_layer_pass: float = 0.00112
    """The same for compiled decoder layers (``levers.compiled``: one graph per layer, pointwise
    work fused, fewer launches). The engine has no term of its own: on one GPU PlainEngine comes
    with compiled layers, and DeepSpeed stage 0's overhead per micro step (issue 16's probe: 6 %
    at QLoRA 8B micro batch 4) is inside each path's fitted per-layer-pass constant (fitted)."""
    hbm_bytes_per_s: float = 2.5e12
    """Achieved GPU memory bandwidth of elementwise and dequantize kernels (H100 SXM HBM3: 3.35 TB/s
    peak, about 75 %). One value for every GPU: only its ratio to the FLOP time matters for ranking."""
    activation_moves: float = 4.0
    """Times each byte a layer saves for backward crosses HBM: written in forward, read in backward,
    and its gradient written and read once; checkpointing writes it once more in the recompute."""
    compiled_activation_moves: float = 2.0
    """The same for compiled decoder layers: a fused kernel reads a saved tensor where eager ran
    several elementwise kernels over it and its gradient, so only the write in forward and the read
    in backward are left (assumed, not fitted: the QLoRA 8B runs on this path cannot tell it apart
    from flex_attention_mfu, both being per-token costs at one sequence length)."""
    dequant_bytes_per_param: float = 2.5
    """bitsandbytes dequantizes a 4-bit weight per matmul: reads 0.5 B packed, writes 2 B bf16."""
    intra_node_bytes_per_s: float = 150e9
    """Effective per-GPU collective bandwidth over NVLink (H100 NVLink4 ~ 450 GB/s peak, ~1/3 achieved in NCCL rings)."""
    inter_node_bytes_per_s: float = 20e9
    """Effective per-GPU bandwidth across nodes (400 Gb/s InfiniBand per GPU, ~40% achieved)."""
    comm_overlap: float = 0.5
    """Fraction of communication hidden behind compute (overlap_comm, ZeRO-3 prefetch)."""
    pcie_bytes_per_s: float = 20e9
    """Effective host<->GPU copy bandwidth per GPU (PCIe Gen5 x16 with pinned memory, shared directions)."""
    cpu_adam_params_per_s_per_node: float = 2e9
    """DeepSpeedCPUAdam update rate per node (AVX-512, all cores): parameters per second."""
    nvme_bytes_per_s_per_node: float = 3e9
    """Sustained NVMe read/write bandwidth per node (one PCIe Gen4 drive)."""
    zero3_seconds_per_layer_pass: float = 0.015
    """ZeRO-3's per-module fetch/release bookkeeping, independent of bytes moved: seconds per decoder
    layer per pass (forward, backward, and the checkpointing recompute). Measured on one H100
    (benchmarks/results/device/h100-call4, 2026-11-23): zero3_offload_optimizer cost 1.3 s (LoRA 8B)
    and 1.6 s (QLoRA 8B) more per micro step than single_gpu, with only ~0.03 s of offload traffic:
    1.3-1.6 s / (32 layers x 3 passes)."""


SPEED = SpeedModel()


class NoFitError(OrchError):
    """No strategy fits the job on its hardware (the message says what to change)."""

    code = Exit.NO_FIT


@dataclass
class Candidate:
    """One strategy evaluated for a job."""

    strategy: str
    """Strategy name (a key of strategy.STRATEGIES)."""
    estimate: memory.MemoryEstimate
    """Its memory estimate."""
    fits: bool
    """True when GPU total and host RAM fit with headroom."""
    tokens_per_s: float
    """Predicted training throughput of the whole job (speed model), for ranking."""
    reason: str
    """One line: why it fits or does not."""
    micro_batch_size: int
    """The micro batch it was evaluated with: the spec's, or the planner's pick when the spec says auto."""
    gradient_checkpointing: bool
    """Checkpointing it was evaluated with: the spec's, or the planner's pick when the spec says auto."""
    levers: levers.Levers
    """Engine, compiled layers and attention kernel the trainer will use for it on the job's GPUs."""


@dataclass
class Plan:
    """The planner's answer."""

    chosen: Optional[str]
    """The strategy to use, or None when nothing fits."""
    candidates: list[Candidate] = field(default_factory=list)
    """Every valid strategy, in STRATEGIES order, each with its best knobs (the fastest that fit,
    else the ones needing the least GPU memory)."""
    reason: str = ""
    """One sentence: why this strategy (or why none)."""
    suggestion: str = ""
    """When nothing fits: the cheapest change that makes something fit; when something does and fewer
    nodes would do, that hint."""
    runner_up: Optional[Candidate] = None
    """The fastest fitting combination of another strategy or checkpointing setting than the chosen
    one (None when there is none): what the choice won against."""


# ---------------------------------------------------------------------------
# Valid strategies


def valid_strategies(job: JobSpec, keep_zero_stage: Optional[int] = None) -> list[str]:
    """Strategies that make sense for the method and hardware.

    ``keep_zero_stage``: only that ZeRO stage's strategies, plain ZeRO-2/3 on one GPU
    included (a ``--resume`` loads a checkpoint only into the stage that wrote it:
    checkpoint.check_resumable).

    single_gpu only on one GPU. Plain ZeRO-2/3 on one GPU shard nothing, so
    they are offered only with more than one; the offload variants are offered
    on one GPU too (they move optimizer states or params to the host, useful for
    full finetunes). NVMe variants need hardware.nvme_path. qlora under ZeRO-3
    needs the packed storage dtype to equal model.dtype (the trainer refuses
    otherwise). training.engine plain keeps the strategies PlainEngine runs.
    """
    world = job.hardware.world_size
    out = []
    for s in STRATEGIES.values():
        if keep_zero_stage is not None and s.zero_stage != keep_zero_stage:
            continue
        if s.name == "single_gpu" and world != 1:
            continue
        if s.name in ("zero2", "zero3") and world == 1 and keep_zero_stage is None:
            continue
        if s.needs_nvme and not job.hardware.nvme_path:
            continue
        if job.method == "qlora" and s.sharded and job.quantization.storage_for(True) != job.model.dtype:
            continue
        if job.training.engine == "plain" and levers.EngineFacts.of_job(job, s.name).unsupported_reason():
            continue
        out.append(s.name)
    return out


# ---------------------------------------------------------------------------
# Speed model


def flops_per_token(job: JobSpec, shape: ModelShape) -> tuple[int, int]:
    """(weight-matmul FLOPs, attention FLOPs) per token of one forward + backward, as the speed model
    counts them (the throughput benchmark's MFU uses the same count).

    Forward 2 per weight (decoder linears, LoRA A/B, LM head) and 4 x layers x seq x heads*head_dim
    for the attention scores and weighted sum (the full square: packed rows carry a block mask, no
    causal skipping); backward computes input gradients (as much again, attention twice) and weight
    gradients of trained weights only (2 each); the checkpointing recompute repeats the decoder
    forward, and the chunked loss always recomputes the LM head.
    """
    t, data = job.training, job.data
    ckpt = bool(t.gradient_checkpointing)
    counts = memory.param_counts(job, shape)
    head = shape.vocab_size * shape.hidden_size
    attn = 4 * shape.num_hidden_layers * data.seq_len * shape.q_dim
    weights_fwd = 2 * counts.linear + 2 * counts.lora
    weights = weights_fwd + 2 * head + 2 * counts.linear + 2 * head + 4 * counts.lora  # forward + backward
    if job.method == "full":
        weights += 2 * counts.linear + 2 * head
    weights += (weights_fwd if ckpt else 0) + (2 * head if t.loss_chunk_tokens else 0)
    attention = attn + 2 * attn + (attn if ckpt else 0)
    return weights, attention


def micro_step_seconds(job: JobSpec, strategy: str, shape: ModelShape, speed: SpeedModel = SPEED) -> float:
    """Predicted seconds of one forward + backward of one micro batch on one GPU (no communication),
    with the levers the trainer uses for ``strategy`` on the job's GPUs (``levers.resolve``).

    FLOPs per token (``flops_per_token``): weight FLOPs run at peak_mfu, attention FLOPs at
    attention_mfu (flex_attention_mfu for flex attention). Memory traffic: each layer's saved
    activations cross HBM activation_moves times (+1 with checkpointing), and qlora dequantizes
    every 4-bit weight in each pass. Fixed: a launch overhead per layer per pass unit
    (compiled_seconds_per_layer_pass for compiled layers).
    """
    t, data = job.training, job.data
    ckpt = bool(t.gradient_checkpointing)
    tokens = t.micro_batch_size * data.seq_len
    layers = shape.num_hidden_layers
    used = levers.resolve(job, strategy, shape)
    attention_mfu = speed.flex_attention_mfu if used.attention == "flex_attention" else speed.attention_mfu
    per_layer_pass = speed.compiled_seconds_per_layer_pass if used.compile else speed.seconds_per_layer_pass
    weights, attention = flops_per_token(job, shape)
    peak = job.hardware.gpu_tflops() * 1e12
    seconds = tokens * (weights / (peak * speed.peak_mfu) + attention / (peak * attention_mfu))
    saved = memory.layer_activation_bytes(job, shape, tokens, data.seq_len) * layers
    moves = speed.compiled_activation_moves if used.compile else speed.activation_moves
    traffic = saved * (moves + (1 if ckpt else 0))
    if job.method == "qlora":
        _, packed, _ = memory.base_weight_bytes(job, shape, "uint8")  # 2 params per byte
        traffic += (3 if ckpt else 2) * 2 * packed * speed.dequant_bytes_per_param
    seconds += traffic / speed.hbm_bytes_per_s
    return seconds + (4 if ckpt else 3) * layers * per_layer_pass


def step_seconds(job: JobSpec, strategy: str, shape: ModelShape, speed: SpeedModel = SPEED) -> float:
    """Predicted seconds per optimizer step: micro steps + exposed communication + offload traffic."""
    hw, t = job.hardware, job.training
    world = hw.world_size
    d = memory.DTYPE_BYTES[job.model.dtype]
    counts = memory.param_counts(job, shape)
    # = grad_accum() for a valid job; a fraction for the hardware variants suggest() explores
    # (more GPUs than the global batch has sequences), where an integer would make the step free
    micro_steps = t.global_batch_size / (t.micro_batch_size * world)
    compute = micro_steps * micro_step_seconds(job, strategy, shape, speed) + speed.seconds_per_step

    stage = STRATEGIES[strategy].zero_stage
    ring = (world - 1) / world if world > 1 else 0.0
    bw = speed.inter_node_bytes_per_s if hw.nodes > 1 else speed.intra_node_bytes_per_s
    dense, packed, _ = memory.base_weight_bytes(job, shape, job.quantization.storage_for(stage == 3))
    model_bytes = dense + packed + counts.lora * d
    grad_bytes = counts.trainable * d
    comm = 0.0
    if stage == 2:
        comm = (micro_steps * grad_bytes + grad_bytes) * ring  # reduce-scatter per micro step, allgather after step
    elif stage == 3:
        comm = micro_steps * (2 * model_bytes + grad_bytes) * ring  # gather fwd + bwd, reduce-scatter grads
    exposed = comm / bw * (1 - speed.comm_overlap)
    if stage == 3:
        passes = 3 if t.gradient_checkpointing else 2
        exposed += micro_steps * passes * shape.num_hidden_layers * speed.zero3_seconds_per_layer_pass

    offload = 0.0
    opt_dev, param_dev = STRATEGIES[strategy].optimizer_offload, STRATEGIES[strategy].param_offload
    shard = counts.trainable / world
    ranks = hw.gpus_per_node
    if opt_dev != "none":
        offload += shard * (memory.FP32 + d) / speed.pcie_bytes_per_s  # grads down, updated params up
        offload += shard * ranks / speed.cpu_adam_params_per_s_per_node
    if opt_dev == "nvme":
        offload += 2 * shard * 12 * ranks / speed.nvme_bytes_per_s_per_node  # read + write master and moments
    if param_dev != "none":
        offload += micro_steps * 2 * model_bytes / world / speed.pcie_bytes_per_s
    if param_dev == "nvme":
        offload += micro_steps * 2 * model_bytes / world * ranks / speed.nvme_bytes_per_s_per_node
    return compute + exposed + offload


def tokens_per_second(job: JobSpec, strategy: str, shape: ModelShape, speed: SpeedModel = SPEED) -> float:
    return job.training.global_batch_size * job.data.seq_len / step_seconds(job, strategy, shape, speed)


# ---------------------------------------------------------------------------
# Planning


def gpu_budget(job: JobSpec) -> int:
    """Bytes per GPU an estimate's total may use."""
    return int(job.hardware.gpu_memory_bytes() * (1 - GPU_HEADROOM))


def host_budget(job: JobSpec) -> int:
    return int(job.hardware.host_ram_gb * GIB * (1 - HOST_HEADROOM))


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def evaluate(job: JobSpec, strategy: str, shape: ModelShape) -> Candidate:
    """One strategy with the job's knobs, which must be concrete (no auto: see with_knobs)."""
    est = memory.estimate(job, strategy, shape=shape)
    gpu_ok = est.total <= gpu_budget(job)
    host_ok = est.cpu_bytes <= host_budget(job)
    if not gpu_ok:
        what = max([("training peak", est.peak_allocated), ("load peak", est.load_peak), ("eval peak", est.eval_peak)],
                   key=lambda named: named[1])[0]
        reason = f"needs {_gib(est.total)} per GPU ({what}), over the {_gib(gpu_budget(job))} usable"
    elif not host_ok:
        reason = f"needs {_gib(est.cpu_bytes)} host RAM per node, over the {_gib(host_budget(job))} usable"
    else:
        reason = f"fits: {_gib(est.total)} of {_gib(gpu_budget(job))} per GPU"
    t = job.training
    return Candidate(strategy, est, gpu_ok and host_ok, tokens_per_second(job, strategy, shape), reason,
                     t.micro_batch_size, t.gradient_checkpointing,  # type: ignore[arg-type]
                     levers.resolve(job, strategy, shape))


# ---------------------------------------------------------------------------
# Knobs: micro batch and checkpointing, searched with the strategy where the spec says auto


def micro_batch_choices(job: JobSpec) -> list[int]:
    """The micro batches to try, smallest first: the spec's, or for auto every divisor m of the global
    batch with m x GPUs dividing it (the global batch stays, the accumulation is derived)."""
    t, world = job.training, job.hardware.world_size
    if t.micro_batch_size != "auto":
        return [t.micro_batch_size]
    return [m for m in range(1, t.global_batch_size // world + 1) if t.global_batch_size % (m * world) == 0]


def checkpointing_choices(job: JobSpec) -> list[bool]:
    """The spec's checkpointing, or both settings for auto (off first: faster when it fits)."""
    ckpt = job.training.gradient_checkpointing
    return [False, True] if ckpt == "auto" else [ckpt]  # type: ignore[list-item]


def with_knobs(job: JobSpec, micro_batch_size: int, gradient_checkpointing: bool) -> JobSpec:
    """``job`` with concrete knob values (no re-validation: the values come from the choices above)."""
    knobs = {"micro_batch_size": micro_batch_size, "gradient_checkpointing": gradient_checkpointing}
    return job.model_copy(update={"training": job.training.model_copy(update=knobs)})


def most_frugal(job: JobSpec) -> JobSpec:
    """``job`` with its auto knobs at the least memory they allow: micro batch 1 (or the smallest
    allowed), checkpointing on. For the no-fit search, which then changes the other levers."""
    micros = micro_batch_choices(job) or [1]
    return with_knobs(job, micros[0], checkpointing_choices(job)[-1])


def _search(job: JobSpec, strategy: str, shape: ModelShape) -> list[Candidate]:
    """One strategy with every knob combination worth evaluating.

    Per checkpointing setting the micro batches go up until one does not fit: memory only grows
    with the micro batch (and speed with it, at a fixed global batch), so larger ones cannot fit.
    """
    out = []
    for ckpt in checkpointing_choices(job):
        for micro in micro_batch_choices(job):
            cand = evaluate(with_knobs(job, micro, ckpt), strategy, shape)
            out.append(cand)
            if not cand.fits:
                break
    return out


def _pick(cands: list[Candidate]) -> Candidate:
    """The fastest that fits, else the one needing the least GPU memory (the closest to fitting)."""
    return _best(cands) or min(cands, key=lambda c: (c.estimate.total, -c.tokens_per_s))


def _candidates(job: JobSpec, shape: ModelShape) -> list[Candidate]:
    """Every valid strategy with its best knobs."""
    return [_pick(found) for found in (_search(job, s, shape) for s in valid_strategies(job)) if found]


def _best(cands: list[Candidate]) -> Optional[Candidate]:
    fitting = [c for c in cands if c.fits]
    return max(fitting, key=lambda c: c.tokens_per_s) if fitting else None


def _runner_up(chosen: Candidate, searched: list[Candidate]) -> Optional[Candidate]:
    """The fastest fitting candidate with another strategy or checkpointing setting than ``chosen``;
    when there is none, the fastest other fitting micro batch of the same (a neighbour is the
    least informative alternative, so it comes last)."""
    group = (chosen.strategy, chosen.gradient_checkpointing)
    return (_best([c for c in searched if (c.strategy, c.gradient_checkpointing) != group])
            or _best([c for c in searched if c is not chosen]))


def plan(job: JobSpec, keep_zero_stage: Optional[int] = None) -> Plan:
    """Evaluate every valid strategy (of ``keep_zero_stage`` only, when given: valid_strategies),
    each with its best knobs where the spec says auto, and choose (job.strategy if forced, else the
    fastest that fits)."""
    shape = job.shape()
    searched = {s: _search(job, s, shape) for s in valid_strategies(job, keep_zero_stage)}
    if job.strategy != "auto" and job.strategy not in searched:
        searched[job.strategy] = _search(job, job.strategy, shape)
    searched = {s: found for s, found in searched.items() if found}
    everything = [c for found in searched.values() for c in found]
    cands = [_pick(found) for found in searched.values()]
    if job.strategy != "auto":
        forced = next((c for c in cands if c.strategy == job.strategy), None)
        if forced is not None and forced.fits:
            return Plan(job.strategy, cands, f"{job.strategy} was set in the spec and fits "
                        f"({forced.reason.removeprefix('fits: ')}).",
                        runner_up=_runner_up(forced, [c for c in everything if c.strategy == job.strategy]))
        why = forced.reason if forced is not None else "leaves no micro batch that divides the global batch"
        return Plan(None, cands, f"{job.strategy} was set in the spec but {why}.", suggest(most_frugal(job), shape))
    best = _best(cands)
    if best is None:
        return Plan(None, cands, "No strategy fits: " + "; ".join(f"{c.strategy} {c.reason}" for c in cands[:2]) + ".",
                    suggest(most_frugal(job), shape))
    others = [c for c in cands if c is not best]
    faster = [c for c in others if c.tokens_per_s > best.tokens_per_s]
    if faster:
        f = max(faster, key=lambda c: c.tokens_per_s)
        why = f"{best.strategy} is the fastest that fits ({best.estimate.total / GIB:.1f} of {gpu_budget(job) / GIB:.1f} GiB " \
              f"per GPU); the faster {f.strategy} {f.reason}."
    else:
        why = f"{best.strategy} is the fastest valid strategy and fits ({best.estimate.total / GIB:.1f} of " \
              f"{gpu_budget(job) / GIB:.1f} GiB per GPU)."
    return Plan(best.strategy, cands, why, fewer_nodes_hint(job, shape), _runner_up(best, everything))


def fewer_nodes_hint(job: JobSpec, shape: ModelShape) -> str:
    """When the job also fits on fewer nodes, say so: inter-node links are the slowest part of a step."""
    for nodes in range(1, job.hardware.nodes):
        override = f"hardware.nodes={nodes}"
        smaller = _changed(job, [override])
        best = _fit(smaller, shape) if smaller is not None else None
        if best is not None:
            return (f"it also fits on {nodes} node(s) ({override}, {best.strategy}): fewer nodes "
                    f"avoid inter-node traffic and free the rest")
    return ""


def _changed(job: JobSpec, overrides: list[str]) -> Optional[JobSpec]:
    """``job`` with ``overrides`` applied through the spec's own validation, or None when that is not
    a valid spec (hardware.nodes=4 with a global batch of 2): the planner only prints changes that
    `orch validate JOB OVERRIDES...` accepts."""
    try:
        return with_overrides(job, overrides)
    except SpecError:
        return None


def _fit(job: JobSpec, shape: ModelShape) -> Optional[Candidate]:
    """What `orch plan` would choose for ``job`` (its forced strategy, or the fastest that fits, each
    with its best knobs where the spec says auto), or None."""
    if job.strategy == "auto":
        return _best(_candidates(job, shape))
    return _best(_search(job, job.strategy, shape))


def _levers(job: JobSpec) -> list[list[str]]:
    """Changes to try, as overrides, cheapest lever first; each lever lists its values from mild to strong.

    Chunked loss is free; a smaller micro batch keeps the global batch (more
    accumulation); checkpointing costs ~30% compute; a strategy set in the spec can be
    left to the planner; QLoRA changes the method; more GPUs and nodes cost hardware.
    """
    t, hw = job.training, job.hardware
    levers: list[list[str]] = []
    if t.loss_chunk_tokens == 0:
        levers.append(["training.loss_chunk_tokens=4096"])
    sizes = []
    mb = t.micro_batch_size // 2
    while mb >= 1:
        sizes.append(f"training.micro_batch_size={mb}")
        mb //= 2
    if sizes:
        levers.append(sizes)
    if not t.gradient_checkpointing:
        levers.append(["training.gradient_checkpointing=true"])
    if job.strategy != "auto":
        levers.append(["strategy=auto"])
    if job.method != "qlora":
        levers.append(["method=qlora"])
    gpus = []
    g = hw.gpus_per_node
    while g < 8:
        g *= 2
        gpus.append(f"hardware.gpus_per_node={g}")
    if gpus:
        levers.append(gpus)
    levers.append([f"hardware.nodes={hw.nodes * k}" for k in (2, 4, 8)])
    return levers


def _fit_message(overrides: list[str], changed: JobSpec, best: Candidate) -> str:
    return (f"try {' '.join(overrides)}: then {best.strategy} fits ({best.estimate.total / GIB:.1f} of "
            f"{gpu_budget(changed) / GIB:.1f} GiB per GPU)")


def suggest(job: JobSpec, shape: ModelShape) -> str:
    """The cheapest change that makes the job fit, as overrides the user can paste.

    First every single change on its own, cheapest lever first; if none is
    enough, the levers are combined cumulatively (each lever left at its
    strongest value that still gives a valid spec before the next is added).
    Every change is validated like the spec itself and planned again: a change
    that is not a valid spec, or after which nothing fits, is never printed.
    """
    levers = _levers(job)
    for lever in levers:
        for override in lever:
            changed = _changed(job, [override])
            best = _fit(changed, shape) if changed is not None else None
            if best is not None:
                return _fit_message([override], changed, best)  # type: ignore[arg-type]
    # Combine: leave each lever at its strongest valid value and add the next; once something fits,
    # relax the earlier levers back to their mildest values that still fit.
    chosen: list[tuple[int, int]] = []  # (lever index, value index)

    def overrides(picks: list[tuple[int, int]]) -> list[str]:
        return [levers[li][vi] for li, vi in picks]

    def fit(picks: list[tuple[int, int]]) -> Optional[tuple[JobSpec, Candidate]]:
        changed = _changed(job, overrides(picks))
        best = _fit(changed, shape) if changed is not None else None
        return (changed, best) if best is not None else None  # type: ignore[return-value]

    for li, lever in enumerate(levers):
        for vi in range(len(lever)):
            picks = chosen + [(li, vi)]
            if fit(picks) is None:
                continue
            for k, (lj, vj) in enumerate(picks[:-1]):
                for milder in range(vj):
                    trial = picks[:k] + [(lj, milder)] + picks[k + 1:]
                    if fit(trial) is not None:
                        picks = trial
                        break
            changed, best = fit(picks)  # type: ignore[misc]
            return _fit_message(overrides(picks), changed, best)
        strongest = next((vi for vi in reversed(range(len(lever)))
                          if _changed(job, overrides(chosen + [(li, vi)])) is not None), None)
        if strongest is not None:
            chosen.append((li, strongest))
    return (f"nothing tried fits (micro batch 1, checkpointing, QLoRA and up to 8x the nodes together, as far as "
            f"training.global_batch_size {job.training.global_batch_size} allows): use GPUs with more memory, a larger "
            f"global batch or a smaller model")


def resolve(job: JobSpec, keep_zero_stage: Optional[int] = None) -> tuple[str, JobSpec]:
    """The strategy to run and ``job`` with every auto knob replaced by the planner's choice.

    A forced strategy is returned as is, fitting or not (compile and the trainer do not
    second-guess it); its auto knobs are the fastest that fit it, else the most frugal ones.
    ``keep_zero_stage``: a ``--resume`` continues a checkpoint of that ZeRO stage
    (checkpoint.kept_zero_stage), so strategy auto chooses among that stage's strategies only.
    Raises NoFitError when strategy auto finds nothing that fits.
    """
    if job.strategy != "auto" and job.knobs_resolved():
        return job.strategy, job
    result = plan(job, keep_zero_stage if job.strategy == "auto" else None)
    if result.chosen is None and job.strategy == "auto":
        kept = "" if keep_zero_stage is None else f"--resume keeps the checkpoint's ZeRO stage {keep_zero_stage}: "
        raise NoFitError(f"{kept}{result.reason} {result.suggestion}".strip())
    strategy = result.chosen or job.strategy
    picked = next((c for c in result.candidates if c.strategy == strategy), None)
    if picked is None:
        return strategy, most_frugal(job)
    return strategy, with_knobs(job, picked.micro_batch_size, picked.gradient_checkpointing)


def next_strategy(job: JobSpec, strategy: str) -> Optional[str]:
    """The strategy to try after ``strategy`` ran out of GPU memory: the first later one in the plan's
    order (each later one saves more memory) that fits, else the next valid one; None when ``strategy``
    is the last. The trainer's out-of-memory message names it."""
    cands = plan(job).candidates
    names = [c.strategy for c in cands]
    later = cands[names.index(strategy) + 1:] if strategy in names else []
    fitting = [c.strategy for c in later if c.fits]
    return (fitting or [c.strategy for c in later] or [None])[0]


# ---------------------------------------------------------------------------
# Output


def _r(n: int) -> float:
    return round(n / GIB, 3)


def _candidate_json(c: Candidate) -> dict:
    return {
        "strategy": c.strategy,
        "micro_batch_size": c.micro_batch_size,
        "gradient_checkpointing": c.gradient_checkpointing,
        "fits": c.fits,
        "gpu_gib": _r(c.estimate.peak_allocated),
        "gpu_total_gib": _r(c.estimate.total),
        "load_gib": _r(c.estimate.load_peak),
        "eval_gib": _r(c.estimate.eval_peak),
        "cpu_gib": _r(c.estimate.cpu_bytes),
        "nvme_gib": _r(c.estimate.nvme_bytes),
        "tokens_per_s": round(c.tokens_per_s, 1),
        "engine": c.levers.engine,
        "compile": c.levers.compile,
        "attention": c.levers.attention,
        "phase": c.estimate.phase,
        "breakdown": {k: _r(v) for k, v in c.estimate.breakdown.items()},
        "reason": c.reason,
    }


def plan_json(job: JobSpec, result: Plan) -> dict:
    """The plan as one JSON-able dict (GiB floats; per-GPU unless named per node). Each candidate
    carries the knobs it was evaluated with; ``runner_up`` is what the choice won against."""
    return {
        "job": job.name,
        "chosen": result.chosen,
        "reason": result.reason,
        "suggestion": result.suggestion or None,
        "gpu_budget_gib": _r(gpu_budget(job)),
        "candidates": [_candidate_json(c) for c in result.candidates],
        "runner_up": _candidate_json(result.runner_up) if result.runner_up else None,
    }


def _knobs_text(micro_batch_size: int, gradient_checkpointing: bool) -> str:
    return f"micro batch {micro_batch_size}, checkpointing {'on' if gradient_checkpointing else 'off'}"


def _levers_text(used: levers.Levers) -> str:
    engine = "PlainEngine" if used.engine == "plain" else "DeepSpeed engine"
    return f"{engine}, {'compiled' if used.compile else 'eager'} decoder layers, attention {used.attention}"


def render_table(job: JobSpec, result: Plan) -> str:
    """Components x strategies in GiB (one decimal), fits row, chosen marked; fits in 100 columns."""
    cands = result.candidates
    hw = job.hardware
    width = 11
    gpu = "GPU" if hw.gpu_memory_gb is not None else hw.gpu
    t = job.training
    ckpt = t.gradient_checkpointing if t.gradient_checkpointing == "auto" else ("on" if t.gradient_checkpointing else "off")
    lines = [
        f"{job.name}: {job.method}, {job.model.name}, {hw.nodes} node(s) x {hw.gpus_per_node} {gpu} "
        f"({hw.gpu_memory_bytes() / GIB:.1f} GiB, {gpu_budget(job) / GIB:.1f} usable)",
        f"micro batch {t.micro_batch_size} x {job.data.seq_len} tokens"
        + (f" (global batch {t.global_batch_size})" if t.micro_batch_size == "auto" else "")
        + f", checkpointing {ckpt}, loss chunk {t.loss_chunk_tokens or 'off'}",
        "",
    ]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<20}" + "".join(f"{c:>{width}}" for c in cells)

    lines.append(row("GiB per GPU", [("*" if c.strategy == result.chosen else "") + STRATEGIES[c.strategy].label for c in cands]))
    if not job.knobs_resolved():  # each strategy with its own best knobs
        lines.append(row("micro batch", [str(c.micro_batch_size) for c in cands]))
        lines.append(row("checkpointing", ["on" if c.gradient_checkpointing else "off" for c in cands]))
    for comp in memory.COMPONENTS:
        values = [c.estimate.breakdown.get(comp, 0) for c in cands]
        if any(v >= GIB // 20 for v in values):
            lines.append(row(comp, [f"{v / GIB:.1f}" for v in values]))
    lines.append(row("= peak allocated", [f"{c.estimate.peak_allocated / GIB:.1f}" for c in cands]))
    lines.append(row("load peak", [f"{c.estimate.load_peak / GIB:.1f}" for c in cands]))
    if job.data.has_eval():
        lines.append(row("eval peak", [f"{c.estimate.eval_peak / GIB:.1f}" for c in cands]))
    lines.append(row("total (+slack, ctx)", [f"{c.estimate.total / GIB:.1f}" for c in cands]))
    lines.append(row("host RAM per node", [f"{c.estimate.cpu_bytes / GIB:.0f}" for c in cands]))
    if any(c.estimate.nvme_bytes for c in cands):
        lines.append(row("NVMe per node", [f"{c.estimate.nvme_bytes / GIB:.0f}" for c in cands]))
    lines.append(row("fits", ["yes" if c.fits else "no" for c in cands]))
    lines.append(row("rel. speed", [f"{c.tokens_per_s / max(x.tokens_per_s for x in cands):.2f}" for c in cands]))
    lines.append("")
    if result.chosen:
        lines.append(textwrap.fill(f"chosen: {result.chosen} (*). {result.reason}", 100, subsequent_indent="  "))
        chosen = next(c for c in cands if c.strategy == result.chosen)
        lines.append(f"levers: {_levers_text(chosen.levers)}")
        if not job.knobs_resolved():
            lines.append(f"knobs: {_knobs_text(chosen.micro_batch_size, chosen.gradient_checkpointing)} "
                         f"(accumulation {t.global_batch_size // (chosen.micro_batch_size * hw.world_size)}): "
                         f"{chosen.tokens_per_s:,.0f} tok/s predicted, {chosen.estimate.total / GIB:.1f} GiB")
        r = result.runner_up
        if r is not None:
            lines.append(textwrap.fill(
                f"runner-up: {r.strategy}, {_knobs_text(r.micro_batch_size, r.gradient_checkpointing)}: "
                f"{r.tokens_per_s:,.0f} tok/s predicted ({r.tokens_per_s / chosen.tokens_per_s:.2f}x), "
                f"{r.estimate.total / GIB:.1f} GiB", 100, subsequent_indent="  "))
        if result.suggestion:
            lines.append(textwrap.fill(f"note: {result.suggestion}", 100, subsequent_indent="  "))
    else:
        lines.append(textwrap.fill(f"NO FIT. {result.reason}", 100, subsequent_indent="  "))
        if result.suggestion:
            lines.append(textwrap.fill(f"suggestion: {result.suggestion}", 100, subsequent_indent="  "))
    return "\n".join(lines)
