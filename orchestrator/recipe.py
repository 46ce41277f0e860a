"""The training recipe: what every rank runs, top to bottom (`recipe`).

setup    this rank (`RankInfo`, from the launcher's environment) and the process group; the
         tokenizer, the tokenized rows (cached) and their batches; the DeepSpeed config; the model
         (loaded or built and quantized on this rank's device, LoRA added); the engine (DeepSpeed's,
         or PlainEngine on one device: training.engine) with compiled decoder layers
         (training.compile); resume; logging.
train    optimizer steps of grad_accum micro batches (`train`); the loss is the sum of token losses
         over all loss tokens of the step (exact for any process count); a metrics record every
         ``log_every`` steps; a checkpoint every ``save_every``; a stop signal ends the loop at the
         next step boundary with a checkpoint.
save     DeepSpeed (or PlainEngine) checkpoint + RNG + data position, marked complete when all
         ranks are done (`save_checkpoint`); LoRA adapters in PEFT format.
report   summary.json (measured vs predicted peak), memory plot, wandb summary (orchestrator/report.py).

Every setup step is a function that takes what it needs and returns what it makes; the loop's
state is one `LoopState`. The entry point (flags, exit codes) is orchestrator/train.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import deepspeed
import numpy as np
import torch

from orchestrator import checkpoint as C
from orchestrator import engine as E
from orchestrator import evaluate as EV
from orchestrator import jit_ops
from orchestrator import levers
from orchestrator import memory_cap
from orchestrator import modeling as M
from orchestrator import report as R
from orchestrator import speedups as S
from orchestrator.compiler import write_run_job
from orchestrator.data import Batcher, EvalBatches, Tokenized, load_tokenizer, mixture, prepare_data, render_data
from orchestrator.errors import Exit, OrchError
from orchestrator.faults import NO_FAULTS, Faults
from orchestrator.spec import JobSpec
from orchestrator.stop import StopRequest, signal_name
from orchestrator.strategy import STRATEGIES


# ---------------------------------------------------------------------------
# this rank


@dataclass(frozen=True)
class RankInfo:
    """Who this process is in the job: made first, from the launcher's environment."""

    rank: int
    """Global rank (RANK)."""
    local_rank: int
    """Rank on this node (LOCAL_RANK): the index of this rank's GPU."""
    world_size: int
    """Processes in the job (WORLD_SIZE)."""
    local_world_size: int
    """Processes on this node (LOCAL_WORLD_SIZE)."""
    device: torch.device
    """``cuda:<local_rank>``, or the CPU where there is no GPU."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def from_environment(cls) -> "RankInfo":
        """This process's rank; a process started without a launcher is rank 0 of 1."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank=int(env.get("RANK", "0")), local_rank=local_rank, world_size=world,
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))), device=device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank_info: RankInfo) -> None:
    """Join the process group (nccl on GPUs, gloo on the CPU) and claim this rank's device."""
    # A process started without a launcher (`orch train`, one process) has no rendezvous
    # variables: torch.distributed reads them from the environment, so give it a group of one.
    for var, value in (("RANK", rank_info.rank), ("LOCAL_RANK", rank_info.local_rank),
                       ("WORLD_SIZE", rank_info.world_size), ("LOCAL_WORLD_SIZE", rank_info.local_world_size),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(var, str(value))
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if rank_info.cuda:
        torch.cuda.set_device(rank_info.local_rank)
    else:
        # N processes on one CPU: split the cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, rank_info.local_world_size)))
    # DeepSpeed's CPU shared-memory all-reduce serves inference only and leaks /dev/shm: off (jit_ops)
    jit_ops.disable_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if rank_info.cuda else "gloo", verbose=False)


def barrier(rank_info: RankInfo) -> None:
    if rank_info.world_size > 1:
        torch.distributed.barrier()


def cleanup() -> None:
    """Leave the process group (best effort: the run is over either way)."""
    try:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def stop_agreed(stop: StopRequest, rank_info: RankInfo) -> bool:
    """True on every rank if any rank got a stop signal (one small all-reduce per step), so that all
    ranks write the checkpoint together even when only some got the signal."""
    if rank_info.world_size == 1:
        return stop.requested
    flag = torch.tensor([1 if stop.requested else 0], device=rank_info.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def check_world_size(job: JobSpec, rank_info: RankInfo) -> None:
    hw = job.hardware
    if rank_info.world_size != hw.world_size:
        raise OrchError(
            f"hardware: the spec gives {hw.nodes} x {hw.gpus_per_node} = {hw.world_size} processes but "
            f"{rank_info.world_size} were launched; set hardware.nodes/gpus_per_node to match", Exit.BAD_SPEC)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def cap_gpu_memory(job: JobSpec, rank_info: RankInfo) -> Optional[memory_cap.MemoryCap]:
    """Cap this rank's CUDA allocator to the plan's GPU when the device is larger (memory_cap), once,
    after set_device and before anything is allocated: a 24 GiB plan then runs out of memory where a
    24 GiB GPU would."""
    cap = memory_cap.cap_gpu_memory(job, rank_info.device)
    if cap is not None and rank_info.is_main:
        print(cap.line(), file=sys.stderr)
    return cap


# ---------------------------------------------------------------------------
# setup


def setup_output_dir(job: JobSpec, rank_info: RankInfo) -> Path:
    out = job.output_dir()
    if rank_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(rank_info)
    return out


def setup_tokenizer(job: JobSpec):
    return load_tokenizer(job, job.shape().vocab_size)


def setup_data(job: JobSpec, tokenizer, rank_info: RankInfo, out: Path) -> Tokenized:
    """The tokenized rows (training, and eval with an eval split): rank 0 builds the cache, every rank
    reads it."""
    return prepare_data(job, tokenizer, out / "data_cache", rank_info.is_main, lambda: barrier(rank_info))


def count_steps(job: JobSpec, batcher: Batcher) -> int:
    """Optimizer steps of the whole run: training.max_steps, or the steps of training.epochs."""
    if job.training.max_steps is not None:
        return job.training.max_steps
    return batcher.steps_for_epochs(job.training.epochs)


def setup_ds_config(job: JobSpec, strategy: str, path: Optional[str], total_steps: int) -> dict:
    """The DeepSpeed config: the compiled file at ``path``, else built from the job. Built before the
    model: under ZeRO-3 the model is constructed already partitioned with it."""
    from orchestrator.deepspeed_config import build_ds_config, scheduler_block

    if path is None:
        return build_ds_config(job, strategy, job.shape(), total_steps)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OrchError(f"--ds-config: cannot read {path}: {exc}", Exit.BAD_SPEC) from None
    if job.training.epochs is not None and "scheduler" in config:
        # compiled before the data size was known: only now is the step count
        config["scheduler"] = scheduler_block(job, total_steps)
    return config


def setup_model(job: JobSpec, strategy: str, rank_info: RankInfo, ds_config: dict,
                probe: Optional[M.LiveTensorBytes] = None) -> M.LoadedModel:
    """The model on this rank's device: loaded or built, quantized (qlora), LoRA added (qlora/lora).
    ``probe`` samples the live CPU tensor bytes at the build's peaks (build_peak_bytes on a CPU)."""
    return M.load_model(job, strategy, rank_info.device, job.training.seed, ds_config, probe)


@dataclass(frozen=True)
class BuildPeak:
    """The most the model build held on this rank, before the engine partitions or wraps it."""

    allocated: Optional[int]
    """GPU: torch.cuda.max_memory_allocated right after the build (None on a CPU)."""
    sampled: Optional[int]
    """CPU: the largest live tensor bytes the build added, sampled at its peaks (None on a GPU)."""


@dataclass(frozen=True)
class TrainEngine:
    """What `setup_engine` made."""

    engine: Any
    """DeepSpeed's engine or a PlainEngine (the same API: engine(...), backward, step, checkpoints)."""
    kind: str
    """'deepspeed' or 'plain' (training.engine resolved)."""
    compiled: Optional[S.CompiledLayers]
    """The compiled decoder layers (training.compile), or None."""


def setup_engine(job: JobSpec, strategy: str, loaded: M.LoadedModel, ds_config: dict,
                 rank_info: RankInfo) -> TrainEngine:
    """The one place that makes the engine: DeepSpeed's (deepspeed.initialize) or PlainEngine
    (training.engine), over the chunked-loss module; then compiles the decoder layers
    (training.compile)."""
    module = M.CausalLMLoss(loaded.model, loaded.base, job.training.loss_chunk_tokens)
    kind = E.choose_engine(job.training.engine, ds_config)
    if kind == "plain":
        engine = E.PlainEngine(module, E.EngineConfig.from_deepspeed(ds_config))
    else:
        # the optimizer's JIT ops, before DeepSpeed builds them itself (a stale build lock would hang it)
        jit_ops.load_ops(jit_ops.optimizer_ops(STRATEGIES[strategy], rank_info.cuda))
        params = [p for p in module.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config)
    compiled = None
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if S.compile_wanted(job.training.compile, rank_info.device, stage):
        compiled = S.compile_decoder_layers(loaded.base.model.layers)
    return TrainEngine(engine=engine, kind=kind, compiled=compiled)


@dataclass(frozen=True)
class ParamBytes:
    """Bytes of a module's parameters; ZeRO-3 keeps ``ds_tensor`` (this rank's part)."""

    local: int
    full: int
    quantized_local: int
    """Of ``local``: packed 4-bit weights (bitsandbytes Params4bit)."""
    quantized_full: int


def param_bytes(module: torch.nn.Module) -> ParamBytes:
    local = full = q_local = q_full = 0
    for p in module.parameters():
        size = p.element_size()
        n_full = getattr(p, "ds_numel", p.numel())
        n_local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        local += n_local * size
        full += n_full * size
        if type(p).__name__ == "Params4bit":
            q_local += n_local * size
            q_full += n_full * size
    return ParamBytes(local=local, full=full, quantized_local=q_local, quantized_full=q_full)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass(frozen=True)
class LoadMemory:
    """This rank's memory right after model load + engine init (`measure_load`)."""

    peak_allocated: Optional[int]
    """torch.cuda.max_memory_allocated since the load started (None on CPU)."""
    cpu_rss: int
    params: ParamBytes
    """Parameters held after engine init."""


def measure_load(engine: TrainEngine, rank_info: RankInfo) -> LoadMemory:
    """What load + engine init left on this rank; then restarts the CUDA peak for training."""
    peak = None
    if rank_info.cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    return LoadMemory(peak_allocated=peak, cpu_rss=_rss(), params=param_bytes(engine.engine.module))


def rank_memory(rank_info: RankInfo, built: ParamBytes, build_peak: BuildPeak, load: LoadMemory) -> R.RankMemory:
    """This rank's memory statistics at the end of the run."""
    return R.RankMemory(
        rank=rank_info.rank, load_peak_allocated=load.peak_allocated,
        peak_allocated=torch.cuda.max_memory_allocated() if rank_info.cuda else None,
        peak_reserved=torch.cuda.max_memory_reserved() if rank_info.cuda else None,
        cpu_rss_peak=_peak_rss(), cpu_rss_after_load=load.cpu_rss,
        params_bytes_local=load.params.local, params_bytes_full=load.params.full, params_bytes_local_built=built.local,
        quantized_bytes_local_built=built.quantized_local, build_peak_allocated=build_peak.allocated,
        build_peak_sampled=build_peak.sampled,
        quantized_bytes_local=load.params.quantized_local, quantized_bytes_full=load.params.quantized_full)


# ---------------------------------------------------------------------------
# the run's parts, and where the loop stands


@dataclass(frozen=True)
class Run:
    """Everything setup made that the loop, checkpoints and the report use."""

    job: JobSpec
    strategy: str
    rank_info: RankInfo
    out: Path
    """<output_dir>."""
    tokenizer: Any
    batcher: Batcher
    total_steps: int
    loaded: M.LoadedModel
    engine: TrainEngine
    log: R.MetricsLog
    evals: Optional[EV.Evals] = None
    """The eval split's batches and what its evals found (None without an eval split)."""
    faults: Faults = NO_FAULTS
    """Test seams (orchestrator/faults.py); product runs keep the default, which does nothing."""

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


@dataclass(frozen=True)
class LoopState:
    """Where the training loop stands."""

    step: int = 0
    """Optimizer steps done."""
    saved_step: Optional[int] = None
    """Step of the latest checkpoint written or resumed from (None: none yet)."""
    last_loss: Optional[float] = None
    """Loss of the last logged step."""
    tokens_per_s: Optional[float] = None
    """Loss tokens per second over the last log window."""
    compiled_variants: Optional[int] = None
    """Compiled graphs of the decoder layers, counted after the first step (training.compile)."""
    stopped: bool = False
    """The loop ended on a stop signal (after writing a checkpoint), not at total_steps."""


def finished(out: Path, total_steps: int) -> Optional[str]:
    """Why the run in ``out`` is over: all ``total_steps`` steps done (its latest complete checkpoint
    or its summary.json says so) or ended by early stopping (its summary.json); None when it is not."""
    latest = C.latest(out / "checkpoints")
    if latest is not None and latest.step >= total_steps:
        return f"its checkpoint {latest.tag} is step {latest.step} of {total_steps}"
    try:
        summary = json.loads((out / "summary.json").read_text())
        steps, early_stopped = summary["steps"], summary.get("early_stopped")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if isinstance(steps, int) and steps >= total_steps:
        return f"its summary.json records {steps} of {total_steps} steps"
    if early_stopped is True:
        return f"early stopping ended it at step {steps} (its summary.json)"
    return None


@dataclass(frozen=True)
class ResumePoint:
    """Where ``--resume`` continues (`setup_resume`)."""

    checkpoint: C.CheckpointInfo
    """The latest complete checkpoint of the run."""
    universal: bool
    """Saved by another number of processes: loaded from its universal form, which the engine must be
    made for (`with_universal_load`)."""


def setup_resume(job: JobSpec, strategy: str, out: Path, rank_info: RankInfo, global_batch: int,
                 faults: Faults) -> Optional[ResumePoint]:
    """The checkpoint a ``--resume`` continues from (None: there is none, start at step 0), checked
    against this run before anything is loaded. A checkpoint of another process count is converted
    here (rank 0, once) to DeepSpeed's universal form, before the engine that must load it is made.
    Collective."""
    info = C.resume_point(out, strategy, levers.engine(job, strategy), rank_info.world_size, global_batch)
    if info is None:
        if rank_info.is_main:
            print(f"orch: no complete checkpoint in {out / 'checkpoints'}; starting from step 0", file=sys.stderr)
        return None
    if info.world_size == rank_info.world_size:
        return ResumePoint(info, universal=False)
    error = None
    if rank_info.is_main:
        try:
            C.to_universal(info, faults)
        except C.CheckpointError as exc:
            error = str(exc)
    error = from_main(rank_info, error)
    if error is not None:
        raise C.CheckpointError(error)
    if rank_info.is_main:
        print(f"orch: {info.tag} was saved by {info.world_size} processes, this run has {rank_info.world_size}: "
              f"loading its universal form {info.path / C.UNIVERSAL}", file=sys.stderr)
    return ResumePoint(info, universal=True)


def from_main(rank_info: RankInfo, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object). Collective."""
    if rank_info.world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def with_universal_load(ds_config: dict) -> dict:
    """``ds_config`` that makes the DeepSpeed engine load universal checkpoints."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def resume(job: JobSpec, engine: TrainEngine, point: ResumePoint, rank_info: RankInfo,
           evals: Optional[EV.Evals]) -> LoopState:
    """The state of checkpoint ``point`` (checked by `setup_resume`), loaded into ``engine``; ``evals``
    goes on from the checkpoint's eval bookkeeping (best eval, early-stopping count)."""
    info = point.checkpoint
    client = C.load(engine.engine, info, rank_info.rank, rank_info.world_size, strict=job.method == "full",
                    seed=job.training.seed)
    if evals is not None:
        evals.restore(client.get("eval"))
    step = int(client["step"])
    if rank_info.is_main:
        print(f"orch: resumed from {info.path} at step {step}", file=sys.stderr)
    return LoopState(step=step, saved_step=step)


# ---------------------------------------------------------------------------
# train


def trained_mixture(run: Run, steps: int) -> list:
    """Tokens, loss tokens and examples per training source over the first ``steps`` steps (data.SourceShare)."""
    return mixture(run.job.data.train_sources(), run.batcher.source_counts(steps))


def micro_batch(run: Run, step: int, micro: int) -> dict[str, torch.Tensor]:
    arrays = run.batcher.micro_batch_arrays(step, micro, run.rank_info.rank)
    return {k: torch.from_numpy(v).to(run.rank_info.device, non_blocking=True) for k, v in arrays.items()}


def memory_now(rank_info: RankInfo) -> dict[str, Optional[int]]:
    """The memory fields of a StepRecord."""
    if rank_info.cuda:
        return {"mem_allocated": torch.cuda.memory_allocated(), "mem_reserved": torch.cuda.memory_reserved(),
                "mem_peak": torch.cuda.max_memory_allocated(), "cpu_rss": _rss()}
    # CPU: there is no allocator counter; the GPU fields are null, cpu_rss is the process RSS.
    return {"mem_allocated": None, "mem_reserved": None, "mem_peak": None, "cpu_rss": _rss()}


def train(run: Run, state: LoopState, stop: StopRequest) -> LoopState:
    """Optimizer steps from ``state.step`` to run.total_steps, or to the first step boundary after a
    stop signal (a checkpoint is written there); returns where the loop stopped."""
    job, rank_info, engine = run.job, run.rank_info, run.engine.engine
    ga = job.grad_accum()
    world = rank_info.world_size
    log_every = job.logging.log_every
    save_every = job.training.save_every
    bar = None
    if rank_info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=run.total_steps, initial=state.step, desc=job.name, unit="step", dynamic_ncols=True,
                   mininterval=1.0)
    engine.train()
    window_tokens = 0
    window_start = time.time()
    try:
        while state.step < run.total_steps:
            step = state.step
            step_tokens = run.batcher.step_loss_tokens(step)
            # d(loss)/d(params) = d(sum of token losses / loss tokens of the step):
            # DeepSpeed divides by grad_accum and averages over ranks, so scale back up.
            scale = torch.tensor(ga * world / max(step_tokens, 1), device=rank_info.device, dtype=torch.float32)
            acc = torch.zeros((), device=rank_info.device, dtype=torch.float32)
            try:
                run.faults.in_step(step + 1)
                for m in range(ga):
                    b = micro_batch(run, step, m)
                    loss = engine(b["input_ids"], b["position_ids"], b["targets"], scale)
                    engine.backward(loss)
                    engine.step()
                    acc += loss.detach().float()
            except torch.cuda.OutOfMemoryError:
                used = torch.cuda.max_memory_allocated() if rank_info.cuda else None
                raise OrchError(R.oom_message(job, run.strategy, rank_info.rank, step + 1, used),
                                Exit.TRAIN_FAILED) from None
            if run.engine.compiled is not None and state.compiled_variants is None:
                # after the first step: the decoder layers must have run compiled code
                state = replace(state, compiled_variants=S.check_compiled(run.engine.compiled))
            state = replace(state, step=step + 1)
            window_tokens += step_tokens
            if state.step % log_every == 0 or state.step == run.total_steps:
                # the only sync per log step: the step loss over all ranks
                if world > 1:
                    torch.distributed.all_reduce(acc)
                now = time.time()
                state = replace(state, last_loss=acc.item() / (ga * world),
                                tokens_per_s=window_tokens / max(now - window_start, 1e-9))
                lr = engine.get_lr()[0] if engine.get_lr() else None
                shares = trained_mixture(run, state.step)
                run.log.log(R.StepRecord(step=state.step, rank=rank_info.rank, loss=state.last_loss, lr=lr,
                                         tokens_per_s=state.tokens_per_s, **memory_now(rank_info), time=time.time(),
                                         source_tokens={share.name: share.tokens for share in shares}))
                window_tokens, window_start = 0, time.time()
                if bar is not None:
                    bar.set_postfix(loss=f"{state.last_loss:.4f}", tok_s=f"{state.tokens_per_s:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if eval_due(run, state.step, at_end=False):
                state, early_stop = run_eval(run, state)
                if early_stop:
                    return state  # the recipe saves the final checkpoint
            stopping = stop_agreed(stop, rank_info)
            due = stopping or (save_every and state.step % save_every == 0 and state.step < run.total_steps)
            if due and state.saved_step != state.step:  # not twice: an eval may have saved this step
                state = save_checkpoint(run, state)
            if stopping:
                return replace(state, stopped=True)
        return state
    finally:
        if bar is not None:
            bar.close()  # ends the progress line, so what follows (an error included) is a line of its own


def eval_due(run: Run, step: int, at_end: bool) -> bool:
    """An eval of the eval split now: every training.eval_every steps, and at the end unless the last
    step had one."""
    if run.evals is None:
        return False
    if at_end:
        return run.evals.last_step != step
    every = run.job.training.eval_every
    return bool(every) and step % every == 0


def run_eval(run: Run, state: LoopState) -> tuple[LoopState, bool]:
    """Evaluate at ``state.step`` (collective): log it and checkpoint a new best (the loop's own save of
    that step then sees it saved). Returns the state and True when early stopping ends training."""
    rank_info, step = run.rank_info, state.step
    result = EV.evaluate(run.engine.engine, run.evals.batches, rank_info.rank, rank_info.device)
    verdict = run.evals.record(step, result)
    if rank_info.is_main:
        run.log.log_eval(step, rank_info.rank, result.loss, result.perplexity, result.tokens)
        from tqdm import tqdm

        tqdm.write(f"orch: eval at step {step}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f}"
                   + (" (best so far)" if verdict.new_best else ""), file=sys.stderr)
    # the best checkpoint is kept; at the last step the recipe's final save is it
    if verdict.new_best and step < run.total_steps:
        state = save_checkpoint(run, state)
    if verdict.stop and rank_info.is_main:
        stopping = run.evals.stopping
        print(f"orch: early stopping at step {step}: eval loss not below {stopping.best_loss:.4f} (step "
              f"{stopping.best_step}) for {stopping.evals_since_best} evals (training.early_stopping_patience)",
              file=sys.stderr)
    return state, verdict.stop


# ---------------------------------------------------------------------------
# save


def save_checkpoint(run: Run, state: LoopState) -> LoopState:
    """Checkpoint ``state.step`` on every rank (collective), and the LoRA adapter; returns the state
    with the saved step."""
    job, rank_info = run.job, run.rank_info
    client = {"step": state.step, "data_position": state.step * run.batcher.global_batch,
              "seed": job.training.seed, "world_size": rank_info.world_size,
              "eval": run.evals.state() if run.evals is not None else None}
    C.save(run.engine.engine, run.checkpoints, state.step, client, rank_info.rank, rank_info.world_size, run.strategy,
           run.batcher.global_batch,
           lambda: barrier(rank_info), exclude_frozen=job.method != "full", faults=run.faults)
    if job.method != "full":
        save_adapter(run)
    return replace(state, saved_step=state.step)


def save_adapter(run: Run) -> None:
    """LoRA adapters in PEFT format (``adapter/``). Under ZeRO-3 only the adapter params are gathered."""
    from peft import get_peft_model_state_dict

    peft_model = run.loaded.model
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    is_main = run.rank_info.is_main
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
        state = {n: p.detach().to("cpu", copy=True) for n, p in named} if is_main else None
    if is_main:
        target = run.out / "adapter"
        tmp = run.out / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(str(tmp), state_dict=get_peft_model_state_dict(peft_model, state_dict=state))
        run.tokenizer.save_pretrained(str(tmp))
        old = run.out / "adapter.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    barrier(run.rank_info)


# ---------------------------------------------------------------------------
# report


def report(run: Run, state: LoopState, memory: R.RankMemory, load_seconds: float) -> Optional[R.RunSummary]:
    """Gather every rank's memory; rank 0 writes summary.json and memory.png, closes wandb and prints
    the summary. Returns the summary on rank 0, None elsewhere. Collective."""
    rank_info = run.rank_info
    per_rank: list[Any] = [None] * rank_info.world_size
    if rank_info.world_size > 1:
        torch.distributed.all_gather_object(per_rank, asdict(memory))
    else:
        per_rank = [asdict(memory)]
    summary = None
    if rank_info.is_main:
        summary = R.summarize(run.job, run.strategy, state.step, run.engine.kind, state.compiled_variants,
                              run.loaded.attention, state.last_loss, state.tokens_per_s, rank_info.device.type,
                              load_seconds, [R.RankMemory(**r) for r in per_rank], R.predict(run.job, run.strategy),
                              trained_mixture(run, state.step),
                              run.evals.summary(run.checkpoints) if run.evals is not None else None)
        R.write_summary(run.out / "summary.json", summary)
        try:
            R.plot_memory(run.log.path, run.out / "memory.png", summary)
        except Exception as exc:  # noqa: BLE001 - a missing plot must not fail a finished run
            print(f"orch: memory plot not written: {exc}", file=sys.stderr)
        run.log.finish(summary)
        print(R.render_summary(summary), file=sys.stderr)
    barrier(rank_info)
    return summary


# ---------------------------------------------------------------------------
# the recipe


def recipe(job: JobSpec, strategy: str, rank_info: RankInfo, stop: StopRequest, ds_config_path: Optional[str] = None,
           resume_run: bool = False, faults: Faults = NO_FAULTS) -> Optional[R.RunSummary]:
    """setup -> train -> save -> report, on this rank. ``stop``: set by a stop signal (installed by
    the caller before anything else); ``ds_config_path``: a compiled DeepSpeed JSON (None builds it
    from the job); ``resume_run``: continue from the latest complete checkpoint; ``faults``: test
    seams. Returns the summary (rank 0; None on the others, and when there was nothing to train).
    Raises OrchError(Exit.REQUEUE) after the checkpoint of a stop signal."""
    init_distributed(rank_info)
    check_world_size(job, rank_info)
    out = setup_output_dir(job, rank_info)
    seed_everything(job.training.seed)

    tokenizer = setup_tokenizer(job)
    data = setup_data(job, tokenizer, rank_info, out)
    batcher = Batcher(data.train, job.training.seed, job.training.micro_batch_size, job.grad_accum(),
                      rank_info.world_size)
    total_steps = count_steps(job, batcher)
    evals = None
    if data.eval is not None:
        evals = EV.Evals(EvalBatches(data.eval, job.eval_micro_batch(), rank_info.world_size, tokenizer.pad_token_id),
                         EV.EarlyStopping(job.training.early_stopping_patience))
    if resume_run:
        done = finished(out, total_steps)
        if done is not None:  # leave it as it is: nothing to train, nothing to rewrite
            if rank_info.is_main:
                print(f"orch: {out} is already finished ({done}); nothing to do", file=sys.stderr)
            return None
    if rank_info.is_main:
        write_run_job(job, strategy)  # <output_dir>/job.yaml: what `orch export RUN_DIR` reads
        for line in render_data(job, data, batcher, total_steps):
            print(f"orch: {line}", file=sys.stderr)
    ds_config = setup_ds_config(job, strategy, ds_config_path, total_steps)
    point = (setup_resume(job, strategy, out, rank_info, batcher.global_batch, faults)
             if resume_run else None)
    if point is not None and point.universal:
        ds_config = with_universal_load(ds_config)

    cap_gpu_memory(job, rank_info)
    if rank_info.cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    probe = None if rank_info.cuda else M.LiveTensorBytes.start()
    loaded = setup_model(job, strategy, rank_info, ds_config, probe)
    load_seconds = time.time() - started
    built = param_bytes(loaded.model)
    build_peak = BuildPeak(allocated=torch.cuda.max_memory_allocated() if rank_info.cuda else None,
                           sampled=None if rank_info.cuda else probe.peak)
    engine = setup_engine(job, strategy, loaded, ds_config, rank_info)
    load = measure_load(engine, rank_info)

    start = resume(job, engine, point, rank_info, evals) if point is not None else LoopState()
    log = R.setup_logging(job, strategy, out, rank_info.is_main, rank_info.world_size, resume_run)
    run = Run(job=job, strategy=strategy, rank_info=rank_info, out=out, tokenizer=tokenizer, batcher=batcher,
              total_steps=total_steps, loaded=loaded, engine=engine, log=log, evals=evals, faults=faults)
    if rank_info.is_main:
        R.write_run_info(job, strategy, out, rank_info.world_size, total_steps, start.step)

    state = train(run, start, stop)
    if not state.stopped and eval_due(run, state.step, at_end=True):
        state, _ = run_eval(run, state)
    if state.stopped:
        by = signal_name(stop.signum) if stop.requested else "a stop signal to another rank"
        raise OrchError(f"stopped by {by} at step {state.step}; checkpoint written, continue with --resume",
                        Exit.REQUEUE)
    if state.saved_step != state.step:  # not when resumed from the final checkpoint
        state = save_checkpoint(run, state)
    return report(run, state, rank_memory(rank_info, built, build_peak, load), load_seconds)
