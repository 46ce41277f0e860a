"""Packed rows do not leak between examples, for every attention kernel orch offers on the CPU.

A row holds examples A | B | C and a padding tail, laid out as orchestrator/data.py lays them
out (position_ids restart at 0 at every example and at the padding). 384 tokens: three of flex
attention's 128-token blocks, with example borders inside blocks. Checked: each example's
logits equal that example run alone; the padding tail's token ids do not reach any real
token; sdpa's and eager's gradients of B's loss equal B alone's; and the mask transformers
builds for flex_attention is exactly "same example and not in the future", with the blocks
that hold no allowed pair skipped.

flex_attention on the CPU runs forward only: PyTorch 2.13 raises "FlexAttention does not
support backward on CPU" for inputs that require grad, so its gradients are not checked here
(orch refuses flex_attention for CPU training: tests/test_train_modeling.py).
"""

from __future__ import annotations

import pytest
import torch

from orchestrator import modeling as M
from orchestrator.spec import load_job
from tests.train_helpers import tiny_job

CPU = torch.device("cpu")
LENGTHS = {"A": 100, "B": 150, "C": 90}
SEQ = 384  # A 0-99 | B 100-249 | C 250-339 | padding 340-383


def _spans() -> dict[str, slice]:
    spans, at = {}, 0
    for name, n in LENGTHS.items():
        spans[name] = slice(at, at + n)
        at += n
    spans["pad"] = slice(at, SEQ)
    return spans


def _row(pad_token: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 512, (1, SEQ), generator=gen)
    pos = torch.zeros(1, SEQ, dtype=torch.long)
    for span in _spans().values():
        pos[0, span] = torch.arange(span.stop - span.start)
    ids[0, _spans()["pad"]] = pad_token
    return ids, pos


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    job = load_job(tiny_job(tmp_path_factory.mktemp("packing"), "packing", method="full",
                            data={"seq_len": SEQ}, training={"gradient_checkpointing": False}), for_training=True)
    loaded = M.load_model(job, "single_gpu", CPU, seed=0)
    return loaded.base


def _logits(base, impl: str, ids, pos) -> torch.Tensor:
    base.set_attn_implementation(impl)
    with torch.no_grad():
        return base(input_ids=ids, position_ids=pos).logits


@pytest.mark.parametrize("impl", ["flex_attention", "sdpa", "eager"])
def test_each_packed_example_sees_only_itself(base, impl):
    ids, pos = _row()
    packed = _logits(base, impl, ids, pos)
    for name, span in _spans().items():
        if name == "pad":
            continue
        alone = _logits(base, impl, ids[:, span], pos[:, span])
        # fp32; measured max abs difference 2.4e-7, every kernel
        torch.testing.assert_close(packed[:, span], alone, rtol=1e-5, atol=1e-5, msg=f"{impl}: example {name}")
    # other padding ids leave every real token's logits exactly as they were
    other = _logits(base, impl, *_row(pad_token=7))
    real = slice(0, _spans()["pad"].start)
    assert torch.equal(other[:, real], packed[:, real])
    if impl != "sdpa":  # and every kernel agrees with sdpa's dense-mask path
        torch.testing.assert_close(packed[:, real], _logits(base, "sdpa", ids, pos)[:, real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gradients_of_a_packed_example_equal_it_alone(base, impl):
    base.set_attn_implementation(impl)
    ids, pos = _row()
    span = _spans()["B"]

    def grads_of_b_loss(ids, pos, at: slice) -> list[torch.Tensor]:
        base.zero_grad(set_to_none=True)
        logits = base(input_ids=ids, position_ids=pos).logits[0, at]
        targets = ids[0, at].roll(-1)
        torch.nn.functional.cross_entropy(logits[:-1].float(), targets[:-1], reduction="sum").backward()
        return [p.grad.clone() for p in base.parameters()]

    packed = grads_of_b_loss(ids, pos, span)
    alone = grads_of_b_loss(ids[:, span], pos[:, span], slice(0, span.stop - span.start))
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    base.zero_grad(set_to_none=True)


def test_flex_mask_is_same_example_and_causal(base):
    from torch.nn.attention.flex_attention import BlockMask, create_mask
    from transformers.masking_utils import create_causal_mask

    base.set_attn_implementation("flex_attention")
    ids, pos = _row()
    embeds = base.model.embed_tokens(ids)
    mask = create_causal_mask(config=base.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                              position_ids=pos)
    assert isinstance(mask, BlockMask)
    dense = create_mask(mask.mask_mod, 1, 1, SEQ, SEQ, device="cpu")[0, 0]
    example = torch.empty(SEQ, dtype=torch.long)  # which example (or the padding) each token belongs to
    for index, span in enumerate(_spans().values()):
        example[span] = index
    q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    expected = (example[:, None] == example[None, :]) & (k <= q)
    assert torch.equal(dense, expected)
    # block level: a 128 x 128 block is computed iff it holds an allowed pair (e.g. queries of C and the
    # padding never read block 0, which holds only A and the start of B)
    blocks = mask.to_dense()[0, 0].bool()
    size = 128
    holds = expected.reshape(SEQ // size, size, SEQ // size, size).any(dim=3).any(dim=1)
    assert torch.equal(blocks, holds) and not blocks[2, 0]
