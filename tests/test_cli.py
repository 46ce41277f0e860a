"""The `orch` CLI: validate/schema/models/gpus, help texts, exit codes, --debug.

Most tests run the real CLI in a subprocess from this checkout (tests/cli_helpers.py);
the fault-injection tests call `cli.main([...])` in-process so a function can be
monkeypatched to fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import catalog, cli, spec
from orchestrator.errors import Exit, OrchError
from orchestrator.strategy import STRATEGIES
from tests.cli_helpers import REPO_ROOT, orch_env, run_orch
from tests.test_spec import BASE, CASES, line_of

EXAMPLE_JOBS = sorted((REPO_ROOT / "jobs").glob("*.yaml"))
PRESET_NAMES = ["llama3-1b", "llama3-3b", "llama3-8b", "llama3-70b", "llama3-405b",
                "llama2-7b", "llama2-13b", "mistral-7b", "qwen2.5-7b", "qwen2.5-72b"]


# --- validate as a real process -------------------------------------------------------------------


def test_validate_examples_subprocess() -> None:
    for path in EXAMPLE_JOBS:
        res = run_orch("validate", path.relative_to(REPO_ROOT))
        assert (res.returncode, res.stderr) == (0, ""), path
        assert "ok (" in res.stdout


def test_validate_override_subprocess() -> None:
    res = run_orch("validate", "jobs/tiny.yaml", "training.micro_batch_size=-1")
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        "orch: error: jobs/tiny.yaml (override 'training.micro_batch_size=-1'): training.micro_batch_size: got -1; must be >= 1"
    ]


# A sample of tests/test_spec.py's cases, as real processes (exit status, stderr, no traceback).
SUBPROCESS_SAMPLE = ["typo_nested_key", "batch_not_divisible", "unknown_preset", "non_utf8_bytes", "yaml_alias",
                     "invalid_yaml_syntax", "nan_epochs", "nested_too_deep"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_SAMPLE], ids=lambda c: c.id)
def test_malformed_spec_subprocess(case, tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text('{"text": "hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_bytes(case.content if isinstance(case.content, bytes) else case.content.encode())
    res = run_orch("validate", "job.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith("orch: error: job.yaml")
    if case.field:
        assert f": {case.field}: " in line
    if case.line:
        assert line.startswith(f"orch: error: job.yaml:{line_of(case.content, case.line)}: ")


def test_usage_errors_exit_2_without_traceback() -> None:
    for args in [("validate",), ("frobnicate",), ("models", "--bogus"), ()]:
        res = run_orch(*args)
        assert res.returncode == 2, args
        assert "Traceback" not in res.stderr


def test_no_command_prints_help() -> None:
    res = run_orch()
    assert res.returncode == 2
    assert "usage: orch" in res.stdout and "examples:" in res.stdout


# --- schema ---------------------------------------------------------------------------------------


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        schema = root["$defs"][ref.removeprefix("#/$defs/")]
    return schema


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
          "null": type(None)}


def schema_errors(value: Any, schema: dict, root: dict, path: str = "") -> list[str]:
    """A small JSON Schema checker for the keywords pydantic emits here (jsonschema is not in the venv).

    Supports $ref, anyOf, type, enum, const, properties, required, additionalProperties=false,
    items, minimum/maximum (+exclusive), minLength/maxLength, minItems.
    """
    schema = _resolve(schema, root)
    errors: list[str] = []
    if "anyOf" in schema:
        if all(schema_errors(value, s, root, path) for s in schema["anyOf"]):
            errors.append(f"{path}: matches no anyOf branch")
        return errors
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in enum")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} != const")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, bad in [("minimum", value < schema.get("minimum", value)), ("maximum", value > schema.get("maximum", value)),
                         ("exclusiveMinimum", "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]),
                         ("exclusiveMaximum", "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"])]:
            if bad:
                errors.append(f"{path}: {value} violates {key}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: length")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: too few items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), root, f"{path}.{i}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in props:
                errors += schema_errors(item, props[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{key}: additional property")
    return errors


@pytest.fixture(scope="module")
def printed_schema() -> dict:
    res = run_orch("schema")
    assert (res.returncode, res.stderr) == (0, "")
    return json.loads(res.stdout)


def test_schema_is_json_schema_with_descriptions(printed_schema: dict) -> None:
    assert printed_schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert printed_schema["type"] == "object" and printed_schema["additionalProperties"] is False
    training = _resolve(printed_schema["properties"]["training"], printed_schema)
    assert "Sequences per GPU per forward pass" in training["properties"]["micro_batch_size"]["description"]
    micro = training["properties"]["micro_batch_size"]["anyOf"]
    assert {"const": "auto", "type": "string"} in micro  # the planner chooses (planner.plan)
    assert {"type": "integer", "minimum": 1, "maximum": 65536} in micro
    strategy = printed_schema["properties"]["strategy"]
    assert set(strategy["enum"]) == {"auto", *STRATEGIES}
    assert "zero3_offload_all (ZeRO-3 with the optimizer states and the parameters in host RAM)" in strategy["description"]


@pytest.mark.parametrize("path", EXAMPLE_JOBS, ids=[p.name for p in EXAMPLE_JOBS])
def test_example_jobs_match_printed_schema(path: Path, printed_schema: dict) -> None:
    raw = yaml.safe_load(path.read_text())
    assert schema_errors(raw, printed_schema, printed_schema) == []
    # The fully resolved job (every default filled in) matches too.
    job = spec.load_job(path, check_paths=False)
    assert schema_errors(yaml.safe_load(spec.dump_job(job)), printed_schema, printed_schema) == []


def test_schema_checker_rejects_what_the_spec_rejects(printed_schema: dict) -> None:
    """The structural check can fail: bad values that orch rejects are also outside the schema."""
    raw = yaml.safe_load(BASE)
    for mutate, where in [
        (lambda d: d["training"].update(micro_batch_size=0), ".training.micro_batch_size"),
        (lambda d: d["training"].update(micro_batch_size="autox"), ".training.micro_batch_size"),
        (lambda d: d["training"].update(gradient_checkpointing="on"), ".training.gradient_checkpointing"),
        (lambda d: d["training"].update(warmup_step=3), ".training.warmup_step"),
        (lambda d: d.update(strategy="zero4"), ".strategy"),
        (lambda d: d["data"].update(paths=[]), ".data.paths"),
        (lambda d: d.pop("method"), ".method"),
        (lambda d: d["model"].update(dtype="fp8"), ".model.dtype"),
        (lambda d: d["lora"].update(target_modules=5), ".lora.target_modules"),
    ]:
        bad = json.loads(json.dumps(raw))
        mutate(bad)
        errors = schema_errors(bad, printed_schema, printed_schema)
        assert any(e.startswith(where) for e in errors), (where, errors)
    assert schema_errors(raw, printed_schema, printed_schema) == []


# --- models and gpus ------------------------------------------------------------------------------


def test_models_lists_every_preset_with_shape() -> None:
    res = run_orch("models")
    assert (res.returncode, res.stderr) == (0, "")
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:]}
    assert set(PRESET_NAMES) <= set(rows)
    for name in PRESET_NAMES:
        s = catalog.PRESETS[name]
        _, family, params, layers, hidden, ffn, heads, kv, head_dim, vocab, tied, window = rows[name]
        assert [int(layers), int(hidden), int(ffn), int(heads), int(kv), int(head_dim), int(vocab)] == [
            s.num_hidden_layers, s.hidden_size, s.intermediate_size, s.num_attention_heads, s.num_key_value_heads,
            s.head_dim_, s.vocab_size]
        assert family == s.model_type
        assert tied == ("yes" if s.tie_word_embeddings else "no")
        assert window == (str(s.sliding_window) if s.sliding_window else "-")
        assert params == catalog.format_params(s.num_params())


def test_models_small_model_not_zero_billion() -> None:
    """Bug fixed: tiny-llama printed as 0.00B."""
    res = run_orch("models")
    row = next(line for line in res.stdout.splitlines() if line.startswith("tiny-llama"))
    assert "0.00B" not in row
    assert row.split()[2] == f"{catalog.PRESETS['tiny-llama'].num_params() / 1e6:.3f}M"


def test_models_json() -> None:
    res = run_orch("models", "--json")
    assert res.returncode == 0
    data = {row["name"]: row for row in json.loads(res.stdout)}
    for name in PRESET_NAMES:
        assert data[name]["params"] == catalog.PRESETS[name].num_params()
        assert data[name]["hidden_size"] == catalog.PRESETS[name].hidden_size


def test_gpus() -> None:
    res = run_orch("gpus")
    assert res.returncode == 0
    assert res.stdout.splitlines()[0].split() == ["gpu", "memory", "bf16", "16-bit", "TFLOP/s"]
    for name, gpu in catalog.GPUS.items():
        line = next(x for x in res.stdout.splitlines() if x.split()[0] == name)
        assert f"{gpu.memory_mib / 1024:.1f} GiB" in line
        # Bug fixed: V100-32GB was listed with "bf16 125 TFLOP/s"; it has no bf16 (125 is its fp16 peak).
        assert line.split()[3] == ("yes" if gpu.bf16 else "no")
    assert next(x for x in res.stdout.splitlines() if x.startswith("V100-32GB")).split()[3:] == ["no", "125"]


# --- help -----------------------------------------------------------------------------------------


def _subcommands() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_subcommand_help_has_an_example() -> None:
    subs = _subcommands()
    assert {"validate", "schema", "models", "gpus", "plan", "compile", "submit", "train", "export", "status", "cancel",
            "logs"} <= set(subs)
    for name, sub in subs.items():
        text = sub.format_help()
        lines = text.splitlines()
        i = next((k for k, line in enumerate(lines) if line.strip().lower().startswith("example")), None)
        assert i is not None, f"`orch {name} --help` has no example"
        assert lines[i + 1].strip().split()[0] in ("orch", "deepspeed"), name
        for action in sub._actions:
            if action.help != "==SUPPRESS==" and action.dest != "help":
                assert action.help, f"orch {name}: option {action.dest} has no help"


def test_top_level_help_subprocess() -> None:
    res = run_orch("--help")
    assert res.returncode == 0
    assert "examples:" in res.stdout and "exit codes:" in res.stdout
    for name in ("validate", "schema", "models", "gpus", "plan", "compile", "submit"):
        assert name in res.stdout
    res = run_orch("validate", "--help")
    assert res.returncode == 0 and "example:\n  orch validate jobs/" in res.stdout


# --- error handling and --debug -------------------------------------------------------------------


def _boom(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("injected failure\nsecond line")


def test_unexpected_error_is_one_line_without_debug(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # Fault injection: load_job is replaced by a function that raises, to stand for a bug
    # anywhere below the CLI. The CLI's handling of it is what is tested, not load_job.
    monkeypatch.setattr(spec, "load_job", _boom)
    code = cli.main(["validate", "jobs/tiny.yaml"])
    err = capsys.readouterr().err
    assert code == Exit.ERROR == 1
    assert err.splitlines() == ["orch: error: RuntimeError: injected failure (run with --debug for the traceback)"]


def test_debug_reraises_for_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec, "load_job", _boom)  # fault injection, as above
    with pytest.raises(RuntimeError, match="injected failure"):
        cli.main(["--debug", "validate", "jobs/tiny.yaml"])


def test_debug_spec_error_reraises(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(OrchError) as exc:
        cli.main(["--debug", "validate", str(REPO_ROOT / "jobs/tiny.yaml"), "training.lr=-1"])
    assert exc.value.code == Exit.BAD_SPEC


_INJECT = """
import sys
from orchestrator import cli, spec
def boom(*a, **k):
    raise RuntimeError("injected failure")
spec.load_job = boom  # fault injection: stands for a bug below the CLI
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("debug", [False, True])
def test_traceback_only_with_debug_subprocess(debug: bool) -> None:
    args = (["--debug"] if debug else []) + ["validate", "jobs/tiny.yaml"]
    res = subprocess.run([sys.executable, "-c", _INJECT, *args], cwd=REPO_ROOT, env=orch_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert ("Traceback (most recent call last)" in res.stderr) is debug
    assert "RuntimeError: injected failure" in res.stderr


def test_keyboard_interrupt_exit_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(spec, "load_job", interrupted)  # fault injection: Ctrl-C during loading
    assert cli.main(["validate", "jobs/tiny.yaml"]) == 130
    assert capsys.readouterr().err == "orch: interrupted\n"


# --- overrides anywhere after the command ---------------------------------------------------------


def test_overrides_mix_with_options_on_every_command_that_takes_them() -> None:
    """Bug fixed: `orch plan JOB --json k=v` failed with "unrecognized arguments"."""
    parser = cli.build_parser()
    with_overrides = {name: sub for name, sub in _subcommands().items() if any(a.dest == "overrides" for a in sub._actions)}
    assert set(with_overrides) == {"validate", "plan", "compile", "submit", "train"}
    for name, sub in with_overrides.items():
        # one flag of each mutually exclusive group (--resume | --restart)
        exclusive = [a for g in sub._mutually_exclusive_groups for a in g._group_actions[1:]]
        flags = [a.option_strings[-1] for a in sub._actions
                 if a.option_strings and a.nargs == 0 and a.dest != "help" and a not in exclusive]
        argv = [name, "a.b=1", *flags[:1], "c.d=2", *flags[1:2], "e.f=3"]
        argv.insert(1, "jobs/tiny.yaml")
        args = cli.parse_args(parser, argv)
        assert (args.job, args.overrides) == ("jobs/tiny.yaml", ["a.b=1", "c.d=2", "e.f=3"]), argv
        assert all(getattr(args, sub._option_string_actions[f].dest) for f in flags[:2]), argv
    # the trainer's own entry point (what the launcher runs) too
    from orchestrator import train

    args = train.module_parser().parse_intermixed_args(["--job", "j.yaml", "a.b=1", "--resume", "c.d=2"])
    assert (args.job, args.overrides, args.resume) == ("j.yaml", ["a.b=1", "c.d=2"], True)


def test_override_after_option_subprocess(tmp_path: Path) -> None:
    res = run_orch("plan", "jobs/tiny.yaml", "--json", "name=renamed", "training.max_steps=5")
    assert (res.returncode, res.stderr) == (0, "")
    assert json.loads(res.stdout)["job"] == "renamed"
    res = run_orch("submit", "jobs/tiny.yaml", "--dry-run", "--out", tmp_path, f"training.output_dir={tmp_path}/x",
                   "--portable")
    assert (res.returncode, res.stderr) == (0, "")
    assert f"logs:      {tmp_path}/x/logs" in res.stdout
    # what is not an override is still refused
    res = run_orch("plan", "jobs/tiny.yaml", "--json", "--bogus")
    assert res.returncode == 2 and res.stderr.splitlines()[-1] == "orch: error: unrecognized arguments: --bogus"


# --- a closed stdout ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("models",), ("plan", "jobs/tiny.yaml"), ("schema",)])
def test_closed_stdout_exits_quietly(args: tuple) -> None:
    """Bug fixed: `orch plan JOB | head -2` and `orch models | head` ended with a BrokenPipeError
    traceback. The reader's end of the pipe is closed before orch starts, so every write fails,
    whatever the timing (the `head` case, deterministically)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO_ROOT, env=orch_env(),
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (Exit.BROKEN_PIPE, "")


# --- warnings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["validate"], ["plan", "--json"], ["submit", "--dry-run", "--portable"]])
def test_warnings_go_to_stderr_one_line_each(command: list[str], tmp_path: Path) -> None:
    extra = ["--out", str(tmp_path)] if command[0] == "submit" else []
    res = run_orch(command[0], "jobs/tiny.yaml", *command[1:], *extra, "training.max_steps=2", "data.seq_len=4096")
    assert res.returncode == 0, res.stderr
    warmup_line = line_of((REPO_ROOT / "jobs/tiny.yaml").read_text(), "warmup_steps:")
    assert res.stderr.splitlines() == [
        f"orch: warning: jobs/tiny.yaml:{warmup_line}: training.warmup_steps: 2 warmup steps for "
        "2 training steps: the learning rate never gets past warmup",
        "orch: warning: jobs/tiny.yaml (override 'data.seq_len=4096'): data.seq_len: 4096 is above tiny-llama's "
        "max_position_embeddings 2048: the model never saw such positions",
    ]
    if command[0] == "plan":
        json.loads(res.stdout)  # stdout stays one JSON object


# --- every example in the help texts runs ---------------------------------------------------------


def help_examples() -> list[str]:
    """Every example command line in `orch --help` and each subcommand's --help (the lines under
    "example:" / "examples:")."""
    texts = [cli.build_parser().format_help()] + [sub.format_help() for sub in _subcommands().values()]
    examples = []
    for text in texts:
        block = False
        for line in text.splitlines():
            if line.strip().lower() in ("example:", "examples:"):
                block = True
            elif block and line.startswith("  ") and line.strip():
                examples.append(line.strip())
            else:
                block = False
    return examples


# Examples that are checked for argument validity and for their files, not run: `orch train` trains in
# this process for a minute (tests/test_train_runs.py runs the trainer), status/cancel/logs need a
# Slurm cluster and a job id (tests/test_slurm_cli.py runs them against the local cluster), and
# `orch export` needs the run folder that the `orch submit ... --local` example trains
# (tests/test_export.py exports real runs).
NOT_RUN = ("orch train ", "orch status", "orch cancel ", "orch logs ", "orch export ")


def test_help_examples_run_as_written_on_a_fresh_clone(tmp_path: Path) -> None:
    """Bug fixed: the help named jobs/llama8b_full.yaml and runs/tiny/job.yaml, which do not exist.

    Each example runs in a copy of the checkout's files (what a fresh clone has), through an `orch`
    on PATH, with bash, as written. `orch submit` examples get --dry-run appended: --local trains for
    a minute and a real submit needs a Slurm cluster with GPUs; --dry-run compiles and prints the
    batch script, which checks everything up to the launch. Afterwards no file of the clone has changed.
    """
    examples = help_examples()
    assert any(e.startswith("orch compile") for e in examples) and any(e.startswith("orch train") for e in examples)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    clone = tmp_path / "clone"
    for name in files:
        if (REPO_ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, clone / name)
    before = {name: (clone / name).read_bytes() for name in files if (clone / name).is_file()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "orch").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m orchestrator.cli "$@"\n')
    (bin_dir / "orch").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(clone))
    parser = cli.build_parser()
    for example in examples:
        argv = shlex.split(example, comments=True)
        if example.startswith(NOT_RUN):
            args = cli.parse_args(parser, argv[1:])  # argparse exits (SystemExit) on a bad argument
            for value in [getattr(args, "job", None), getattr(args, "ds_config", None)]:
                assert value is None or (clone / value).is_file(), (example, value)
            continue
        line = example.split("#")[0].strip() + (" --dry-run" if argv[1] == "submit" else "")
        proc = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "error" not in proc.stderr, (line, proc.stderr[-2000:])
    after = {name: (clone / name).read_bytes() for name in before}
    assert [name for name in before if before[name] != after[name]] == []


def test_help_mentions_only_files_that_exist() -> None:
    """Paths named anywhere in the help (option descriptions too) exist in the repository."""
    texts = [cli.build_parser().format_help()] + [sub.format_help() for sub in _subcommands().values()]
    named = set(re.findall(r"\b((?:jobs|slurm|ds_configs|models)/[\w./-]+\.(?:yaml|json))\b", "\n".join(texts)))
    assert named and all((REPO_ROOT / p).is_file() for p in named), named


_INJECT_BROKEN_PIPE = """
import sys
from orchestrator import cli, spec
def broken(*a, **k):
    raise BrokenPipeError(32, "Broken pipe")
spec.load_job = broken  # fault injection: a broken pipe that is not stdout's (a socket, a child's pipe)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_broken_pipe_that_is_not_stdout_is_an_error() -> None:
    """Only a closed stdout ends quietly: a BrokenPipeError from a socket or a child's pipe (wandb's
    service inside `orch train`) is reported like any other failure. stdout is an open pipe here."""
    res = subprocess.run([sys.executable, "-c", _INJECT_BROKEN_PIPE, "validate", "jobs/tiny.yaml"], cwd=REPO_ROOT,
                         env=orch_env(), capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stdout) == (Exit.ERROR, "")
    assert res.stderr == "orch: error: BrokenPipeError: [Errno 32] Broken pipe (run with --debug for the traceback)\n"


def test_library_modules_do_not_import_the_cli() -> None:
    # submit used to reach back into cli for its errors and compile step (an import cycle);
    # library modules now take typed arguments and raise orchestrator.errors' classes.
    code = ("import sys; import orchestrator.submit, orchestrator.compiler, orchestrator.train; "
            "print('orchestrator.cli' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=orch_env(), capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "False", res.stderr
