"""First call on a device machine: library versions, GPU, bitsandbytes 4-bit and DeepSpeed import."""
import importlib, json, os, time
import torch
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
       "gpu_name": torch.cuda.get_device_name(0), "total_mem": torch.cuda.get_device_properties(0).total_memory}
for m in ["transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets", "pydantic", "huggingface_hub", "fsspec", "pyarrow", "flash_attn", "liger_kernel"]:
    try:
        out[m] = importlib.import_module(m).__version__
    except Exception as e:  # report, don't stop: this run exists to find out
        out[m] = f"missing ({type(e).__name__})"
import bitsandbytes as bnb
w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
t = time.time(); q, st = bnb.functional.quantize_4bit(w, quant_type="nf4", quant_storage=torch.bfloat16); torch.cuda.synchronize()
out["bnb_quant_ms"] = round((time.time() - t) * 1000, 2)
out["bnb_err"] = float((bnb.functional.dequantize_4bit(q, st) - w).abs().mean() / w.abs().mean())
torch.cuda.synchronize(); out["ctx_allocated"] = torch.cuda.memory_allocated()
free, total = torch.cuda.mem_get_info(); out["mem_get_info_used"] = total - free
print(json.dumps(out, indent=1))
