"""Honour the spec's GPU size at run time: a process planned for a smaller GPU than it got is capped to it.

Imported only by the trainer (torch). orch plans for ``hardware.gpu`` / ``hardware.gpu_memory_gb``;
trained on a larger GPU, a job planned for 24 GiB would otherwise use whatever the 80 GB GPU has and
never show whether the plan holds. `cap_gpu_memory` limits PyTorch's caching allocator with
``torch.cuda.set_per_process_memory_fraction`` so that the process meets an out-of-memory error
where the planned GPU would: the allocator gets the planned GPU's memory minus what a process
holds outside the allocator there (CUDA context and, with several processes, NCCL buffers:
``memory.outside_allocator_bytes``, the same bytes the planner adds to the peak), out of the
physical GPU's total. This is how a 24 GiB job is validated on an H100 (benchmarks/knob_grid.py).

The recipe calls it once per rank, after ``torch.cuda.set_device`` and before the model is built::

    cap = memory_cap.cap_gpu_memory(job, device)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from orchestrator import memory
from orchestrator.spec import JobSpec


@dataclass(frozen=True)
class MemoryCap:
    """A cap set on this process's caching allocator."""

    planned_bytes: int
    """The spec's GPU memory (hardware.gpu_memory_gb, else the catalog GPU's)."""
    physical_bytes: int
    """The device's total memory (torch.cuda.get_device_properties(device).total_memory)."""
    fraction: float
    """What was passed to torch.cuda.set_per_process_memory_fraction: the allocator may reserve this
    fraction of physical_bytes."""

    def line(self) -> str:
        gib = 2**30
        return (f"orch: GPU memory capped to {self.fraction * self.physical_bytes / gib:.2f} GiB for the allocator "
                f"({self.planned_bytes / gib:.2f} GiB planned, {self.physical_bytes / gib:.2f} GiB on the device)")


def cap_fraction(planned_bytes: int, physical_bytes: int, outside_allocator_bytes: int) -> Optional[float]:
    """The allocator's share of the physical GPU that leaves a process what the planned GPU would:
    (planned - outside the allocator) / physical; None when the planned GPU is not smaller."""
    if planned_bytes >= physical_bytes:
        return None
    return max(planned_bytes - outside_allocator_bytes, 0) / physical_bytes


def cap_gpu_memory(job: JobSpec, device: torch.device,
                   set_fraction: Callable[[float, torch.device], None] = torch.cuda.set_per_process_memory_fraction,
                   total_memory: Optional[Callable[[torch.device], int]] = None) -> Optional[MemoryCap]:
    """Cap this process's CUDA allocator to the spec's GPU when the device is larger; None when
    nothing was capped (the CPU, or a GPU no larger than planned).

    ``set_fraction`` and ``total_memory`` are torch's, replaceable where there is no GPU (tests).
    """
    if device.type != "cuda":
        return None
    physical = (total_memory or (lambda d: torch.cuda.get_device_properties(d).total_memory))(device)
    planned = job.hardware.gpu_memory_bytes()
    fraction = cap_fraction(planned, physical, memory.outside_allocator_bytes(job))
    if fraction is None:
        return None
    set_fraction(fraction, device)
    return MemoryCap(planned_bytes=planned, physical_bytes=physical, fraction=fraction)
