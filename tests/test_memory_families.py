"""The memory model's family terms against hand-computed bytes, on small shapes defined here.

Shapes (hidden 64, 2 layers, 4 heads, vocab 512, MLP 128):
  QWEN3: 2 kv heads, head_dim 32 (q_dim 128, kv_dim 64: head_dim apart from hidden / heads),
         q/k RMSNorms over head_dim, untied.
  GEMMA2: as QWEN3 but 4 norms per layer, (1 + w) norms, tied, a sliding-window layer then a
          full one, attention soft-cap 50 and final-logit soft-cap 30.
  GEMMA3: GEMMA2's layout with q/k norms and no soft-caps.
  PHI3: 4 kv heads, head_dim 16 (q_dim = kv_dim = 64), fused qkv_proj (64 -> 192) and
        gate_up_proj (64 -> 256), every layer sliding.
Jobs are jobs/tiny.yaml in bf16: micro batch 4 x seq 64 = 256 tokens, LoRA r 8 on all
linears, dropout 0, sdpa.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import memory
from orchestrator.catalog import FULL, PRESETS, SLIDING, ModelShape
from orchestrator.memory import Calibration
from orchestrator.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
QWEN3 = ModelShape(model_type="qwen3", num_key_value_heads=2, head_dim=32, **COMMON)
GEMMA2 = ModelShape(model_type="gemma2", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                    sliding_window=16, layer_types=(SLIDING, FULL), attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, query_pre_attn_scalar=32, **COMMON)
GEMMA3 = ModelShape(model_type="gemma3_text", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                    sliding_window=16, layer_types=(SLIDING, FULL), query_pre_attn_scalar=32, **COMMON)
PHI3 = ModelShape(model_type="phi3", num_key_value_heads=4, sliding_window=16, layer_types=(SLIDING, SLIDING), **COMMON)
TOKENS, SEQ = 256, 64
# Explicit, so re-fitting the defaults does not change these hand computations.
CAL = Calibration(norm_fp32_copies=1.0, mlp_intermediates=3.0, backward_transient=0.5, loss_bytes_per_logit=12.0,
                  dequant_copies=1.0)


def job(*overrides: str):
    """On DeepSpeed's engine with sdpa, as the hand computations below (tests/test_memory.py covers the levers)."""
    base = ["model.dtype=bf16", "quantization.compute_dtype=bf16", "lora.dropout=0.0", "training.micro_batch_size=4",
            "training.global_batch_size=8", "training.gradient_checkpointing=false", "training.engine=deepspeed",
            "model.attn_implementation=sdpa"]
    return load_job(ROOT / "jobs/tiny.yaml", base + list(overrides), check_paths=False)


def test_param_counts():
    # QWEN3 per layer: q 64*128 + k 64*64 + v 64*64 + o 128*64 + gate/up/down 3 * 64*128 = 49152;
    # other: embed 512*64 + lm_head 512*64 + per layer (2 norms * 64 + q/k norms 2 * 32) * 2 + final 64
    c = memory.param_counts(job(), QWEN3)
    assert (c.linear, c.other) == (2 * 49152, 32768 + 32768 + 2 * 192 + 64)
    # GEMMA2: same linears; tied embedding counted once; 4 norms of 64 per layer
    c = memory.param_counts(job(), GEMMA2)
    assert (c.linear, c.other) == (2 * 49152, 32768 + 2 * 256 + 64)
    # PHI3: qkv 64*192 + o 64*64 + gate_up 64*256 + down 128*64 = 40960 per layer;
    # LoRA r 8 on its 4 modules: 8 * ((64+192) + (64+64) + (64+256) + (128+64)) = 7168 per layer
    c = memory.param_counts(job(), PHI3)
    assert (c.linear, c.lora, c.largest_linear, c.linear_tensors) == (2 * 40960, 2 * 7168, 16384, 8)
    assert PHI3.linear_names() == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_qwen3_layer_activations():
    # norms: fp32 copies of 2 x 64 (layer norms) + 128 (q_norm) + 64 (k_norm) = 320 elements -> 1280 B;
    # attention: q, expanded k, v 3*2*128 + sdpa out 2*128 + lse 4*4 = 1040; sdpa mask copy 2*64 = 128;
    # MLP 3*2*128 = 768; inputs read by LoRA A: norm1 out 2*64 + attn out 2*128 + norm2 out 2*64
    # + act product 2*128 = 768; LoRA A outputs 7*2*8 = 112 -> 4096 B per token
    assert memory.layer_activation_bytes(job(), QWEN3, TOKENS, SEQ, CAL) == 4096 * TOKENS
    # full finetune: + the normalized tensors for the norm weights in bf16 (2*320), no LoRA A outputs
    assert memory.layer_activation_bytes(job("method=full"), QWEN3, TOKENS, SEQ, CAL) == (4096 + 640 - 112) * TOKENS


def test_gemma2_layer_activations_softcap_and_four_norms():
    # norms: 4 x 64 elements in fp32 = 1024; attention 1040; eager scores: fp32 softmax + bf16 probs
    # + the tanh output of the soft-cap, (4 + 2 + 2) * 4 heads * 64 = 2048; MLP (GeGLU) 768;
    # LoRA inputs 768; LoRA A outputs 112 -> 5760
    eager = job("model.attn_implementation=eager")
    assert memory.layer_activation_bytes(eager, GEMMA2, TOKENS, SEQ, CAL) == 5760 * TOKENS
    # without attention soft-capping the tanh output (2 * 4 * 64 = 512) is not saved
    uncapped = ModelShape(**{**GEMMA2.__dict__, "attn_logit_softcapping": 0.0})
    assert memory.layer_activation_bytes(eager, uncapped, TOKENS, SEQ, CAL) == (5760 - 512) * TOKENS
    # flash attention saves no scores at all (it caps inside the kernel)
    flash = job("model.attn_implementation=flash_attention_2")
    assert memory.layer_activation_bytes(flash, GEMMA2, TOKENS, SEQ, CAL) == (5760 - 2048) * TOKENS
    # full finetune: Gemma's (1 + w) product runs in fp32, so the weight gradient keeps 4 B x 256
    full = job("model.attn_implementation=eager", "method=full")
    assert memory.layer_activation_bytes(full, GEMMA2, TOKENS, SEQ, CAL) == (5760 + 1024 - 112) * TOKENS


def test_gemma3_layer_activations_qk_norms():
    # norms: (4 x 64 + 128 + 64) fp32 = 1792; then as QWEN3 with sdpa: 1040 + 128 + 768 + 768 + 112
    assert memory.layer_activation_bytes(job(), GEMMA3, TOKENS, SEQ, CAL) == (1792 + 2816) * TOKENS
    # full: + 4 B x 448 for the fp32 norm outputs, no LoRA A outputs
    assert memory.layer_activation_bytes(job("method=full"), GEMMA3, TOKENS, SEQ, CAL) == (1792 * 2 + 2816 - 112) * TOKENS


def test_phi3_fused_linears():
    # norms 2*64*4 = 512; attention 3*2*64 + 2*64 + 4*4 = 528; sdpa 128; MLP 768 (gate and up are
    # halves of the one gate_up output); LoRA inputs: 2*64 (qkv) + 2*64 (o) + 2*64 (gate_up)
    # + 2*128 (down) = 640; LoRA A outputs 4*2*8 = 64 -> 2640
    assert memory.layer_activation_bytes(job(), PHI3, TOKENS, SEQ, CAL) == 2640 * TOKENS
    # dropout: each of the 4 adapted modules saves its dropout output + mask, 3 B x in:
    # 3*64 * 3 + 3*128 = 960 instead of the shared 640
    dropout = job("lora.dropout=0.1")
    assert memory.layer_activation_bytes(dropout, PHI3, TOKENS, SEQ, CAL) == (2640 - 640 + 960) * TOKENS
    # the dequantization buffer holds the largest fused linear, gate_up 64*256, in bf16
    assert memory.dequant_buffer_bytes(job(), PHI3, CAL) == 16384 * 2
    # LoRA on only the fused attention input: one adapted module, one group input (2*64)
    qkv = job("lora.target_modules=[qkv_proj]")
    assert memory.layer_activation_bytes(qkv, PHI3, TOKENS, SEQ, CAL) == (2640 - 640 + 128 - 3 * 16) * TOKENS


def test_sliding_and_full_layers_build_two_masks():
    # Gemma mixes sliding and full layers: two micro x seq x seq masks, bool for sdpa (4*64*64 each)
    assert GEMMA2.attention_mask_kinds() == 2 and PHI3.attention_mask_kinds() == 1 == QWEN3.attention_mask_kinds()
    saved, _ = memory.activation_bytes(job(), GEMMA3, CAL)
    layer = (1792 + 2816) * TOKENS
    final_norm = (4 + 2) * 64 * TOKENS
    assert saved == 2 * layer + final_norm + 2 * 4 * 64 * 64
    saved, _ = memory.activation_bytes(job(), PHI3, CAL)
    assert saved == 2 * 2640 * TOKENS + final_norm + 4 * 64 * 64


def test_final_logit_softcap_keeps_its_tanh():
    # 12 B per logit (log-softmax + two fp32 grads) + the bf16 tanh output of the cap
    assert memory.logits_loss_bytes(job(), GEMMA2, CAL) == (12 + 2) * 512 * TOKENS
    assert memory.logits_loss_bytes(job(), GEMMA3, CAL) == 12 * 512 * TOKENS


@pytest.mark.parametrize("name", ["qwen3-8b", "gemma2-9b", "gemma3-1b", "gemma3-12b", "phi3-mini"])
@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_estimate_adds_up_for_every_family_preset(name, method):
    j = load_job(ROOT / "jobs/tiny.yaml", [f"model.name={name}", f"method={method}", "model.dtype=bf16",
                                            "quantization.compute_dtype=bf16", "model.attn_implementation=eager",
                                            "data.seq_len=2048", "training.micro_batch_size=1",
                                            "training.global_batch_size=1"], check_paths=False)
    e = memory.estimate(j, "single_gpu")
    assert sum(e.breakdown.values()) == e.peak_allocated > 0
    assert j.shape() is PRESETS[name]
