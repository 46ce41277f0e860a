"""benchmarks/throughput.py end to end on the CPU: orch's trainer and the HF Trainer + PEFT baseline both run
the tiny smoke case for real (a few steps), and the report rows hold what the GPU runs will report.

The CPU numbers themselves mean nothing (tiny-llama, fp32, 128 tokens per step); only the plumbing is checked.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import throughput as tp


def test_tiny_case_both_sides(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    assert tp.main(["--tiny", "--only", "tiny-lora-cpu", "--steps", "3", "--warmup", "1", "--timeout", "300",
                    "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["steps"] == 3 and payload["warmup_steps"] == 1 and "transformers" in payload["versions"]
    (row,) = payload["rows"]
    assert row["case"] == "tiny-lora-cpu" and row["tokens_per_step"] == 2 * 64
    for side in ("orch", "baseline", "baseline_flags"):
        s = row[side]
        assert s["returncode"] == 0, s.get("log_tail")
        assert s["steps"] == 3 and s["tokens_per_s"] > 0 and s["final_loss"] > 0
        assert s["mfu"] is None  # CPU: no peak FLOP/s
        assert s["command"]
    assert row["speedup"] == pytest.approx(row["orch"]["tokens_per_s"] / row["baseline"]["tokens_per_s"])
    assert row["speedup_vs_flags"] == pytest.approx(row["orch"]["tokens_per_s"] / row["baseline_flags"]["tokens_per_s"])
    assert row["memory_ratio"] is None and row["memory_ratio_vs_flags"] is None  # no CUDA allocator counters on the CPU
    # orch with its defaults, and what it used on the CPU: PlainEngine, eager layers (compile auto: CUDA only), sdpa
    o = row["orch"]
    assert (o["engine"], o["compiled_variants"], o["attention"]) == ("plain", None, "sdpa")
    # HF's defaults: its default optimizer (fused AdamW on torch >= 2.8), sdpa; no flags
    b, f = row["baseline"], row["baseline_flags"]
    assert (b["optimizer"], b["attention"], b["liger"], b["compiled"]) == ("adamw_torch_fused", "sdpa", "off", "off")
    # HF + flags: liger-kernel needs triton + CUDA, so it is not installed here; torch_compile ran (dynamo made graphs)
    assert f["liger"] == "not installed" and f["optimizer"] == "adamw_torch_fused"
    graphs = int(f["compiled"].split()[0])
    assert graphs >= 1, f["compiled"]
    md = out.with_suffix(".md").read_text()
    assert "| tiny-lora-cpu |" in md and "vs flags" in md and "liger not installed" in md
    assert "tiny-lora-cpu" in capsys.readouterr().out


def test_liger_record_names_the_patched_modules():
    # what liger-kernel does to an instance (_bind_method_to_module): a module's forward replaced by a function
    # of a liger_kernel module; faked here with such a function, liger-kernel not being installed
    import types

    from torch import nn

    def forward(self, x):
        return x

    forward.__module__, forward.__qualname__ = "liger_kernel.transformers.rms_norm", "LigerRMSNorm.forward"
    model = nn.Sequential(nn.Linear(2, 2), nn.Identity(), nn.Identity())
    assert tp.liger_record(model) == "installed, patched nothing"
    for m in model[1:]:
        m.forward = types.MethodType(forward, m)
    assert tp.liger_record(model) == "applied: LigerRMSNorm x2"


def test_arithmetic_and_skips():
    # warm-up excluded: steps 2..4 took 3 s for 3 x 100 tokens
    assert tp.steady_tokens_per_s([10.0, 11.0, 12.0, 13.0, 14.0], 2, 100) == pytest.approx(100.0)
    assert tp.steady_tokens_per_s([10.0, 11.0], 2, 100) is None
    # the GPU's peak comes from orch's catalog (dense bf16 TFLOP/s), matched on torch's device name
    assert tp.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and tp.peak_flops("NVIDIA H200") == 989e12
    assert tp.peak_flops("NVIDIA L40S") == 362e12 and tp.peak_flops("NVIDIA L4") == 121e12  # L40S is not an L4
    assert tp.peak_flops("NVIDIA GeForce RTX 4090") == 165e12 and tp.peak_flops("cpu") is None
    assert tp.mfu(1000.0, 10**9, 1e12, 1) == pytest.approx(1.0)
    big = next(c for c in tp.CASES if c.gpus == 2)
    row = tp.run_case(big, 12, 2, 10, "NVIDIA H100 80GB HBM3", 1)
    assert row["skipped"] == "needs 2 GPUs, this machine has 1" and "orch" not in row
    assert "skipped: needs 2 GPUs" in " ".join(tp.table_cells(row))
    assert {c.name for c in tp.CASES} >= {"qlora-8b-s2048-mb1", "qlora-8b-s2048-mb4", "lora-8b-s2048-mb1"}
