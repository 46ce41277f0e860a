"""The job spec: every example validates; every malformed spec is one line naming the field (and line).

Malformed specs are real files in tmp_path, checked through the real CLI entry
point `cli.main(["validate", ...])` in-process (the same function the `orch`
script runs; a subprocess per case would cost ~0.5 s each on a shared 2-core
machine). tests/test_cli.py repeats a sample of them as real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import pytest
import yaml

from orchestrator import catalog, cli, spec

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_JOBS = sorted((REPO / "jobs").glob("*.yaml"))

# A small valid job. Line numbers matter: cases point at the line of a needle.
BASE = """\
name: demo
model:
  name: tiny-llama
  weights: random
  dtype: fp32
method: qlora
lora: {r: 8, alpha: 16}
data:
  paths: [data.jsonl]
  format: text
  seq_len: 64
training:
  micro_batch_size: 2
  global_batch_size: 4
  lr: 1.0e-3
  max_steps: 5
hardware:
  gpu_memory_gb: 4
slurm:
  time: "00:10:00"
"""


def sub(old: str, new: str, text: str = BASE) -> str:
    """BASE with one exact piece replaced (fails loudly if the piece is not there exactly once)."""
    assert text.count(old) == 1, f"{old!r} must occur once in the base spec"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle``."""
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in spec text")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current folder, with a data file and a few model folders."""
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "notes.txt").write_text("not data\n")
    (tmp_path / "no_config").mkdir()
    bad = tmp_path / "gpt2_model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "alpaca_no_output.jsonl").write_text('{"instruction": "add", "input": "2 and 3"}\n')
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.jsonl").write_text('{"text": "hello"}\n')
    zero = tmp_path / "zero_heads"
    zero.mkdir()
    (zero / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 0, "vocab_size": 100}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@dataclass
class Case:
    id: str
    content: Union[str, bytes]
    field: Optional[str]
    """Field path the message must name; None for file-level errors (the message names the file)."""
    line: Optional[str] = None
    """A needle: the message must carry the line of the first line containing it."""
    also: Optional[str] = None
    """Another piece the message must contain (the hint, the allowed values...)."""


def _nested(depth: int) -> str:
    return "name: " + "[" * depth + "]" * depth + "\n"


CASES = [
    # wrong types
    Case("str_for_int", sub("seq_len: 64", "seq_len: '64'"), "data.seq_len", "seq_len", "must be an integer"),
    Case("bool_for_int", sub("micro_batch_size: 2", "micro_batch_size: true"), "training.micro_batch_size", "micro_batch_size"),
    Case("float_for_int", sub("max_steps: 5", "max_steps: 5.0"), "training.max_steps", "max_steps", "must be an integer"),
    Case("exponent_float_for_int", sub("max_steps: 5", "max_steps: 1e3"), "training.max_steps", "max_steps", "got 1000.0"),
    Case("list_for_str", sub("name: demo", "name: [a, b]"), "name", "name: [a", "must be a string"),
    Case("section_not_mapping", sub("hardware:\n  gpu_memory_gb: 4", "hardware: [4]"), "hardware", "hardware:", "must be a section"),
    Case("date_for_str", sub("name: demo", "name: 2024-01-01"), "name", "name: 2024"),
    # unknown keys
    Case("unknown_top_key", BASE + "optimizer: adam\n", "optimizer", "optimizer:", "unknown key"),
    Case("typo_nested_key", sub("  lr: 1.0e-3", "  lr: 1.0e-3\n  warmup_step: 3"), "training.warmup_step", "warmup_step",
         "did you mean 'warmup_steps'"),
    Case("duplicate_key", BASE + "name: other\n", "name", "name: other", "duplicate key (first given on line 1)"),
    # ranges
    Case("negative_micro_batch", sub("micro_batch_size: 2", "micro_batch_size: -2"), "training.micro_batch_size",
         "micro_batch_size", "must be >= 1"),
    Case("seq_len_too_small", sub("seq_len: 64", "seq_len: 4"), "data.seq_len", "seq_len", "must be >= 8"),
    Case("lr_above_one", sub("lr: 1.0e-3", "lr: 2.0"), "training.lr", "lr:", "must be <= 1"),
    Case("huge_int", sub("max_steps: 5", "max_steps: " + "9" * 40), "training.max_steps", "max_steps", "must be <= 2147483647"),
    Case("nan_epochs", sub("max_steps: 5", "epochs: .nan"), "training.epochs", "epochs", "finite"),
    Case("inf_lr", sub("lr: 1.0e-3", "lr: .inf"), "training.lr", "lr:", "finite"),
    Case("batch_not_divisible", sub("global_batch_size: 4", "global_batch_size: 5"), "training.global_batch_size",
         "global_batch_size", "multiple of micro_batch_size x GPUs = 2 x 1 = 2"),
    # files
    Case("missing_data_file", sub("paths: [data.jsonl]", "paths: [data.jsonl, missing.jsonl]"), "data.paths.1", "paths:",
         "does not exist"),
    Case("data_wrong_suffix", sub("paths: [data.jsonl]", "paths: [notes.txt]"), "data.paths.0", "paths:", ".jsonl"),
    Case("unknown_preset", sub("name: tiny-llama", "name: llama3-8"), "model.name", "llama3-8", "did you mean preset 'llama3-8b'"),
    Case("model_folder_without_config", sub("name: tiny-llama", "name: no_config"), "model.name", "no_config", "has no config.json"),
    Case("unsupported_model_type", sub("name: tiny-llama", "name: gpt2_model"), "model.name", "gpt2_model",
         "model_type 'gpt2' is not supported"),
    Case("config_zero_heads", sub("name: tiny-llama", "name: zero_heads"), "model.name", "zero_heads", "num_attention_heads"),
    Case("tokenizer_not_folder", sub("  weights: random", "  weights: random\n  tokenizer: nope"), "model.tokenizer",
         "tokenizer", "is not a folder"),
    # data that the trainer would refuse after the queue wait: caught from the first rows
    Case("empty_data_file", sub("paths: [data.jsonl]", "paths: [data.jsonl, empty.jsonl]"), "data.paths.1", "paths:",
         "'empty.jsonl' has no rows"),
    Case("chat_format_on_text_rows", sub("format: text", "format: chat"), "data.format", "format: chat",
         "format 'chat' needs 'messages': a list of {role, content}, but line 1 of 'data.jsonl' (data.paths.0) has keys text"),
    Case("alpaca_without_output", sub("format: text", "format: alpaca", sub("paths: [data.jsonl]", "paths: [alpaca_no_output.jsonl]")),
         "data.format", "format: alpaca", "format 'alpaca' needs a string field 'output'"),
    Case("folder_not_a_dataset", sub("paths: [data.jsonl]", "paths: [shards]"), "data.paths.0", "paths:",
         "not a data set saved with save_to_disk"),
    Case("target_module_not_in_model", sub("lora: {r: 8, alpha: 16}", "lora: {r: 8, alpha: 16, target_modules: [q_proj, vproj]}"),
         "lora.target_modules", "lora:", "'vproj' is not a linear layer of tiny-llama's decoder blocks (did you mean 'v_proj'?)"),
    # dataset mixing and the eval split: each source's file and format named by its own key
    Case("paths_and_sources", sub("paths: [data.jsonl]", "paths: [data.jsonl]\n  sources: [{path: data.jsonl}]"),
         "data.paths", None, "give exactly one of data.paths (one source) or data.sources"),
    Case("neither_paths_nor_sources", sub("  paths: [data.jsonl]\n", ""), "data.paths", None, "give exactly one"),
    Case("source_weight_zero", sub("paths: [data.jsonl]", "sources: [{path: data.jsonl, weight: 0}]"),
         "data.sources.0.weight", "sources:", "must be > 0"),
    Case("source_weight_typo", sub("paths: [data.jsonl]", "sources: [{path: data.jsonl, wieght: 2}]"),
         "data.sources.0.wieght", "sources:", "did you mean 'weight'"),
    Case("source_missing_file", sub("paths: [data.jsonl]", "sources:\n    - {path: data.jsonl}\n    - {path: gone.jsonl}"),
         "data.sources.1.path", "gone.jsonl", "'gone.jsonl' does not exist"),
    Case("source_format_mismatch", sub("paths: [data.jsonl]", "sources:\n    - {path: data.jsonl}\n    - {path: data.jsonl, format: chat}"),
         "data.sources.1.format", "format: chat", "but line 1 of 'data.jsonl' (data.sources.1.path) has keys text"),
    Case("source_inherits_format", sub("paths: [data.jsonl]", "sources:\n    - {path: data.jsonl}\n    - {path: alpaca_no_output.jsonl}"),
         "data.sources.1.format", "alpaca_no_output", "format 'text' needs a string field 'text'"),
    Case("eval_path_missing", sub("seq_len: 64", "seq_len: 64\n  eval_paths: [gone.jsonl]"), "data.eval_paths.0", "eval_paths",
         "does not exist"),
    Case("eval_source_with_weight", sub("seq_len: 64", "seq_len: 64\n  eval_sources: [{path: data.jsonl, weight: 2}]"),
         "data.eval_sources.0.weight", "eval_sources", "unknown key; allowed: format, path"),
    Case("eval_source_format_mismatch", sub("seq_len: 64", "seq_len: 64\n  eval_sources: [{path: data.jsonl, format: alpaca}]"),
         "data.eval_sources.0.format", "eval_sources", "(data.eval_sources.0.path) has keys text"),
    Case("two_eval_splits", sub("seq_len: 64", "seq_len: 64\n  eval_paths: [data.jsonl]\n  eval_fraction: 0.1"),
         "data.eval_fraction", "eval_fraction", "at most one of data.eval_paths, data.eval_sources or data.eval_fraction"),
    Case("eval_fraction_half", sub("seq_len: 64", "seq_len: 64\n  eval_fraction: 0.5"), "data.eval_fraction", "eval_fraction",
         "must be < 0.5"),
    Case("eval_every_without_split", sub("max_steps: 5", "max_steps: 5\n  eval_every: 2"), "training.eval_every",
         "eval_every", "there is no eval split; set data.eval_paths, data.eval_sources or data.eval_fraction"),
    Case("patience_without_eval_every", sub("max_steps: 5", "max_steps: 5\n  early_stopping_patience: 2",
                                            sub("seq_len: 64", "seq_len: 64\n  eval_fraction: 0.2")),
         "training.early_stopping_patience", "early_stopping_patience", "needs training.eval_every > 0"),
    # GPUs without bf16 (V100): no bf16 dtype, named with the fp16 alternative
    Case("bf16_on_v100", sub("dtype: fp32", "dtype: bf16", sub("gpu_memory_gb: 4", "gpu: V100-32GB")), "model.dtype", "dtype: bf16",
         "hardware.gpu V100-32GB has no bf16; set model.dtype: fp16"),
    Case("bf16_compute_on_v100", sub("gpu_memory_gb: 4", "gpu: v100-32gb"), "quantization.compute_dtype", None,
         "set quantization.compute_dtype: fp16"),
    # YAML 1.1 reads unquoted 24:00:00 as 86400
    Case("time_unquoted", sub('time: "00:10:00"', "time: 24:00:00"), "slurm.time", "time:",
         'got 86400; YAML reads an unquoted 24:00:00 as the base-60 number 86400: quote it, "24:00:00"'),
    # invisible Unicode format characters (bidi overrides) in one-line text
    Case("name_bidi_override", sub("name: demo", 'name: "invoice\u202Egpj.exe"'), "name", "name:", "(found U+202E)"),
    Case("setup_bidi_isolate", sub("slurm:", 'slurm:\n  setup: ["echo \u2066hi"]'), "slurm.setup", "setup:", "(found U+2066)"),
    # extra #SBATCH options that orch writes itself
    Case("sbatch_time_twice", sub("slurm:", "slurm:\n  extra_sbatch: ['--time=01:00:00']"), "slurm.extra_sbatch", "extra_sbatch",
         "'--time=01:00:00' sets --time, which orch writes itself: set slurm.time"),
    Case("sbatch_no_requeue", sub("slurm:", "slurm:\n  extra_sbatch: [--exclusive, --no-requeue]"), "slurm.extra_sbatch",
         "extra_sbatch", "orch requeues a job that checkpointed on USR1"),
    Case("sbatch_abbreviated_nodes", sub("slurm:", "slurm:\n  extra_sbatch: ['--node=2']"), "slurm.extra_sbatch", "extra_sbatch",
         "sets --nodes (abbreviated), which orch writes itself: set hardware.nodes"),
    Case("sbatch_gres_gpu", sub("slurm:", "slurm:\n  extra_sbatch: ['--gres=tmpfs:10G,gpu:a100:4']"), "slurm.extra_sbatch",
         "extra_sbatch", "asks for GPUs, which orch writes itself as --gpus-per-node"),
    # enums and formats
    Case("bad_dtype", sub("dtype: fp32", "dtype: fp8"), "model.dtype", "dtype", "allowed: 'bf16', 'fp16' or 'fp32'"),
    Case("bad_method", sub("method: qlora", "method: dora"), "method", "method", "allowed:"),
    Case("bad_format", sub("format: text", "format: sharegpt"), "data.format", "format", "allowed:"),
    Case("bad_strategy", BASE + "strategy: zero4\n", "strategy", "strategy", "'zero3_offload_all_nvme'"),
    Case("bad_wandb_mode", BASE + "logging: {wandb_mode: loud}\n", "logging.wandb_mode", "logging", "allowed:"),
    Case("bad_block_size", BASE + "quantization: {block_size: 100}\n", "quantization.block_size", "quantization", "64, 128 or 256"),
    Case("bad_time", sub('time: "00:10:00"', 'time: "10 minutes"'), "slurm.time", "time:", "HH:MM:SS"),
    Case("bad_partition", sub("slurm:", "slurm:\n  partition: 'gpu; rm -rf ~'"), "slurm.partition", "partition"),
    Case("short_sbatch_option", sub("slurm:", "slurm:\n  extra_sbatch: ['-N 2']"), "slurm.extra_sbatch", "extra_sbatch", "'--'"),
    Case("bad_gpu_did_you_mean", sub("gpu_memory_gb: 4", "gpu: A100-80G"), "hardware.gpu", "gpu:", "did you mean A100-80GB?"),
    Case("target_modules_int", sub("lora: {r: 8, alpha: 16}", "lora: {r: 8, alpha: 16, target_modules: 5}"),
         "lora.target_modules", "lora:", "must be 'all-linear' or a list"),
    Case("target_modules_item", sub("lora: {r: 8, alpha: 16}", "lora: {r: 8, alpha: 16, target_modules: [q_proj, 7]}"),
         "lora.target_modules.1", "lora:", "must be a string"),
    # Slurm reads a bare "MM:SS", so "00:20" is 20 seconds there (orch read 20 minutes): only unambiguous forms
    Case("time_minutes_seconds_form", sub('time: "00:10:00"', 'time: "00:20"'), "slurm.time", "time:", "HH:MM:SS"),
    Case("time_61_minutes", sub('time: "00:10:00"', 'time: "00:61:00"'), "slurm.time", "time:", "00-59"),
    Case("time_zero", sub('time: "00:10:00"', 'time: "0:00:00"'), "slurm.time", "time:", "more than zero"),
    Case("signal_after_time_limit", sub('time: "00:10:00"', 'time: "00:04:00"'), "slurm.signal_seconds", "slurm:",
         "300 s must be less than slurm.time (00:04:00 = 240 s)"),
    # cross-field rules
    Case("nvme_without_path", BASE + "strategy: zero3_offload_optimizer_nvme\n", "hardware.nvme_path", "hardware:", "NVMe"),
    Case("single_gpu_with_2_gpus", sub("gpu_memory_gb: 4", "gpu_memory_gb: 4\n  gpus_per_node: 2") + "strategy: single_gpu\n",
         "strategy", "strategy:", "needs exactly 1 GPU"),
    Case("both_steps_and_epochs", sub("max_steps: 5", "max_steps: 5\n  epochs: 1"), "training.max_steps", "max_steps", "exactly one"),
    Case("neither_steps_nor_epochs", sub("  max_steps: 5\n", ""), "training.max_steps", "training:", "exactly one"),
    Case("flash_attention_fp32", sub("dtype: fp32", "dtype: fp32\n  attn_implementation: flash_attention_2"),
         "model.attn_implementation", "attn_implementation", "bf16 or fp16"),
    Case("plain_engine_fp16", sub("dtype: fp32", "dtype: fp16").replace("max_steps: 5", "max_steps: 5\n  engine: plain"),
         "training.engine", "engine: plain", "bf16 or fp32"),
    Case("plain_engine_zero3", sub("max_steps: 5", "max_steps: 5\n  engine: plain") + "strategy: zero3\n",
         "training.engine", "engine: plain", "single_gpu on 1 GPU only (here strategy zero3 on 1)"),
    Case("bad_engine", sub("max_steps: 5", "max_steps: 5\n  engine: fast"), "training.engine", "engine: fast",
         "'auto', 'deepspeed' or 'plain'"),
    Case("compile_yes", sub("max_steps: 5", "max_steps: 5\n  compile: 'yes'"), "training.compile", "compile:", "auto"),
    Case("missing_section", sub("data:\n  paths: [data.jsonl]\n  format: text\n  seq_len: 64\n", ""), "data", None,
         "required field is missing"),
    # text that would break one-line output or generated scripts
    Case("name_trailing_newline", sub("name: demo", 'name: "demo\\n"'), "name", "name: ", "one line"),
    Case("name_nul", sub("name: demo", 'name: "de\\0mo"'), "name", "name: ", "one line"),
    Case("output_dir_line_separator", sub("max_steps: 5", 'max_steps: 5\n  output_dir: "runs/\\u2028x"'),
         "training.output_dir", "output_dir", "one line"),
    # file-level problems: the message names the file
    Case("non_mapping_yaml", "- a\n- b\n", None, None, "expected a mapping"),
    Case("scalar_yaml", "just a string\n", None, None, "expected a mapping"),
    Case("invalid_yaml_syntax", "name: demo\nmodel: [unclosed\nmethod: qlora\n", None, None, "invalid YAML"),
    Case("tab_indentation", "name: demo\nmodel:\n\tname: x\n", None, None, "invalid YAML"),
    Case("non_utf8_bytes", b"name: d\xffmo\n", None, None, "not UTF-8"),
    Case("yaml_alias", "name: &n demo\nmodel: {name: *n}\n", None, None, "aliases"),
    Case("empty_file", "", None, None, "expected a mapping"),
    Case("comment_only", "# nothing here\n", None, None, "expected a mapping"),
    Case("python_tag", "name: !!python/object/apply:os.system [echo hi]\n", None, None, "invalid YAML"),
    Case("int_of_5000_digits", sub("max_steps: 5", "max_steps: 1" + "0" * 5000), None, None, "invalid YAML value"),
    Case("nested_too_deep", _nested(3000), None, None, "nested too deeply"),
]

# The brief asks for at least 30 malformed cases.
assert len(CASES) >= 30


def _validate(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(["validate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_spec_is_one_line_naming_field(case: Case, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    job = workdir / "job.yaml"
    if isinstance(case.content, bytes):
        job.write_bytes(case.content)
    else:
        job.write_text(case.content, encoding="utf-8")
    code, out, err = _validate(capsys, "job.yaml")
    assert code == cli.Exit.BAD_SPEC == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    message = lines[0]
    assert message.startswith("orch: error: job.yaml")
    if case.field is not None:
        # "<file>[:line]: <field path>: ..."
        assert re.search(rf"^orch: error: job\.yaml(:\d+)?: {re.escape(case.field)}: ", message), message
    if case.line is not None:
        assert isinstance(case.content, str)
        assert message.startswith(f"orch: error: job.yaml:{line_of(case.content, case.line)}: "), message
    if case.also is not None:
        assert case.also in message


def test_base_spec_is_valid(workdir: Path) -> None:
    """The cases above fail because of their one change, not because BASE is broken."""
    (workdir / "job.yaml").write_text(BASE)
    job = spec.load_job("job.yaml")
    assert job.name == "demo" and job.training.max_steps == 5 and job.grad_accum() == 2


def test_several_problems_one_line_each(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    text = sub("dtype: fp32", "dtype: fp8", sub("seq_len: 64", "seq_len: -1"))
    (workdir / "job.yaml").write_text(text)
    code, _, err = _validate(capsys, "job.yaml")
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 2
    assert any(f"job.yaml:{line_of(text, 'dtype')}: model.dtype:" in x for x in lines)
    assert any(f"job.yaml:{line_of(text, 'seq_len')}: data.seq_len:" in x for x in lines)


def test_union_field_gives_one_error_not_one_per_branch(workdir: Path) -> None:
    """Bug fixed: `target_modules: 5` used to give two lines ("allowed: 'all-linear'" and "should be a valid list")."""
    (workdir / "job.yaml").write_text(sub("lora: {r: 8, alpha: 16}", "lora: {r: 8, alpha: 16, target_modules: {q: 1}}"))
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert exc.value.problems == [
        "job.yaml:7: lora.target_modules: got {'q': 1}; must be 'all-linear' or a list"
    ]


def test_union_field_bad_module_name(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(sub("lora: {r: 8, alpha: 16}", "lora: {r: 8, alpha: 16, target_modules: ['q proj']}"))
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert exc.value.problems == ["job.yaml:7: lora.target_modules: got ['q proj']; 'q proj' is not a module name"]


def test_nan_is_named_as_nan(workdir: Path) -> None:
    """Bug fixed: `epochs: .nan` said "should be less than or equal to 10000"; unbounded floats
    (max_grad_norm) accepted NaN outright."""
    (workdir / "job.yaml").write_text(sub("lr: 1.0e-3", "lr: 1.0e-3\n  max_grad_norm: .nan"))
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert "training.max_grad_norm: got nan; must be a finite number" in str(exc.value)


def test_trailing_newline_rejected_everywhere_one_line_is_required() -> None:
    """Bug fixed: the one-line check used re.match with `$`, which lets one trailing newline through."""
    for bad in ("x\n", "x\r", "x\x85", "x\u2028", "x\u2029", "\x00"):
        with pytest.raises(ValueError):
            spec._one_line(bad, "value")
    assert spec._one_line("Ünïcödé ok 日本", "value") == "Ünïcödé ok 日本"


def test_exponent_floats_are_numbers(workdir: Path) -> None:
    """Bug fixed: YAML 1.1 reads `lr: 3e-4` as the string '3e-4' (a float needs a dot), which the
    strict spec then rejected as "not a number"."""
    (workdir / "job.yaml").write_text(sub("lr: 1.0e-3", "lr: 3e-4"))
    assert spec.load_job("job.yaml").training.lr == pytest.approx(3e-4)
    assert spec.load_job("job.yaml", ["training.lr=5E-5"]).training.lr == pytest.approx(5e-5)
    # The shared SafeLoader is left alone (other YAML in the process keeps YAML 1.1 rules).
    assert yaml.safe_load("x: 3e-4") == {"x": "3e-4"}


def test_duplicate_nested_key(workdir: Path) -> None:
    text = sub("  lr: 1.0e-3", "  lr: 1.0e-3\n  lr: 0.5")
    (workdir / "job.yaml").write_text(text)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert str(exc.value) == f"job.yaml:{line_of(text, 'lr: 0.5')}: training.lr: duplicate key (first given on line {line_of(text, 'lr:')})"


def test_missing_and_directory_job_file(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _validate(capsys, "nope.yaml")
    assert (code, err.strip()) == (2, "orch: error: nope.yaml: no such file")
    code, _, err = _validate(capsys, "no_config")
    assert (code, err.strip()) == (2, "orch: error: no_config: is a directory, expected a YAML job file")


# --- example jobs -------------------------------------------------------------------------------


def test_there_are_example_jobs() -> None:
    assert {p.name for p in EXAMPLE_JOBS} >= {"tiny.yaml", "llama70b.yaml", "llama8b_qlora_24gb.yaml",
                                              "llama8b_full_2x80.yaml", "llama13b_full_offload.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_JOBS, ids=[p.name for p in EXAMPLE_JOBS])
def test_example_job_validates(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(REPO)  # example jobs use paths relative to the repo root
    code, out, err = _validate(capsys, str(path.relative_to(REPO)))
    assert (code, err) == (0, "")
    assert out.startswith(f"{path.relative_to(REPO)}: ok (")
    job = spec.load_job(path.relative_to(REPO))
    # The resolved spec round-trips: dump_job's YAML loads back to the same job.
    again = spec.validate_dict(yaml.safe_load(spec.dump_job(job)), spec._Source("dump", {}))
    assert again == job


# --- overrides ----------------------------------------------------------------------------------


def test_override_is_validated_and_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(REPO)
    code, _, err = _validate(capsys, "jobs/tiny.yaml", "training.micro_batch_size=-1")
    assert code == 2
    assert err.strip() == ("orch: error: jobs/tiny.yaml (override 'training.micro_batch_size=-1'): "
                           "training.micro_batch_size: got -1; must be >= 1")


@pytest.mark.parametrize(
    "override, attr, expected",
    [
        ("training.micro_batch_size=2", lambda j: j.training.micro_batch_size, 2),  # YAML int
        ("training.gradient_checkpointing=true", lambda j: j.training.gradient_checkpointing, True),  # YAML bool
        ("lora.target_modules=[q_proj,v_proj]", lambda j: j.lora.target_modules, ["q_proj", "v_proj"]),  # YAML list
        ("training.lr=3e-4", lambda j: j.training.lr, 3e-4),
        ("name=hello world", lambda j: j.name, "hello world"),  # plain text stays a string
        ("training.seed=0x10", lambda j: j.training.seed, 16),  # YAML 1.1 hex int
    ],
)
def test_override_values_are_yaml_scalars(workdir: Path, override: str, attr: Callable, expected: object) -> None:
    (workdir / "job.yaml").write_text(BASE)
    value = attr(spec.load_job("job.yaml", [override]))
    assert value == expected and type(value) is type(expected)


def test_override_creates_sections(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(BASE)  # BASE has no logging, strategy or quantization section
    job = spec.load_job("job.yaml", ["logging.wandb_mode=disabled", "quantization.type=fp4",
                                     "hardware.nvme_path=/local/nvme", "strategy=zero3_offload_all_nvme",
                                     "training.max_steps=null", "training.epochs=2"])
    assert (job.logging.wandb_mode, job.quantization.type, job.hardware.nvme_path, job.strategy) == (
        "disabled", "fp4", "/local/nvme", "zero3_offload_all_nvme")
    assert (job.training.max_steps, job.training.epochs) == (None, 2)


def test_override_into_new_section_is_validated(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", ["logging.wandb_mode=loud"])
    assert str(exc.value).startswith("job.yaml (override 'logging.wandb_mode=loud'): logging.wandb_mode: got 'loud'; allowed:")
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", ["logging.colour=red"])
    assert "logging.colour: unknown key" in str(exc.value)


@pytest.mark.parametrize("bad", ["training.lr", "=3", "a..b=1", "training.=1", ".x=1", "training lr=1", "9a=1", "a-b=1", ""])
def test_malformed_override_syntax(workdir: Path, bad: str) -> None:
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", [bad])
    assert str(exc.value) == f"override {bad!r}: expected dotted.key=value, e.g. training.micro_batch_size=4"


def test_override_into_a_scalar(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", ["name.first=x"])
    assert str(exc.value) == "override 'name.first=x': name is not a section"


def test_override_with_huge_number(workdir: Path) -> None:
    """Bug fixed: an override of 5000 digits crashed with ValueError from int()."""
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", ["training.max_steps=1" + "0" * 5000])
    assert str(exc.value).startswith("override 'training.max_steps=1000")


def test_cross_field_error_from_override_names_override(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", ["training.global_batch_size=3"])
    assert str(exc.value) == ("job.yaml (override 'training.global_batch_size=3'): training.global_batch_size: "
                              "3 must be a multiple of micro_batch_size x GPUs = 2 x 1 = 2")


# --- names and paths ----------------------------------------------------------------------------

_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@pytest.mark.parametrize("name", ["..", "...", ".", "../../etc/passwd", "a/b\\c", "-rf", "日本語", "  x  ", "CON",
                                  "a" * 128, "x\u00a0", "._-", "job name (v2)", "模型一", "llama-ß"])
def test_slug_is_one_safe_path_component(workdir: Path, name: str) -> None:
    (workdir / "job.yaml").write_text(BASE)
    job = spec.load_job("job.yaml", [f"name={json.dumps(name)}"])
    slug = job.slug()
    assert _SAFE_COMPONENT.fullmatch(slug), slug
    assert slug not in (".", "..") and "/" not in slug and "\\" not in slug
    assert job.output_dir() == Path("runs") / slug


def _sha8(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def test_slug_keeps_readable_names() -> None:
    # A name that is already one safe component is its own slug: the committed examples keep their files.
    for name in ("llama70b-lora", "tiny", "llama8b-qlora-24gb", "a.b_c-d", "a" * 100):
        assert spec.safe_name(name) == name
    # Any other name keeps its readable part and gets 8 hex digits of its SHA-256.
    assert spec.safe_name("my job (v2)") == f"my_job_v2_{_sha8('my job (v2)')}"
    assert spec.safe_name("..") == f"job_{_sha8('..')}"
    assert spec.safe_name("a" * 101) == f"{'a' * 91}_{_sha8('a' * 101)}"  # 91 + 1 + 8 = 100 characters
    # A safe name that ends like a hashed slug is hashed too, so it cannot equal another name's slug.
    assert spec.safe_name("x_0123abcd") == f"x_0123abcd_{_sha8('x_0123abcd')}"


@pytest.mark.parametrize("a, b", [("模型一", "模型二"), ("llama-ß", "llama-日本"), ("my job", "my_job"), ("a/b", "a_b"),
                                  ("a" * 101, "a" * 102), ("-rf", "rf")])
def test_distinct_names_give_distinct_folders_and_files(workdir: Path, a: str, b: str) -> None:
    """Bug fixed: 模型一 and 模型二 both became `job`, llama-ß and llama-日本 both `llama`."""
    from orchestrator import compiler

    (workdir / "job.yaml").write_text(BASE)
    job_a, job_b = (spec.load_job("job.yaml", [f"name={json.dumps(n)}"]) for n in (a, b))
    assert job_a.output_dir() != job_b.output_dir()
    files_a, files_b = compiler.output_files(job_a, Path("out")), compiler.output_files(job_b, Path("out"))
    assert all(files_a[k] != files_b[k] for k in files_a)


# --- schema -------------------------------------------------------------------------------------


def test_schema_describes_every_field() -> None:
    schema = spec.json_schema()
    missing = []
    for owner, obj in [("JobSpec", schema), *schema["$defs"].items()]:
        for key, prop in obj.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{owner}.{key}")
    assert missing == []
    assert set(schema["properties"]) == set(spec.JobSpec.model_fields)
    assert set(schema["required"]) == {"name", "model", "method", "data", "training"}


def test_catalog_gpus_in_schema_description() -> None:
    desc = spec.json_schema()["$defs"]["HardwareSpec"]["properties"]["gpu"]["description"]
    assert all(name in desc for name in catalog.GPUS)


# --- regressions found by tests/reliability/test_spec_fuzz.py -----------------------------------


def test_unknown_key_with_newline_stays_one_line(workdir: Path) -> None:
    """Bug fixed: an unknown key "a\\nb" was printed raw, splitting the error over two lines."""
    (workdir / "job.yaml").write_text(sub("lr: 1.0e-3", 'lr: 1.0e-3\n  "a\\nb c": 1'))
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    (problem,) = exc.value.problems
    assert problem.startswith("job.yaml:16: training.'a\\nb c': unknown key; allowed: ")
    assert len(problem.splitlines()) == 1
    # A long odd key is shortened inside its quotes, so the path stays parseable.
    (workdir / "job.yaml").write_text(BASE + f"{'é' * 80}: 1\n")
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert str(exc.value).startswith(f"job.yaml:21: '{'é' * 40}...': unknown key;")


@pytest.mark.parametrize("key", ["str", "a[1]", "list[str]", "function-after"])
def test_unknown_key_that_looks_like_a_pydantic_tag(workdir: Path, key: str) -> None:
    """Bug fixed: the loc cleaning dropped every part that looked like a union branch tag,
    so an unknown key `str` under training was reported as `training: unknown key`."""
    text = sub("lr: 1.0e-3", f"lr: 1.0e-3\n  '{key}': 1")
    (workdir / "job.yaml").write_text(text)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else repr(key)
    assert str(exc.value).startswith(f"job.yaml:{line_of(text, key)}: training.{shown}: unknown key;")


def test_bad_explicit_tag_is_a_spec_error(workdir: Path) -> None:
    """Bug fixed: `!!timestamp x` made PyYAML raise AttributeError (a traceback from orch validate)."""
    (workdir / "job.yaml").write_text(sub("name: demo", "name: !!timestamp x"))
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert str(exc.value).startswith("job.yaml: invalid YAML value (AttributeError: ")
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError, match="override 'name=!!timestamp x': value is not a usable YAML"):
        spec.load_job("job.yaml", ["name=!!timestamp x"])


def test_deep_flow_nesting_rejected_before_parsing(workdir: Path) -> None:
    """Thousands of '[' used to cost ~1 s of recursion in PyYAML each; now a bracket count rejects them
    (its message, with the line and the limit, is not PyYAML's)."""
    text = BASE + "x: " + "[" * 200_000 + "]" * 200_000 + "\n"
    (workdir / "job.yaml").write_text(text)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert str(exc.value) == f"job.yaml:{line_of(text, 'x: [')}: YAML nested too deeply (more than 64 levels of [ or {{)"
    # 64 levels are fine (and rejected only for being an unknown key).
    (workdir / "job.yaml").write_text(BASE + "x: " + "[" * 64 + "]" * 64 + "\n")
    with pytest.raises(spec.SpecError, match="x: unknown key"):
        spec.load_job("job.yaml")


def test_problem_list_is_capped(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(BASE + "".join(f"k{i}: {i}\n" for i in range(500)))
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml")
    assert len(exc.value.problems) == spec.MAX_PROBLEMS + 1
    assert exc.value.problems[-1] == "job.yaml: (top level): 480 more problems not shown"


@pytest.mark.parametrize("text, seconds", [("00:20:00", 1200), ("2-00:00:00", 172800), ("1-12", 129600),
                                           ("1-12:30", 131400), ("100:00:00", 360000)])
def test_slurm_time_seconds(text: str, seconds: int) -> None:
    # Slurm's forms: D-HH = days and hours; D-HH:MM; HH:MM:SS. 1-12:30 = 86400 + 12*3600 + 30*60 = 131400.
    assert spec.SlurmSpec(time=text).time_seconds() == seconds


# --- GPUs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("written", ["a100-80gb", "A100-80gb", "A100-80GB"])
def test_gpu_names_any_case(workdir: Path, written: str) -> None:
    """Bug fixed: GPU names were case-sensitive, and `a100-80gb` suggested H100-80GB."""
    (workdir / "job.yaml").write_text(sub("gpu_memory_gb: 4", f"gpu: {written}"))
    job = spec.load_job("job.yaml")
    assert job.hardware.gpu == "A100-80GB"
    assert job.hardware.gpu_memory_bytes() == catalog.GPUS["A100-80GB"].memory_mib * catalog.MIB


def test_gpu_typo_suggests_the_same_gpu_in_any_case(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(sub("gpu_memory_gb: 4", "gpu: a100-80g"))
    with pytest.raises(spec.SpecError, match=r"hardware.gpu: got 'a100-80g'; unknown GPU \(did you mean A100-80GB\?\)"):
        spec.load_job("job.yaml")


def test_gpu_without_bf16_runs_fp16(workdir: Path) -> None:
    assert not catalog.GPUS["V100-32GB"].bf16
    assert [name for name, gpu in catalog.GPUS.items() if not gpu.bf16] == ["V100-32GB"]
    (workdir / "job.yaml").write_text(sub("dtype: fp32", "dtype: fp16", sub("gpu_memory_gb: 4", "gpu: V100-32GB")))
    job = spec.load_job("job.yaml", ["quantization.compute_dtype=fp16"])
    assert (job.model.dtype, job.quantization.compute_dtype) == ("fp16", "fp16")
    # method full never dequantizes: quantization.compute_dtype (bf16 by default) does not matter there
    assert spec.load_job("job.yaml", ["method=full"]).quantization.compute_dtype == "bf16"


# --- slurm.extra_sbatch ---------------------------------------------------------------------------


@pytest.mark.parametrize("line", ["--exclusive", "--constraint=h100&ib", "--time-min=01:00:00", "--gres=tmpfs:10G",
                                  "--gpu-bind=closest", "--mail-type=END", "--nodelist=n[1-2]", "--mem-bind=local"])
def test_extra_sbatch_options_orch_does_not_write_are_kept(workdir: Path, line: str) -> None:
    (workdir / "job.yaml").write_text(BASE)
    job = spec.load_job("job.yaml", [f"slurm.extra_sbatch=[{json.dumps(line)}]"])
    assert job.slurm.extra_sbatch == [line]


def test_every_option_orch_writes_is_reserved(workdir: Path) -> None:
    """The reserved table covers every #SBATCH option orch generates (so extra_sbatch cannot set one twice)."""
    from orchestrator import slurm

    (workdir / "job.yaml").write_text(BASE)
    job = spec.load_job("job.yaml", ["slurm.partition=gpu", "slurm.account=a", "slurm.qos=q"])
    written = {opt.split("=", 1)[0] for opt in slurm.sbatch_options(job, slurm.SbatchPaths("j.yaml", "d.json", "logs"))}
    assert written <= set(spec.SBATCH_OPTIONS_ORCH_WRITES), written - set(spec.SBATCH_OPTIONS_ORCH_WRITES)
    for name in written:  # and each is rejected in extra_sbatch, by name
        with pytest.raises(spec.SpecError, match=f"sets {name}, which orch writes itself"):
            spec.load_job("job.yaml", [f"slurm.extra_sbatch=['{name}=1']"])


def test_schema_states_the_extra_sbatch_rule() -> None:
    desc = spec.json_schema()["$defs"]["SlurmSpec"]["properties"]["extra_sbatch"]["description"]
    assert "An option orch writes itself is rejected" in desc
    assert all(name in desc for name in spec.SBATCH_OPTIONS_ORCH_WRITES)


# --- other one-line text --------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u061c", "\ufeff", "\u200b"])
def test_format_characters_rejected_where_one_line_is_required(workdir: Path, char: str) -> None:
    """Bug fixed: an RTL override (U+202E) in the name was accepted; every one-line field refuses
    invisible format characters (Unicode category Cf)."""
    (workdir / "job.yaml").write_text(BASE)
    for override, field in [(f"name=a{char}b", "name"), (f"data.paths=['a{char}.jsonl']", "data.paths"),
                            (f"training.output_dir=runs/{char}x", "training.output_dir"),
                            (f"slurm.setup=['echo {char}']", "slurm.setup")]:
        with pytest.raises(spec.SpecError) as exc:
            spec.load_job("job.yaml", [override])
        assert f": {field}: " in str(exc.value) and f"(found U+{ord(char):04X})" in str(exc.value), str(exc.value)


def test_time_override_read_as_number_says_quote_it(workdir: Path) -> None:
    (workdir / "job.yaml").write_text(BASE)
    with pytest.raises(spec.SpecError) as exc:
        spec.load_job("job.yaml", ["slurm.time=1:30:00"])  # 1*3600 + 30*60 = 5400
    assert str(exc.value) == ("job.yaml (override 'slurm.time=1:30:00'): slurm.time: got 5400; YAML reads an unquoted "
                              '1:30:00 as the base-60 number 5400: quote it, "1:30:00"')
    assert spec.load_job("job.yaml", ['slurm.time="1:30:00"']).slurm.time == "1:30:00"


# --- warnings -------------------------------------------------------------------------------------


def test_warnings_warmup_longer_than_training_and_seq_len_above_positions(workdir: Path) -> None:
    text = sub("max_steps: 5", "max_steps: 5\n  warmup_steps: 8", sub("seq_len: 64", "seq_len: 4096"))
    (workdir / "job.yaml").write_text(text)
    warnings: list[str] = []
    job = spec.load_job("job.yaml", warnings=warnings)  # valid: warnings do not stop the job
    assert job.training.warmup_steps == 8
    assert warnings == [
        f"job.yaml:{line_of(text, 'warmup_steps')}: training.warmup_steps: 8 warmup steps for 5 training steps: "
        "the learning rate never gets past warmup",
        # tiny-llama's max_position_embeddings is 2048 (orchestrator/catalog.py)
        f"job.yaml:{line_of(text, 'seq_len')}: data.seq_len: 4096 is above tiny-llama's max_position_embeddings 2048: "
        "the model never saw such positions",
    ]
    quiet: list[str] = []
    spec.load_job("job.yaml", ["training.warmup_steps=4", "data.seq_len=2048"], warnings=quiet)
    assert quiet == []
    from_override: list[str] = []
    spec.load_job("job.yaml", ["training.max_steps=8", "data.seq_len=2048"], warnings=from_override)
    assert from_override == [f"job.yaml:{line_of(text, 'warmup_steps')}: training.warmup_steps: 8 warmup steps for 8 training steps: "
                             "the learning rate never gets past warmup"]


def test_example_jobs_have_no_warnings() -> None:
    for path in EXAMPLE_JOBS:
        warnings: list[str] = []
        spec.load_job(path, check_paths=False, warnings=warnings)
        assert warnings == [], path
