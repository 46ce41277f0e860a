"""The trainer: what every rank runs (``python -m orchestrator.train --job JOB.yaml``).

One recipe, four phases (`Trainer.setup`, `train`, `save`, `finish`):

setup   distributed init (one device per rank: ``cuda:<local_rank>`` or the CPU),
        tokenizer, tokenized rows (cached), model (loaded/built and quantized on
        this rank's device, LoRA added), engine (DeepSpeed's, or PlainEngine on
        one device: training.engine), compiled decoder layers (training.compile),
        resume.
train   optimizer steps of grad_accum micro batches; the loss is the sum of token
        losses over all loss tokens of the step (exact for any process count);
        logging every ``log_every`` steps; checkpoints every ``save_every``.
save    DeepSpeed checkpoint + RNG + data position, marked complete when all
        ranks are done; LoRA adapters in PEFT format.
finish  summary.json (measured vs predicted peak), memory plot, wandb summary.

Exit codes (orchestrator.errors.Exit): OK; BAD_SPEC for a bad spec, argument,
data or model folder; NO_FIT when strategy auto finds nothing; TRAIN_FAILED
(runtime out-of-memory included, with predicted vs used); REQUEUE after a
checkpoint written on SIGUSR1/SIGTERM -- the Slurm script requeues on it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from orchestrator.catalog import GIB
from orchestrator.compiler import write_run_job
from orchestrator.errors import Exit, OrchError, print_error


@dataclass
class RankMemory:
    """Memory statistics of one rank (bytes; None where the device has no such counter)."""

    rank: int
    load_peak_allocated: Optional[int] = None
    """torch.cuda.max_memory_allocated after model load + engine init (None on CPU)."""
    peak_allocated: Optional[int] = None
    """torch.cuda.max_memory_allocated during training (None on CPU)."""
    peak_reserved: Optional[int] = None
    """torch.cuda.max_memory_reserved during training (None on CPU)."""
    cpu_rss_peak: Optional[int] = None
    """Peak resident set size of the process (ru_maxrss), all phases."""
    cpu_rss_after_load: Optional[int] = None
    """Resident set size right after load + engine init."""
    params_bytes_local: Optional[int] = None
    """Bytes of model parameters this rank holds after engine init (its ZeRO-3 partition, or everything)."""
    params_bytes_full: Optional[int] = None
    """Bytes of all model parameters, unpartitioned."""
    params_bytes_local_built: Optional[int] = None
    """Bytes of model parameters this rank holds right after the model is built/loaded, before
    deepspeed.initialize (ZeRO-3 lora/full: already its partition; otherwise the whole model)."""
    quantized_bytes_local: Optional[int] = None
    """Of params_bytes_local: the packed 4-bit weights (qlora)."""
    quantized_bytes_full: Optional[int] = None
    """Of params_bytes_full: the packed 4-bit weights (qlora)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Trainer:
    """One training run on one rank."""

    def __init__(self, job, strategy: str, ds_config_path: Optional[str], resume: bool):
        self.job = job
        self.strategy = strategy
        self.ds_config_path = ds_config_path
        self.resume = resume
        self.out = job.output_dir()
        self.stop_requested = False
        self.step = 0
        self.saved_step = -1
        self.last_loss: Optional[float] = None
        self.tokens_per_s: Optional[float] = None
        self.engine_kind = "deepspeed"  # or "plain" (training.engine, chosen in _build_engine)
        self.compiled = None  # speedups.CompiledLayers when training.compile is on
        self.compiled_variants: Optional[int] = None  # compiled graphs of the decoder layers, after the first step

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        for var, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                             ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(var, default)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        import deepspeed
        import torch

        self.torch = torch
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            # N processes on one CPU: split the cores instead of oversubscribing them.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        from orchestrator import jit_ops

        # Before DeepSpeed builds it itself: a lock left by a killed build would hang this run forever.
        jit_ops.load_ops([jit_ops.SHM_COMM])
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", verbose=False)
        self.dist = torch.distributed
        job = self.job
        if self.world != job.hardware.world_size:
            raise OrchError(
                f"hardware: the spec gives {job.hardware.nodes} x {job.hardware.gpus_per_node} = {job.hardware.world_size} "
                f"processes but {self.world} were launched; set hardware.nodes/gpus_per_node to match", Exit.BAD_SPEC)
        self.is_main = self.rank == 0
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_run_job(job, self.strategy)  # <output_dir>/job.yaml: what `orch export RUN_DIR` reads
        self.barrier()
        self._install_signals()
        self._seed(job.training.seed)

        from orchestrator import data as D
        from orchestrator import evaluate as EV

        self.shape = job.shape()
        self.tok = D.load_tokenizer(job, self.shape.vocab_size)
        self.data = D.prepare_data(job, self.tok, self.out / "data_cache", self.is_main, self.barrier)
        self.rows = self.data.train
        self.batcher = D.Batcher(self.rows, job.training.seed, job.training.micro_batch_size, job.grad_accum(), self.world)
        if job.training.max_steps is not None:
            self.total_steps = job.training.max_steps
        else:
            self.total_steps = self.batcher.steps_for_epochs(job.training.epochs)
        self.evals = EV.Evals(D.EvalBatches(self.data.eval, job.eval_micro_batch(), self.world, self.tok.pad_token_id),
                              EV.EarlyStopping(job.training.early_stopping_patience)) if self.data.eval is not None else None
        if self.is_main:
            for line in D.render_data(job, self.data, self.batcher, self.total_steps):
                print(f"orch: {line}", file=sys.stderr)

        # Built before the model: under ZeRO-3 the model is constructed already partitioned with it.
        self.deepspeed_config = self.ds_config()
        self.memory = RankMemory(rank=self.rank)
        self._load_model()
        self._build_engine()
        self.ckpt_root = self.out / "checkpoints"
        if self.resume:
            self._resume()
        self._setup_logging()
        if self.is_main:
            from orchestrator.memory import estimate
            from orchestrator.progress import RunInfo

            est = estimate(job, self.strategy)
            RunInfo(job.name, self.strategy, self.world, self.total_steps, self.step, time.time(), est.peak_allocated,
                    est.eval_peak).write(self.out)

    def _seed(self, seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        self.torch.manual_seed(seed)  # also seeds every CUDA device

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()

    def _install_signals(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            self.stop_requested = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, handler)

    def _load_model(self) -> None:
        from orchestrator import modeling as M

        torch = self.torch
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        self.loaded = M.load_model(self.job, self.strategy, self.device, self.job.training.seed, self.deepspeed_config)
        self.load_seconds = time.time() - t0
        self.memory.params_bytes_local_built = param_bytes(self.loaded.model)[0]
        self.module = M.CausalLMLoss(self.loaded.model, self.loaded.base, self.job.training.loss_chunk_tokens)

    def ds_config(self) -> dict:
        from orchestrator.deepspeed_config import build_ds_config, scheduler_block

        if self.ds_config_path:
            try:
                config = json.loads(Path(self.ds_config_path).read_text())
            except (OSError, ValueError) as exc:
                raise OrchError(f"--ds-config: cannot read {self.ds_config_path}: {exc}", Exit.BAD_SPEC) from None
            if self.job.training.epochs is not None and "scheduler" in config:
                # compiled before the data size was known: only now is the step count
                config["scheduler"] = scheduler_block(self.job, self.total_steps)
            return config
        return build_ds_config(self.job, self.strategy, self.shape, self.total_steps)

    def _build_engine(self) -> None:
        import deepspeed

        from orchestrator import engine as E
        from orchestrator import speedups as S

        torch = self.torch
        self.engine_kind = E.choose_engine(self.job.training.engine, self.deepspeed_config)
        if self.engine_kind == "plain":
            self.engine = E.PlainEngine(self.module, E.EngineConfig.from_deepspeed(self.deepspeed_config))
        if self.engine_kind == "deepspeed":
            from orchestrator import jit_ops
            from orchestrator.strategy import STRATEGIES

            jit_ops.load_ops(jit_ops.optimizer_ops(STRATEGIES[self.strategy], self.cuda))
            params = [p for p in self.module.parameters() if p.requires_grad]
            self.engine, _, _, _ = deepspeed.initialize(model=self.module, model_parameters=params,
                                                        config=self.deepspeed_config)
        stage = self.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        if S.compile_wanted(self.job.training.compile, self.device, stage):
            self.compiled = S.compile_decoder_layers(self.loaded.base.model.layers)
        self.memory.cpu_rss_after_load = _rss()
        self.memory.params_bytes_local, self.memory.params_bytes_full, self.memory.quantized_bytes_local, \
            self.memory.quantized_bytes_full = param_bytes(self.module)
        if self.cuda:
            torch.cuda.synchronize()
            self.memory.load_peak_allocated = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def _resume(self) -> None:
        from orchestrator import checkpoint as C

        info = C.latest(self.ckpt_root)
        if info is None:
            if self.is_main:
                print(f"orch: no complete checkpoint in {self.ckpt_root}; starting from step 0", file=sys.stderr)
            return
        from orchestrator import engine as E

        written = E.written_by(info.path)
        # (a checkpoint of another process count gets C.load's error first: no engine can resume it here)
        if written is not None and written != self.engine_kind and info.world_size == self.world:
            raise OrchError(f"{info.path}: written by the {written} engine, this run uses the {self.engine_kind} "
                            f"engine; resume it with training.engine={written}", Exit.TRAIN_FAILED)
        client = C.load(self.engine, info, self.rank, self.world, strict=self.job.method == "full")
        self.step = self.saved_step = int(client["step"])
        if self.is_main:
            print(f"orch: resumed from {info.path} at step {self.step}", file=sys.stderr)

    def _setup_logging(self) -> None:
        self.metrics_path = self.out / "metrics.jsonl"
        self.wandb = None
        mode = self.job.logging.wandb_mode
        if self.is_main and mode != "disabled":
            if mode == "online" and not os.environ.get("WANDB_API_KEY"):
                print("orch: logging.wandb_mode is online but WANDB_API_KEY is not set; logging offline", file=sys.stderr)
                mode = "offline"
            try:
                import wandb
            except ImportError:
                # wandb is optional at run time (the GPU image has none): metrics.jsonl still gets everything.
                print(f"orch: logging.wandb_mode is {mode} but wandb is not installed; logging to metrics.jsonl only",
                      file=sys.stderr)
                return
            os.environ["WANDB_MODE"] = mode
            os.environ.setdefault("WANDB_SILENT", "true")

            # one wandb run per output dir: a resumed (requeued) job continues the same run
            id_file = self.out / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                id=run_id,
                project=self.job.logging.wandb_project, entity=self.job.logging.wandb_entity, name=self.job.name,
                dir=str(self.out), config={"job": self.job.model_dump(mode="json"), "strategy": self.strategy,
                                           "world_size": self.world},
                resume="allow",
            )

    # ------------------------------------------------------------------ train

    def micro_batch(self, step: int, micro: int) -> dict:
        arrays = self.batcher.micro_batch_arrays(step, micro, self.rank)
        return {k: self.torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in arrays.items()}

    def train(self) -> None:
        from orchestrator import speedups as S

        torch = self.torch
        job = self.job
        ga = job.grad_accum()
        log_every = job.logging.log_every
        save_every = job.training.save_every
        bar = None
        if self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=job.name, unit="step", dynamic_ncols=True, mininterval=1.0)
        self.engine.train()
        window_tokens = 0
        window_start = time.time()
        # TEST-ONLY: ORCH_TEST_RAISE_OOM_AT_STEP=<n> raises CUDA OOM inside step n, so the
        # out-of-memory path is tested on CPU (tests/reliability/test_runtime_faults.py). Unset in real runs.
        oom_at = int(os.environ.get("ORCH_TEST_RAISE_OOM_AT_STEP") or 0)
        while self.step < self.total_steps:
            step = self.step
            step_tokens = self.batcher.step_loss_tokens(step)
            # d(loss)/d(params) = d(sum of token losses / loss tokens of the step):
            # DeepSpeed divides by grad_accum and averages over ranks, so scale back up.
            scale = torch.tensor(ga * self.world / max(step_tokens, 1), device=self.device, dtype=torch.float32)
            acc = torch.zeros((), device=self.device, dtype=torch.float32)
            try:
                if oom_at == step + 1:  # TEST-ONLY fault injection (ORCH_TEST_RAISE_OOM_AT_STEP)
                    raise torch.cuda.OutOfMemoryError("ORCH_TEST_RAISE_OOM_AT_STEP")
                for m in range(ga):
                    b = self.micro_batch(step, m)
                    loss = self.engine(b["input_ids"], b["position_ids"], b["targets"], scale)
                    self.engine.backward(loss)
                    self.engine.step()
                    acc += loss.detach().float()
                if self.compiled is not None and self.compiled_variants is None:
                    # after the first step: the decoder layers must have run compiled code
                    self.compiled_variants = S.check_compiled(self.compiled)
            except torch.cuda.OutOfMemoryError:
                if bar is not None:
                    bar.close()  # ends the progress line, so the error is a line of its own
                raise OrchError(self.oom_message(), Exit.TRAIN_FAILED) from None
            except S.CompileError:  # graph break, recompile limit, or layers that never ran compiled
                if bar is not None:
                    bar.close()
                raise
            self.step += 1
            window_tokens += step_tokens
            if self.step % log_every == 0 or self.step == self.total_steps:
                # the only sync per log step: the step loss over all ranks
                if self.world > 1:
                    self.dist.all_reduce(acc)
                self.last_loss = acc.item() / (ga * self.world)
                now = time.time()
                self.tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                self.log_step()
                window_tokens, window_start = 0, time.time()
                if bar is not None:
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", tok_s=f"{self.tokens_per_s:.0f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if self.eval_due(at_end=False) and self.run_eval():  # early stopping: finish() saves the final checkpoint
                break
            stop = self.stop_agreed()
            if stop or (save_every and self.step % save_every == 0 and self.step < self.total_steps):
                self.save()
            if stop:
                if bar is not None:
                    bar.close()
                raise OrchError(f"stopped by signal at step {self.step}; checkpoint written, resume with --resume", Exit.REQUEUE)
        if bar is not None:
            bar.close()
        if self.eval_due(at_end=True):
            self.run_eval()

    def stop_agreed(self) -> bool:
        """True on every rank if any rank got SIGUSR1/SIGTERM (one small all-reduce per step)."""
        if self.world == 1:
            return self.stop_requested
        torch = self.torch
        flag = torch.tensor([1 if self.stop_requested else 0], device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return bool(flag.item())

    def memory_now(self) -> dict:
        torch = self.torch
        if self.cuda:
            return {"mem_allocated": torch.cuda.memory_allocated(), "mem_reserved": torch.cuda.memory_reserved(),
                    "mem_peak": torch.cuda.max_memory_allocated(), "cpu_rss": _rss()}
        # CPU: there is no allocator counter; the GPU fields are null, cpu_rss is the process RSS.
        return {"mem_allocated": None, "mem_reserved": None, "mem_peak": None, "cpu_rss": _rss()}

    def log_step(self) -> None:
        lr = self.engine.get_lr()[0] if self.engine.get_lr() else None
        shares = self.trained_mixture()
        record = {"step": self.step, "rank": self.rank, "loss": self.last_loss, "lr": lr,
                  "tokens_per_s": self.tokens_per_s, **self.memory_now(), "time": time.time(),
                  "source_tokens": {s.name: s.tokens for s in shares}}
        with open(self.metrics_path, "a") as f:  # one short line per write: appends from ranks do not interleave
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if k not in ("rank", "time", "source_tokens") and v is not None}
            self.wandb.log({**flat, **{f"source_tokens/{s.name}": s.tokens for s in shares}}, step=self.step)

    def eval_due(self, at_end: bool) -> bool:
        """An eval of the eval split now: every training.eval_every steps, and at the end unless the last step had one."""
        if self.evals is None:
            return False
        if at_end:
            return self.evals.last_step != self.step
        every = self.job.training.eval_every
        return bool(every) and self.step % every == 0

    def run_eval(self) -> bool:
        """Evaluate at this step (all ranks): log it, checkpoint a new best that no other save would, and
        return True when early stopping ends training."""
        from orchestrator import evaluate as EV

        result = EV.evaluate(self.engine, self.evals.batches, self.rank, self.device)
        verdict = self.evals.record(self.step, result)
        if self.is_main:
            record = {"step": self.step, "rank": self.rank, "eval_loss": result.loss, "eval_ppl": result.perplexity,
                      "eval_tokens": result.tokens, "time": time.time()}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log({"eval_loss": result.loss, "eval_ppl": result.perplexity}, step=self.step)
            from tqdm import tqdm

            tqdm.write(f"orch: eval at step {self.step}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f}"
                       + (" (best so far)" if verdict.new_best else ""), file=sys.stderr)
        save_every = self.job.training.save_every
        # the best checkpoint is kept: at save_every steps the loop saves it, at the last step finish() does
        if verdict.new_best and self.step < self.total_steps and not (save_every and self.step % save_every == 0):
            self.save()
        if verdict.stop and self.is_main:
            stopping = self.evals.stopping
            print(f"orch: early stopping at step {self.step}: eval loss not below {stopping.best_loss:.4f} (step "
                  f"{stopping.best_step}) for {stopping.evals_since_best} evals (training.early_stopping_patience)",
                  file=sys.stderr)
        return verdict.stop

    def oom_message(self) -> str:
        torch = self.torch
        used = torch.cuda.max_memory_allocated() if self.cuda else None
        pred = predicted(self.job, self.strategy)
        nxt = next_strategy(self.job, self.strategy)
        gib = lambda b: "unknown" if b is None else f"{b / GIB:.2f} GiB"  # noqa: E731
        return (f"out of GPU memory on rank {self.rank} in step {self.step + 1} with strategy {self.strategy}: "
                f"predicted peak {gib(pred[0])}, used {gib(used)} (max allocated); "
                + (f"try strategy={nxt} (orch plan shows the options)" if nxt else "no larger-saving strategy left: "
                   "lower training.micro_batch_size or data.seq_len, or add GPUs"))

    # ------------------------------------------------------------------ save

    def save(self) -> None:
        from orchestrator import checkpoint as C

        client = {"step": self.step, "data_position": self.step * self.batcher.global_batch,
                  "seed": self.job.training.seed, "world_size": self.world}
        C.save(self.engine, self.ckpt_root, self.step, client, self.rank, self.world, self.strategy, self.barrier,
               exclude_frozen=self.job.method != "full")
        self.saved_step = self.step
        if self.job.method != "full":
            self.save_adapter()

    def save_adapter(self) -> None:
        """LoRA adapters in PEFT format (``adapter/``). Under ZeRO-3 only the adapter params are gathered."""
        import shutil

        import deepspeed
        from peft import get_peft_model_state_dict

        peft_model = self.loaded.model
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=hasattr(params[0], "ds_id")):
            state = {n: p.detach().to("cpu", copy=True) for n, p in named} if self.is_main else None
        if self.is_main:
            target = self.out / "adapter"
            tmp = self.out / "adapter.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            peft_model.save_pretrained(str(tmp), state_dict=get_peft_model_state_dict(peft_model, state_dict=state))
            self.tok.save_pretrained(str(tmp))
            old = self.out / "adapter.old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    # ------------------------------------------------------------------ finish

    def finish(self) -> dict:
        torch = self.torch
        if self.saved_step != self.step:  # not when resumed from the final checkpoint
            self.save()
        mem = self.memory
        if self.cuda:
            mem.peak_allocated = torch.cuda.max_memory_allocated()
            mem.peak_reserved = torch.cuda.max_memory_reserved()
        mem.cpu_rss_peak = _peak_rss()
        per_rank = [None] * self.world
        if self.world > 1:
            self.dist.all_gather_object(per_rank, asdict(mem))
        else:
            per_rank = [asdict(mem)]
        summary = {}
        if self.is_main:
            summary = self.summary(per_rank)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            try:
                plot_memory(self.metrics_path, self.out / "memory.png", summary)
            except Exception as exc:  # noqa: BLE001 - a missing plot must not fail a finished run
                print(f"orch: memory plot not written: {exc}", file=sys.stderr)
            if self.wandb is not None:
                self.wandb.summary.update({k: v for k, v in summary.items() if k not in ("per_rank", "mixture")})
                for share in summary["mixture"]:
                    self.wandb.summary.update({f"mixture/{share['name']}/{k}": v for k, v in share.items() if k != "name"})
                for r in per_rank:
                    self.wandb.summary.update({f"rank{r['rank']}/{k}": v for k, v in r.items() if k != "rank"})
                self.wandb.finish()
            print(render_summary(summary), file=sys.stderr)
        self.barrier()
        return summary

    def summary(self, per_rank: list[dict]) -> dict:
        def top(key: str) -> Optional[int]:
            vals = [r[key] for r in per_rank if r.get(key) is not None]
            return max(vals) if vals else None

        pred = predicted(self.job, self.strategy)
        peak = top("peak_allocated")
        err = None
        if peak is not None and pred[0]:
            err = round(100.0 * (peak - pred[0]) / pred[0], 2)
        return {
            "job": self.job.name, "strategy": self.strategy, "world_size": self.world, "steps": self.step,
            "engine": self.engine_kind, "compiled_variants": self.compiled_variants, "attention": self.loaded.attention,
            "final_loss": self.last_loss, "tokens_per_s": self.tokens_per_s,
            "device": "cuda" if self.cuda else "cpu",
            "load_peak_bytes": top("load_peak_allocated"), "peak_allocated_bytes": peak,
            "cpu_rss_peak_bytes": top("cpu_rss_peak"), "load_seconds": round(self.load_seconds, 3),
            "per_rank": per_rank,
            "predicted_peak_bytes": pred[0],
            "predicted_load_peak_bytes": pred[1],
            "error_pct": err,
            "mixture": [asdict(share) for share in self.trained_mixture()],
            **(self.evals.summary(self.ckpt_root) if self.evals is not None else {}),
        }

    def trained_mixture(self) -> list:
        """Tokens, loss tokens and examples per training source over the steps trained (data.SourceShare)."""
        from orchestrator import data as D

        return D.mixture(self.job.data.train_sources(), self.batcher.source_counts(self.step))

    def cleanup(self) -> None:
        try:
            if self.dist.is_initialized():
                self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass


# ---------------------------------------------------------------------------
# predictions (orch's memory model and planner)


def predicted(job, strategy: str) -> tuple[int, int]:
    """(predicted peak allocated, predicted load peak) from orch's memory model."""
    from orchestrator.memory import estimate

    est = estimate(job, strategy)
    return est.peak_allocated, est.load_peak


def next_strategy(job, strategy: str) -> Optional[str]:
    """The next strategy that saves more memory than ``strategy``: the first later one in the plan's
    order that the planner says fits, else the next valid one; None when ``strategy`` is the last."""
    from orchestrator import planner

    cands = planner.plan(job).candidates
    names = [c.strategy for c in cands]
    later = cands[names.index(strategy) + 1:] if strategy in names else []
    fitting = [c.strategy for c in later if c.fits]
    return (fitting or [c.strategy for c in later] or [None])[0]


def param_bytes(module) -> tuple[int, int, int, int]:
    """(local, full, quantized local, quantized full) parameter bytes; ZeRO-3 keeps ``ds_tensor`` (this rank's part)."""
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
    return local, full, q_local, q_full


def render_summary(s: dict) -> str:
    gib = lambda b: "n/a" if b is None else f"{b / GIB:.3f} GiB"  # noqa: E731
    lines = [f"orch: {s['job']}: {s['steps']} steps, final loss {s['final_loss']}, {s['strategy']} on {s['world_size']} x {s['device']}"]
    lines.append(f"  peak allocated: measured {gib(s['peak_allocated_bytes'])}, predicted {gib(s['predicted_peak_bytes'])}, "
                 f"error {s['error_pct'] if s['error_pct'] is not None else 'n/a'} %")
    lines.append(f"  load peak: measured {gib(s['load_peak_bytes'])}, predicted {gib(s['predicted_load_peak_bytes'])}; "
                 f"CPU RSS peak {gib(s['cpu_rss_peak_bytes'])}")
    if s.get("eval_loss") is not None:
        lines.append(f"  eval loss {s['eval_loss']:.4f} (step {s['eval_step']}), best {s['best_eval_loss']:.4f} at step "
                     f"{s['best_step']}" + (f" ({s['best_checkpoint']})" if s.get("best_checkpoint") else "")
                     + (", stopped early" if s.get("early_stopped") else ""))
    return "\n".join(lines)


def plot_memory(metrics: Path, png: Path, summary: dict) -> None:
    """Memory over steps per rank (GPU allocated/reserved, or CPU RSS on CPU), with the predicted peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[int, list[dict]] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "eval_loss" in rec:
            continue
        runs.setdefault(rec["rank"], []).append(rec)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rank, recs in sorted(runs.items()):
        steps = [r["step"] for r in recs]
        if recs[0].get("mem_allocated") is not None:
            ax.plot(steps, [r["mem_allocated"] / GIB for r in recs], label=f"rank {rank} allocated")
            ax.plot(steps, [r["mem_peak"] / GIB for r in recs], "--", label=f"rank {rank} peak")
            ax.plot(steps, [r["mem_reserved"] / GIB for r in recs], ":", label=f"rank {rank} reserved")
        else:
            ax.plot(steps, [r["cpu_rss"] / GIB for r in recs], label=f"rank {rank} CPU RSS")
    if summary.get("predicted_peak_bytes"):
        ax.axhline(summary["predicted_peak_bytes"] / GIB, color="red", label="predicted peak")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GiB")
    ax.set_title(f"{summary['job']} ({summary['strategy']}, {summary['world_size']} ranks)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------
# entry points


def run(job_path: str, overrides: Sequence[str], ds_config: Optional[str], resume: bool) -> int:
    from orchestrator import planner, preflight
    from orchestrator.spec import load_job

    try:
        job = load_job(job_path, list(overrides), for_training=True)
        strategy = job.strategy
        if strategy == "auto" or not job.knobs_resolved():
            # `orch train JOB` on a spec: choose like `orch compile` does (a compiled job has no auto left)
            strategy, job = planner.resolve(job)
        try:  # again here: the job may run on a node that sees another file system than the submitter
            preflight.check_output_dir(job.output_dir(), preflight.checkpoint_bytes(job, strategy))
        except preflight.PreflightError as exc:
            # Here the job is already running: the spec's output dir is what is wrong, not a submit.
            raise OrchError(str(exc), Exit.BAD_SPEC) from None
    except OrchError as exc:
        print_error(exc)
        return exc.code
    trainer = Trainer(job, strategy, ds_config, resume)
    try:
        trainer.setup()
        trainer.train()
        trainer.finish()
        return Exit.OK
    except OrchError as exc:
        print_error(exc)
        if exc.code == Exit.TRAIN_FAILED and getattr(trainer, "world", 1) > 1:
            # the other ranks may be blocked in a collective: leave now (the
            # launcher stops them) instead of hanging in destroy_process_group
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(exc.code)
        return exc.code
    finally:
        if hasattr(trainer, "dist"):
            trainer.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.train", description="orch trainer (one rank)")
    p.add_argument("--job", required=True, help="compiled job YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides")
    p.add_argument("--ds-config", help="DeepSpeed JSON (default: built from the job)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides before or after the options
    return run(args.job, args.overrides, args.ds_config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
