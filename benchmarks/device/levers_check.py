"""GPU checks of the speed levers that the CPU tests cannot make (tests/test_engine.py,
test_speedups.py and test_packing_attention.py cover the rest on the CPU).

From the repo root on the device machine, after ``source benchmarks/device/env.sh``
(it needs the tests/ folder of the working tree)::

    python3 benchmarks/device/levers_check.py > "$OUT/levers_check.json"

1. flex_attention gradients (PyTorch has no CPU backward for flex attention): in a
   packed A|B|C|padding row, the gradients of B's loss equal those of B run alone,
   for flex_attention and, as the reference, sdpa. fp32 tiny Llama (random weights).
2. compiled decoder layers on CUDA with bitsandbytes 4-bit, PEFT LoRA and
   non-reentrant checkpointing under the GPU image's transformers: loss and LoRA
   gradients vs eager, and how many compiled variants serve the layers (1 expected);
   once with sdpa, once with flex_attention. fp32 compute, tiny QLoRA.
3. PlainEngine vs DeepSpeed stage 0 on CUDA, bf16 QLoRA, grad accumulation 2,
   6 steps: loss curves and learning rates (DeepSpeed's zero-gradient init step
   undone, as in tests/test_engine.py).

Prints one JSON object with each measured difference and whether it is within
the bound written next to it (bounds: fp32 1e-4 relative for losses, gradients
compared by max |a - b| / max |b| <= 1e-3; bf16 curves 1e-2 relative).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(".").resolve()))

import torch  # noqa: E402

from orchestrator import engine as E  # noqa: E402
from orchestrator import modeling as M  # noqa: E402
from orchestrator import speedups as S  # noqa: E402
from orchestrator.spec import load_job  # noqa: E402
from tests import engine_runs as R  # noqa: E402
from tests import test_packing_attention as P  # noqa: E402
from tests.train_helpers import tiny_job  # noqa: E402

CUDA = torch.device("cuda", 0)
SCRATCH = Path(tempfile.mkdtemp(prefix="levers-"))


def job(name: str, **sections):
    folder = SCRATCH / name
    folder.mkdir()
    return load_job(tiny_job(folder, name, **sections), for_training=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def flex_gradients() -> dict:
    j = job("flex", method="full", data={"seq_len": P.SEQ}, training={"gradient_checkpointing": False})
    base = M.load_model(j, "single_gpu", CUDA, seed=0).base
    ids, pos = (t.to(CUDA) for t in P._row())
    span = P._spans()["B"]
    out = {}
    for impl in ("sdpa", "flex_attention"):
        base.set_attn_implementation(impl)

        def grads(ids, pos, at):
            base.zero_grad(set_to_none=True)
            logits = base(input_ids=ids, position_ids=pos).logits[0, at]
            torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, at].roll(-1)[:-1], reduction="sum").backward()
            return [p.grad.clone() for p in base.parameters()]

        packed = grads(ids, pos, span)
        alone = grads(ids[:, span], pos[:, span], slice(0, span.stop - span.start))
        worst = max(rel(a, b) for a, b in zip(packed, alone))
        out[impl] = {"grad_rel_diff_packed_vs_alone": worst, "ok": worst <= 1e-3}
    return out


def compiled_layers() -> dict:
    out = {}
    for impl in ("sdpa", "flex_attention"):
        try:
            out[impl] = compiled_layers_with(impl)
        except Exception as exc:  # noqa: BLE001 - report both kernels, whatever fails
            out[impl] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "ok": False}
    return out


def compiled_layers_with(impl: str) -> dict:
    torch._dynamo.reset()
    j = job(f"compile-{impl}", method="qlora", lora={"dropout": 0.0}, model={"attn_implementation": impl},
            training={"gradient_checkpointing": True, "loss_chunk_tokens": 24})
    torch.manual_seed(0)
    loaded = M.load_model(j, "single_gpu", CUDA, seed=0)
    module = M.CausalLMLoss(loaded.model, loaded.base, j.training.loss_chunk_tokens)
    loaded_model, base = loaded.model, loaded.base

    def step(s):
        ids, pos, targets = (t.to(CUDA) for t in R.batch(s, 0))
        loss = module(ids, pos, targets, torch.tensor(1.0 / 64, device=CUDA))
        loss.backward()
        grads = [p.grad.clone() for p in loaded_model.parameters() if p.requires_grad]
        loaded_model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    eager = [step(s) for s in (0, 1)]
    compiled = S.compile_decoder_layers(base.model.layers)
    try:
        runs = [step(s) for s in (0, 1)]
        variants = S.check_compiled(compiled)
    except S.CompileError as exc:
        return {"error": str(exc), "ok": False}
    loss_diff = max(rel(a[0], b[0]) for a, b in zip(runs, eager))
    grad_diff = max(rel(x, y) for a, b in zip(runs, eager) for x, y in zip(a[1], b[1]))
    return {"loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff, "compiled_variants": variants,
            "ok": loss_diff <= 1e-4 and grad_diff <= 1e-3 and variants == 1}


def engine_parity() -> dict:
    import deepspeed

    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29561")):
        os.environ.setdefault(var, value)
    deepspeed.init_distributed(dist_backend="nccl", verbose=False)
    j = job("engine", method="qlora", model={"dtype": "bf16"}, quantization={"compute_dtype": "bf16"},
            lora={"dropout": 0.0},
            training={"global_batch_size": 4, "max_grad_norm": 0.05, "lr": 1e-2, "weight_decay": 0.1,
                      "lr_schedule": "cosine", "warmup_steps": 2, "max_steps": 6, "loss_chunk_tokens": 24})
    ds = R.run(R.deepspeed_engine(j, neutralize_init_step=True, device=CUDA), j, 6)
    module, config = R.build(j, CUDA)
    plain = R.run(E.PlainEngine(module, E.EngineConfig.from_deepspeed(config)), j, 6)
    worst = max(abs(a - b) / abs(a) for a, b in zip(ds.losses, plain.losses))
    return {"deepspeed": ds.losses, "plain": plain.losses, "loss_rel_diff": worst, "lrs_equal": ds.lrs == plain.lrs,
            "adamw": E._adamw_kernel(CUDA), "ok": worst <= 1e-2 and ds.lrs == plain.lrs}


def main() -> int:
    import transformers

    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name(0)}
    for name, check in (("flex_gradients", flex_gradients), ("compiled_layers", compiled_layers),
                        ("engine_parity", engine_parity)):
        try:
            result[name] = check()
        except Exception as exc:  # noqa: BLE001 - report every check, whatever fails
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "ok": False}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
