"""Model building: random layer-by-layer build, 4-bit quantization (real bitsandbytes on CPU),
tied embeddings, LoRA, chunked loss. In-process, no DeepSpeed."""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from orchestrator import modeling as M
from orchestrator.catalog import PRESETS
from orchestrator.spec import load_job
from tests.train_helpers import tiny_job

CPU = torch.device("cpu")


def _job(tmp_path, name="m", **sections):
    return load_job(tiny_job(tmp_path, name, **sections), for_training=True)


def _relative_error(q, ref) -> float:
    deq = bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    return ((deq - ref).norm() / ref.norm()).item()


def test_random_qlora_quantizes_every_decoder_linear_and_keeps_head(tmp_path, bnb_cpu_path):
    job = _job(tmp_path, method="qlora")
    model, n = M.build_random(job, M.hf_config(job), CPU, M.bnb_settings(job, sharded=False), seed=1)
    # 7 linears (q, k, v, o, gate, up, down) x 2 layers
    assert n == 14 == M.count_4bit(model)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit) and model.lm_head.weight.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on meta
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # unsharded: uint8 storage
    # the 4-bit weights dequantize to the same seeded weights a plain build gets, within NF4 error
    plain, _ = M.build_random(job, M.hf_config(job), CPU, None, seed=1)
    q = model.model.layers[1].mlp.down_proj.weight
    ref = plain.model.layers[1].mlp.down_proj.weight
    assert _relative_error(q, ref) < 0.15  # NF4 of a Gaussian: ~0.09 relative error
    ids = torch.randint(0, 259, (1, 16))
    train_logits = model(input_ids=ids).logits
    assert torch.isfinite(train_logits).all()
    # An eval pass (what evaluation and export do) leaves the weights as they are, whatever the
    # CPU: bitsandbytes' AVX512-BF16 layout is kept off, so the next training step sees them intact.
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits
    assert not getattr(q.quant_state, "packing_format_for_cpu", False)
    assert _relative_error(q, ref) < 0.15
    torch.testing.assert_close(eval_logits, train_logits.detach())


def test_cpu_4bit_refuses_rows_that_are_not_whole_blocks(tmp_path):
    # bitsandbytes' CPU dequantize is wrong for in_features that are not a multiple of the block
    # (176 = 2.75 blocks of 64): orch stops before training on such weights.
    folder = tmp_path / "odd"
    folder.mkdir()
    cfg = PRESETS["tiny-llama"].to_hf_config()
    cfg["intermediate_size"] = 176
    (folder / "config.json").write_text(json.dumps(cfg))
    job = _job(tmp_path, method="qlora", model={"name": str(folder), "weights": "random"})
    with pytest.raises(M.ModelError, match=r"quantization.block_size: .*down_proj: in_features 176, block 64"):
        M.load_model(job, "single_gpu", CPU, seed=0)
    M.load_model(_job(tmp_path, "lora", method="lora", model={"name": str(folder), "weights": "random"}),
                 "single_gpu", CPU, seed=0)  # a bf16/fp32 base has no such limit


def test_zero3_storage_must_equal_param_dtype(tmp_path):
    job = _job(tmp_path, method="qlora", model={"dtype": "bf16"}, quantization={"compute_dtype": "bf16", "storage_dtype": "uint8"})
    with pytest.raises(M.ModelError, match="storage dtype must equal model.dtype"):
        M.bnb_settings(job, sharded=True)
    auto = _job(tmp_path, "auto", method="qlora", model={"dtype": "bf16"}, quantization={"compute_dtype": "bf16"})
    assert M.bnb_settings(auto, sharded=True)["quant_storage"] == torch.bfloat16


def test_tied_embeddings_stay_tied(tmp_path):
    folder = tmp_path / "tied"
    folder.mkdir()
    cfg = PRESETS["tiny-llama"].to_hf_config()
    cfg["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    job = _job(tmp_path, method="qlora", model={"name": str(folder)})
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    base = loaded.base
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert base.lm_head.weight.device.type == "cpu"


def test_lora_trains_only_adapters_in_model_dtype(tmp_path):
    # PEFT creates a 4-bit layer's adapters in that layer's compute dtype. A bf16 model computing in
    # fp32 gets fp32 adapters from PEFT; add_lora must cast them to model.dtype, bf16.
    job = _job(tmp_path, method="qlora", model={"dtype": "bf16"}, quantization={"compute_dtype": "fp32"})
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    trainable = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.bfloat16 for p in trainable.values())
    # every decoder linear got an adapter: 14 modules x (A, B)
    assert len(trainable) == 28


def test_chunked_loss_equals_full_logits_loss(tmp_path):
    job = _job(tmp_path, method="full")
    torch.manual_seed(0)
    ids = torch.randint(0, 259, (2, 32))
    pos = torch.arange(32).repeat(2, 1)
    tgt = ids.roll(-1, dims=1)
    tgt[:, -1] = -100
    tgt[0, :5] = -100
    results = []
    for chunk in (0, 7):
        loaded = M.load_model(job, "single_gpu", CPU, seed=0)
        mod = M.CausalLMLoss(loaded.model, loaded.base, chunk)
        loss = mod(ids, pos, tgt, torch.tensor(1.0))
        loss.backward()
        grad = loaded.base.model.layers[0].mlp.up_proj.weight.grad.clone()
        results.append((loss.detach(), grad))
    (l0, g0), (l1, g1) = results
    ref = torch.nn.functional.cross_entropy(
        M.load_model(job, "single_gpu", CPU, seed=0).base(input_ids=ids, position_ids=pos).logits.float().reshape(-1, 512),
        tgt.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(l0, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


def test_pretrained_folder_loads_quantized_with_bitsandbytes(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = PRESETS["tiny-llama"].to_hf_config()
    mt = cfg.pop("model_type")
    cfg.pop("architectures")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg))
    folder = tmp_path / "pre"
    model.save_pretrained(folder)
    job = _job(tmp_path, method="qlora", model={"name": str(folder), "weights": "pretrained"})
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    assert loaded.quantized_modules == 14
    assert not isinstance(loaded.base.lm_head, bnb.nn.Linear4bit)  # skip_modules: [lm_head]
    ids = torch.randint(0, 259, (1, 8))
    assert torch.isfinite(loaded.model(input_ids=ids).logits).all()


def test_flex_attention_is_refused_on_the_cpu(tmp_path, monkeypatch):
    job = _job(tmp_path, method="lora", model={"attn_implementation": "flex_attention"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M.ModelError, match=r"^model.attn_implementation: flex_attention trains only on a GPU"):
        M.load_model(job, "single_gpu", CPU, seed=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU side of the switch: accepted
    assert M.attn_implementation(job) == "flex_attention"


def _pretrained_folder(tmp_path, **config) -> "Path":
    """A tiny Llama saved by transformers in 100 KB shards with an index (several files, like a real checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = PRESETS["tiny-llama"].to_hf_config()
    mt = cfg.pop("model_type")
    cfg.pop("architectures")
    cfg.update(config)
    torch.manual_seed(0)
    folder = tmp_path / "pre"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg)).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    return folder


def test_pretrained_by_piece_reads_layer_by_layer_what_from_pretrained_loads(tmp_path, monkeypatch):
    # The per-layer read of the qlora ZeRO-3 load, here without DeepSpeed: tied embeddings (no lm_head tensor in
    # the files) and down_proj kept in fp32 by skip_modules. Its model must be the one transformers' own
    # from_pretrained + BitsAndBytesConfig loads: the same packed 4-bit bytes, quant states and fp32 weights.
    import safetensors
    from transformers import AutoModelForCausalLM

    folder = _pretrained_folder(tmp_path, tie_word_embeddings=True)
    job = _job(tmp_path, method="qlora", model={"name": str(folder), "weights": "pretrained"},
               quantization={"skip_modules": ["lm_head", "down_proj"]})
    reads: list[str] = []
    real_open = safetensors.safe_open

    class RecordingOpen:  # the real safe_open, noting which tensors are read, in order
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            reads.append(key)
            return self.file.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", RecordingOpen)
    settings = M.bnb_settings(job, sharded=False)
    model, n = M.load_pretrained_by_piece(job, M.hf_config(job), CPU, settings)
    monkeypatch.undo()
    # piece by piece: the embedding, layer 0's tensors, layer 1's, the final norm (no lm_head: tied); each tensor once
    pieces = [".".join(k.split(".")[1:3]) if k.startswith("model.layers.") else k.split(".")[1] for k in reads]
    runs = [piece for i, piece in enumerate(pieces) if i == 0 or pieces[i - 1] != piece]
    assert runs == ["embed_tokens", "layers.0", "layers.1", "norm"]
    assert len(reads) == len(set(reads)) == 1 + 2 * 9 + 1  # a layer: 7 linears + 2 norms
    assert n == 12  # 6 of 7 linears x 2 layers: down_proj is skipped
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear

    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, quantization_config=M.bnb_config(job, False),
                                               device_map={"": "cpu"}, local_files_only=True)
    M.keep_portable_cpu_4bit_(ref)
    mine = dict(model.named_parameters())
    theirs = dict(ref.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in theirs.items():
        assert torch.equal(mine[name].data, p.data), name
        if hasattr(p, "quant_state"):
            assert torch.equal(mine[name].quant_state.absmax, p.quant_state.absmax), name
            assert torch.equal(mine[name].quant_state.state2.absmax, p.quant_state.state2.absmax), name
    ids = torch.randint(0, 259, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_pretrained_by_piece_errors_name_the_folder_or_tensor(tmp_path):
    import json as _json

    folder = _pretrained_folder(tmp_path)
    job = _job(tmp_path, method="qlora", model={"name": str(folder), "weights": "pretrained"})
    settings = M.bnb_settings(job, sharded=False)
    index = folder / "model.safetensors.index.json"
    data = _json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index.write_text(_json.dumps(data))
    with pytest.raises(M.ModelError, match=r"^model.name: the checkpoint has no tensor model.layers.1.mlp.up_proj.weight "):
        M.load_pretrained_by_piece(job, M.hf_config(job), CPU, settings)
    index.unlink()
    for f in folder.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(M.ModelError, match=r"^model.name: .* has no model.safetensors or model.safetensors.index.json"):
        M.load_pretrained_by_piece(job, M.hf_config(job), CPU, settings)


def test_live_tensor_bytes_counts_each_storage_once():
    probe = M.LiveTensorBytes.start()
    x = torch.zeros(1000, dtype=torch.float32)  # 4000 B
    views = [x[:10], x.view(10, 100)]  # the same storage: not counted again
    probe.sample()
    assert probe.peak == 4000
    del x, views
    probe.sample()  # freed: the peak stays, the sample is back at the baseline
    assert probe.peak == 4000 and M.live_cpu_tensor_bytes() == probe.baseline


def test_live_tensor_bytes_skips_tensors_without_storage_left_by_compile():
    # torch.compile's tracing leaves FunctionalTensors (and FakeTensors) reachable by the garbage collector
    # (the full suite had them after the compile tests); data_ptr() raises on a FunctionalTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    with FunctionalTensorMode():
        functional = FunctionalTensor.to_functional(torch.zeros(1000))
    probe = M.LiveTensorBytes.start()
    kept = torch.zeros(250)  # 1000 B, counted
    probe.sample()
    assert probe.peak == 1000
    del functional, kept


def _gathered_4bit_layer(dtype: torch.dtype):
    """One bitsandbytes 4-bit linear (64 -> 128) made the way orch quantizes, its fp32 weight for reference."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False))
    settings = {"compute_dtype": dtype, "compress_statistics": False, "quant_type": "nf4", "quant_storage": dtype,
                "blocksize": 64}
    assert M._quantize_linears_(layer, settings, [], torch.device("cpu")) == 1
    M.keep_portable_cpu_4bit_(layer)
    return layer


def _holders(ptr: int) -> int:
    """Live tensors (found by the garbage collector) whose data starts at ``ptr``."""
    import gc
    import warnings

    def at(o) -> bool:
        try:
            return isinstance(o, torch.Tensor) and o.numel() > 0 and o.data_ptr() == ptr
        except (RuntimeError, ReferenceError):
            # tensors without storage (FakeTensor/FunctionalTensor) and dead weak proxies that torch.compile
            # leaves behind in the same process hold nothing
            return False

    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if at(o))


@pytest.mark.parametrize("keep_parameter", [False, True], ids=["bitsandbytes", "orch"])
def test_4bit_forward_lets_zero3_free_the_gathered_weight(keep_parameter, bnb_cpu_path):
    """ZeRO-3 frees a gathered weight by swapping the parameter's .data. With bitsandbytes' own matmul the
    forward's graph keeps a view of the data (so every layer's gathered weight lived until its backward);
    with orch's forward nothing outside the parameter does, and after re-gathering (the data put back, as
    DeepSpeed does before the backward) the gradient is bitsandbytes' to the bit."""
    reference, layer = _gathered_4bit_layer(torch.float32), _gathered_4bit_layer(torch.float32)
    if keep_parameter:
        assert M.keep_4bit_parameters_for_backward_(layer) == 1
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)  # orch checkpoints decoder layers
    weight = layer[0].weight
    gathered = weight.data
    ptr = gathered.data_ptr()
    weight.data = torch.empty(0, dtype=gathered.dtype)  # released after the forward
    del gathered
    assert _holders(ptr) == (0 if keep_parameter else 1)

    weight.data = reference[0].weight.data.clone()  # gathered again for the backward
    out.sum().backward()
    reference(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(out, reference(x_ref), rtol=0, atol=0)
