"""`orch export RUN_DIR --out DIR` (orchestrator/export.py) and the run folder's job.yaml it starts from.

Real runs: the trainer trains tiny Llamas on the CPU (PlainEngine in one process, DeepSpeed ZeRO-2 and
ZeRO-3 in two), the export reads their checkpoints, and the exported folder is loaded in a separate
Python that can import neither orch nor PEFT, with HF_HUB_OFFLINE=1. "orch's own forward" is the
trainer's model built by modeling.load_model with the adapter the trainer wrote (RUN_DIR/adapter),
not read back through the export's checkpoint reader.

Tolerances (max |logit difference|, measured on this CPU, bound = about 10x the measured value):
* lora, fp32: exported (merged) vs orch (unmerged): measured 2.1e-7 on logits up to 0.64 -> LORA_ATOL.
* qlora, bf16 model and compute dtype: exported vs the dequantized-merged reference computed here:
  measured 0 (the same bf16 weights) -> DEQUANT_ATOL, one bf16 ulp at these logits (below 1);
  exported vs orch's 4-bit forward: measured 4.4e-3 on logits up to 0.70 (both bitsandbytes CPU
  paths) -- printed, and it must equal what the export itself reported (QLORA_REPORT_ATOL).
* full: the exported tensors equal the checkpoint's exactly (fp32 run), so the logits do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator import cli, export
from orchestrator import modeling as M
from orchestrator.compiler import RUN_JOB_FILE, write_run_job
from orchestrator.errors import Exit
from orchestrator.spec import load_job
from tests.train_helpers import REPO, check, env, out_dir, run_trainer, tiny_job

CPU = torch.device("cpu")
LORA_ATOL = 2e-6
DEQUANT_ATOL = 2**-8
QLORA_REPORT_ATOL = 1e-6


# ---------------------------------------------------------------------------
# job.yaml


def test_run_job_is_the_resolved_job_with_absolute_paths(tmp_path, monkeypatch):
    """write_run_job writes what the trainer trains: the concrete strategy, and paths that still
    point at the same files when read from another folder (orch export runs anywhere)."""
    monkeypatch.chdir(tmp_path)
    spec = tiny_job(tmp_path, "rel", strategy="auto", training={"output_dir": "runs/{name}"})
    data = yaml.safe_load(spec.read_text())
    data["data"]["paths"] = ["data.jsonl"]  # relative to the folder orch runs in
    spec.write_text(yaml.safe_dump(data))
    job = load_job(spec)

    path = write_run_job(job, "single_gpu")

    assert path == tmp_path / "runs" / "rel" / RUN_JOB_FILE
    assert sorted(p.name for p in path.parent.iterdir()) == [RUN_JOB_FILE]  # written atomically: no temp file left
    monkeypatch.chdir("/")
    back = load_job(path)
    assert back.strategy == "single_gpu"
    assert back.data.paths == [str(tmp_path / "data.jsonl")]
    assert Path(back.training.output_dir) == tmp_path / "runs" / "rel"
    assert back.model_dump(exclude={"strategy", "data", "training"}) == job.model_dump(exclude={"strategy", "data", "training"})


# ---------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written


def _fake_run(tmp_path: Path, complete: bool) -> Path:
    """A run folder with the trainer's job.yaml and one checkpoint folder, COMPLETE or not (no weights:
    every refusal below comes before any weight is read)."""
    job = load_job(tiny_job(tmp_path, "fake"))
    run = write_run_job(job, "single_gpu").parent
    ckpt = run / "checkpoints" / "step00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "plain_engine.pt").write_bytes(b"half-written")
    if complete:
        (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1, "strategy": "single_gpu"}))
    return run


def _export_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["export", *map(str, argv)])
    err = capsys.readouterr().err
    return code, err


def test_refuses_a_folder_without_job_yaml(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, err = _export_cli(capsys, tmp_path / "run", "--out", tmp_path / "hf")
    assert code == Exit.BAD_SPEC
    assert err == (f"orch: error: {tmp_path / 'run' / 'job.yaml'}: no such file; the trainer writes it when a run starts, "
                   f"so {tmp_path / 'run'} is not a run folder, or its run started before orch wrote job.yaml\n")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_refuses_a_job_yaml_it_cannot_read(tmp_path, capsys):
    run = _fake_run(tmp_path, complete=True)
    (run / RUN_JOB_FILE).write_text("name: x\nmethod: sideways\n")
    code, err = _export_cli(capsys, run, "--out", tmp_path / "hf")
    assert code == Exit.BAD_SPEC
    assert len(err.splitlines()) == 1 and err.startswith(f"orch: error: cannot read the run's job: {run / RUN_JOB_FILE}")
    assert not (tmp_path / "hf").exists()


def test_refuses_a_run_without_a_complete_checkpoint(tmp_path, capsys):
    run = _fake_run(tmp_path, complete=False)  # killed mid-save: files, no COMPLETE marker
    code, err = _export_cli(capsys, run, "--out", tmp_path / "hf")
    assert code == Exit.BAD_SPEC
    assert err == (f"orch: error: {run}: no complete checkpoint in {run / 'checkpoints'} (a checkpoint is complete once "
                   "its COMPLETE marker is written); nothing to export\n")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def _complete(run: Path, step: int) -> None:
    ckpt = run / "checkpoints" / f"step{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text(json.dumps({"step": step, "world_size": 1, "strategy": "single_gpu"}))


def test_checkpoint_choice_latest_best_or_a_step(tmp_path):
    run = _fake_run(tmp_path, complete=True)  # step 2
    _complete(run, 1)
    _complete(run, 3)
    (run / "checkpoints" / "step00000004").mkdir()  # partial: no marker
    assert export.pick_checkpoint(run, export.LATEST).tag == "step00000003"
    assert export.pick_checkpoint(run, "step00000001").step == 1
    (run / "summary.json").write_text(json.dumps({"best_checkpoint": "step00000002"}))  # as the trainer records it
    assert export.pick_checkpoint(run, export.BEST).tag == "step00000002"
    for which, wanted in (("step00000004", "is not a complete checkpoint"), ("../fake", "is not a checkpoint folder name"),
                          ("step00000009", "is not a complete checkpoint")):
        with pytest.raises(export.ExportError, match=wanted):
            export.pick_checkpoint(run, which)
    (run / "summary.json").write_text(json.dumps({"best_checkpoint": None}))  # no eval split
    with pytest.raises(export.ExportError, match="names no best checkpoint"):
        export.pick_checkpoint(run, export.BEST)


def test_refuses_an_out_folder_that_is_not_empty(tmp_path, capsys):
    run = _fake_run(tmp_path, complete=True)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    code, err = _export_cli(capsys, run, "--out", out)
    assert code == Exit.BAD_SPEC
    assert err == f"orch: error: --out: {out} exists and is not an empty folder; orch export never overwrites, name a new one\n"
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "the user's"
    assert not (tmp_path / "hf.tmp").exists()


def test_refuses_a_tmp_folder_it_did_not_make(tmp_path, capsys):
    run = _fake_run(tmp_path, complete=True)
    (tmp_path / "hf.tmp").mkdir()
    (tmp_path / "hf.tmp" / "notes.txt").write_text("the user's")
    code, err = _export_cli(capsys, run, "--out", tmp_path / "hf")
    assert code == Exit.BAD_SPEC
    assert err == f"orch: error: --out: {tmp_path / 'hf.tmp'} exists and orch export did not make it; move it away\n"
    assert (tmp_path / "hf.tmp" / "notes.txt").read_text() == "the user's"


# ---------------------------------------------------------------------------
# shards


def test_shards_fill_up_to_the_limit_and_the_index_names_every_tensor(tmp_path):
    # fp32 tensors of 300, 100, 100 and 50 elements = 1200, 400, 400, 200 bytes; limit 1000 bytes:
    # [c] alone (1200 > limit: a file of its own), then [a, b, d] (400 + 400 + 200 = 1000, exactly the limit).
    writer = export.ShardWriter(tmp_path, max_bytes=1000)
    tensors = {"c": torch.zeros(300), "a": torch.arange(100.0), "b": torch.ones(100), "d": torch.full((50,), 2.0)}
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()

    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"c": files[0], "a": files[1], "b": files[1], "d": files[1]}
    assert index["metadata"]["total_size"] == 1200 + 400 + 400 + 200
    from safetensors.torch import load_file

    back = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    writer = export.ShardWriter(tmp_path, max_bytes=10**9)
    writer.add("w", torch.ones(3))
    assert writer.close() == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ---------------------------------------------------------------------------
# real runs, exported and loaded without orch


# Loads an exported folder the way a user without orch does: orch and PEFT cannot be imported,
# nothing is downloaded (HF_HUB_OFFLINE=1), and the run's files are not on the path.
PLAIN_LOAD = """
import sys
sys.modules["orchestrator"] = None
sys.modules["peft"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
tokenizer = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_file)).logits
torch.save({"logits": logits, "state": model.state_dict(), "dtype": str(model.dtype),
            "tokens": tokenizer("the cat sat")["input_ids"]}, out_file)
"""


def plain_load(folder: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    """Logits of ``ids``, the state dict, dtype and a tokenization, from a Python without orch or PEFT."""
    torch.save(ids, tmp_path / "ids.pt")
    e = env()
    e.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                          cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    check(proc)
    return torch.load(tmp_path / "o.pt")


def files_of(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time: a run that is exported is not changed."""
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def orch_forward(run: Path, ids: torch.Tensor) -> tuple[torch.Tensor, M.LoadedModel]:
    """Logits of orch's own lora/qlora model: modeling.load_model as the trainer calls it, with the adapter the
    trainer wrote (RUN_DIR/adapter, PEFT format), eager attention as the export's measurement uses."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from orchestrator.spec import with_overrides

    job = with_overrides(load_job(run / RUN_JOB_FILE, check_paths=False), ["model.attn_implementation=eager"])
    loaded = M.load_model(job, "single_gpu", CPU, job.training.seed)
    result = set_peft_model_state_dict(loaded.model, load_file(run / "adapter" / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    loaded.model.eval()
    with torch.no_grad():
        return loaded.base(input_ids=ids).logits, loaded


def _train(tmp_path_factory, name: str, nprocs: int, **sections) -> Path:
    folder = tmp_path_factory.mktemp(name)
    sections.setdefault("training", {}).update({"max_steps": 2})
    job = tiny_job(folder, name, **sections)
    check(run_trainer(job, nprocs))
    return out_dir(job)


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers (weights, generation_config.json) with orch's byte tokenizer."""
    from transformers import AutoModelForCausalLM

    from orchestrator.data import byte_tokenizer

    folder = tmp_path_factory.mktemp("pretrained") / "tiny"
    config = M.hf_config(load_job(tiny_job(folder.parent, "shape")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_z2(tmp_path_factory, pretrained_folder):
    """LoRA on the pretrained folder, DeepSpeed ZeRO-2 over 2 processes (DeepSpeed's stage 0-2 layout)."""
    return _train(tmp_path_factory, "loraz2", 2, method="lora", strategy="zero2",
                  model={"name": str(pretrained_folder), "weights": "pretrained", "dtype": "fp32"})


@pytest.fixture(scope="module")
def qlora_bf16(tmp_path_factory):
    """QLoRA in bf16 (model and compute dtype), PlainEngine, 1 process: the realistic QLoRA dtypes."""
    return _train(tmp_path_factory, "qlorabf16", 1, method="qlora",
                  model={"name": "tiny-llama", "weights": "random", "dtype": "bf16"}, quantization={"compute_dtype": "bf16"})


@pytest.fixture(scope="module")
def full_plain(tmp_path_factory):
    return _train(tmp_path_factory, "fullplain", 1)


@pytest.fixture(scope="module")
def full_z3(tmp_path_factory):
    return _train(tmp_path_factory, "fullz3", 2, strategy="zero3")


@pytest.mark.slow
def test_lora_merged_export_matches_orchs_forward(lora_z2, pretrained_folder, tmp_path):
    """The real CLI; small shards so the index is exercised; the folder loads without orch or PEFT and its
    logits are orch's (adapters unmerged) within LORA_ATOL; the run is not changed."""
    before = files_of(lora_z2)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", str(lora_z2), "--out", str(out),
                           "--max-shard-mb", "0.2"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    check(proc)
    assert proc.stdout.startswith(f"exported loraz2 (lora, step 2) to {out}: 4 safetensors file(s), fp32\n")
    assert files_of(lora_z2) == before  # trains nothing, writes nothing into the run
    assert not (tmp_path / "hf.tmp").exists()

    from orchestrator.data import byte_tokenizer

    ids = export.fixed_batch(512, 32)
    plain = plain_load(out, ids, tmp_path)
    orch, _ = orch_forward(lora_z2, ids)
    diff = (plain["logits"] - orch).abs().max().item()
    print(f"lora: exported vs orch's forward: max |logit difference| {diff:.3g} (logits up to {orch.abs().max():.3g})")
    assert diff <= LORA_ATOL
    meta = json.loads((out / export.METADATA_FILE).read_text())
    assert meta["step"] == 2 and meta["difference"]["max_abs"] <= LORA_ATOL and meta["difference"]["top1_agreement"] == 1.0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == meta["files"] and len(meta["files"]) == 4
    assert set(index["weight_map"]) == set(plain["state"])  # every tensor (tiny-llama ties nothing)
    assert (out / "generation_config.json").read_text() == (pretrained_folder / "generation_config.json").read_text()
    assert plain["tokens"] == byte_tokenizer()("the cat sat")["input_ids"]  # the tokenizer the run trained with
    # the adapters changed the model: the export is not just the base
    base = plain_load(pretrained_folder, ids, tmp_path)["logits"]
    assert (base - orch).abs().max().item() > 100 * LORA_ATOL


@pytest.mark.slow
def test_qlora_export_is_the_dequantized_merge_and_reports_its_difference(qlora_bf16, bnb_cpu_path, tmp_path):
    """In this process, so the fixture's bitsandbytes CPU path (portable / AVX512-BF16) is the one the export
    builds its 4-bit model on."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    result = export.export_run(qlora_bf16, out)
    assert result.method == "qlora" and result.dtype == "bf16" and result.files == ["model.safetensors"]

    ids = export.fixed_batch(512, 32)
    plain = plain_load(out, ids, tmp_path)
    assert plain["dtype"] == "torch.bfloat16"
    orch, loaded = orch_forward(qlora_bf16, ids)

    # The reference, hand-computed: every LoRA layer's 4-bit base dequantized by bitsandbytes, plus
    # (alpha / r) B A = 16 / 8 B A from the spec's lora section, summed in fp32, rounded once to bf16.
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    reference_state = {}
    for name, module in loaded.base.named_modules():
        if isinstance(module, LoraLayer):
            w = module.get_base_layer().weight
            deq = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            reference_state[f"{name}.weight"] = want = (deq + 16 / 8 * (b @ a)).to(torch.bfloat16)
            # fp32 sums in another order may round to a neighbouring bf16 value: one ulp, 2^-7 relative
            torch.testing.assert_close(plain["state"][f"{name}.weight"], want, rtol=2**-7, atol=2**-16)
    assert len(reference_state) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    config = M.hf_config(load_job(qlora_bf16 / RUN_JOB_FILE, check_paths=False))
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="eager")
    reference.load_state_dict({**plain["state"], **reference_state})
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
    to_reference = (plain["logits"].float() - ref_logits.float()).abs().max().item()
    to_4bit = (plain["logits"].float() - orch.float()).abs().max().item()
    print(f"qlora ({bnb_cpu_path}): exported vs dequantized-merged reference {to_reference:.3g}; "
          f"vs orch's 4-bit forward {to_4bit:.3g} (reported {result.difference.max_abs:.3g}; logits up to {orch.abs().max():.3g})")
    assert to_reference <= DEQUANT_ATOL
    assert abs(to_4bit - result.difference.max_abs) <= QLORA_REPORT_ATOL
    assert to_4bit > 0  # not bit-identical, as the export says
    assert "not bit-identical to the 4-bit forward" in export.render(result)


def _assert_full_export(run: Path, out: Path, want: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """The exported folder holds exactly ``want`` (the trainer's weights) and its logits are those of a model
    built from ``want``."""
    from transformers import AutoModelForCausalLM

    ids = export.fixed_batch(512, 32)
    plain = plain_load(out, ids, tmp_path)
    assert set(plain["state"]) == set(want)
    for key, tensor in want.items():
        torch.testing.assert_close(plain["state"][key], tensor, rtol=0, atol=0)
    config = M.hf_config(load_job(run / RUN_JOB_FILE, check_paths=False))
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    reference.load_state_dict(want)
    with torch.no_grad():
        torch.testing.assert_close(plain["logits"], reference(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_full_plain_engine_export_is_the_checkpoints_weights(full_plain, tmp_path):
    """PlainEngine's plain_engine.pt; an interrupted export's leftover <out>.tmp is cleared."""
    from orchestrator.checkpoint import latest
    from orchestrator.checkpoint import PLAIN_STATE_FILE

    out = tmp_path / "hf"
    leftover = tmp_path / "hf.tmp"
    leftover.mkdir()
    (leftover / export.IN_PROGRESS).touch()
    (leftover / "model-00001-of-00009.safetensors").write_bytes(b"half")
    before = files_of(full_plain)
    result = export.export_run(full_plain, out)
    assert files_of(full_plain) == before and not leftover.exists()
    assert result.difference is None and sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         export.METADATA_FILE])
    module = torch.load(latest(full_plain / "checkpoints").path / PLAIN_STATE_FILE, weights_only=True)["module"]
    _assert_full_export(full_plain, out, {k.removeprefix("lm."): v for k, v in module.items()}, tmp_path)


@pytest.mark.slow
def test_export_of_the_best_eval_checkpoint(tmp_path_factory, tmp_path, capsys):
    """A run with an eval split whose second step overshoots (lr 0.3: eval loss 5.97 after step 1, 9.70 after
    step 2 on this CPU): `--checkpoint best` exports step 1's weights exactly, not the latest's."""
    from orchestrator.checkpoint import PLAIN_STATE_FILE

    run = _train(tmp_path_factory, "fullbest", 1, data={"eval_fraction": 0.25},
                 training={"eval_every": 1, "save_every": 1, "lr": 0.3})
    best = json.loads((run / "summary.json").read_text())["best_checkpoint"]
    assert best == "step00000001" and export.pick_checkpoint(run, export.LATEST).step == 2
    code, err = _export_cli(capsys, run, "--out", tmp_path / "hf", "--checkpoint", "best")
    assert code == 0, err
    assert json.loads((tmp_path / "hf" / export.METADATA_FILE).read_text())["step"] == 1
    module = torch.load(run / "checkpoints" / best / PLAIN_STATE_FILE, weights_only=True)["module"]
    _assert_full_export(run, tmp_path / "hf", {k.removeprefix("lm."): v for k, v in module.items()}, tmp_path)


@pytest.mark.slow
def test_full_zero3_export_gathers_the_partitions(full_z3, tmp_path):
    """A 2-process ZeRO-3 checkpoint: each rank holds half of every flattened parameter; the export joins them
    and equals DeepSpeed's own consolidation (zero_to_fp32, whole model at once)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = tmp_path / "hf"
    export.export_run(full_z3, out)
    master = get_fp32_state_dict_from_zero_checkpoint(str(full_z3 / "checkpoints"), tag="step00000002")
    assert len(list((full_z3 / "checkpoints" / "step00000002").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    _assert_full_export(full_z3, out, {k.removeprefix("lm."): v for k, v in master.items()}, tmp_path)
