"""PlainEngine: one-device training without the DeepSpeed engine (strategy single_gpu).

On one GPU without offload DeepSpeed's ZeRO stage 0 engine buys nothing but costs
time per micro step (measured on an H100, issue 16: 6 % for QLoRA 8B at micro
batch 4, 31 % for LoRA at micro batch 1). PlainEngine does the same arithmetic
with plain PyTorch and exposes exactly the part of DeepSpeed's engine API that
orch's trainer (``orchestrator/recipe.py``) and checkpointing
(``orchestrator/checkpoint.py``) call, so it drops in where
``deepspeed.initialize`` was::

    engine(*inputs)            the module's forward
    engine.backward(loss)      (loss / gradient_accumulation_steps).backward()
    engine.step()              every micro step; the optimizer steps at the accumulation boundary
    engine.train(), engine.get_lr(), engine.module
    engine.save_checkpoint(root, tag=, client_state=, save_latest=, exclude_frozen_parameters=)
    engine.load_checkpoint(root, tag=, load_module_strict=, load_optimizer_states=,
                           load_lr_scheduler_states=) -> (path or None, client_state)

It is built from the DeepSpeed config dict orch generates
(``orchestrator/deepspeed_config.py``): AdamW lr/betas/eps/weight_decay,
gradient_clipping, gradient_accumulation_steps, the scheduler block and the
bf16/fp16 switches. ``unsupported_reason`` says which configs it cannot run:
ZeRO stage > 0 (partitioning needs DeepSpeed), fp16 (it needs dynamic loss
scaling, which PlainEngine does not implement: fp16 jobs keep DeepSpeed),
optimizers other than AdamW.

What one optimizer step does, and how it compares with DeepSpeed 0.19.8 stage 0
(read from ``deepspeed/runtime/engine.py`` and ``fp16/unfused_optimizer.py``,
which is what DeepSpeed uses for bf16 at stage 0 with orch's torch AdamW):

* backward: ``loss / gradient_accumulation_steps``; gradients accumulate in
  ``param.grad`` in the parameter dtype over the micro steps (bf16 for bf16 --
  DeepSpeed does the same: its bf16 stage-0 grad accumulation dtype is bf16).
* at the boundary, bf16: each gradient is copied to fp32 onto its fp32 master
  (the bf16 gradient is freed as soon as it is copied); fp32: the parameters
  are their own masters and the gradients are used in place.
* the global L2 norm of all gradients; if it is not finite the step is skipped
  (no update, no scheduler step, ``skipped_steps`` + 1) -- DeepSpeed skips in
  bf16 and fp16 but not in fp32, where a NaN would reach the weights; here
  every dtype skips.
* clipping: gradients times ``min(1, clip / (norm + 1e-6))`` (DeepSpeed's formula).
* ``torch.optim.AdamW`` on the masters, fused where the device has the fused
  kernel (CUDA, CPU), else foreach. DeepSpeed runs the foreach AdamW (orch sets
  ``torch_adam``); the two agree to float rounding.
* bf16: the updated masters are copied into the bf16 weights.
* the learning-rate scheduler steps: DeepSpeed's own WarmupLR / WarmupDecayLR /
  WarmupCosineLR classes (``deepspeed.runtime.lr_schedules``) on this optimizer,
  stepped after every applied update as DeepSpeed's engine does, so the schedule
  is DeepSpeed's exactly -- including that the first step runs at the rate the
  scheduler set when it was built (WarmupCosineLR: 0.0).

One deliberate difference: DeepSpeed's bf16 stage-0 optimizer runs one AdamW
step on all-zero gradients when it is built (``initialize_optimizer_states``):
the weights decay once by ``lr x weight_decay`` and Adam's step counter starts
at 1, so its bias correction differs from plain AdamW (the first real update is
about 0.74x as large). ZeRO-2/3 and fp32 stage 0 do not do this; PlainEngine
does not either, so its bf16 updates are plain AdamW, as orch's other
strategies are.

Memory, bytes per trainable parameter (w = 2 for bf16, 4 for fp32):

=====================  =====  =====  ====================================================
component              bf16   fp32   lifetime
=====================  =====  =====  ====================================================
weights                2      4      always (in the model)
gradients              2      4      first backward of a step until that step's update
fp32 master weights    4      0      always (fp32: the weights are the masters)
Adam moments (fp32)    8      8      always, from the first update
fp32 gradients         4      0      during the update only (bf16: converted one tensor
                                     at a time while the bf16 gradients are freed, so
                                     the two together peak at 4 + one tensor's 2)
AdamW temporaries      0      0      fused kernel: none; foreach fallback (devices
                                     without a fused kernel): one fp32 tensor per param
                                     (its sqrt of exp_avg_sq), 4 bytes
clipping               0      0      foreach norms: one scalar per tensor
=====================  =====  =====  ====================================================

So the persistent state is 14 (bf16) / 12 (fp32) bytes per trainable param,
plus the gradients (2 / 4) from the first backward of a step to its update.
During the update the gradient bytes peak at 4 (bf16: fp32 copies replacing
the bf16 gradients) / 4 (fp32: the gradients themselves): in memory.py's terms
(gradients counted separately) ``step_temp`` is 2 (bf16) / 0 (fp32) bytes per
trainable param. DeepSpeed stage 0 holds the same persistent state, but at the
update it has all bf16 and all fp32 gradients at once and its foreach AdamW
allocates another fp32 tensor: ``step_temp`` 8 (bf16) / 4 (fp32), which is
what memory.model_states counts for single_gpu today.

Frozen parameters (the 4-bit or bf16 base under LoRA) cost only their storage:
no gradient, master or moment. Checkpoints (``save_checkpoint``) are written
from the device tensors by ``torch.save`` (it copies each tensor to host memory
as it writes); nothing else is copied.

Checkpoint layout: ``<root>/<tag>/plain_engine.pt`` (one file: trainable or all
weights, masters, optimizer and scheduler state, step counters, client state),
in the same ``<root>/<tag>/`` folder DeepSpeed would use, so checkpoint.py's
COMPLETE-marker protocol (it writes ``rng_rank<R>.pt`` and ``COMPLETE`` next to
it) works unchanged. The formats differ: a DeepSpeed checkpoint does not load
into PlainEngine and vice versa; `written_by` tells which engine wrote a
folder, so the trainer can say so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from orchestrator import levers
from orchestrator.checkpoint import PLAIN_STATE_FILE, CheckpointError, written_by
from orchestrator.levers import ENGINES, EngineError, EngineFacts  # noqa: F401 - ENGINES, EngineError: this module's API

FORMAT = 1


@dataclass(frozen=True)
class EngineConfig:
    """What PlainEngine takes from orch's DeepSpeed config dict (`from_deepspeed`)."""

    dtype: torch.dtype
    """Dtype of the trainable weights and their gradients: bf16 (fp32 masters kept) or fp32 (no masters)."""
    gradient_accumulation_steps: int
    """Micro steps per optimizer step; the loss is divided by it before backward, as DeepSpeed does."""
    gradient_clipping: float
    """Global L2 norm to clip gradients to; 0 turns clipping off (DeepSpeed's convention)."""
    lr: float
    """AdamW learning rate before the scheduler sets it."""
    betas: tuple[float, float]
    """AdamW betas."""
    eps: float
    """AdamW epsilon."""
    weight_decay: float
    """AdamW decoupled weight decay."""
    scheduler_type: Optional[str]
    """A class name in deepspeed.runtime.lr_schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR), or None."""
    scheduler_params: tuple[tuple[str, Any], ...]
    """That class's keyword arguments, as in the DeepSpeed config's scheduler.params."""

    @classmethod
    def from_deepspeed(cls, config: dict) -> "EngineConfig":
        """Parse a DeepSpeed config dict; raises EngineError when PlainEngine cannot run it."""
        reason = unsupported_reason(config)
        if reason:
            raise EngineError(reason)
        params = config["optimizer"].get("params", {})
        scheduler = config.get("scheduler")
        return cls(
            dtype=torch.bfloat16 if config.get("bf16", {}).get("enabled") else torch.float32,
            gradient_accumulation_steps=int(config.get("gradient_accumulation_steps", 1)),
            gradient_clipping=float(config.get("gradient_clipping", 0.0)),
            lr=float(params.get("lr", 1e-3)),
            betas=(float(params.get("betas", (0.9, 0.999))[0]), float(params.get("betas", (0.9, 0.999))[1])),
            eps=float(params.get("eps", 1e-8)),
            weight_decay=float(params.get("weight_decay", 0.01)),
            scheduler_type=scheduler["type"] if scheduler else None,
            scheduler_params=tuple(sorted(scheduler.get("params", {}).items())) if scheduler else (),
        )


def unsupported_reason(config: dict) -> Optional[str]:
    """Why PlainEngine cannot run this DeepSpeed config, or None when it can (levers.EngineFacts' rule)."""
    return EngineFacts.of_deepspeed(config).unsupported_reason()


def choose_engine(setting: str, config: dict) -> str:
    """'plain' or 'deepspeed' for ``training.engine`` = ``setting`` and this DeepSpeed config
    (``levers.choose_engine``, the rule the planner's memory model uses too)."""
    return levers.choose_engine(setting, EngineFacts.of_deepspeed(config))


def _adamw_kernel(device: torch.device) -> dict:
    """fused=True where PyTorch has the fused AdamW kernel for this device, else the foreach one."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if device.type in _get_fused_kernels_supported_devices():
        return {"fused": True}
    return {"foreach": True}


class PlainEngine:
    """Single-device trainer engine with DeepSpeed stage 0 semantics (see the module docstring)."""

    def __init__(self, module: nn.Module, config: EngineConfig):
        self.module = module
        """The wrapped module (DeepSpeed's ``engine.module``)."""
        self.config = config
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise EngineError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        """Names of the trainable parameters, in optimizer order."""
        self.params = [p for _, p in named]
        for p in self.params:  # as DeepSpeed does when bf16 is enabled; orch builds them in this dtype already
            if p.dtype != config.dtype:
                p.data = p.data.to(config.dtype)
        if config.dtype == torch.float32:
            self.masters = self.params
        else:
            self.masters = [p.detach().float() for p in self.params]
        """What AdamW updates: fp32 copies (bf16), or the parameters themselves (fp32)."""
        self.optimizer = torch.optim.AdamW(self.masters, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay, **_adamw_kernel(self.params[0].device))
        self.lr_scheduler = self._scheduler()
        self.micro_steps = 0
        """backward + step calls so far (DeepSpeed's micro_steps)."""
        self.global_steps = 0
        """Optimizer steps taken or skipped (DeepSpeed's global_steps)."""
        self.skipped_steps = 0
        """Steps skipped for a non-finite gradient norm."""
        self.last_grad_norm: Optional[torch.Tensor] = None
        """Gradient norm of the last step, before clipping (a device scalar; reading it syncs)."""

    def _scheduler(self):
        if self.config.scheduler_type is None:
            return None
        from deepspeed.runtime import lr_schedules

        scheduler = getattr(lr_schedules, self.config.scheduler_type, None)
        if scheduler is None:
            raise EngineError(f"scheduler {self.config.scheduler_type!r} is not one of DeepSpeed's lr_schedules")
        return scheduler(self.optimizer, **dict(self.config.scheduler_params))

    # ------------------------------------------------------------------ training

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "PlainEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "PlainEngine":
        return self.train(False)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next `step` call updates the weights."""
        return (self.micro_steps + 1) % self.config.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of ``loss / gradient_accumulation_steps``; returns that scaled loss (as DeepSpeed does)."""
        scaled = loss / self.config.gradient_accumulation_steps
        scaled.backward()
        return scaled

    def step(self) -> None:
        """Call after every backward; updates the weights at the accumulation boundary."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if boundary:
            self._update()

    @torch.no_grad()
    def _update(self) -> None:
        self.global_steps += 1
        if self.masters is not self.params:
            for p, m in zip(self.params, self.masters):
                # DeepSpeed's bf16 stage 0 steps a parameter without a gradient with zeros
                m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
                p.grad = None
        stepped = [m for m in self.masters if m.grad is not None]
        norm = torch.nn.utils.get_total_norm([m.grad for m in stepped], foreach=True)
        self.last_grad_norm = norm
        if not torch.isfinite(norm):  # one device->host sync per optimizer step
            self.skipped_steps += 1
            self._drop_grads()
            return
        if self.config.gradient_clipping > 0:
            # takes the tensors whose .grad it scales (get_total_norm takes the gradients themselves)
            torch.nn.utils.clip_grads_with_norm_(stepped, self.config.gradient_clipping, norm, foreach=True)
        self.optimizer.step()
        if self.masters is not self.params:
            torch._foreach_copy_(self.params, self.masters)
        self._drop_grads()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _drop_grads(self) -> None:
        for m in self.masters:
            m.grad = None
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, save_dir, tag, client_state: Optional[dict] = None, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> bool:
        """Write ``<save_dir>/<tag>/plain_engine.pt``; ``exclude_frozen_parameters`` keeps only trainable weights."""
        folder = Path(save_dir) / str(tag)
        folder.mkdir(parents=True, exist_ok=True)
        if exclude_frozen_parameters:
            weights = {n: p.detach() for n, p in zip(self.names, self.params)}
        else:
            weights = self.module.state_dict()
        state = {
            "format": FORMAT,
            "dtype": str(self.config.dtype),
            "names": list(self.names),
            "shapes": [list(p.shape) for p in self.params],
            "module": weights,
            "masters": None if self.masters is self.params else [m.detach() for m in self.masters],
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "micro_steps": self.micro_steps,
            "global_steps": self.global_steps,
            "skipped_steps": self.skipped_steps,
            "client_state": dict(client_state or {}),
        }
        torch.save(state, folder / PLAIN_STATE_FILE)
        if save_latest:
            (Path(save_dir) / "latest").write_text(str(tag))
        return True

    def load_checkpoint(self, load_dir, tag=None, load_module_strict: bool = True, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True) -> tuple[Optional[str], Optional[dict]]:
        """Restore a `save_checkpoint` folder; returns (its path, client_state), or (None, None) if absent."""
        root = Path(load_dir)
        if tag is None:
            latest = root / "latest"
            if not latest.is_file():
                return None, None
            tag = latest.read_text().strip()
        folder = root / str(tag)
        path = folder / PLAIN_STATE_FILE
        if written_by(folder) == "deepspeed":
            raise CheckpointError(f"{folder}: written by the DeepSpeed engine, this run uses the plain engine; "
                                  "resume it with training.engine=deepspeed")
        if not path.is_file():
            return None, None
        device = self.params[0].device
        state = torch.load(path, map_location=device, weights_only=True)
        mine = (list(self.names), [list(p.shape) for p in self.params], str(self.config.dtype))
        saved = (state["names"], state["shapes"], state["dtype"])
        if state.get("format") != FORMAT or mine != saved:
            raise CheckpointError(f"{path}: its trainable parameters (names, shapes or dtype) differ from this model's; "
                              "resume with the spec that wrote it")
        missing, unexpected = self.module.load_state_dict(state["module"], strict=load_module_strict)
        not_loaded = set(self.names) & set(missing)
        if not_loaded or unexpected:
            raise CheckpointError(f"{path}: {len(not_loaded)} trainable weights missing, {len(unexpected)} unexpected")
        with torch.no_grad():
            if state["masters"] is not None:
                torch._foreach_copy_(self.masters, state["masters"])
                torch._foreach_copy_(self.params, self.masters)
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_lr_scheduler_states and self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps = state["micro_steps"]
        self.global_steps = state["global_steps"]
        self.skipped_steps = state["skipped_steps"]
        return str(folder), state["client_state"]
