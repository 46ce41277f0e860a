"""benchmarks/device/profile_step.py's kernel categories, on names as the profiler reports them (CUDA kernels
from an H100 trace's naming and CPU ops of the smoke run); the profiling itself runs on the GPU machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

FILE = Path(__file__).resolve().parents[1] / "benchmarks/device/profile_step.py"
spec = importlib.util.spec_from_file_location("profile_step", FILE)
ps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ps)


def test_kernel_names_fall_in_their_category():
    assert ps.category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert ps.category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT") == "gemm"
    assert ps.category("aten::mm") == "gemm" and ps.category("aten::mean") == "elementwise/norm"
    assert ps.category("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)") == "dequantize"
    assert ps.category("bitsandbytes::dequantize_4bit") == "dequantize"
    assert ps.category("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>") == "attention"
    assert ps.category("triton_tem_fused_0") == "attention"  # Inductor templates: flex attention's (no max-autotune)
    assert ps.category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "elementwise/norm"  # RMSNorm
    # the fused AdamW kernel: optimizer is tried before gemm and elementwise
    assert ps.category("void at::native::multi_tensor_apply_kernel<...FusedAdamMathFunctor...>") == "optimizer"
    assert ps.category("Memcpy HtoD (Pageable -> Device)") == "other"
