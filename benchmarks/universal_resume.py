"""What a resume on another number of processes costs: DeepSpeed's universal conversion of a full
finetune's checkpoint (time, disk) and the resumed step's loss against the uninterrupted run.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/universal_resume.py [--layers 8] [--hidden 512]

For ZeRO-2 and ZeRO-3: a 2-process CPU run (orch's launcher, real DeepSpeed, random weights of a
Llama shape written to a local config.json) trains 2 steps with a checkpoint after each; a copy as
a run stopped after step 1 is converted (checkpoint.to_universal, timed alone) and resumed on 1
process, which trains step 2. Writes benchmarks/results/universal_resume.{json,md}: parameters,
ZeRO's optimizer-state bytes, the universal form's bytes, the disk the trainer asks for before
converting (checkpoint.conversion_bytes), the conversion's wall time, and the step-2 losses.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import versions  # noqa: E402
from orchestrator import checkpoint as C  # noqa: E402
from tests.train_helpers import check, losses, out_dir, run_trainer, stopped_copy, tiny_job  # noqa: E402


def model_folder(folder: Path, layers: int, hidden: int) -> tuple[Path, int]:
    """A Llama config.json of this shape (random weights: no weight files); returns it and its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=8192,
                         tie_word_embeddings=False, max_position_embeddings=256)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    import torch

    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return folder, params


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def one_case(root: Path, model: Path, strategy: str) -> dict:
    (root / strategy).mkdir()
    job = tiny_job(root / strategy, f"uc{strategy}", strategy=strategy,
                   model={"name": str(model), "weights": "random", "dtype": "fp32"},
                   training={"max_steps": 2, "save_every": 1})
    check(run_trainer(job, 2, timeout=1800))
    reference = losses(out_dir(job))
    cut = stopped_copy(job, root / f"{strategy}-cut", after_step=1)
    info = C.latest(out_dir(cut) / "checkpoints")
    optim = sum(f.stat().st_size for f in info.path.glob("*optim_states.pt"))
    planned = C.conversion_bytes(info.path)
    start = time.perf_counter()
    universal = C.to_universal(info)
    seconds = time.perf_counter() - start
    proc = run_trainer(cut, 1, args=("--resume",), timeout=1800)
    check(proc)
    resumed = losses(out_dir(cut))
    return {"strategy": strategy, "optimizer_state_bytes": optim, "universal_bytes": folder_bytes(universal),
            "conversion_bytes_asked": planned, "conversion_seconds": round(seconds, 2),
            "reference_step2_loss": reference[2], "resumed_step2_loss": resumed[2],
            "relative_difference": abs(resumed[2] - reference[2]) / abs(reference[2])}


def render(result: dict) -> str:
    lines = [f"# Universal conversion and resume 2 -> 1 processes ({result['date']})", "",
             f"Command: `{result['command']}`; machine: {result['machine']}; {result['params']:,} parameters "
             f"(full finetune, fp32, {result['shape']}).", "",
             "| strategy | ZeRO optimizer state | universal form | disk asked before converting | conversion | "
             "step-2 loss uninterrupted / resumed | relative difference |", "|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        lines.append(f"| {c['strategy']} | {c['optimizer_state_bytes'] / 1e6:.0f} MB | {c['universal_bytes'] / 1e6:.0f} MB "
                     f"| {c['conversion_bytes_asked'] / 1e6:.0f} MB | {c['conversion_seconds']:.1f} s | "
                     f"{c['reference_step2_loss']:.6f} / {c['resumed_step2_loss']:.6f} | {c['relative_difference']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-uc-") as tmp:
        root = Path(tmp)
        model, params = model_folder(root / "model", args.layers, args.hidden)
        cases = [one_case(root, model, s) for s in ("zero2", "zero3")]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result = {"command": "PYTHONPATH=$PWD .venv/bin/python benchmarks/universal_resume.py " + " ".join(sys.argv[1:]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{cpu}, {os.cpu_count()} cores, no GPU", "versions": versions(), "params": params,
              "shape": f"{args.layers} layers, hidden {args.hidden}, vocab 8192", "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "universal_resume.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "universal_resume.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
