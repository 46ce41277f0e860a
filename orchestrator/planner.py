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

from orchestrator import memory
from orchestrator.catalog import GIB, ModelShape
from orchestrator.deepspeed_config import ZERO_STAGE, offload_devices
from orchestrator.spec import STRATEGIES, JobSpec, SpecError, with_overrides

GPU_HEADROOM = 0.05
"""Fraction of GPU memory kept free beyond the estimate's total (which already has allocator slack and
CUDA/NCCL context): covers what the model does not see (lazy NCCL/cuDNN allocations, other processes)."""
HOST_HEADROOM = 0.10
"""Fraction of host RAM kept free for the OS, page cache and data loading."""

LABELS = {
    "single_gpu": "single",
    "zero2": "zero2",
    "zero3": "zero3",
    "zero3_offload_optimizer": "z3+optCPU",
    "zero3_offload_all": "z3+allCPU",
    "zero3_offload_optimizer_nvme": "z3+optNVMe",
    "zero3_offload_all_nvme": "z3+allNVMe",
}
"""Short column names for the table (10 characters at most)."""


@dataclass(frozen=True)
class SpeedModel:
    """Constants of the relative speed model (only the ranking matters, not absolute numbers)."""

    mfu: float = 0.21
    """Achieved fraction of the GPU's dense bf16 peak (by this model's FLOP count). Measured with orch's
    trainer on one H100, single_gpu, seq 2048: 0.19-0.24 for QLoRA/LoRA 8B and full 1B
    (benchmarks/results/device/h100-call3 and h100-call4, 2026-11-23)."""
    qlora_compute_factor: float = 1.25
    """Extra compute time of 4-bit layers (dequantize before every matmul, forward and backward)."""
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


class NoFitError(Exception):
    """No strategy fits the job on its hardware (the message says what to change)."""


@dataclass
class Candidate:
    """One strategy evaluated for a job."""

    strategy: str
    """Strategy name (spec.STRATEGIES)."""
    estimate: memory.MemoryEstimate
    """Its memory estimate."""
    fits: bool
    """True when GPU total and host RAM fit with headroom."""
    tokens_per_s: float
    """Predicted training throughput of the whole job (speed model), for ranking."""
    reason: str
    """One line: why it fits or does not."""


@dataclass
class Plan:
    """The planner's answer."""

    chosen: Optional[str]
    """The strategy to use, or None when nothing fits."""
    candidates: list[Candidate] = field(default_factory=list)
    """Every valid strategy, in STRATEGIES order."""
    reason: str = ""
    """One sentence: why this strategy (or why none)."""
    suggestion: str = ""
    """When nothing fits: the cheapest change that makes something fit; when something does and fewer
    nodes would do, that hint."""


# ---------------------------------------------------------------------------
# Valid strategies


def valid_strategies(job: JobSpec) -> list[str]:
    """Strategies that make sense for the method and hardware.

    single_gpu only on one GPU. Plain ZeRO-2/3 on one GPU shard nothing, so
    they are offered only with more than one; the offload variants are offered
    on one GPU too (they move optimizer states or params to the host, useful for
    full finetunes). NVMe variants need hardware.nvme_path. qlora under ZeRO-3
    needs the packed storage dtype to equal model.dtype (the trainer refuses
    otherwise).
    """
    world = job.hardware.world_size
    out = []
    for s in STRATEGIES:
        if s == "single_gpu" and world != 1:
            continue
        if s in ("zero2", "zero3") and world == 1:
            continue
        if s.endswith("_nvme") and not job.hardware.nvme_path:
            continue
        if job.method == "qlora" and ZERO_STAGE[s] == 3 and job.quantization.storage_for(True) != job.model.dtype:
            continue
        out.append(s)
    return out


# ---------------------------------------------------------------------------
# Speed model


def step_seconds(job: JobSpec, strategy: str, shape: ModelShape, speed: SpeedModel = SPEED) -> float:
    """Predicted seconds per optimizer step: compute + exposed communication + offload traffic."""
    hw, t = job.hardware, job.training
    world = hw.world_size
    d = memory.DTYPE_BYTES[job.model.dtype]
    counts = memory.param_counts(job, shape)
    n = counts.total
    tokens_per_gpu = t.global_batch_size * job.data.seq_len / world
    # Forward 2N flops/token; backward 2N for input grads + 2N for weight grads of trained weights;
    # checkpointing repeats the forward. Attention scores: 4*L*seq*q per token forward.
    attn = 4 * shape.num_hidden_layers * job.data.seq_len * shape.q_dim
    fwd = 2 * n + attn
    bwd = 2 * n + 2 * attn + 2 * counts.trainable
    flops = fwd + bwd + (fwd if t.gradient_checkpointing else 0)
    compute = flops * tokens_per_gpu / (hw.gpu_tflops() * 1e12 * speed.mfu)
    if job.method == "qlora":
        compute *= speed.qlora_compute_factor

    stage = ZERO_STAGE[strategy]
    micro_steps = job.grad_accum()
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
    opt_dev, param_dev = offload_devices(strategy)
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
    est = memory.estimate(job, strategy, shape=shape)
    gpu_ok = est.total <= gpu_budget(job)
    host_ok = est.cpu_bytes <= host_budget(job)
    if not gpu_ok:
        what = "load peak" if est.load_peak > est.peak_allocated else "training peak"
        reason = f"needs {_gib(est.total)} per GPU ({what}), over the {_gib(gpu_budget(job))} usable"
    elif not host_ok:
        reason = f"needs {_gib(est.cpu_bytes)} host RAM per node, over the {_gib(host_budget(job))} usable"
    else:
        reason = f"fits: {_gib(est.total)} of {_gib(gpu_budget(job))} per GPU"
    return Candidate(strategy, est, gpu_ok and host_ok, tokens_per_second(job, strategy, shape), reason)


def _candidates(job: JobSpec, shape: ModelShape) -> list[Candidate]:
    return [evaluate(job, s, shape) for s in valid_strategies(job)]


def _best(cands: list[Candidate]) -> Optional[Candidate]:
    fitting = [c for c in cands if c.fits]
    return max(fitting, key=lambda c: c.tokens_per_s) if fitting else None


def plan(job: JobSpec) -> Plan:
    """Evaluate every valid strategy and choose (job.strategy if forced, else the fastest that fits)."""
    shape = job.shape()
    cands = _candidates(job, shape)
    if job.strategy != "auto":
        forced = next((c for c in cands if c.strategy == job.strategy), None)
        if forced is None:
            forced = evaluate(job, job.strategy, shape)
            cands.append(forced)
        if forced.fits:
            return Plan(job.strategy, cands, f"{job.strategy} was set in the spec and fits ({forced.reason.removeprefix('fits: ')}).")
        return Plan(None, cands, f"{job.strategy} was set in the spec but {forced.reason}.", suggest(job, shape))
    best = _best(cands)
    if best is None:
        return Plan(None, cands, "No strategy fits: " + "; ".join(f"{c.strategy} {c.reason}" for c in cands[:2]) + ".",
                    suggest(job, shape))
    others = [c for c in cands if c is not best]
    faster = [c for c in others if c.tokens_per_s > best.tokens_per_s]
    if faster:
        f = max(faster, key=lambda c: c.tokens_per_s)
        why = f"{best.strategy} is the fastest that fits ({best.estimate.total / GIB:.1f} of {gpu_budget(job) / GIB:.1f} GiB " \
              f"per GPU); the faster {f.strategy} {f.reason}."
    else:
        why = f"{best.strategy} is the fastest valid strategy and fits ({best.estimate.total / GIB:.1f} of " \
              f"{gpu_budget(job) / GIB:.1f} GiB per GPU)."
    return Plan(best.strategy, cands, why, fewer_nodes_hint(job, shape))


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
    """What `orch plan` would choose for ``job`` (its forced strategy, or the fastest that fits), or None."""
    if job.strategy == "auto":
        return _best(_candidates(job, shape))
    forced = evaluate(job, job.strategy, shape)
    return forced if forced.fits else None


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


def resolve_strategy(job: JobSpec) -> str:
    """job.strategy if set, else the planner's choice. Raises NoFitError when auto finds nothing."""
    if job.strategy != "auto":
        return job.strategy
    result = plan(job)
    if result.chosen is None:
        raise NoFitError(f"{result.reason} {result.suggestion}".strip())
    return result.chosen


# ---------------------------------------------------------------------------
# Output


def _r(n: int) -> float:
    return round(n / GIB, 3)


def plan_json(job: JobSpec, result: Plan) -> dict:
    """The plan as one JSON-able dict (GiB floats; per-GPU unless named per node)."""
    return {
        "job": job.name,
        "chosen": result.chosen,
        "reason": result.reason,
        "suggestion": result.suggestion or None,
        "gpu_budget_gib": _r(gpu_budget(job)),
        "candidates": [
            {
                "strategy": c.strategy,
                "fits": c.fits,
                "gpu_gib": _r(c.estimate.peak_allocated),
                "gpu_total_gib": _r(c.estimate.total),
                "load_gib": _r(c.estimate.load_peak),
                "cpu_gib": _r(c.estimate.cpu_bytes),
                "nvme_gib": _r(c.estimate.nvme_bytes),
                "tokens_per_s": round(c.tokens_per_s, 1),
                "phase": c.estimate.phase,
                "breakdown": {k: _r(v) for k, v in c.estimate.breakdown.items()},
                "reason": c.reason,
            }
            for c in result.candidates
        ],
    }


def render_table(job: JobSpec, result: Plan) -> str:
    """Components x strategies in GiB (one decimal), fits row, chosen marked; fits in 100 columns."""
    cands = result.candidates
    hw = job.hardware
    width = 11
    gpu = "GPU" if hw.gpu_memory_gb is not None else hw.gpu
    lines = [
        f"{job.name}: {job.method}, {job.model.name}, {hw.nodes} node(s) x {hw.gpus_per_node} {gpu} "
        f"({hw.gpu_memory_bytes() / GIB:.1f} GiB, {gpu_budget(job) / GIB:.1f} usable)",
        f"micro batch {job.training.micro_batch_size} x {job.data.seq_len} tokens, checkpointing "
        f"{'on' if job.training.gradient_checkpointing else 'off'}, loss chunk {job.training.loss_chunk_tokens or 'off'}",
        "",
    ]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<20}" + "".join(f"{c:>{width}}" for c in cells)

    lines.append(row("GiB per GPU", [("*" if c.strategy == result.chosen else "") + LABELS[c.strategy] for c in cands]))
    for comp in memory.COMPONENTS:
        values = [c.estimate.breakdown.get(comp, 0) for c in cands]
        if any(v >= GIB // 20 for v in values):
            lines.append(row(comp, [f"{v / GIB:.1f}" for v in values]))
    lines.append(row("= peak allocated", [f"{c.estimate.peak_allocated / GIB:.1f}" for c in cands]))
    lines.append(row("load peak", [f"{c.estimate.load_peak / GIB:.1f}" for c in cands]))
    lines.append(row("total (+slack, ctx)", [f"{c.estimate.total / GIB:.1f}" for c in cands]))
    lines.append(row("host RAM per node", [f"{c.estimate.cpu_bytes / GIB:.0f}" for c in cands]))
    if any(c.estimate.nvme_bytes for c in cands):
        lines.append(row("NVMe per node", [f"{c.estimate.nvme_bytes / GIB:.0f}" for c in cands]))
    lines.append(row("fits", ["yes" if c.fits else "no" for c in cands]))
    lines.append(row("rel. speed", [f"{c.tokens_per_s / max(x.tokens_per_s for x in cands):.2f}" for c in cands]))
    lines.append("")
    if result.chosen:
        lines.append(textwrap.fill(f"chosen: {result.chosen} (*). {result.reason}", 100, subsequent_indent="  "))
        if result.suggestion:
            lines.append(textwrap.fill(f"note: {result.suggestion}", 100, subsequent_indent="  "))
    else:
        lines.append(textwrap.fill(f"NO FIT. {result.reason}", 100, subsequent_indent="  "))
        if result.suggestion:
            lines.append(textwrap.fill(f"suggestion: {result.suggestion}", 100, subsequent_indent="  "))
    return "\n".join(lines)
