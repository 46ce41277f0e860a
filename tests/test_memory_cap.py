"""The spec's GPU size is honoured at run time (orchestrator/memory_cap.py): the fraction by hand, the CUDA call
behind its seam (no GPU here: torch's set_per_process_memory_fraction and device total are replaced)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import memory_cap
from orchestrator.catalog import MIB
from orchestrator.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
H100 = 81_559 * MIB  # catalog H100-80GB = nvidia-smi's total of the H100 measured on
CUDA0 = torch.device("cuda", 0)


def job(*overrides: str):
    return load_job(ROOT / "jobs/llama8b_qlora_24gb.yaml", list(overrides), check_paths=False)


def test_fraction_leaves_what_the_planned_gpu_would():
    # RTX 4090 (catalog 24,564 MiB) on an H100: the allocator gets 24,564 - 560 (CUDA context) MiB of 81,559
    assert memory_cap.cap_fraction(24_564 * MIB, H100, 560 * MIB) == pytest.approx(24_004 / 81_559, rel=1e-12)
    assert memory_cap.cap_fraction(H100, H100, 560 * MIB) is None  # the planned GPU is the device
    assert memory_cap.cap_fraction(H100 + 1, H100, 560 * MIB) is None


def test_cap_calls_torch_with_the_fraction_on_a_larger_gpu():
    calls = []
    cap = memory_cap.cap_gpu_memory(job(), CUDA0, set_fraction=lambda f, d: calls.append((f, d)),
                                    total_memory=lambda d: H100)
    assert calls == [(pytest.approx(24_004 / 81_559, rel=1e-12), CUDA0)]
    assert (cap.planned_bytes, cap.physical_bytes) == (24_564 * MIB, H100)
    assert cap.line() == ("orch: GPU memory capped to 23.44 GiB for the allocator (23.99 GiB planned, "
                          "79.65 GiB on the device)")
    # hardware.gpu_memory_gb sets the plan; 2 GPUs also keep NCCL's 384 MiB outside the allocator:
    # (24 x 1024 - 560 - 384) / 81,559 MiB
    calls.clear()
    two = job("hardware.gpu_memory_gb=24", "hardware.gpus_per_node=2", "strategy=zero3_offload_optimizer",
              "quantization.storage_dtype=bf16")
    memory_cap.cap_gpu_memory(two, CUDA0, set_fraction=lambda f, d: calls.append((f, d)), total_memory=lambda d: H100)
    assert calls == [(pytest.approx((24 * 1024 - 560 - 384) / 81_559, rel=1e-12), CUDA0)]


def test_no_cap_on_the_cpu_or_a_gpu_no_larger_than_planned():
    def refuse(fraction, device):
        raise AssertionError("set_per_process_memory_fraction must not be called")

    assert memory_cap.cap_gpu_memory(job(), torch.device("cpu"), set_fraction=refuse, total_memory=lambda d: H100) is None
    assert memory_cap.cap_gpu_memory(job("hardware.gpu=H100-80GB"), CUDA0, set_fraction=refuse,
                                     total_memory=lambda d: H100) is None
