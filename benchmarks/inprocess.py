"""orch's trainer pieces in one process, for the device scripts that run one model several ways without
building it again each time (benchmarks/knob_grid.py: a grid of micro batch x checkpointing) or look inside
one optimizer step (benchmarks/device/profile_step.py).

What a training run does, minus its checkpoints, logging and signals, through these calls of the trainer's
modules only -- the coupling to adapt when the trainer's recipe changes (orchestrator/recipe.py):

* data: ``data.load_tokenizer``, ``data.tokenize_all``, ``data.Batcher(...).micro_batch_arrays`` /
  ``step_loss_tokens`` (the trainer's ``prepare_rows`` adds only its cache);
* model: ``memory_cap.cap_gpu_memory`` (the planned GPU size), ``modeling.load_model``,
  ``modeling.CausalLMLoss``, ``modeling.set_checkpointing`` (checkpointing switched on a built model);
* engine: ``levers.resolve`` picks it as the trainer does; ``engine.PlainEngine`` from
  ``deepspeed_config.build_ds_config``, or ``deepspeed.initialize``;
* compiled layers: ``speedups.compile_decoder_layers`` once per model, ``check_compiled`` after a step;
* one optimizer step: the trainer's loop body (``recipe.train``): per micro batch
  ``loss = engine(ids, position_ids, targets, scale)``, ``engine.backward(loss)``, ``engine.step()``, with
  scale = grad_accum x world / loss tokens of the step.

Nothing here decides anything the trainer decides differently: the job is resolved by the planner
(``planner.with_knobs``) and the levers by ``levers.resolve`` for the device.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from orchestrator import data as D
from orchestrator import levers
from orchestrator import memory_cap
from orchestrator import modeling as M
from orchestrator import speedups as S
from orchestrator.deepspeed_config import build_ds_config
from orchestrator.spec import JobSpec

STRATEGY = "single_gpu"
"""These scripts measure one GPU."""


@dataclass
class Model:
    """A built model, kept across configurations of one job (same shape, method and levers)."""

    job: JobSpec
    """The job it was built for (its knobs are the first configuration's)."""
    device: torch.device
    """Where it lives."""
    loaded: M.LoadedModel
    """modeling.load_model's result."""
    module: M.CausalLMLoss
    """What the engine wraps: decoder + chunked loss."""
    levers: levers.Levers
    """Engine, compiled layers and attention for this device (levers.resolve)."""
    compiled: Optional[S.CompiledLayers]
    """The compiled decoder layers, when levers.compile."""
    cap: Optional[memory_cap.MemoryCap]
    """The allocator cap set for the planned GPU, if it is smaller than the device."""
    rows: D.Rows
    """The job's tokenized rows."""
    load_seconds: float
    """Wall time of the build."""


def device() -> torch.device:
    """cuda:0 when there is a GPU, else the CPU (one process, one device)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def init_distributed() -> None:
    """A one-process group, as the trainer's setup makes (DeepSpeed's engine needs one)."""
    import deepspeed

    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29563")):
        os.environ.setdefault(var, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def build(job: JobSpec, dev: torch.device, recompile_limit: int = S.RECOMPILE_LIMIT) -> Model:
    """Cap the allocator to the planned GPU, tokenize, build the model and compile its layers (as the trainer)."""
    used = levers.resolve(job, STRATEGY, job.shape(), cuda=dev.type == "cuda")
    cap = memory_cap.cap_gpu_memory(job, dev)
    tok = D.load_tokenizer(job, job.shape().vocab_size)
    rows = D.tokenize_all(job, tok).train  # the eval split, if any, is not timed
    start = time.time()
    loaded = M.load_model(job, STRATEGY, dev, job.training.seed)
    module = M.CausalLMLoss(loaded.model, loaded.base, job.training.loss_chunk_tokens)
    compiled = S.compile_decoder_layers(loaded.base.model.layers, recompile_limit) if used.compile else None
    return Model(job, dev, loaded, module, used, compiled, cap, rows, time.time() - start)


def engine(model: Model, job: JobSpec) -> Any:
    """A fresh engine (and optimizer) for ``job``'s knobs on the built model: PlainEngine or DeepSpeed's."""
    from orchestrator import engine as E

    config = build_ds_config(job, STRATEGY, job.shape(), job.training.max_steps)
    if model.levers.engine == "plain":
        return E.PlainEngine(model.module, E.EngineConfig.from_deepspeed(config))
    import deepspeed

    init_distributed()
    params = [p for p in model.module.parameters() if p.requires_grad]
    eng, _, _, _ = deepspeed.initialize(model=model.module, model_parameters=params, config=config)
    return eng


def set_checkpointing(model: Model, on: bool) -> None:
    """Switch activation checkpointing of the built model (the knob a grid point changes)."""
    M.set_checkpointing(model.loaded.base, on)


def optimizer_step(model: Model, eng: Any, batcher: D.Batcher, step: int) -> None:
    """One optimizer step of the trainer's loop (``recipe.train``), on one process."""
    ga = batcher.grad_accum
    scale = torch.tensor(ga / max(batcher.step_loss_tokens(step), 1), device=model.device, dtype=torch.float32)
    for micro in range(ga):
        arrays = batcher.micro_batch_arrays(step, micro, 0)
        b = {k: torch.from_numpy(v).to(model.device, non_blocking=True) for k, v in arrays.items()}
        loss = eng(b["input_ids"], b["position_ids"], b["targets"], scale)
        eng.backward(loss)
        eng.step()


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release(model: Model, eng: Any = None) -> None:
    """Drop an engine's optimizer state and every gradient, and hand the freed memory back to the
    allocator's pool: what a fresh configuration (or the one after an out-of-memory) starts from."""
    if eng is not None and hasattr(eng, "optimizer"):
        eng.optimizer = None
    for p in model.module.parameters():
        p.grad = None
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
