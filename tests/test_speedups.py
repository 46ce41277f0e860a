"""Regional torch.compile of the decoder layers (orchestrator/speedups.py) on the CPU: compiled and
eager training steps agree for LoRA and QLoRA (real bitsandbytes) with non-reentrant
checkpointing and packed rows; every way of falling back to eager is an error.

Inductor generates and compiles C++ here (tens of seconds per model); the fallback tests use
dynamo's "eager" backend, which traces and guards exactly as inductor's would without
generating code.
"""

from __future__ import annotations

import pytest
import torch

from orchestrator import modeling as M
from orchestrator import speedups as S
from orchestrator.spec import load_job
from tests import engine_runs as R
from tests.train_helpers import tiny_job

pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code and the recompile limit are process-wide: each test starts from none and restores the limit."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    yield
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.reset()


def _model(tmp_path, method: str):
    job = load_job(tiny_job(tmp_path, method, method=method, lora={"dropout": 0.0},
                            training={"gradient_checkpointing": True, "loss_chunk_tokens": 24}), for_training=True)
    torch.manual_seed(0)
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    return loaded, M.CausalLMLoss(loaded.model, loaded.base, job.training.loss_chunk_tokens)


def _loss_and_grads(module, loaded, step: int):
    ids, pos, targets = R.batch(step, 0)
    loss = module(ids, pos, targets, torch.tensor(1.0 / 64))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    loaded.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_compiled_layers_train_like_eager(tmp_path, method):
    loaded, module = _model(tmp_path, method)
    assert loaded.base.model.layers[0].gradient_checkpointing  # the checkpointed path is the one compiled
    eager = [_loss_and_grads(module, loaded, step) for step in (0, 1)]
    compiled = S.compile_decoder_layers(loaded.base.model.layers)
    assert compiled.count == 2 and compiled.layer_type.__name__ == "LlamaDecoderLayer"
    for step in (0, 1):
        loss, grads = _loss_and_grads(module, loaded, step)
        ref_loss, ref_grads = eager[step]
        # fp32; measured: loss equal, gradients within 1.5e-6 (fused kernels sum in another order)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # one graph serves both layers and both steps
    assert S.check_compiled(compiled) == 1


def test_graph_break_inside_a_layer_is_an_error(tmp_path):
    loaded, module = _model(tmp_path, "lora")
    mlp = loaded.base.model.layers[1].mlp
    forward = mlp.forward

    def breaking(x):
        torch._dynamo.graph_break()  # what an untraceable op in a layer does
        return forward(x)

    mlp.forward = breaking
    S.compile_decoder_layers(loaded.base.model.layers, backend="eager")
    with pytest.raises(S.CompileError, match=r"^training.compile: decoder layer 1 cannot run compiled \(Unsupported: .*"
                                             r"set training.compile=false$") as exc:
        _loss_and_grads(module, loaded, 0)
    assert "\n" not in str(exc.value)


def test_recompile_limit_is_an_error(tmp_path):
    loaded, module = _model(tmp_path, "lora")
    compiled = S.compile_decoder_layers(loaded.base.model.layers, recompile_limit=1, backend="eager")
    assert torch._dynamo.config.recompile_limit == 1
    _loss_and_grads(module, loaded, 0)  # packed rows: a 4D mask
    assert S.check_compiled(compiled) == 1
    ids, _, targets = R.batch(1, 0)
    causal = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)  # one example per row: no mask, a second graph
    with pytest.raises(S.CompileError, match=r"^training.compile: decoder layer 0 needed more than 1 compiled variants \(torch._dynamo's recompile limit\)"):
        module(ids, causal, targets, torch.tensor(1.0))


def test_layers_that_never_ran_compiled_are_detected(tmp_path):
    loaded, module = _model(tmp_path, "lora")
    compiled = S.compile_decoder_layers(loaded.base.model.layers, backend="eager")
    with torch.compiler.set_stance("force_eager"):  # as TORCHDYNAMO_DISABLE=1 would
        _loss_and_grads(module, loaded, 0)
    with pytest.raises(S.CompileError, match=r"^training.compile: the 2 LlamaDecoderLayer layers ran without compiled code"):
        S.check_compiled(compiled)
    _loss_and_grads(module, loaded, 0)
    assert S.check_compiled(compiled) == 1


def test_compile_wanted():
    cuda = torch.device("cuda", 0)
    assert S.compile_wanted("auto", cuda, zero_stage=0) and S.compile_wanted("auto", cuda, zero_stage=2)
    assert not S.compile_wanted("auto", cuda, zero_stage=3)  # ZeRO-3's gather hooks run inside the layers
    assert not S.compile_wanted("auto", CPU, zero_stage=0)
    assert S.compile_wanted(True, CPU, zero_stage=3) and not S.compile_wanted(False, cuda, zero_stage=0)
