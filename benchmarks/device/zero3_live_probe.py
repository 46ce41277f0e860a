"""Probe: which parameters stay gathered on the GPU during QLoRA training under a ZeRO-3 strategy.

    PYTHONPATH=$PWD python benchmarks/device/zero3_live_probe.py [MODEL] [STRATEGY]

One GPU; builds the memory_accuracy job for MODEL (default llama3-8b) and STRATEGY (default
zero3_offload_all), trains 2 optimizer steps through orch's recipe helpers and prints, after each
forward / backward / step: parameters whose ZeRO status is AVAILABLE with their bytes on the device
by class, torch.cuda.memory_allocated and max_memory_allocated.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import Config, prepare_run  # noqa: E402
from orchestrator import recipe as R  # noqa: E402
from orchestrator.data import Batcher  # noqa: E402

GIB = 2**30


def live(module) -> str:
    count, nbytes, by_kind = 0, 0, {}
    for _, p in module.named_parameters():
        if str(getattr(p, "ds_status", "")).endswith("AVAILABLE") and p.data.numel() > 0 and p.data.is_cuda:
            count += 1
            nbytes += p.data.numel() * p.element_size()
            kind = type(p).__name__
            by_kind[kind] = by_kind.get(kind, 0) + p.data.numel() * p.element_size()
    kinds = ", ".join(f"{k} {v / GIB:.2f}" for k, v in by_kind.items())
    return (f"live params {count} ({nbytes / GIB:.2f} GiB: {kinds}); allocated {torch.cuda.memory_allocated() / GIB:.2f}"
            f" GiB, max {torch.cuda.max_memory_allocated() / GIB:.2f} GiB")


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
    strategy = sys.argv[2] if len(sys.argv) > 2 else "zero3_offload_all"
    cfg = Config(f"probe-{model}-{strategy}", "probe", strategy, 1, (f"model.name={model}", "training.max_steps=2"))
    job, _ = prepare_run(cfg, ROOT / "runs" / "probe" / cfg.name)
    ri = R.RankInfo.from_environment()
    R.init_distributed(ri)
    out = R.setup_output_dir(job, ri)
    tok = R.setup_tokenizer(job)
    data = R.setup_data(job, tok, ri, out)
    batcher = Batcher(data.train, job.training.seed, job.training.micro_batch_size, job.grad_accum(), ri.world_size)
    ds = R.setup_ds_config(job, strategy, None, 2)
    for item in os.environ.get("ZERO", "").split(","):  # e.g. ZERO=stage3_prefetch_bucket_size=0
        if item:
            key, value = item.split("=")
            ds["zero_optimization"][key] = int(value)
    print("zero_optimization:", ds["zero_optimization"], flush=True)
    loaded = R.setup_model(job, strategy, ri, ds)
    print("after build:", live(loaded.model), flush=True)
    engine = R.setup_engine(job, strategy, loaded, ds, ri).engine
    print("after engine init:", live(engine.module), flush=True)
    peak = watch_fetches(engine.module)
    one = torch.ones((), device=ri.device)
    for step in range(2):
        for micro in range(job.grad_accum()):
            b = {k: torch.from_numpy(v).to(ri.device) for k, v in batcher.micro_batch_arrays(step, micro, ri.rank).items()}
            if step == 1:  # the step whose forward peaks (step 0 records DeepSpeed's fetch trace)
                torch.cuda.memory._record_memory_history(max_entries=2_000_000)
            loss = engine(b["input_ids"], b["position_ids"], b["targets"], one)
            print(f"step {step} micro {micro} after forward:", live(engine.module), flush=True)
            print(f"  most live parameter bytes at a ZeRO fetch so far: {peak}", flush=True)
            if step == 1:
                top_at_peak(torch.cuda.memory._snapshot())
                torch.cuda.memory._record_memory_history(enabled=None)
            engine.backward(loss)
            print(f"step {step} micro {micro} after backward:", live(engine.module), flush=True)
        engine.step()
        print(f"step {step} after optimizer step:", live(engine.module), flush=True)


def watch_fetches(module) -> dict:
    """Wrap DeepSpeed's sub-module fetch: record the most parameter bytes live on the GPU right after one."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as PPC

    peak = {"live_gib": 0.0, "allocated_gib": 0.0, "where": ""}
    original = PPC.PartitionedParameterCoordinator.fetch_sub_module

    def fetch(self, sub, forward):
        result = original(self, sub, forward)
        nbytes = sum(p.data.numel() * p.element_size() for p in module.parameters()
                     if str(getattr(p, "ds_status", "")).endswith("AVAILABLE") and p.data.is_cuda)
        if nbytes / GIB > peak["live_gib"]:
            peak.update(live_gib=round(nbytes / GIB, 3), allocated_gib=round(torch.cuda.memory_allocated() / GIB, 3),
                        where=f"{'forward' if forward else 'backward'} of {type(sub).__name__}")
        return result

    PPC.PartitionedParameterCoordinator.fetch_sub_module = fetch
    return peak


def top_at_peak(snapshot: dict, n: int = 12) -> None:
    """From the recorded alloc/free events: the allocations live at the highest point, by call site."""
    events = [e for trace in snapshot["device_traces"] for e in trace if e["action"] in ("alloc", "free_completed")]
    live_now, total, best, best_live = {}, 0, 0, {}
    for e in events:
        if e["action"] == "alloc":
            live_now[e["addr"]] = e
            total += e["size"]
        elif e["addr"] in live_now:
            total -= live_now.pop(e["addr"])["size"]
        if total > best:
            best, best_live = total, dict(live_now)
    sites = {}
    for e in best_live.values():
        frames = [f for f in e.get("frames", []) if any(k in f["filename"] for k in ("orchestrator", "deepspeed",
                  "bitsandbytes", "transformers", "peft", "torch/utils/checkpoint"))]
        key = " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"
        sites[key] = sites.get(key, 0) + e["size"]
    print(f"  recorded peak {best / GIB:.2f} GiB above the recording's start; live allocations there by site:")
    for key, size in sorted(sites.items(), key=lambda kv: -kv[1])[:n]:
        print(f"    {size / GIB:8.3f} GiB  {key}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
