"""End-to-end trainer runs: real DeepSpeed on CPU, 1 process and 2 processes (orch's launcher).

Each fixture is one real training run of the tiny Llama (hidden 64, 2 layers,
seq 32, 6 optimizer steps of 8 sequences); the tests compare runs.

Loss parity: the same seed and data give the same global batches for 1 and 2
processes (see orchestrator/data.py), and the loss is sum(token losses) / loss
tokens of the optimizer step, so the curves agree up to float reordering.
Measured on this CPU (fp32): see PARITY_RTOL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train_helpers import check, loss_parity, losses, metrics, out_dir, run_trainer, stopped_copy, summary, tiny_job

pytestmark = pytest.mark.slow

# Relative tolerance of 1-process vs 2-process loss curves (fp32). Differences
# come from summation order (gloo all-reduce, ZeRO bucket flattening) and grow a
# little per step through Adam; measured max relative difference over 6 steps
# is printed by the tests (full: 1.9e-7 for ZeRO-2 and ZeRO-3; qlora: 1.6e-7 ZeRO-2,
# 8.1e-8 ZeRO-3), the bound leaves headroom.
PARITY_RTOL = 1e-5
# DeepSpeedCPUAdam (offload) vs torch AdamW: different kernels, same math;
OFFLOAD_RTOL = 1e-5  # measured 9.0e-7

# Bytes of bitsandbytes' lookup tables that it makes on first use (outside any model): the only live tensors
# of a by-piece build that the memory model does not count (measured 1,404 B on this CPU).
BNB_TABLES = 4096

QLORA = {"method": "qlora", "quantization": {"compute_dtype": "fp32", "storage_dtype": "fp32"}}


def _run(tmp_path_factory, name: str, nprocs: int, **sections) -> Path:
    folder = tmp_path_factory.mktemp(name)
    job = tiny_job(folder, name, **sections)
    check(run_trainer(job, nprocs))
    return job


@pytest.fixture(scope="module")
def full_1(tmp_path_factory):
    return _run(tmp_path_factory, "full1", 1, logging={"wandb_mode": "offline"})


@pytest.fixture(scope="module")
def full_z2(tmp_path_factory):
    return _run(tmp_path_factory, "fullz2", 2, strategy="zero2")


@pytest.fixture(scope="module")
def full_z3(tmp_path_factory):
    return _run(tmp_path_factory, "fullz3", 2, strategy="zero3")


@pytest.fixture(scope="module")
def qlora_1(tmp_path_factory):
    return _run(tmp_path_factory, "qlora1", 1, **QLORA)


@pytest.fixture(scope="module")
def qlora_z3(tmp_path_factory):
    # checkpoints at step 3 and 6: the resume tests start from step 3
    return _run(tmp_path_factory, "qloraz3", 2, strategy="zero3", training={"save_every": 3}, **QLORA)


def test_full_single_process_loss_goes_down_and_outputs(full_1):
    out = out_dir(full_1)
    l = losses(out)
    # random init: loss starts near ln(512) = 6.24; 6 steps of full finetuning on 4 repeated sentences
    assert l[1] > 5.5 and l[6] < 0.85 * l[1], l  # measured: 6.28 -> 4.77
    assert all(l[s + 1] < l[s] for s in range(1, 6)), l
    s = summary(out)
    assert s["steps"] == 6 and s["world_size"] == 1 and s["strategy"] == "single_gpu"
    assert s["final_loss"] == pytest.approx(l[6])
    assert s["cpu_rss_peak_bytes"] > 100 * 2**20
    assert s["peak_allocated_bytes"] is None  # CPU: no CUDA allocator; RSS is reported instead
    assert (out / "memory.png").stat().st_size > 1000
    rec = metrics(out)[0]
    assert rec["cpu_rss"] > 0 and rec["tokens_per_s"] > 0 and rec["lr"] == pytest.approx(3e-3)
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "wandb offline run missing"
    assert (out / "checkpoints" / "step00000006" / "COMPLETE").is_file()


def test_full_zero2_matches_single_process(full_1, full_z2):
    loss_parity(full_1, full_z2, PARITY_RTOL)


def test_full_zero3_matches_single_process(full_1, full_z3):
    loss_parity(full_1, full_z3, PARITY_RTOL)
    s = summary(out_dir(full_z3))
    for r in s["per_rank"]:  # ZeRO-3: each of 2 ranks holds half of the parameters
        assert r["params_bytes_local"] == pytest.approx(r["params_bytes_full"] / 2, rel=0.01)


def test_full_zero3_offload_optimizer_matches(tmp_path_factory, full_1):
    job = _run(tmp_path_factory, "fullz3off", 2, strategy="zero3_offload_optimizer")
    loss_parity(full_1, job, OFFLOAD_RTOL)


def test_qlora_zero2_matches_single_process(tmp_path_factory, qlora_1):
    job = _run(tmp_path_factory, "qloraz2", 2, strategy="zero2", **QLORA)
    loss_parity(qlora_1, job, PARITY_RTOL)


def sharded_load_check(job_path: Path, packed_full: int) -> None:
    """The 2-process qlora ZeRO-3 run of ``job_path`` loaded sharded: right after the build (before
    deepspeed.initialize) each rank held half of the ``packed_full`` packed 4-bit bytes, and the live CPU
    tensor bytes sampled at the build's peaks (modeling.LiveTensorBytes: each piece whole before it is
    partitioned, and the end of the build) equal the memory model's build peak for this job, which is under
    the peak of the unsharded by-layer load (ZeRO-2's, and ZeRO-3's before issue 14: the whole 4-bit model
    with one layer in model.dtype on top). The whole 4-bit model alone is no bound on a toy: there one
    fp32 layer outweighs all the packed weights."""
    from orchestrator import memory
    from orchestrator.spec import load_job

    job = load_job(job_path, ["hardware.gpus_per_node=2"], for_training=True)
    shape = job.shape()
    predicted = memory.build_peak_bytes(job, "zero3", shape)
    unsharded = memory.build_peak_bytes(job, "zero2", shape)
    for r in summary(out_dir(job_path))["per_rank"]:
        assert r["quantized_bytes_full"] == packed_full
        assert r["quantized_bytes_local_built"] == r["quantized_bytes_local"] == packed_full // 2
        print(f"rank {r['rank']}: build peak sampled {r['build_peak_sampled']} B, predicted {predicted} B, "
              f"unsharded load {unsharded} B")
        # The model's moments are what the trainer holds, to the byte but for bitsandbytes' code tables made on
        # first use (a 256-entry map, 16-entry maps; 1,404 B here, found by listing the live tensors of each sample)
        assert abs(r["build_peak_sampled"] - predicted) <= BNB_TABLES
        assert predicted < unsharded


def test_qlora_zero3_matches_single_process_and_shards_4bit(qlora_1, qlora_z3):
    loss_parity(qlora_1, qlora_z3, PARITY_RTOL)
    # tiny-llama: per layer q 64x64 + k, v 64x32 + o 64x64 + gate, up 64x192 + down 192x64 = 49,152 weights,
    # packed two per byte: 24,576 B (6,144 fp32 storage elements); 2 layers
    sharded_load_check(qlora_z3, 2 * 24_576)


def test_resume_gives_the_same_losses(tmp_path, qlora_z3):
    job = stopped_copy(qlora_z3, tmp_path / "resume", after_step=3)
    proc = run_trainer(job, 2, args=("--resume",))
    check(proc)
    assert "resumed from" in proc.stderr and "step 3" in proc.stderr
    before, after = losses(out_dir(qlora_z3)), losses(out_dir(job))
    assert sorted(after) == [4, 5, 6]
    for step in after:  # same data position, RNG and optimizer state: the same numbers
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=0), (before, after)


def test_resume_under_another_zero_stage_is_a_clear_error(tmp_path, qlora_z3):
    job = stopped_copy(qlora_z3, tmp_path / "stage", after_step=3)
    job.write_text(job.read_text().replace("strategy: zero3", "strategy: single_gpu"))
    proc = run_trainer(job, 1, args=("--resume",))
    check(proc, 2)
    assert "saved under strategy zero3 (ZeRO stage 3)" in proc.stderr and "resume with strategy: zero3" in proc.stderr
    assert not (out_dir(job) / "checkpoints" / "step00000003" / "universal").exists()


@pytest.fixture(scope="module")
def qlora_bf16_z3(tmp_path_factory):
    bf16 = {"method": "qlora", "model": {"dtype": "bf16"}, "quantization": {"compute_dtype": "bf16"}}
    return _run(tmp_path_factory, "qlorabf16", 2, strategy="zero3", training={"max_steps": 3}, **bf16)


def reload_matches_masters(job_path: Path, tag: str, make_base, dtype: torch.dtype) -> int:
    """The adapter a ZeRO-3 run saved reloads in plain PEFT onto ``make_base()`` and gives exactly the outputs of
    that base with the LoRA weights DeepSpeed holds (the fp32 masters of checkpoint ``tag``, cast to ``dtype``),
    and each saved tensor is that cast. Returns how many LoRA tensors were compared."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from orchestrator import modeling as M
    from orchestrator.spec import load_job

    out = out_dir(job_path)
    job = load_job(job_path, for_training=True)
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    # autocast_adapter_dtype=False: keep the saved adapter's dtype as is (PEFT's default upcasts it to fp32)
    reloaded = PeftModel.from_pretrained(make_base(), str(out / "adapter"), autocast_adapter_dtype=False).eval()
    master = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag, exclude_frozen_parameters=True)
    ref_base = make_base()
    ref = get_peft_model(ref_base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=M.lora_target_names(ref_base, job)),
                         autocast_adapter_dtype=False).eval()
    params = dict(ref.named_parameters())
    n = 0
    for k, v in master.items():
        name = k.removeprefix("lm.")
        if "lora_" in name:
            params[name].data = v.to(dtype)
            saved = tensors[name.replace(".default", "")]
            assert torch.equal(saved, params[name].data), name  # adapter file == DeepSpeed's master in the adapter dtype
            n += 1
    assert n == len(tensors)
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    return n


def test_qlora_zero3_bf16_adapter_gathers_and_reloads_in_plain_peft(qlora_bf16_z3, bnb_cpu_path):
    # bnb_cpu_path: the reload and the reference run once as on a CPU with AVX512-BF16 and once without
    from safetensors.torch import load_file

    from orchestrator import modeling as M
    from orchestrator.spec import load_job

    job_path = qlora_bf16_z3
    out = out_dir(job_path)
    s = summary(out)
    for r in s["per_rank"]:  # bf16 storage: the packed 4-bit weights are partitioned like any bf16 param
        assert r["quantized_bytes_local"] == pytest.approx(r["quantized_bytes_full"] / 2, rel=0.01)
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    assert len(tensors) == 28
    q_a = next(v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    assert tuple(q_a.shape) == (8, 64) and q_a.dtype == torch.bfloat16  # gathered, not a partition

    job = load_job(job_path, for_training=True)
    settings = M.bnb_settings(job, sharded=True)
    # the base: the same seeded build, unsharded (on one process)
    assert reload_matches_masters(job_path, "step00000003", lambda: M.build_random(
        job, M.hf_config(job), torch.device("cpu"), settings, seed=job.training.seed)[0], torch.bfloat16) == 28


# A pretrained folder for the per-layer read of the qlora ZeRO-3 load: a tiny Llama with an MLP wide enough
# (512) that a decoder layer, not the embedding, is the largest piece; tied embeddings (the files have no
# lm_head); transformers' own 100 KB shards with an index; down_proj kept in fp32 by skip_modules.
PRETRAINED_QLORA = {**QLORA, "quantization": {**QLORA["quantization"], "skip_modules": ["lm_head", "down_proj"]}}


@pytest.fixture(scope="module")
def pretrained_folder(tmp_path_factory) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.catalog import PRESETS

    cfg = PRESETS["tiny-llama"].to_hf_config()
    mt = cfg.pop("model_type")
    cfg.pop("architectures")
    cfg.update(intermediate_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-wide"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg)).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert not list(folder.glob("pytorch_model*"))
    return folder


@pytest.fixture(scope="module")
def pretrained_1(tmp_path_factory, pretrained_folder):
    # one process: transformers' from_pretrained with a BitsAndBytesConfig (not the by-piece load)
    return _run(tmp_path_factory, "pre1", 1, model={"name": str(pretrained_folder), "weights": "pretrained"},
                **PRETRAINED_QLORA)


@pytest.fixture(scope="module")
def pretrained_z3(tmp_path_factory, pretrained_folder):
    return _run(tmp_path_factory, "prez3", 2, strategy="zero3", model={"name": str(pretrained_folder), "weights": "pretrained"},
                **PRETRAINED_QLORA)


def test_pretrained_qlora_zero3_loads_by_layer_matches_and_reloads(pretrained_1, pretrained_z3, pretrained_folder, bnb_cpu_path):
    from transformers import AutoModelForCausalLM

    from orchestrator import modeling as M
    from orchestrator.spec import load_job

    loss_parity(pretrained_1, pretrained_z3, PARITY_RTOL)
    # per layer q 64x64 + k, v 64x32 + o 64x64 + gate, up 64x512 = 77,824 4-bit weights (down_proj skipped):
    # 38,912 B packed; 2 layers
    sharded_load_check(pretrained_z3, 2 * 38_912)
    # the adapter reloads onto the base a PEFT user would load: transformers' from_pretrained + BitsAndBytesConfig
    job = load_job(pretrained_z3, for_training=True)
    assert reload_matches_masters(pretrained_z3, "step00000006", lambda: AutoModelForCausalLM.from_pretrained(
        str(pretrained_folder), dtype=torch.float32, quantization_config=M.bnb_config(job, sharded=False),
        device_map={"": "cpu"}, local_files_only=True), torch.float32) == 28


def test_sigusr1_checkpoints_and_exits_75(tmp_path):
    job = tiny_job(tmp_path, "sig", training={"max_steps": 100000})
    cmd_env_job = job
    from tests.train_helpers import env
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.train", "--job", str(cmd_env_job)], env=env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = out_dir(job)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "orch: stopped by SIGUSR1 at step" in err and "Traceback" not in err
    marks = list((out / "checkpoints").glob("*/COMPLETE"))
    assert len(marks) == 1
    step = json.loads(marks[0].read_text())["step"]
    assert step == max(r["step"] for r in metrics(out))


def test_demo_job_trains(tmp_path):
    """jobs/tiny.yaml as shipped (what `orch submit jobs/tiny.yaml --local` runs), strategy chosen by the planner.
    (How long it takes is the README's fresh-clone timing, not a test's business.)"""
    from tests.train_helpers import REPO

    proc = run_trainer(REPO / "jobs" / "tiny.yaml", 1, cwd=REPO,
                       overrides=(f"training.output_dir={tmp_path / 'tiny'}", "logging.wandb_mode=disabled"))
    check(proc)
    l = losses(tmp_path / "tiny")
    assert len(l) == 30 and l[30] < l[1] - 0.3, l  # measured 6.27 -> 5.71
    assert summary(tmp_path / "tiny")["predicted_peak_bytes"] > 0  # orch's memory model was consulted


def test_full_zero3_builds_partitioned_half_params_per_rank(full_z3):
    # The model is built inside zero.Init: right after load (before deepspeed.initialize) each of the 2 ranks holds its partition
    # (ds_tensor) of every param -- ceil(numel / 2) elements, fp32 -- never the whole model.
    from orchestrator.catalog import PRESETS

    shape = PRESETS["tiny-llama"]
    h = shape.hidden_size
    per_layer = [a * b for a, b in shape.linear_shapes().values()] + [h, h]  # 7 linears + 2 RMSNorms
    numels = [shape.embedding_params()] + per_layer * shape.num_hidden_layers + [h]
    if not shape.tie_word_embeddings:
        numels.append(shape.lm_head_params())
    full = sum(numels) * 4
    expected_local = sum(-(-n // 2) for n in numels) * 4
    s = summary(out_dir(full_z3))
    assert s["world_size"] == 2 and len(s["per_rank"]) == 2
    for r in s["per_rank"]:
        assert r["params_bytes_full"] == full
        # measured right after load_model, before deepspeed.initialize: already partitioned
        assert r["params_bytes_local_built"] == expected_local
        assert r["params_bytes_local"] == expected_local
        assert r["params_bytes_local"] <= full // 2 + 4 * len(numels)


def test_pretrained_zero3_loads_partitioned_and_matches(tmp_path):
    # A saved tiny model folder loaded with from_pretrained: under ZeRO-3 (HfDeepSpeedConfig) each of
    # 2 ranks holds only its partition right after load, and the loss curve matches 1 process.
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.catalog import PRESETS

    cfg = PRESETS["tiny-llama"].to_hf_config()
    mt = cfg.pop("model_type")
    cfg.pop("architectures")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg))
    folder = tmp_path / "pre"
    model.save_pretrained(folder)
    full = sum(p.numel() for p in model.parameters()) * 4
    local = sum(-(-p.numel() // 2) for p in model.parameters()) * 4
    pre = {"model": {"name": str(folder), "weights": "pretrained"}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = tiny_job(tmp_path / "a", "pre1", **pre)
    z3 = tiny_job(tmp_path / "b", "prez3", strategy="zero3", **pre)
    check(run_trainer(one, 1))
    check(run_trainer(z3, 2))
    loss_parity(one, z3, PARITY_RTOL)
    for r in summary(out_dir(z3))["per_rank"]:
        assert r["params_bytes_full"] == full
        assert r["params_bytes_local_built"] == local
