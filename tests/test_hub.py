"""Hub-style model names (org/name) resolved offline from a Hugging Face cache folder built here.

The cache has the layout ``hf download`` writes: models--org--name/refs/main names the
revision, snapshots/<revision>/ holds links into blobs/. HF_HUB_CACHE points at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import catalog, hub
from orchestrator.spec import SpecError, load_job
from tests.cli_helpers import REPO_ROOT, run_orch
from tests.train_helpers import tiny_job

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = REVISION, ref: bool = True) -> Path:
    """Put ``files`` into the cache as hf download does: content in blobs/, links in the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def tiny_config() -> bytes:
    return json.dumps(catalog.PRESETS["tiny-llama"].to_hf_config()).encode()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def test_cache_dir_follows_huggingface_hub_rules(tmp_path):
    home = Path("~").expanduser()
    assert hub.cache_dir({}) == home / ".cache" / "huggingface" / "hub"
    assert hub.cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub.cache_dir({"HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}) == Path("/h/hub")
    assert hub.cache_dir({"HUGGINGFACE_HUB_CACHE": "/old", "HF_HOME": "/h"}) == Path("/old")
    assert hub.cache_dir({"HF_HUB_CACHE": "/c", "HUGGINGFACE_HUB_CACHE": "/old", "HF_HOME": "/h"}) == Path("/c")


@pytest.mark.parametrize("name, ok", [("meta-llama/Llama-3.1-8B", True), ("Qwen/Qwen3-8B", True), ("a/b", True),
                                      ("tiny-llama", False), ("a/b/c", False), ("/abs/path", False), ("a/..", False),
                                      ("./models/x", False), ("org/na me", False)])
def test_repo_id_syntax(name, ok):
    assert hub.is_repo_id(name) == ok


def test_snapshot_from_refs_main(cache):
    snapshot = cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    cache_repo(cache, "org/other", {"config.json": tiny_config()}, revision="f" * 40)
    assert hub.snapshot_folder("org/tiny") == snapshot
    # refs/main picks the revision among several snapshots
    newer = cache / "models--org--tiny" / "snapshots" / ("e" * 40)
    newer.mkdir()
    assert hub.snapshot_folder("org/tiny") == snapshot
    (cache / "models--org--tiny" / "refs" / "main").write_text("e" * 40 + "\n")
    assert hub.snapshot_folder("org/tiny") == newer


def test_snapshot_without_ref(cache):
    # hf download --revision <hash> writes no refs/main: one snapshot is the one meant, several are ambiguous
    snapshot = cache_repo(cache, "org/tiny", {"config.json": tiny_config()}, ref=False)
    assert hub.snapshot_folder("org/tiny") == snapshot
    (snapshot.parent / ("e" * 40)).mkdir()
    with pytest.raises(hub.NotCached, match="2 revisions and no refs/main"):
        hub.snapshot_folder("org/tiny")


def test_not_cached_says_how_to_download(cache):
    with pytest.raises(hub.NotCached) as exc:
        hub.snapshot_folder("meta-llama/Llama-3.1-8B")
    message = str(exc.value)
    assert "`hf download meta-llama/Llama-3.1-8B`" in message and "huggingface-cli download" in message
    assert "orch never downloads" in message and str(cache) in message and "\n" not in message


def test_plan_from_the_cached_config_alone(cache, tmp_path):
    # config.json only: enough for plan/compile; the shape is the cached file's
    cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    job = load_job(tiny_job(tmp_path, "hub", model={"name": "org/tiny"}))
    shape = job.shape()
    assert shape.source.startswith(str(cache)) and shape.num_params() == catalog.PRESETS["tiny-llama"].num_params()
    res = run_orch("plan", tmp_path / "hub.yaml", cwd=tmp_path, env={"HF_HUB_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr
    assert "org/tiny" in res.stdout


def test_training_needs_the_weights(cache, tmp_path):
    cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    path = tiny_job(tmp_path, "hub", model={"name": "org/tiny", "weights": "pretrained"})
    with pytest.raises(SpecError, match=r"model.name: 'org/tiny' has no \*.safetensors"):
        load_job(path, for_training=True)
    load_job(path)  # planning needs no weights


def test_not_cached_is_one_line_exit_2(cache, tmp_path):
    tiny_job(tmp_path, "missing", model={"name": "org/missing"})
    res = run_orch("plan", tmp_path / "missing.yaml", cwd=tmp_path, env={"HF_HUB_CACHE": str(cache)})
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.name:" in lines[0] and "hf download org/missing" in lines[0], res.stderr


def test_local_folder_wins_over_the_cache(cache, tmp_path, monkeypatch):
    cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    cfg = catalog.PRESETS["tiny-llama"].to_hf_config()
    cfg["num_hidden_layers"] = 3
    (local / "config.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(tmp_path)
    job = load_job(tiny_job(tmp_path, "hub", model={"name": "org/tiny"}))
    assert job.model.folder() == Path("org/tiny") and job.shape().num_hidden_layers == 3
    assert not hub.from_cache("org/tiny")


def test_compile_records_the_snapshot(cache, tmp_path):
    from orchestrator.compiler import build

    snapshot = cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    job = load_job(tiny_job(tmp_path, "hub", model={"name": "org/tiny"}))
    assert build(job, tmp_path / "out").job.model.name == str(snapshot)
    # --portable keeps the id: the cluster resolves it in its own cache
    from orchestrator.compiler import CompileOptions

    assert build(job, tmp_path / "out", CompileOptions(portable=True)).job.model.name == "org/tiny"


def test_pretrained_weights_and_tokenizer_load_from_the_snapshot(cache, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator import data as D
    from orchestrator import modeling as M

    cfg = catalog.PRESETS["tiny-llama"].to_hf_config()
    config = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(config)
    saved = tmp_path / "saved"
    reference.save_pretrained(saved)
    tokenizer = D.byte_tokenizer()
    tokenizer.add_tokens(["<|snapshot|>"])  # tells this tokenizer from the byte tokenizer orch falls back to
    tokenizer.save_pretrained(saved)
    # No refs/main (hf download --revision <hash>): transformers itself could not resolve the id
    # offline, so this also shows that the trainer reads the folder orch resolved.
    cache_repo(cache, "org/tiny", {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()}, ref=False)
    job = load_job(tiny_job(tmp_path, "hub", method="lora", model={"name": "org/tiny", "weights": "pretrained"}),
                   for_training=True)
    loaded = M.load_model(job, "single_gpu", torch.device("cpu"), seed=0)
    torch.testing.assert_close(loaded.base.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)
    assert len(D.load_tokenizer(job, 512)) == len(D.byte_tokenizer()) + 1


def test_resolution_imports_neither_torch_nor_huggingface_hub(cache, tmp_path):
    cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    tiny_job(tmp_path, "hub", model={"name": "org/tiny"})
    code = (
        "import sys; from orchestrator.cli import main; rc = main(['plan', 'hub.yaml']); "
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; print('HEAVY', heavy, rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "HEAVY [] 0" in out.stdout, out.stdout + out.stderr


# --- what the spec refuses about a model --------------------------------------------------------


def _folder(tmp_path: Path, name: str, cfg: dict) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_relabelled_moe_is_refused_naming_the_key(tmp_path):
    # a Mixtral config relabelled "mistral" used to plan silently as a dense 7B
    cfg = {**json.loads(Path(REPO_ROOT / "models/llama3-70b/config.json").read_text()), "model_type": "mistral",
           "num_local_experts": 8, "num_experts_per_tok": 2}
    path = tiny_job(tmp_path, "moe", model={"name": _folder(tmp_path, "mixtral", cfg)})
    with pytest.raises(SpecError) as exc:
        load_job(path)
    (line,) = exc.value.problems
    assert "model.name:" in line and "mixture-of-experts" in line and "num_local_experts: 8" in line


def test_gemma2_with_sdpa_is_refused(tmp_path):
    path = tiny_job(tmp_path, "g2", model={"name": "gemma2-9b", "attn_implementation": "sdpa"})
    with pytest.raises(SpecError, match=r"model.attn_implementation: gemma2 cannot run with sdpa .* use eager"):
        load_job(path)
    load_job(tiny_job(tmp_path, "g2e", model={"name": "gemma2-9b", "attn_implementation": "eager"}))


def test_multimodal_gemma3_trains_random_weights_only(tmp_path):
    folder = str(REPO_ROOT / "models" / "gemma3-12b")
    load_job(tiny_job(tmp_path, "mm", model={"name": folder, "weights": "random"}), for_training=True)
    shutil.copytree(folder, tmp_path / "mm-weights")
    (tmp_path / "mm-weights" / "model.safetensors").write_bytes(b"")
    path = tiny_job(tmp_path, "mmw", model={"name": str(tmp_path / "mm-weights"), "weights": "pretrained"})
    with pytest.raises(SpecError, match=r"model.weights: .* multimodal gemma3_text checkpoint; .*weights: random"):
        load_job(path, for_training=True)
    load_job(path)  # planning it is fine


def test_unreadable_ref_is_one_line(cache):
    snapshot = cache_repo(cache, "org/tiny", {"config.json": tiny_config()})
    (snapshot.parents[1] / "refs" / "main").write_bytes(b"\xff\xfe")
    with pytest.raises(hub.NotCached, match="cannot read the Hugging Face cache"):
        hub.snapshot_folder("org/tiny")
