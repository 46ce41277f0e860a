"""Throughput: orch's trainer vs a plain Hugging Face Trainer + PEFT baseline doing the same job (issue 7).

    PYTHONPATH=$PWD python benchmarks/throughput.py --list
    PYTHONPATH=$PWD python benchmarks/throughput.py                            # all cases (GPU machine)
    PYTHONPATH=$PWD python benchmarks/throughput.py --only qlora-8b-s2048-mb1 --steps 12
    PYTHONPATH=$PWD python benchmarks/throughput.py --tiny                     # CPU smoke test (tiny-llama)

For each case, on the same machine and one after the other, each in its own
process (fresh CUDA context, clean peak-memory counters):

* orch: the resolved job YAML (benchmarks/common.py's BASE + overrides, random
  weights, synthetic packed text) run by ``python -m orchestrator.train``
  (``deepspeed --num_gpus N --module orchestrator.train`` on N > 1 GPUs);
  step end times and per-step peak memory come from ``<output_dir>/metrics.jsonl``
  (``log_every: 1``; the trainer syncs the GPU once per logged step with ``loss.item()``).
* orch runs with its defaults (``training.engine``, ``training.compile`` and
  ``model.attn_implementation`` auto); the row records what it used (summary.json:
  engine, compiled_variants, attention).
* baseline, "HF": ``python benchmarks/throughput.py --baseline-worker CASE --job JOB.yaml --out FILE``
  (``torchrun`` on N > 1 GPUs): the same shape as a transformers model built from
  config, random weights, 4-bit via bitsandbytes ``Linear4bit`` for qlora, then the
  standard PEFT recipe (``prepare_model_for_kbit_training`` for qlora,
  ``get_peft_model`` with the same LoRA r/alpha/dropout on all linear layers) and
  ``transformers.Trainer`` with Hugging Face's defaults (its default optimizer --
  fused AdamW on torch >= 2.8 -- and attention kernel, sdpa), bf16 autocast, gradient
  checkpointing, no checkpoint saving. A ``TrainerCallback`` records each step's end time after
  ``torch.cuda.synchronize()``. The rows are exactly the ones orch trains on
  (orch's tokenizer and packing of the same file), passed with ``position_ids``
  so both sides run the same block-diagonal packed attention.
* baseline "HF + flags": the same worker with ``--flags``: ``use_liger_kernel=True``
  (Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy, when liger-kernel is
  installed; it needs triton and CUDA) and ``torch_compile=True``. The row records what
  actually ran: the modules Liger patched (or "not installed"), the graphs dynamo
  compiled and its graph breaks, and the optimizer and attention used, next to the
  peak memory. Both ratios (vs HF and vs HF + flags) come from the same run.

Throughput: processed tokens (micro batch x seq_len x GPUs per step, padding
included -- both sides run the model on full rows) over the wall time from the
end of step ``--warmup`` to the end of the last step, i.e. the warm-up steps
(CUDA/cuBLAS init, allocator growth, optimizer state creation) are excluded.
orch's own ``tokens_per_s`` (loss-bearing tokens of the last log window) is kept
as ``reported_tokens_per_s`` for reference only.

Peak memory: ``torch.cuda.max_memory_allocated`` during training (counters reset
after the model is built; max over ranks). orch's trainer also saves a final
checkpoint after the last step; its peak is taken from the per-step records, so
that save is not in it. No checkpoint is written during the timed steps
(``save_every: 0``; the baseline uses ``save_strategy="no"``).

MFU = tokens/s x FLOPs per token / (GPUs x peak dense 16-bit FLOP/s), both from
orch: FLOPs per token as the planner's speed model counts them
(``planner.flops_per_token``, weight matmuls plus attention: weight gradients only
for trained weights, the checkpointing recompute and the chunked loss's LM-head
recompute included), the GPU's peak from ``catalog.GPUS`` (the H100 PCIe and NVL
count as the SXM part there). The same count on both sides, so the two MFUs
compare. (benchmarks/results/throughput.json, measured 2026-11-23, used PaLM's
6 N + 12 L (heads x head_dim) T instead.)

Results: benchmarks/results/throughput.json (+ .md). Nothing in this file is a
measurement: run it on the GPU machine (benchmarks/device/throughput.sh).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    Config, add_timing_args, check_timing_args, child_env, machine, make_job, prepare_run, run_logged, select_named,
    trainer_command, versions,
)
from orchestrator import planner  # noqa: E402
from orchestrator.catalog import GIB, GPUS  # noqa: E402
from orchestrator.spec import JobSpec  # noqa: E402
from orchestrator.strategy import STRATEGIES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "throughput"

@dataclass(frozen=True)
class Case:
    """One benchmarked job shape; both sides run exactly this."""

    name: str
    method: str
    """qlora, lora or full."""
    micro_batch: int
    seq_len: int = 2048
    gpus: int = 1
    strategy: str = "single_gpu"
    model: str = "llama3-8b"
    dtype: str = "bf16"
    """model.dtype and the 4-bit compute dtype; fp32 only for the CPU smoke cases."""
    lora_r: int = 16
    gradient_checkpointing: bool = True
    cpu: bool = False
    """A smoke case that runs on the CPU (no GPU check, no MFU)."""

    def overrides(self, steps: int) -> tuple[str, ...]:
        """Spec overrides on common.BASE (LoRA alpha 32, dropout 0.05, nf4 + double quant)."""
        return (f"model.name={self.model}", f"model.dtype={self.dtype}", f"quantization.compute_dtype={self.dtype}",
                f"method={self.method}", f"lora.r={self.lora_r}", f"data.seq_len={self.seq_len}",
                f"training.micro_batch_size={self.micro_batch}",
                f"training.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                # save_every 0: orch checkpoints only after the last step, outside the timed window
                f"training.max_steps={steps}", "training.save_every=0", "logging.log_every=1")

    def config(self, steps: int) -> Config:
        return Config(self.name, "throughput", self.strategy, self.gpus, self.overrides(steps))

    def job(self, steps: int) -> JobSpec:
        """The resolved job of this case (what prepare_run writes), for its FLOP count without running it."""
        return make_job(self.config(steps), RUNS / self.name / "out", RUNS / self.name / "data.jsonl", "throughput")

    def tokens_per_step(self) -> int:
        """Tokens the model processes per optimizer step over all GPUs (grad accumulation 1)."""
        return self.micro_batch * self.seq_len * self.gpus


CASES: list[Case] = [
    Case("qlora-8b-s2048-mb1", "qlora", 1),
    Case("qlora-8b-s2048-mb4", "qlora", 4),
    Case("lora-8b-s2048-mb1", "lora", 1),
    Case("full-8b-zero3-2gpu", "full", 1, gpus=2, strategy="zero3"),
]

# --tiny: the same harness on the CPU with the built-in 2-layer tiny-llama (fp32: CPUs lack fast bf16).
TINY_CASES: list[Case] = [
    Case("tiny-qlora-cpu", "qlora", 2, seq_len=64, model="tiny-llama", dtype="fp32", lora_r=8, cpu=True),
    Case("tiny-lora-cpu", "lora", 2, seq_len=64, model="tiny-llama", dtype="fp32", lora_r=8, cpu=True),
]


# ---------------------------------------------------------------------------
# Arithmetic shared by both sides


def steady_tokens_per_s(step_end_times: Sequence[float], warmup: int, tokens_per_step: int) -> Optional[float]:
    """Tokens/s over steps warmup+1..N: ``step_end_times[k]`` is the wall time at the end of step k+1.

    Both sides use this with their own step end times, so the warm-up steps are
    excluded the same way. None if fewer than warmup + 1 steps finished.
    """
    if warmup < 1 or len(step_end_times) <= warmup:
        return None
    seconds = step_end_times[-1] - step_end_times[warmup - 1]
    return (len(step_end_times) - warmup) * tokens_per_step / seconds if seconds > 0 else None


def peak_flops(device_name: str) -> Optional[float]:
    """Dense 16-bit peak FLOP/s of the catalog GPU whose model (its name before '-': H100, L40S, RTX4090, ...)
    appears in torch's device name ('NVIDIA H100 80GB HBM3'); the longest model name wins (L40S, not L4).
    None when no catalog GPU matches (the CPU included)."""
    compact = device_name.replace(" ", "").upper()
    for name in sorted(GPUS, key=lambda n: -len(n.split("-")[0])):
        if name.split("-")[0].upper() in compact:
            return GPUS[name].peak_tflops * 1e12
    return None


def mfu(tokens_per_s: Optional[float], fpt: int, peak: Optional[float], gpus: int) -> Optional[float]:
    if tokens_per_s is None or peak is None:
        return None
    return tokens_per_s * fpt / (peak * gpus)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------
# orch's side


def orch_records(out_dir: Path) -> list[dict]:
    """Per-step records of every rank (metrics.jsonl)."""
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_orch(case: Case, run_dir: Path, job_path: Path, steps: int, warmup: int, timeout: int) -> dict:
    cmd = trainer_command(case.config(steps), job_path)
    rc, tail, seconds = run_logged(cmd, child_env(), timeout)
    side: dict = {"command": shlex.join(cmd), "returncode": rc, "seconds": seconds}
    records = orch_records(run_dir / "out")
    summary_path = run_dir / "out" / "summary.json"
    if rc != 0 or not summary_path.exists():
        return failed(side, tail)
    summary = json.loads(summary_path.read_text())
    rank0 = sorted((r for r in records if r["rank"] == 0), key=lambda r: r["step"])
    peaks = [r["mem_peak"] for r in records if r.get("mem_peak") is not None]
    side.update(
        steps=len(rank0),
        tokens_per_s=steady_tokens_per_s([r["time"] for r in rank0], warmup, case.tokens_per_step()),
        peak_allocated_bytes=max(peaks) if peaks else None,
        peak_allocated_incl_final_save_bytes=summary.get("peak_allocated_bytes"),
        load_peak_bytes=summary.get("load_peak_bytes"),
        final_loss=summary.get("final_loss"),
        reported_tokens_per_s=summary.get("tokens_per_s"),
        engine=summary.get("engine"), compiled_variants=summary.get("compiled_variants"),
        attention=summary.get("attention"),
    )
    return side


def failed(side: dict, tail: str) -> dict:
    side.update(tokens_per_s=None, peak_allocated_bytes=None, oom="out of memory" in tail.lower(), log_tail=tail)
    return side


# ---------------------------------------------------------------------------
# Baseline side: the runner (parent) and the worker (its own process)


def baseline_command(case: Case, job_path: Path, out: Path, steps: int, flags: bool = False) -> list[str]:
    worker = [str(Path(__file__).resolve()), "--baseline-worker", case.name, "--job", str(job_path),
              "--out", str(out), "--steps", str(steps)] + (["--flags"] if flags else [])
    if case.gpus == 1:
        return [sys.executable, *worker]
    # one process per GPU; HF Trainer picks DeepSpeed ZeRO-3 up from the worker's TrainingArguments
    return ["torchrun", "--standalone", "--nproc_per_node", str(case.gpus), *worker]


def run_baseline(case: Case, run_dir: Path, job_path: Path, steps: int, warmup: int, timeout: int,
                 flags: bool = False) -> dict:
    out = run_dir / ("baseline_flags.json" if flags else "baseline.json")
    cmd = baseline_command(case, job_path, out, steps, flags)
    rc, tail, seconds = run_logged(cmd, child_env(), timeout)
    side: dict = {"command": shlex.join(cmd), "returncode": rc, "seconds": seconds}
    if rc != 0 or not out.exists():
        return failed(side, tail)
    res = json.loads(out.read_text())
    side.update(
        steps=len(res["step_end_times"]),
        tokens_per_s=steady_tokens_per_s(res["step_end_times"], warmup, case.tokens_per_step()),
        peak_allocated_bytes=res["peak_allocated_bytes"],
        load_peak_bytes=res["load_peak_bytes"],
        final_loss=res["final_loss"],
        **{k: res[k] for k in BASELINE_RECORDS},
    )
    return side


BASELINE_RECORDS = ("optimizer", "attention", "liger", "compiled")
"""What a baseline run records about itself besides time and memory (baseline_worker)."""


def build_baseline_model(job, torch, cuda: bool):
    """The job's model the plain transformers/PEFT way (random weights: there is no checkpoint to load)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.modeling import torch_dtype

    shape = job.shape().to_hf_config()
    shape.pop("architectures")
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)  # LlamaConfig for the llama presets
    config.use_cache = False
    dtype = torch_dtype(job.model.dtype)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    gc_kwargs = {"use_reentrant": False}  # as orch; reentrant checkpointing would need enable_input_require_grads
    # attention: Hugging Face's default kernel (no attn_implementation: sdpa where torch has it)
    if job.method == "full":
        # Under ZeRO-3 (HfDeepSpeedConfig alive via TrainingArguments) from_config builds partitioned.
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if job.method == "qlora":
        quantize_4bit_(model, job, torch)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.training.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    lora = LoraConfig(r=job.lora.r, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def quantize_4bit_(model, job, torch) -> None:
    """Every linear layer of the decoder blocks -> bitsandbytes Linear4bit, one at a time (the bnb recipe).

    What ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit, nf4,
    double quant, compute dtype))`` produces, minus the checkpoint: moving an
    unquantized ``Params4bit`` to a device quantizes it.
    """
    import bitsandbytes as bnb

    q = job.quantization
    from orchestrator.modeling import torch_dtype

    compute = torch_dtype(q.compute_dtype)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                device = child.weight.device
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=compute, compress_statistics=q.double_quant, quant_type=q.type,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type=q.type,
                                               compress_statistics=q.double_quant, blocksize=q.block_size).to(device)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, child_name, new)
    model.is_loaded_in_4bit = True  # what PEFT looks at to treat it as a k-bit model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def baseline_dataset(job, torch):
    """orch's own packed rows of the job's data file, as HF input_ids / position_ids / labels.

    orch's targets are already shifted (target[t] = token t+1); HF models shift
    labels themselves (logits[t] vs labels[t+1]), so labels[1:] = targets[:-1].
    position_ids restart at every packed example, from which transformers builds
    the same block-diagonal causal mask orch's trainer gets.
    """
    import numpy as np

    from orchestrator import data as D

    rows = D.tokenize_all(job, D.load_tokenizer(job, job.shape().vocab_size)).train
    labels = np.full_like(rows.targets, D.IGNORE)
    labels[:, 1:] = rows.targets[:, :-1]
    tensors = {"input_ids": rows.input_ids, "position_ids": rows.position_ids, "labels": labels}

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return rows.n

        def __getitem__(self, i: int) -> dict:
            return {k: torch.from_numpy(v[i]) for k, v in tensors.items()}

    return Rows()


def zero3_config(job) -> dict:
    """DeepSpeed ZeRO-3 for the HF Trainer ("auto": filled in from TrainingArguments)."""
    return {"zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": False},
            "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def liger_record(model) -> str:
    """What Liger changed in ``model``: the modules whose forward it replaced, by kernel."""
    patched: dict[str, int] = {}
    for m in model.modules():
        fn = getattr(m.forward, "__func__", m.forward)
        module = getattr(fn, "__module__", "") or ""
        if module.startswith("liger_kernel"):
            name = getattr(fn, "__qualname__", "forward").split(".")[0]
            patched[name] = patched.get(name, 0) + 1
    if not patched:
        return "installed, patched nothing"
    return "applied: " + ", ".join(f"{n} x{k}" for n, k in sorted(patched.items()))


def compile_record(trainer, torch) -> str:
    """Whether dynamo compiled the model: the graphs it made and its graph breaks (0 graphs: it did not run)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    wrapped = type(trainer.model_wrapped).__name__
    return f"{graphs} graphs, {breaks} graph breaks ({wrapped})"


def baseline_worker(case_name: str, job_path: str, out: str, steps: int, flags: bool = False) -> int:
    """One baseline run (its own process): writes step end times, peak memory and what ran to ``out`` (rank 0).

    ``flags``: "HF + flags", use_liger_kernel (when liger-kernel is installed) and torch_compile.
    """
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from orchestrator.spec import load_job

    job = load_job(job_path, for_training=True)
    case = next(c for c in CASES + TINY_CASES if c.name == case_name)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = job.training
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf-baseline-"), max_steps=steps,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=job.grad_accum(),
        learning_rate=t.lr, lr_scheduler_type=t.lr_schedule, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed,  # optim: Hugging Face's default
        use_liger_kernel=flags and liger_installed(), torch_compile=flags,
        bf16=job.model.dtype == "bf16" and cuda, use_cpu=not cuda,
        gradient_checkpointing=t.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
        dataloader_drop_last=True, dataloader_num_workers=0,
        deepspeed=zero3_config(job) if STRATEGIES[case.strategy].sharded else None,
    )
    torch.manual_seed(t.seed)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build_baseline_model(job, torch, cuda)
    dataset = baseline_dataset(job, torch)
    load_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # as orch: the training peak starts after the model is built

    class StepTimer(TrainerCallback):
        """Wall time at the end of every optimizer step, after the GPU finished it."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002
            sync()
            self.times.append(time.time())

    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer])
    result = trainer.train()
    sync()
    records = {"optimizer": str(args.optim.value if hasattr(args.optim, "value") else args.optim),
               "attention": getattr(getattr(model, "config", None), "_attn_implementation", None),
               "liger": ("not installed" if not liger_installed() else liger_record(trainer.model)) if flags else "off",
               "compiled": compile_record(trainer, torch) if flags else "off"}
    peak = torch.cuda.max_memory_allocated() if cuda else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, (peak, load_peak))
        peak, load_peak = max(p[0] for p in peaks), max(p[1] for p in peaks)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        Path(out).write_text(json.dumps({
            "step_end_times": timer.times, "peak_allocated_bytes": peak, "load_peak_bytes": load_peak,
            "final_loss": losses[-1] if losses else result.training_loss, **records,
        }) + "\n")
    return 0


# ---------------------------------------------------------------------------
# One case, both sides


def run_case(case: Case, steps: int, warmup: int, timeout: int, device: str, gpus_available: int) -> dict:
    row: dict = {"case": case.name, "method": case.method, "model": case.model, "gpus": case.gpus,
                 "strategy": case.strategy, "micro_batch": case.micro_batch, "seq_len": case.seq_len,
                 "lora_r": case.lora_r if case.method != "full" else None, "dtype": case.dtype,
                 "gradient_checkpointing": case.gradient_checkpointing, "steps": steps, "warmup_steps": warmup,
                 "tokens_per_step": case.tokens_per_step()}
    if not case.cpu and case.gpus > gpus_available:
        row["skipped"] = f"needs {case.gpus} GPUs, this machine has {gpus_available}"
        return row
    run_dir = RUNS / case.name
    job, job_path = prepare_run(case.config(steps), run_dir, name_prefix="throughput")
    row["job"] = str(job_path)
    row["orch"] = run_orch(case, run_dir, job_path, steps, warmup, timeout)
    row["baseline"] = run_baseline(case, run_dir, job_path, steps, warmup, timeout)
    row["baseline_flags"] = run_baseline(case, run_dir, job_path, steps, warmup, timeout, flags=True)
    fpt = sum(planner.flops_per_token(job, job.shape()))  # weight matmuls + attention
    peak = None if case.cpu else peak_flops(device)
    row.update(flops_per_token=fpt, peak_flops_per_gpu=peak)
    for side in SIDES:
        row[side]["mfu"] = mfu(row[side]["tokens_per_s"], fpt, peak, case.gpus)
    for base, suffix in (("baseline", ""), ("baseline_flags", "_vs_flags")):
        row["speedup" + suffix] = ratio(row["orch"]["tokens_per_s"], row[base]["tokens_per_s"])
        row["memory_ratio" + suffix] = ratio(row["orch"]["peak_allocated_bytes"], row[base]["peak_allocated_bytes"])
    return row


SIDES = ("orch", "baseline", "baseline_flags")
"""Each case's runs: orch with its defaults, HF Trainer + PEFT with HF's defaults, and the same with flags."""


# ---------------------------------------------------------------------------
# Reporting

COLUMNS = ("case", "orch tok/s", "HF tok/s", "HF+flags tok/s", "speedup", "vs flags", "orch GiB", "HF GiB",
           "HF+flags GiB", "memory ratio", "vs flags mem", "MFU % orch/HF/flags", "orch levers", "flags ran")


def _f(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _tps(side: dict) -> str:
    if side["tokens_per_s"] is None:
        return "OOM" if side.get("oom") else f"failed (rc {side['returncode']})"
    return format(side["tokens_per_s"], ".1f")


def table_cells(row: dict) -> list[str]:
    if "skipped" in row:
        return [row["case"], f"skipped: {row['skipped']}"] + [""] * (len(COLUMNS) - 2)
    o, b, f = (row[s] for s in SIDES)
    gib = lambda n: None if n is None else n / GIB  # noqa: E731
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    levers = "-" if o.get("engine") is None else \
        f"{o['engine']}, {'compiled' if o.get('compiled_variants') else 'eager'}, {o.get('attention')}"
    ran = "-" if f.get("compiled") is None else f"liger {f.get('liger')}; compile {f.get('compiled')}"
    return [row["case"], _tps(o), _tps(b), _tps(f), _f(row["speedup"], ".2f"), _f(row["speedup_vs_flags"], ".2f"),
            _f(gib(o["peak_allocated_bytes"]), ".2f"), _f(gib(b["peak_allocated_bytes"]), ".2f"),
            _f(gib(f["peak_allocated_bytes"]), ".2f"), _f(row["memory_ratio"], ".2f"),
            _f(row["memory_ratio_vs_flags"], ".2f"), "/".join(pct(s.get("mfu")) for s in (o, b, f)), levers, ran]


def print_table(rows: list[dict]) -> None:
    widths = [max(len(COLUMNS[i]), *(len(table_cells(r)[i]) for r in rows)) for i in range(len(COLUMNS))]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(table_cells(r), widths)))


NOTES = """\
- tok/s: tokens processed (micro batch x seq_len x GPUs per step, padding included) over the steps after the
  first {warmup} (warm-up excluded), from each side's step end times (GPU synced at every step end).
- speedup = orch tok/s / HF tok/s (> 1: orch faster), "vs flags" the same against HF + flags; memory ratio = orch
  peak / HF peak (< 1: orch smaller). Peak = torch.cuda.max_memory_allocated during training, reset after the model
  is built (max over ranks). All three sides of a row ran one after the other on the same GPU.
- MFU uses the FLOP count of orch's speed model (planner.flops_per_token: weight matmuls forward and backward,
  weight gradients of trained weights only, the checkpointing and LM-head recomputes, attention as the full
  square) and the GPU's dense 16-bit peak from orch's catalog.
- Same job on both sides: same preset shape with random weights, LoRA r/alpha/dropout on all decoder linears, nf4
  + double quant (qlora), gradient checkpointing (non-reentrant), AdamW, lr and schedule, and the same packed rows
  (orch's byte-level tokenizer and packing of the same synthetic file; the baseline gets them with position_ids).
- Recipe differences (what each side does by default): the baseline runs prepare_model_for_kbit_training (qlora:
  non-4-bit weights upcast to fp32), fp32 LoRA weights under bf16 autocast, full-vocabulary fp32 logits in its
  loss, Hugging Face's default optimizer (recorded in the JSON) and its default attention (sdpa with the packed
  rows' dense mask); orch keeps non-4-bit weights in model.dtype, computes the LM head + loss in chunks and runs
  its defaults: PlainEngine with fused AdamW on one GPU, compiled decoder layers and flex attention on CUDA
  ("orch levers": engine, layers, attention). HF + flags adds use_liger_kernel (Liger's RMSNorm, SwiGLU, RoPE and
  fused linear cross-entropy: no full logits) and torch_compile (the whole model); "flags ran" says what Liger
  patched (or "not installed") and what dynamo compiled.
"""


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Throughput: orch vs Hugging Face Trainer + PEFT ({meta.get('date', '')}, {meta.get('device', '')})", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(table_cells(r)) + " |" for r in rows]
    out += ["", NOTES.format(warmup=meta.get("warmup_steps")),
            "Versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())]
    return "\n".join(out) + "\n"


def save(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--tiny", action="store_true", help="the CPU smoke cases (tiny-llama, fp32) instead of the GPU ones")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/throughput.json; .md next to it)")
    add_timing_args(ap, steps=12, timeout=900, timeout_help="seconds per side of a case")
    ap.add_argument("--baseline-worker", metavar="CASE", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--flags", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.baseline_worker:
        return baseline_worker(args.baseline_worker, args.job, args.out, args.steps, args.flags)
    check_timing_args(ap, args)
    cases = select_named(TINY_CASES if args.tiny else CASES, args.only, "case", "" if args.tiny else " (and --tiny)")
    if cases is None:
        return 2
    if args.list:
        print(f"{'case':<22} {'method':<6} {'model':<10} {'GPUs':>4} {'mb':>3} {'seq':>5} {'GFLOP/token':>11}")
        for c in cases:
            job = c.job(args.steps)
            print(f"{c.name:<22} {c.method:<6} {c.model:<10} {c.gpus:>4} {c.micro_batch:>3} {c.seq_len:>5} "
                  f"{sum(planner.flops_per_token(job, job.shape())) / 1e9:>11.2f}")
        return 0

    out = Path(args.out) if args.out else RESULTS / ("throughput_tiny.json" if args.tiny else "throughput.json")
    device, gpus_available = machine()
    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
            "gpus_available": gpus_available, "versions": versions(), "steps": args.steps,
            "warmup_steps": args.warmup, "peak_bf16_flops_per_gpu": peak_flops(device)}
    rows = []
    for c in cases:
        print(f"running {c.name} ...", flush=True)
        row = run_case(c, args.steps, args.warmup, args.timeout, device, gpus_available)
        rows.append(row)
        print("  " + ("  ".join(f"{k}: {v}" for k, v in zip(COLUMNS[1:], table_cells(row)[1:]))), flush=True)
        save(rows, meta, out)  # after every case: a timeout later keeps what was measured
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
