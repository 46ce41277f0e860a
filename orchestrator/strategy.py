"""The training strategies orch can run: one typed record each, in the planner's order.

A strategy is a DeepSpeed ZeRO stage plus where the optimizer states and the
parameters live. Everything that depends on the strategy (the spec's allowed
values, the DeepSpeed config, the memory model, the planner's table, the
trainer) reads these fields instead of decoding the name. Pure data: no imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Device = Literal["none", "cpu", "nvme"]


@dataclass(frozen=True)
class Strategy:
    """One way to spread a job over its GPUs."""

    name: str
    """The spec's ``strategy`` value."""
    zero_stage: int
    """DeepSpeed ZeRO stage: 0 (nothing sharded), 2 (gradients and optimizer states) or 3 (parameters too)."""
    optimizer_offload: Device
    """Where the fp32 master weights, Adam moments and fp32 gradients live: 'none' (the GPU), 'cpu' or 'nvme'."""
    param_offload: Device
    """Where the parameter partitions live between uses: 'none' (the GPU), 'cpu' or 'nvme'."""
    label: str
    """Column name in `orch plan`'s table (10 characters at most)."""
    description: str
    """One line for people."""

    @property
    def sharded(self) -> bool:
        """ZeRO-3: every parameter, frozen and 4-bit ones included, is split across the ranks."""
        return self.zero_stage == 3

    @property
    def needs_nvme(self) -> bool:
        """Something is offloaded to NVMe, so the job needs hardware.nvme_path."""
        return "nvme" in (self.optimizer_offload, self.param_offload)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy(name="single_gpu", zero_stage=0, optimizer_offload="none", param_offload="none", label="single",
             description="one GPU, nothing sharded"),
    Strategy(name="zero2", zero_stage=2, optimizer_offload="none", param_offload="none", label="zero2",
             description="gradients and optimizer states sharded over the GPUs (ZeRO-2)"),
    Strategy(name="zero3", zero_stage=3, optimizer_offload="none", param_offload="none", label="zero3",
             description="parameters, gradients and optimizer states sharded over the GPUs (ZeRO-3)"),
    Strategy(name="zero3_offload_optimizer", zero_stage=3, optimizer_offload="cpu", param_offload="none",
             label="z3+optCPU", description="ZeRO-3 with the optimizer states and step in host RAM"),
    Strategy(name="zero3_offload_all", zero_stage=3, optimizer_offload="cpu", param_offload="cpu",
             label="z3+allCPU", description="ZeRO-3 with the optimizer states and the parameters in host RAM"),
    Strategy(name="zero3_offload_optimizer_nvme", zero_stage=3, optimizer_offload="nvme", param_offload="none",
             label="z3+optNVMe", description="ZeRO-3 with the optimizer states on local NVMe"),
    Strategy(name="zero3_offload_all_nvme", zero_stage=3, optimizer_offload="nvme", param_offload="nvme",
             label="z3+allNVMe", description="ZeRO-3 with the optimizer states and the parameters on local NVMe"),
)}
"""Every strategy by name, from the fastest to the one that saves the most GPU memory."""
