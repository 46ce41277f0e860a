"""Short training runs through an engine, for tests/test_engine.py (tests only).

`run` trains orch's tiny model (built by orchestrator.modeling, wrapped in its
CausalLMLoss) for a few optimizer steps through either engine, the way
orchestrator/train.py drives one: per micro step ``engine(...)``,
``engine.backward(loss)``, ``engine.step()``, loss scaled by
grad_accum / tokens of the step. The batches are a pure function of the step
(seeded generator), so two runs see the same data.

The DeepSpeed engine needs a torch.distributed group, which would outlive a
test; it runs in a fresh process::

    python -m tests.engine_runs JOB.yaml OUT.json [--neutralize-init-step]

writes ``{"losses": [...], "lrs": [...], "grad_norms": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from orchestrator import modeling as M
from orchestrator.deepspeed_config import build_ds_config
from orchestrator.spec import JobSpec, load_job

ROWS, SEQ, VOCAB = 2, 32, 512  # tiny-llama, data.seq_len of tests/train_helpers.tiny_job


@dataclass
class Curve:
    """What one run measured, per optimizer step."""

    losses: list[float] = field(default_factory=list)
    """Sum of token losses / loss tokens of the step (what the trainer logs)."""
    lrs: list[float] = field(default_factory=list)
    """engine.get_lr()[0] when the step started (the rate its update used)."""
    grad_norms: list[float] = field(default_factory=list)
    """Global gradient norm before clipping (PlainEngine's; empty for DeepSpeed, whose stage-0 fp32
    path does not keep it)."""


def build(job: JobSpec, device: torch.device = torch.device("cpu")) -> tuple[torch.nn.Module, dict]:
    """orch's model for ``job`` on ``device``, wrapped in CausalLMLoss, and its single_gpu DeepSpeed config."""
    torch.manual_seed(job.training.seed)  # as the trainer does: PEFT initializes LoRA A from the global generator
    loaded = M.load_model(job, "single_gpu", device, job.training.seed)
    module = M.CausalLMLoss(loaded.model, loaded.base, job.training.loss_chunk_tokens)
    return module, build_ds_config(job, "single_gpu", job.shape(), job.training.max_steps)


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Micro batch ``micro`` of step ``step``: two packed examples per row (positions restart at 20)."""
    gen = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    pos = torch.cat([torch.arange(20), torch.arange(SEQ - 20)]).repeat(ROWS, 1)
    targets = ids.roll(-1, dims=1)
    targets[:, 19] = -100  # no target across the example border
    targets[:, -1] = -100
    return ids, pos, targets


def run(engine, job: JobSpec, steps: int, first_step: int = 0) -> Curve:
    """Train ``steps`` optimizer steps from ``first_step``; ``engine`` is a DeepSpeed engine or a PlainEngine."""
    ga = job.grad_accum()
    curve = Curve()
    engine.train()
    for step in range(first_step, first_step + steps):
        device = next(engine.module.parameters()).device
        micro = [tuple(t.to(device) for t in batch(step, m)) for m in range(ga)]
        tokens = sum(int((t != -100).sum()) for _, _, t in micro)
        scale = torch.tensor(ga / tokens, device=device)
        curve.lrs.append(engine.get_lr()[0])
        total = 0.0
        for ids, pos, targets in micro:
            loss = engine(ids, pos, targets, scale)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        curve.losses.append(total / ga)
        if hasattr(engine, "last_grad_norm"):  # PlainEngine
            curve.grad_norms.append(float(engine.last_grad_norm))
    return curve


def deepspeed_engine(job: JobSpec, neutralize_init_step: bool, device: torch.device = torch.device("cpu")):
    """DeepSpeed's single_gpu engine for ``job`` (needs torch.distributed initialized).

    ``neutralize_init_step``: undo what DeepSpeed's bf16 stage-0 optimizer does when it is
    built (one AdamW step on zero gradients: Adam's step counter starts at 1 and the weights
    decay once), so the run is plain AdamW like PlainEngine's; see orchestrator/engine.py.
    """
    import deepspeed

    module, config = build(job, device)
    params = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=config)
    if neutralize_init_step and job.model.dtype == "bf16":
        engine.optimizer.optimizer.state.clear()
        with torch.no_grad():
            for master, p, b in zip(engine.optimizer.fp32_groups[0], params, before):
                master.copy_(b.float())
                p.copy_(b)
    return engine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.engine_runs")
    p.add_argument("job")
    p.add_argument("out")
    p.add_argument("--neutralize-init-step", action="store_true")
    args = p.parse_args(argv)
    import socket

    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        os.environ[var] = value
    from orchestrator import jit_ops

    jit_ops.disable_shm_comm()  # as the trainer does (see orchestrator/jit_ops.py)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    job = load_job(args.job, for_training=True)
    engine = deepspeed_engine(job, args.neutralize_init_step)
    curve = run(engine, job, job.training.max_steps)
    Path(args.out).write_text(json.dumps(asdict(curve)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
