"""Per-GPU memory model for training with orch's own trainer (no torch import).

`estimate(job, strategy)` predicts, per GPU, the peak of
``torch.cuda.max_memory_allocated()`` during training, the peak while loading
the model, what must fit on the GPU (peak + allocator slack + CUDA/NCCL
context), and the host RAM / NVMe bytes per node for offload strategies.

Everything is integer bytes, computed by one small pure function per
component. Each docstring says what the trainer (``orchestrator/recipe.py`` /
``modeling.py``) and DeepSpeed actually allocate and why. Empirical numbers
live in ONE place, :class:`Calibration`, so they can be re-fitted on GPU
measurements (``benchmarks/memory_accuracy.py --from-results``).

The training peak is the larger of two phases, because activations and optimizer-step
temporaries never coexist:

* forward/backward: resident model states + saved activations + the largest
  transient (loss chunk, or one layer's recompute and its gradients) + bnb
  dequantization buffer + ZeRO communication buffers and gathered params;
* optimizer step: resident model states + the fp32 gradient partition and
  Adam temporaries DeepSpeed creates for the step.

A job with an eval split also has an eval peak (`eval_peak_bytes`: the resident states
plus one no-grad forward and loss at the eval micro batch); what must fit is the
largest of the training, load and eval peaks.

``breakdown`` lists the components of the peak phase only (so the values add
up to ``peak_allocated``); the other phase's transients are 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator import levers
from orchestrator.catalog import GIB, MIB, ModelShape
from orchestrator.deepspeed_config import bucket_sizes
from orchestrator.spec import JobSpec
from orchestrator.strategy import STRATEGIES

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "uint8": 1}
FP32 = 4
ADAM_STATES = 2  # exp_avg and exp_avg_sq, fp32 each
ZERO3_SUB_GROUP_ELEMENTS = 1_000_000_000
"""DeepSpeed's sub_group_size default (orch does not set it): ZeRO-3 makes fp32 partitions and steps
the optimizer one sub-group of at most this many elements at a time."""


@dataclass(frozen=True)
class Calibration:
    """Every empirical constant of the memory model, in one place.

    Values are first estimates reasoned from the libraries' code (see each
    field); the lead re-fits them on H100 measurements with
    ``benchmarks/memory_accuracy.py --fit`` on the "calibration" configs and
    checks the "held_out" ones.
    """

    allocator_slack: float = 0.08
    """Fraction of peak allocated that the caching allocator additionally reserves (block rounding,
    fragmentation between differently sized activations). PyTorch's reserved/allocated ratio on
    transformer training is typically 1.03-1.15; 0.08 is the middle. Not part of peak_allocated."""
    cuda_context_bytes: int = 560 * MIB
    """CUDA context + kernels of torch/cuBLAS/bnb loaded lazily, outside the caching allocator.
    nvidia-smi shows ~500-600 MiB for a torch 2.x CUDA 12 process on H100 before any tensor."""
    nccl_bytes: int = 384 * MIB
    """NCCL communicator buffers (cudaMalloc'd by NCCL, invisible to torch) per process when world > 1,
    NVLS off: a few channels x 4 MiB buffers per peer plus proxy state; 300-500 MiB typical."""
    fixed_allocated_bytes: int = 96 * MIB
    """Small allocations counted by max_memory_allocated that do not scale with the model: cuBLAS/cuBLASLt
    workspaces (torch allocates them through the caching allocator), input ids/targets, rotary caches."""
    host_process_bytes: int = 4 * GIB
    """Host RSS of one training process (python + torch + CUDA runtime + DeepSpeed + data), before offload."""

    # --- activations (bytes per token per decoder layer = sum of the terms below; see layer_activation_bytes)
    norm_fp32_copies: float = 1.0
    """HF RMSNorm upcasts its input to fp32 and keeps it for backward (pow and mul save it): 4h per norm."""
    mlp_intermediates: float = 3.0
    """SwiGLU saves gate out (silu input), silu out and up out (mul saves both factors): 3 x i. The
    product (down_proj input) is counted with the linear inputs."""
    backward_transient: float = 0.5
    """Gradient tensors alive while one layer runs backward, as a fraction of that layer's saved
    activations (grads of the i-sized MLP intermediates dominate: ~2 of the 4 live at once)."""
    loss_bytes_per_logit: float = 12.0
    """Peak bytes per (token x vocab) of the LM head + cross-entropy: fp32 log-softmax output saved (4),
    its incoming grad (4) and outgoing grad (4) at once during backward; the bf16 logits (2) die before."""
    dequant_copies: float = 1.0
    """bnb dequantizes one linear weight at a time to the compute dtype (forward and backward each make
    their own temporary, never two at once)."""
    adam_temp_copies: float = 1.0
    """torch AdamW (foreach) allocates one fp32 temporary the size of the flat partition (sqrt(v)+eps)."""
    load_temp_layers: float = 1.0
    """While building/loading, one decoder layer exists in model.dtype before it is quantized (qlora)."""
    zero3_live_fraction: float = 0.5
    """Fraction of stage3_max_reuse_distance elements ZeRO-3 keeps gathered at the forward/backward
    turn. DeepSpeed (partitioned_param_coordinator.__params_to_release) keeps a module's params when
    they reappear within max_reuse_distance elements of upcoming modules; a layer's forward-to-backward
    distance is about twice the params after it, so about half the window stays gathered."""
    zero3_offload_live_fraction: float = 1.0
    """The same with parameter offload, where a gathered weight is a copy fetched from the host: the
    whole window measured (QLoRA 8B and 70B, zero3_offload_all, one H100, 2026-11-24: 0.5 under-predicted
    their training peaks by 14 % and 10 %; benchmarks/results/device/h100-call17)."""


CALIBRATION = Calibration()


COMPONENTS = (
    "weights",
    "weights_4bit",
    "quant_constants",
    "lora_weights",
    "gradients",
    "master_weights",
    "optimizer_states",
    "optimizer_step_temp",
    "activations",
    "logits_loss",
    "dequant_buffer",
    "zero_buffers",
    "zero3_live_params",
    "fixed",
)
"""Breakdown keys, in display order."""


@dataclass
class MemoryEstimate:
    """Predicted memory of one job under one strategy (integer bytes)."""

    strategy: str
    """The strategy estimated."""
    breakdown: dict[str, int]
    """Per-GPU components at the peak phase (keys: COMPONENTS); they sum to peak_allocated."""
    peak_allocated: int
    """Predicted peak of torch.cuda.max_memory_allocated() per GPU during training."""
    load_peak: int
    """Predicted peak allocated per GPU while loading the model and initializing DeepSpeed."""
    eval_peak: int
    """Predicted peak allocated per GPU during the eval pass (0 without an eval split)."""
    total: int
    """What must fit on one GPU: max(peak, load peak, eval peak) x (1 + slack) + CUDA context (+ NCCL)."""
    cpu_bytes: int
    """Host RAM per node: training processes plus pinned offloaded states/params."""
    nvme_bytes: int
    """NVMe bytes per node for NVMe offload."""
    phase: str
    """Which phase sets the peak: 'forward_backward' or 'optimizer_step'."""
    cpu_breakdown: dict[str, int] = field(default_factory=dict)
    """Host RAM per node by component."""


# ---------------------------------------------------------------------------
# Parameter counts


@dataclass(frozen=True)
class ParamCounts:
    """Element counts of one model under one method."""

    linear: int
    """Weights of the decoder-block linear layers (the ones qlora quantizes)."""
    other: int
    """Embeddings, lm_head (if untied), norms, biases: kept in model.dtype."""
    lora: int
    """LoRA A and B elements (0 for full)."""
    trainable: int
    """What the optimizer updates: lora, or every parameter for full."""
    largest_linear: int
    """Elements of the largest single linear weight in a decoder layer."""
    linear_tensors: int
    """Number of linear weight tensors in the decoder blocks."""

    @property
    def total(self) -> int:
        return self.linear + self.other


def lora_targets(job: JobSpec, shape: ModelShape) -> dict[str, tuple[int, int]]:
    """The decoder linear layers that get LoRA adapters, with (in, out) features."""
    linears = shape.linear_shapes()
    wanted = job.lora.target_modules
    if wanted == "all-linear":
        return linears
    return {name: dims for name, dims in linears.items() if name in wanted}


def param_counts(job: JobSpec, shape: ModelShape) -> ParamCounts:
    linear = shape.num_hidden_layers * shape.layer_linear_params()
    other = shape.num_params() - linear
    lora = 0
    if job.method != "full":
        lora = shape.num_hidden_layers * sum(job.lora.r * (i + o) for i, o in lora_targets(job, shape).values())
    trainable = shape.num_params() if job.method == "full" else lora
    largest = max(i * o for i, o in shape.linear_shapes().values())
    return ParamCounts(linear, other, lora, trainable, largest, shape.num_hidden_layers * len(shape.linear_shapes()))


# ---------------------------------------------------------------------------
# Weights


def packed_4bit_bytes(numel: int, storage_dtype: str) -> int:
    """Bytes of bnb's packed 4-bit data for one weight of ``numel`` elements.

    Two 4-bit values share a byte; bnb stores the bytes as a flat tensor of the
    storage dtype (uint8, or bf16/fp32 so ZeRO-3 can shard it next to bf16
    params), so the byte count is rounded up to whole storage elements.
    """
    itemsize = DTYPE_BYTES[storage_dtype]
    nbytes = (numel + 1) // 2
    return -(-nbytes // itemsize) * itemsize


def quant_constant_bytes(numel: int, block_size: int, double_quant: bool) -> int:
    """Bytes of bnb's quantization state for one 4-bit weight.

    One absmax per ``block_size`` elements. Without double quant each absmax is
    fp32. With double quant the absmax values are themselves quantized to uint8
    with one fp32 absmax per 256 of them, plus one fp32 offset and the 256-entry
    fp32 dynamic code table. The 16-entry fp32 NF4/FP4 code table is always kept.
    """
    blocks = -(-numel // block_size)
    code4 = 16 * FP32
    if not double_quant:
        return blocks * FP32 + code4
    nested_blocks = -(-blocks // 256)
    return blocks * 1 + nested_blocks * FP32 + FP32 + 256 * FP32 + code4


def layer_weight_bytes(job: JobSpec, shape: ModelShape, storage_dtype: str) -> tuple[int, int, int]:
    """(model.dtype weights, packed 4-bit weights, quant constants) of one decoder layer.

    qlora quantizes every linear of the layer except skip_modules; norms, biases and skipped
    linears stay in model.dtype. lora/full keep everything in model.dtype.
    """
    d = DTYPE_BYTES[job.model.dtype]
    if job.method != "qlora":
        return (shape.layer_linear_params() + shape.layer_other_params()) * d, 0, 0
    q = job.quantization
    packed = consts = kept = 0
    for name, (i, o) in shape.linear_shapes().items():
        if name in q.skip_modules:
            kept += i * o
            continue
        packed += packed_4bit_bytes(i * o, storage_dtype)
        consts += quant_constant_bytes(i * o, q.block_size, q.double_quant)
    return (kept + shape.layer_other_params()) * d, packed, consts


def base_weight_bytes(job: JobSpec, shape: ModelShape, storage_dtype: str) -> tuple[int, int, int]:
    """(model.dtype weights, packed 4-bit weights, quant constants) of the whole unsharded model:
    the decoder layers (``layer_weight_bytes``) plus the embedding, the final norm and an untied
    lm_head, which stay in model.dtype."""
    dense, packed, consts = layer_weight_bytes(job, shape, storage_dtype)
    outside = (shape.embedding_params() + shape.lm_head_params() + shape.hidden_size) * DTYPE_BYTES[job.model.dtype]
    layers = shape.num_hidden_layers
    return outside + layers * dense, layers * packed, layers * consts


# ---------------------------------------------------------------------------
# Model states under DeepSpeed (bf16 mode; fp32 models have no master copy)


@dataclass(frozen=True)
class ModelStates:
    """Resident per-GPU (and per-rank host) bytes of params, grads and optimizer states."""

    gpu: dict[str, int]
    host: dict[str, int]
    step_temp: int
    """fp32 gradient partition + Adam temporaries alive during optimizer.step on the GPU."""


def model_states(job: JobSpec, strategy: str, shape: ModelShape, cal: Calibration = CALIBRATION) -> ModelStates:
    """Params, gradients, fp32 master weights and Adam moments per GPU.

    DeepSpeed bf16 mode keeps trainable params and grads in bf16 and gives the
    optimizer fp32 master copies + fp32 exp_avg/exp_avg_sq (16 B per trainable
    param in fp32 state). Sharding by ZeRO stage over W ranks:

    * stage 0 (single_gpu) on DeepSpeed's engine (FP16_UnfusedOptimizer in bf16,
      since torch AdamW is not FusedAdam): nothing sharded; per-param fp32 master
      clones; the step casts every grad to fp32 (4 B/param) and torch's foreach
      Adam makes one fp32 temporary.
    * stage 0 on PlainEngine (``levers.engine``: training.engine auto or plain): the same
      resident state; `plain_step_temp_bytes` for its step.
    * stage 2: params whole; grads, master, moments 1/W; the step makes the fp32
      gradient of the partition. Frozen params are plain module params (whole).
    * stage 3: everything 1/W, frozen and 4-bit params included (the bnb quant
      state is not a param and stays whole); the step works per sub-group
      (sub_group_size 1e9 elements), so its temporaries are capped by that.
    * offload_optimizer: master, moments and fp32 grads live in pinned host RAM;
      the GPU keeps no gradient partition (grads stream to the host).
    * offload_param: param partitions live in host RAM too.
    """
    stage = STRATEGIES[strategy].zero_stage
    opt_dev, param_dev = STRATEGIES[strategy].optimizer_offload, STRATEGIES[strategy].param_offload
    world = job.hardware.world_size
    d = DTYPE_BYTES[job.model.dtype]
    mixed = job.model.dtype != "fp32"
    counts = param_counts(job, shape)
    sharded = stage == 3
    storage = job.quantization.storage_for(sharded)
    dense, packed, consts = base_weight_bytes(job, shape, storage)
    t = counts.trainable
    t_shard = -(-t // world) if stage >= 2 else t

    # Base weights (frozen for lora/qlora, trained for full: then they *are* the trainable params).
    weight_div = world if sharded else 1
    gpu = {"weights": dense // weight_div, "weights_4bit": packed // weight_div, "quant_constants": consts,
           "lora_weights": (counts.lora * d) // weight_div}
    host: dict[str, int] = {}
    if param_dev != "none":
        host["offloaded_params"] = gpu["weights"] + gpu["weights_4bit"] + gpu["lora_weights"]
        gpu["weights"] = gpu["weights_4bit"] = gpu["lora_weights"] = 0

    grads = t_shard * d
    master = t_shard * FP32 if mixed else 0
    moments = t_shard * FP32 * ADAM_STATES
    step_elems = min(t_shard, ZERO3_SUB_GROUP_ELEMENTS) if sharded else t_shard
    step_temp = step_elems * FP32 * (int(mixed) + cal.adam_temp_copies)
    if levers.engine(job, strategy) == "plain":
        step_temp = plain_step_temp_bytes(job, shape)
    if opt_dev != "none":
        host.update(master_weights=master, optimizer_states=moments, fp32_gradients=t_shard * FP32)
        gpu.update(gradients=0, master_weights=0, optimizer_states=0)
        step_temp = 0
    else:
        gpu.update(gradients=grads, master_weights=master, optimizer_states=moments)
    return ModelStates(gpu=gpu, host=host, step_temp=int(step_temp))


def largest_trainable_elements(job: JobSpec, shape: ModelShape) -> int:
    """Elements of the largest trainable tensor: a LoRA A (r x in) or B (out x r) matrix, or for a
    full finetune the embedding, lm_head or largest decoder linear."""
    if job.method == "full":
        return max(shape.embedding_params(), param_counts(job, shape).largest_linear)
    return max(job.lora.r * max(i, o) for i, o in lora_targets(job, shape).values())


def plain_step_temp_bytes(job: JobSpec, shape: ModelShape) -> int:
    """What PlainEngine's optimizer step allocates on top of the resident states (gradients
    counted there), per ``orchestrator/engine.py``'s table.

    bf16: each bf16 gradient is copied to an fp32 gradient on its master and then freed, one
    tensor at a time, so the gradient bytes peak when the last tensor is converted: 4 B per
    trainable param plus that tensor's own 2 B, i.e. 2 B per param and one tensor on top of the
    resident 2 B (the largest trainable tensor stands in for the last one: exact for a full
    finetune, whose last parameter is the untied lm_head, and within one LoRA matrix otherwise).
    fp32: the gradients are the masters' own. Fused AdamW makes no temporaries, the foreach norm
    one scalar per tensor and clipping scales in place.
    """
    d = DTYPE_BYTES[job.model.dtype]
    if job.model.dtype == "fp32":
        return 0
    return (FP32 - d) * param_counts(job, shape).trainable + d * largest_trainable_elements(job, shape)


# ---------------------------------------------------------------------------
# Activations


# Linear layers grouped by the tensor they read: a group's input is saved once if any reader saves it.
INPUT_GROUPS = {
    "attn_in": ("q_proj", "k_proj", "v_proj"),  # input_layernorm output
    "attn_out": ("o_proj",),  # attention output, transposed contiguous
    "mlp_in": ("gate_proj", "up_proj"),  # post_attention_layernorm (Gemma: pre_feedforward_layernorm) output
    "mlp_mid": ("down_proj",),  # act(gate) * up
}
# Phi-3's fused linears: one reader per tensor.
FUSED_INPUT_GROUPS = {
    "attn_in": ("qkv_proj",),
    "attn_out": ("o_proj",),
    "mlp_in": ("gate_up_proj",),
    "mlp_mid": ("down_proj",),
}


def input_groups(shape: ModelShape) -> dict[str, tuple[str, ...]]:
    """The decoder linears of ``shape``'s family grouped by the tensor they read."""
    return FUSED_INPUT_GROUPS if shape.family.fused_linears else INPUT_GROUPS


def norm_bytes_per_token(job: JobSpec, shape: ModelShape, cal: Calibration = CALIBRATION,
                         compiled: bool = False) -> float:
    """Bytes per token that one decoder layer's RMSNorms save for backward.

    Every norm upcasts its input to fp32 and keeps it (pow and mul save it:
    cal.norm_fp32_copies x 4 bytes per element); a compiled layer keeps the input in model
    dtype instead and redoes the upcast in its backward (see layer_activation_bytes). The normalized widths: h for each of the
    family's norms_per_layer (2; Gemma 4), plus q and k (q_dim + kv_dim) where q/k norms
    exist (Qwen3, Gemma-3). A full finetune also saves the normalized tensor for the norm
    weight's gradient: in model dtype for Llama-style norms (w * x.to(dtype)), in fp32 for
    Gemma's (x * (1 + w.float())). With frozen norm weights (LoRA) that product saves nothing.
    """
    family = shape.family
    width = family.norms_per_layer * shape.hidden_size + (shape.q_dim + shape.kv_dim if family.qk_norm else 0)
    per_token = (DTYPE_BYTES[job.model.dtype] if compiled else cal.norm_fp32_copies * FP32) * width
    if job.method == "full":
        per_token += (FP32 if family.offset_norm else DTYPE_BYTES[job.model.dtype]) * width
    return per_token


def attention_score_bytes_per_token(job: JobSpec, shape: ModelShape, seq_len: int) -> int:
    """Bytes per token that one layer's attention scores save, by kernel (``levers.attention``).

    sdpa converts the bool mask to an additive mask in model dtype per call and saves it
    (d * seq_len); eager saves the fp32 softmax and its model-dtype copy per head
    ((4 + d) * heads * seq_len), plus, with attention-logit soft-capping (Gemma-2), the tanh
    output tanh(s / cap) in model dtype (d * heads * seq_len; the divisions and products by
    the scalar cap save nothing); flash_attention_2 saves no scores (soft-capping and sliding
    windows run inside the kernel), and neither does flex_attention: its mask is the BlockMask
    (`attention_mask_bytes`), its soft-cap a score_mod inside the kernel, and its backward
    recomputes the scores block by block. A sliding window changes no saved size: eager and
    sdpa still materialize seq x seq, only masked.
    """
    d = DTYPE_BYTES[job.model.dtype]
    attn = levers.attention(job, shape)
    if attn == "eager":
        softcap = d if shape.attn_logit_softcapping else 0
        return (FP32 + d + softcap) * shape.num_attention_heads * seq_len
    if attn == "sdpa":
        return d * seq_len
    return 0


def key_value_bytes_per_token(job: JobSpec, shape: ModelShape) -> int:
    """Bytes per token of k (after RoPE) and v that one layer's attention saves, by kernel.

    sdpa with packed rows' mask and eager take k and v repeat_kv-expanded to the query heads
    (sdpa with a mask skips its GQA path): 2 x d x q_dim. transformers' flex path passes them at
    the key/value width with enable_gqa when the number of query heads is a power of two (Llama 3
    8B/70B: 32/64 heads over 8), 2 x d x kv_dim, and expands them like sdpa otherwise (Qwen2.5 7B:
    28 heads; ``integrations/flex_attention.py``, transformers 5.17 and 5.23). flash_attention_2
    is counted as sdpa (not measured).
    """
    d = DTYPE_BYTES[job.model.dtype]
    heads = shape.num_attention_heads
    if levers.attention(job, shape) == "flex_attention" and heads & (heads - 1) == 0:
        return 2 * d * shape.kv_dim
    return 2 * d * shape.q_dim


def layer_activation_bytes(job: JobSpec, shape: ModelShape, tokens: int, seq_len: int, cal: Calibration = CALIBRATION,
                           compiled: bool = False) -> int:
    """Bytes one decoder layer saves for backward, for ``tokens`` tokens in sequences of ``seq_len``.

    ``compiled`` (``levers.compiled``: the layer runs through torch.compile): AOTAutograd's
    partitioner recomputes cheap pointwise work in the backward instead of saving its output,
    so each RMSNorm keeps its input in model dtype, not the fp32 upcast, and the MLP does not
    keep the activation's output (one d*i fewer). Measured on an H100 (2026-11-24,
    benchmarks/results/device/h100-call7, -call8; QLoRA, flex attention, PlainEngine, no
    checkpointing, the same job compiled and eager): 1B (h 2048, i 8192) mb 8 x 1024 saved
    2.97 GiB less compiled = 24,330 B per token per layer, 8B (h 4096, i 14336) mb 2 x 2048
    5.47 GiB less = 44,810 B; these terms give 2 norms x 2h + 2i = 24,576 and 45,056 B (+1.0 %,
    +0.5 %).

    Per token (d = model dtype bytes, h hidden, q = heads x head_dim, i ffn):

    * RMSNorms (norm_bytes_per_token): the fp32 copy of each norm's input (4h
      each, saved by pow and mul; Gemma has 4 per layer, Qwen3/Gemma-3 also norm
      q and k); full finetune also saves the normalized tensor for the norm
      weight's gradient.
    * attention: q after RoPE (d*q); k and v, expanded to q heads or not by
      kernel (key_value_bytes_per_token); the kernel's output (d*q) and
      logsumexp (fp32 per head); the scores' saved tensors per kernel
      (attention_score_bytes_per_token). q = heads x head_dim, which Gemma and
      Qwen3 set apart from hidden / heads.
    * gated MLP, SwiGLU or GeGLU alike: gate output (the activation's saved
      input), activation output, up output (cal.mlp_intermediates x d*i; Phi-3's
      fused gate_up output is the gate and up halves of one tensor, the same bytes).
    * linear inputs (input_groups): a frozen base linear saves nothing (torch
      saves the input only for a weight gradient; bnb's MatMul4Bit keeps just
      the packed weight). So a group's input (d*in) is saved for full finetunes,
      and for LoRA only when an adapted module reads it without dropout
      (lora_A saves its input). With dropout > 0 each adapted module saves its
      own dropout output (d*in) and bool mask (1*in) instead.
    * LoRA: A's output (d*r) per adapted module, saved by B.
    """
    d = DTYPE_BYTES[job.model.dtype]
    h, q, i = shape.hidden_size, shape.q_dim, shape.intermediate_size
    heads = shape.num_attention_heads
    per_token = norm_bytes_per_token(job, shape, cal, compiled)
    per_token += d * q + key_value_bytes_per_token(job, shape) + d * q + FP32 * heads  # q, k, v; output + lse
    per_token += attention_score_bytes_per_token(job, shape, seq_len)
    per_token += (cal.mlp_intermediates - (1 if compiled else 0)) * d * i
    linears = shape.linear_shapes()
    groups = input_groups(shape)
    if job.method == "full":
        per_token += sum(d * linears[group[0]][0] for group in groups.values())
    else:
        targets = lora_targets(job, shape)
        per_token += len(targets) * d * job.lora.r
        for group in groups.values():
            adapted = [m for m in group if m in targets]
            width = linears[group[0]][0]
            if job.lora.dropout > 0:
                per_token += len(adapted) * (d + 1) * width
            elif adapted:
                per_token += d * width
    return int(per_token * tokens)


FLEX_BLOCK = 128
"""Tokens per side of one flex-attention block (torch's _DEFAULT_SPARSE_BLOCK_SIZE, which
transformers' ``flex_attention_mask`` uses)."""


def attention_mask_bytes(job: JobSpec, shape: ModelShape) -> int:
    """The masks transformers builds once per forward for packed rows, shared by all layers.

    Rows with several packed examples restart position_ids, so transformers builds a
    block-diagonal causal mask (``levers.attention`` picks the kernel):

    * sdpa: a bool micro_batch x seq x seq tensor; eager: the same in model dtype;
    * flex_attention: a BlockMask, int32 block counts and indices of the blocks that are
      partly and fully inside the mask, forward (per query block) and transposed (per key
      block): 4 x (q_blocks x kv_blocks) + 2 x q_blocks + 2 x kv_blocks int32 per row, blocks of
      FLEX_BLOCK tokens; plus the int64 example id of every token, which its mask function
      holds (``masking_utils.find_packed_sequence_indices``);
    * flash_attention_2: varlen indices instead (counted as nothing).

    (Rows holding a single example get no mask at all: is_causal; the model assumes packing,
    the common case, which is the larger.) Models mixing sliding-window and full layers
    (Gemma-2/3) build one mask per kind (ModelShape.attention_mask_kinds).
    """
    attn = levers.attention(job, shape)
    mb, seq = job.training.micro_batch_size, job.data.seq_len
    if attn == "flash_attention_2":
        per_kind = 0
    elif attn == "flex_attention":
        blocks = -(-seq // FLEX_BLOCK)
        per_kind = mb * (4 * blocks * blocks + 4 * blocks) * FP32 + mb * seq * 8
    else:
        per_kind = mb * seq * seq * (1 if attn == "sdpa" else DTYPE_BYTES[job.model.dtype])
    return shape.attention_mask_kinds() * per_kind


def activation_bytes(job: JobSpec, shape: ModelShape, cal: Calibration = CALIBRATION,
                     compiled: bool = False) -> tuple[int, int]:
    """(saved activations at the start of backward, largest per-layer transient on top of them).

    Without checkpointing every layer keeps its activations; the transient is
    the gradients of the layer being back-propagated. With HF non-reentrant
    checkpointing only each layer's input (d*h per token) is kept; during
    backward one layer is recomputed at a time, so its full activations plus
    its gradients are the transient. Both add the final norm's saved tensors
    and the shared attention mask.

    ``compiled``: the decoder layers run compiled (layer_activation_bytes says what that saves).
    """
    t = job.training
    tokens = t.micro_batch_size * job.data.seq_len
    d = DTYPE_BYTES[job.model.dtype]
    h = shape.hidden_size
    layer = layer_activation_bytes(job, shape, tokens, job.data.seq_len, cal, compiled)
    final_norm = int((cal.norm_fp32_copies * FP32 + d) * h * tokens) + attention_mask_bytes(job, shape)
    if t.gradient_checkpointing:
        saved = shape.num_hidden_layers * d * h * tokens + final_norm
        transient = int(layer * (1 + cal.backward_transient))
    else:
        saved = shape.num_hidden_layers * layer + final_norm
        transient = int(layer * cal.backward_transient)
    return saved, transient


def logits_loss_bytes(job: JobSpec, shape: ModelShape, cal: Calibration = CALIBRATION) -> int:
    """Peak bytes of LM head + cross-entropy.

    The trainer computes them on ``training.loss_chunk_tokens`` tokens at a time,
    each chunk under checkpointing, so only one chunk's fp32 logits exist:
    loss_bytes_per_logit x vocab x min(chunk, tokens). loss_chunk_tokens=0 makes
    the whole micro batch one chunk (full logits, fp32 upcast).

    Final-logit soft-capping (Gemma-2, applied in model dtype before the upcast, as the
    HF model does) keeps tanh(z / cap) for its backward: d more bytes per logit.
    """
    tokens = job.training.micro_batch_size * job.data.seq_len
    chunk = job.training.loss_chunk_tokens or tokens
    per_logit = cal.loss_bytes_per_logit + (DTYPE_BYTES[job.model.dtype] if shape.final_logit_softcapping else 0)
    return int(per_logit * shape.vocab_size * min(chunk, tokens))


def dequant_buffer_bytes(job: JobSpec, shape: ModelShape, cal: Calibration = CALIBRATION) -> int:
    """bnb dequantizes one 4-bit weight to compute dtype per matmul: the largest linear, once."""
    if job.method != "qlora":
        return 0
    return int(cal.dequant_copies * param_counts(job, shape).largest_linear * DTYPE_BYTES[job.quantization.compute_dtype])


# ---------------------------------------------------------------------------
# DeepSpeed buffers


def zero_buffer_bytes(job: JobSpec, strategy: str, shape: ModelShape) -> int:
    """Gradient reduce buckets DeepSpeed allocates (in model dtype).

    Stage 2 with overlap_comm keeps two reduce buckets (one filling while the
    other reduces); stage 3 keeps one flat reduce bucket. Stage 0 has none.
    Bucket size is capped by the trainable params (a tiny LoRA never fills one).
    """
    stage = STRATEGIES[strategy].zero_stage
    if stage == 0:
        return 0
    d = DTYPE_BYTES[job.model.dtype]
    bucket = min(bucket_sizes(shape).reduce_bucket_size, param_counts(job, shape).trainable)
    return (2 if stage == 2 else 1) * bucket * d


def zero3_live_param_bytes(job: JobSpec, strategy: str, shape: ModelShape, cal: Calibration = CALIBRATION) -> int:
    """Params ZeRO-3 holds gathered at the forward/backward turn.

    After a module's forward, ZeRO-3 releases its params unless their next use
    is within stage3_max_reuse_distance elements of upcoming modules -- true for
    the last layers and lm_head, whose backward follows right away -- so about
    cal.zero3_live_fraction x that many elements (1e9 in orch's config) stay
    gathered, capped by the model itself; plus one prefetch bucket in flight. 4-bit weights are gathered in their storage
    elements (numel/2 bytes), the rest in model dtype. One rank without parameter offload gathers in
    place (its partition is the parameter): nothing extra (measured: QLoRA 8B zero3 on one H100 was
    over-predicted by 8 % with the window counted).
    """
    s = STRATEGIES[strategy]
    if not s.sharded:
        return 0
    if job.hardware.world_size == 1 and s.param_offload == "none":
        return 0  # one rank's partition is the whole parameter: gathering it allocates nothing
    buckets = bucket_sizes(shape)
    d = DTYPE_BYTES[job.model.dtype]
    dense, packed, _ = base_weight_bytes(job, shape, job.quantization.storage_for(True))
    model_bytes = dense + packed + param_counts(job, shape).lora * d
    fraction = cal.zero3_live_fraction if s.param_offload == "none" else cal.zero3_offload_live_fraction
    window = int(buckets.stage3_max_reuse_distance * d * fraction)
    prefetch = buckets.stage3_prefetch_bucket_size * d
    return min(model_bytes, window + prefetch)


# ---------------------------------------------------------------------------
# Load: the model is built (modeling.load_model), then the engine is initialized


def whole_model_bytes(job: JobSpec, shape: ModelShape, storage_dtype: str) -> int:
    """Bytes of the whole unsharded model with its LoRA adapters: model.dtype weights, packed 4-bit
    weights and their quant constants, LoRA A/B in model.dtype."""
    dense, packed, consts = base_weight_bytes(job, shape, storage_dtype)
    return dense + packed + consts + param_counts(job, shape).lora * DTYPE_BYTES[job.model.dtype]


@dataclass(frozen=True)
class PieceLoad:
    """Allocated bytes per GPU at the moments of the qlora ZeRO-3 load, which builds the model one piece
    at a time and partitions each piece before the next (modeling._materialize_by_piece)."""

    embedding: int
    """The embedding whole in model.dtype, plus its new partition (DeepSpeed allocates a param's
    partition before it frees the whole tensor)."""
    last_layer: int
    """The partitions and quant constants of every earlier piece, plus the last decoder layer in
    model.dtype (its original linears, held until the layer is quantized) with its packed 4-bit
    weights and quant constants."""
    lm_head: int
    """Every earlier piece's partitions and quant constants, plus the untied lm_head whole and its new
    partition (0 when tied: the head is the embedding)."""
    built: int
    """The end of the build: every partition, every layer's quant constants (never partitioned: not
    parameters), and PEFT's LoRA adapters whole (deepspeed.initialize partitions them)."""

    @property
    def peak(self) -> int:
        return max(self.embedding, self.last_layer, self.lm_head, self.built)


def qlora_zero3_load(job: JobSpec, strategy: str, shape: ModelShape, cal: Calibration = CALIBRATION) -> PieceLoad:
    """The moments of the qlora ZeRO-3 load (``PieceLoad``): sharded states plus one piece.

    Pieces in order: embedding, decoder layers, final norm, untied lm_head. Each is materialized on
    the GPU in model.dtype, a layer's linears quantized (except skip_modules), then every parameter
    is partitioned: 1/W stays, on the GPU, or in host RAM with param offload (then a piece's
    partitions cost the GPU nothing). Resident memory only grows, and every decoder layer needs the
    same working set, so the peaks are at the embedding, the last layer, the lm_head and the end.
    """
    d = DTYPE_BYTES[job.model.dtype]
    world = job.hardware.world_size
    offload = STRATEGIES[strategy].param_offload != "none"

    def share(nbytes: int) -> int:
        return 0 if offload else nbytes // world

    storage = job.quantization.storage_for(True)
    kept, packed, consts = layer_weight_bytes(job, shape, storage)
    embedding, head, norm = shape.embedding_params() * d, shape.lm_head_params() * d, shape.hidden_size * d
    layer_whole = int(cal.load_temp_layers * (shape.layer_linear_params() + shape.layer_other_params()) * d)
    layer_left = share(kept) + share(packed) + consts  # what a finished layer leaves on the GPU
    layers = shape.num_hidden_layers
    before_head = share(embedding) + layers * layer_left + share(norm)
    return PieceLoad(
        embedding=embedding + share(embedding),
        last_layer=share(embedding) + (layers - 1) * layer_left + layer_whole + packed + consts,
        lm_head=before_head + head + share(head) if head else 0,
        built=before_head + share(head) + param_counts(job, shape).lora * d,
    )


def build_peak_bytes(job: JobSpec, strategy: str, shape: ModelShape, cal: Calibration = CALIBRATION) -> int:
    """Peak allocated while the trainer builds or loads the model, before the engine exists.

    The model is materialized piece by piece in the order embedding, decoder layers, final norm,
    lm_head (``modeling.build_random``). qlora quantizes each layer right after it is materialized;
    ``_quantize_linears_`` holds every original linear of the layer until the layer is done, so the
    whole layer in model.dtype (cal.load_temp_layers layers) sits on top of the quantized part
    built so far, and the final norm and an untied lm_head come only after it. PEFT then adds
    LoRA A/B directly in the compute dtype (peft moves adapters to the base layer's device and
    compute dtype), so the last moment of the build holds the whole model with its adapters.

    ZeRO-3, lora/full: built already partitioned (deepspeed.zero.Init for random weights,
    HfDeepSpeedConfig for pretrained); each piece (a decoder layer, the embedding or lm_head) is
    gathered whole to initialize/load it, on top of this rank's partitions. With parameter offload
    the partitions live in host RAM and the gather first copies this rank's part of the piece to
    the GPU (1/W of the piece), next to the gathered whole: measured on one H100, LoRA 8B,
    zero3_offload_all: 2 x the embedding (2,101,347,840 B; 2 x 1,050,673,152 predicted).

    ZeRO-3, qlora: built and partitioned piece by piece, so sharded states plus one piece
    (``qlora_zero3_load``).
    """
    stage = STRATEGIES[strategy].zero_stage
    d = DTYPE_BYTES[job.model.dtype]
    world = job.hardware.world_size
    whole = whole_model_bytes(job, shape, job.quantization.storage_for(stage == 3))
    if stage == 3 and job.method != "qlora":
        param_dev = STRATEGIES[strategy].param_offload
        layer = shape.layer_linear_params() + shape.layer_other_params()
        piece = max(layer, shape.embedding_params(), shape.lm_head_params()) * d
        if param_dev != "none":
            return piece + -(-piece // world)
        dense, packed, _ = base_weight_bytes(job, shape, job.quantization.storage_for(True))
        return (dense + packed) // world + piece
    if job.method != "qlora":
        return whole
    if stage == 3:
        return qlora_zero3_load(job, strategy, shape, cal).peak
    dense, packed, consts = base_weight_bytes(job, shape, job.quantization.storage_for(False))
    # While the last layer is quantized: everything but the final norm and an untied lm_head (its
    # packed weights already counted), plus that layer in model.dtype.
    before_head = dense + packed + consts - (shape.hidden_size + shape.lm_head_params()) * d
    layer = int(cal.load_temp_layers * (shape.layer_linear_params() + shape.layer_other_params()) * d)
    return max(before_head + layer, whole)


def single_gpu_init_bytes(job: JobSpec, engine: str, trainable: int, cal: Calibration = CALIBRATION) -> int:
    """What the single-GPU engine (``levers.engine``: 'plain' or 'deepspeed') allocates while it is
    initialized, on top of the built model.

    PlainEngine (``orchestrator/engine.py``) makes the fp32 master of every trainable bf16 parameter
    (``p.detach().float()``: 4 B) and nothing else: fused AdamW creates its moments at the first
    step, the scheduler holds no tensors. fp32 models train their parameters as their own masters:
    0. Measured on one H100 (issue 16, benchmarks/results/device/h100-call5/quick.json, 41,943,040
    trainable LoRA params): QLoRA 8B 5,954,414,592 B = whole model 5,786,426,240 + 4 x 41,943,040
    + 216,192; LoRA 8B 16,312,181,760 B = 16,144,408,576 + 4 x 41,943,040 + 1,024 (the same
    216,192 and 1,024 B residuals the DeepSpeed runs of those shapes show over their prediction).

    DeepSpeed 0.19.8 wraps torch AdamW in FP16_UnfusedOptimizer for bf16 and fp16 models (engine
    ``_do_optimizer_sanity_check`` returns DDP_BFLOAT16 / FP16, and torch AdamW is no FusedAdam), and
    its ``initialize_optimizer_states`` runs one optimizer step on zero gradients so that the Adam
    moments exist from the start. During that step every trainable parameter has: its fp32 master
    clone (4 B), a zero model.dtype gradient (d) and a zero fp32 gradient on the master (4), exp_avg
    and exp_avg_sq (2 x 4) and torch's foreach AdamW temporary sqrt(v) + eps (cal.adam_temp_copies x
    4); the two gradients are dropped after it. 24 B per trainable bf16 parameter with its own 2 B,
    measured on one H100 to within 0.1 % for LoRA 8B and QLoRA 1B/8B/70B (r 8-64). fp32 models get
    no wrapper (the engine steps torch AdamW itself, whose states appear lazily at the first step).
    """
    d = DTYPE_BYTES[job.model.dtype]
    if job.model.dtype == "fp32":
        return 0
    if engine == "plain":
        return trainable * FP32
    return int(trainable * (FP32 + d + FP32 + ADAM_STATES * FP32 + cal.adam_temp_copies * FP32))


def engine_init_peak_bytes(job: JobSpec, strategy: str, shape: ModelShape, states: ModelStates,
                           cal: Calibration = CALIBRATION) -> int:
    """Peak allocated during engine initialization (deepspeed.initialize), built model included.

    * stage 0: the whole model + ``single_gpu_init_bytes`` of its engine (PlainEngine or DeepSpeed's).
    * stage 2 (``DeepSpeedZeroOptimizer``): the trainable params are copied into one flat buffer on
      the GPU while the originals still exist (only when it fits there; else DeepSpeed flattens
      through host memory); then the fp32 master partition (a model.dtype clone cast to fp32:
      d + 4 B per element at once) and a zero fp32 gradient partition (4 B) are made. Adam moments
      stay lazy here.
    * stage 3 (``DeepSpeedZeroOptimizer_Stage3``): the model arrives partitioned but for a qlora
      model's LoRA adapters, which DeepSpeed partitions param by param, each partition (1/W, on the
      host with param offload) allocated before the whole tensor is freed (``qlora_zero3_load``'s
      end of the build plus the largest adapter's partition). (Before the by-piece load a qlora model
      arrived whole: measured on one H100, QLoRA 8B zero3_offload_optimizer, 6,837,315,584 B.)
      Then, without optimizer offload: the fp32 master partition (converted and cloned:
      2 x 4 B per element of one sub-group at once; none for fp32 models, whose partitions are their
      own masters), the zero fp32 gradient of the largest sub-group, and finally the flat
      model.dtype gradient partition and one reduce bucket (reduce_bucket_size elements). With
      optimizer offload all of that is in host RAM and the GPU gets the reduce bucket only.
    """
    stage = STRATEGIES[strategy].zero_stage
    d = DTYPE_BYTES[job.model.dtype]
    world = job.hardware.world_size
    mixed = job.model.dtype != "fp32"
    t = param_counts(job, shape).trainable
    if stage == 0:
        return (whole_model_bytes(job, shape, job.quantization.storage_for(False))
                + single_gpu_init_bytes(job, levers.engine(job, strategy), t, cal))
    if stage == 2:
        whole = whole_model_bytes(job, shape, job.quantization.storage_for(False))
        flat = t * d if whole + t * d <= job.hardware.gpu_memory_bytes() else 0
        t_shard = -(-t // world)
        return whole + max(flat, t_shard * max(d + FP32, 2 * FP32))
    opt_dev, param_dev = STRATEGIES[strategy].optimizer_offload, STRATEGIES[strategy].param_offload
    resident = sum(states.gpu[k] for k in ("weights", "weights_4bit", "quant_constants", "lora_weights"))
    partitioning = 0
    if job.method == "qlora":
        # The model arrives partitioned but for PEFT's adapters, which are partitioned param by param:
        # the largest one's partition (r x the wider side of a target linear) next to all of them whole.
        largest_lora = job.lora.r * max(max(i, o) for i, o in lora_targets(job, shape).values()) * d
        on_gpu = 0 if param_dev != "none" else -(-largest_lora // world)
        partitioning = qlora_zero3_load(job, strategy, shape, cal).built + on_gpu
    bucket = bucket_sizes(shape).reduce_bucket_size * d
    if opt_dev != "none":
        return max(partitioning, resident + bucket)
    t_shard = -(-t // world)
    sub = min(t_shard, ZERO3_SUB_GROUP_ELEMENTS)
    master = t_shard * FP32 if mixed else 0
    # fp32 conversion temporary of one sub-group, then the fp32 gradient of the largest sub-group
    # (both FP32 x sub), then the model.dtype gradient partition and the reduce bucket
    optimizer = master + max(FP32 * sub, t_shard * d + bucket)
    return max(partitioning, resident + optimizer)


def load_peak_bytes(job: JobSpec, strategy: str, shape: ModelShape, states: ModelStates, cal: Calibration = CALIBRATION) -> int:
    """Peak allocated from model load through engine init (what the trainer records as
    ``RankMemory.load_peak_allocated`` right after deepspeed.initialize): the larger of the build
    peak and the engine-init peak. No fixed term: nothing runs a matmul before the first step, so
    cuBLAS workspaces and inputs are not there yet (measured load peaks of stage 0 runs equal
    model + 24 B per trainable param to within 0.2 MB on 8B)."""
    return max(build_peak_bytes(job, strategy, shape, cal), engine_init_peak_bytes(job, strategy, shape, states, cal))


# ---------------------------------------------------------------------------
# The eval pass: a forward and the loss under torch.no_grad, between optimizer steps


def eval_layer_bytes_per_token(job: JobSpec, shape: ModelShape, seq_len: int) -> int:
    """The largest working set of one decoder layer's no-grad forward, bytes per token, the layer's
    input (the residual stream) included.

    Without autograd a tensor dies when the code drops its last reference, so only what one
    sub-block holds at once counts (d = model dtype bytes, h hidden, q = heads x head_dim,
    kv = kv heads x head_dim, i ffn):

    * attention: the residual (d*h) and the normed input (d*h); q, k, v (d*(q + 2 kv)) and the
      rotated q and k made while those exist (d*(q + kv)); k and v expanded to q heads for
      sdpa/eager (2*d*q; flash_attention_2 and flex read the kv heads); the attention output (d*q);
      the scores' working set per kernel, counted as training saves it
      (attention_score_bytes_per_token, which for eager with soft-capping is one model-dtype copy
      more than the no-grad forward holds at once).
    * MLP: the residual and the normed input (2*d*h) and the ffn-wide tensors alive together:
      act(gate), up and their product (3*d*i) in ``down_proj(act(gate_proj(x)) * up_proj(x))``;
      Phi-3's fused gate_up output stays alive through its two halves (4*d*i).
    * LoRA (eval mode: dropout is the identity): an adapted linear's base output, lora_B's output
      and its scaled copy exist at once, so two output-wide tensors more while it runs: on
      up_proj that makes act(gate) + 3 ffn-wide tensors (4*d*i, over the 3 of the product), on
      Phi-3's gate_up 2*i + 2*2*i (6*d*i); in attention 2 x the widest adapted output.
    """
    d = DTYPE_BYTES[job.model.dtype]
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    linears = shape.linear_shapes()
    targets = lora_targets(job, shape) if job.method != "full" else {}
    expand = 0 if job.model.attn_implementation in ("flash_attention_2", "flex_attention") else 2 * q
    attn_lora = max((linears[m][1] for m in targets if m in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")), default=0)
    attention = (2 * d * h + d * (q + 2 * kv) + d * (q + kv) + d * expand + d * q + 2 * d * attn_lora
                 + attention_score_bytes_per_token(job, shape, seq_len))
    if shape.family.fused_linears:
        ffn_wide = max(4, 2 + 4 * int("gate_up_proj" in targets))
    else:
        ffn_wide = max(3, 2 + 2 * int("up_proj" in targets))
    mlp = 2 * d * h + ffn_wide * d * i
    return max(int(attention), mlp)


def eval_transient_bytes(job: JobSpec, strategy: str, shape: ModelShape, micro_batch: int,
                         cal: Calibration = CALIBRATION) -> int:
    """Peak bytes of the eval pass on top of the resident model states: one micro batch of
    ``micro_batch`` sequences through the decoder and the chunked loss under torch.no_grad.

    No saved activations, no gradients, no optimizer-step temporaries. Two moments compete:

    * inside a decoder layer: its working set (eval_layer_bytes_per_token) for every token, the
      shared 4D attention masks (attention_mask_bytes at this micro batch), the bnb
      dequantization buffer (qlora) and, under ZeRO-3, the gathered parameters;
    * the loss, one chunk of ``loss_chunk_tokens`` at a time (all tokens when 0): the final hidden
      states (d*h per token) and, per logit of the chunk, the model-dtype logits, their fp32 upcast
      and cross-entropy's fp32 log-softmax (d + 4 + 4 bytes; soft-capping's temporaries come before
      the upcast and are no larger), plus the gathered parameters under ZeRO-3.
    """
    t = job.training
    eval_job = job.model_copy(update={"training": t.model_copy(update={"micro_batch_size": micro_batch})})
    tokens = micro_batch * job.data.seq_len
    d = DTYPE_BYTES[job.model.dtype]
    live = zero3_live_param_bytes(job, strategy, shape, cal)
    layer = (eval_layer_bytes_per_token(job, shape, job.data.seq_len) * tokens
             + attention_mask_bytes(eval_job, shape) + dequant_buffer_bytes(job, shape, cal))
    chunk = min(t.loss_chunk_tokens or tokens, tokens)
    loss = d * shape.hidden_size * tokens + (d + FP32 + FP32) * shape.vocab_size * chunk
    return max(layer, loss) + live


def eval_peak_bytes(job: JobSpec, strategy: str, shape: ModelShape, resident: int, cal: Calibration = CALIBRATION) -> int:
    """Peak allocated during the eval pass (0 when the job has no eval split): the resident bytes
    (model states as training keeps them between steps -- DeepSpeed's gradient partition and
    optimizer states stay allocated --, buckets, fixed allocations) plus eval_transient_bytes at the
    eval micro batch (training.eval_micro_batch_size, else the training micro batch)."""
    if not job.data.has_eval():
        return 0
    return resident + eval_transient_bytes(job, strategy, shape, job.eval_micro_batch(), cal)


# ---------------------------------------------------------------------------
# Host RAM and NVMe


def host_bytes(job: JobSpec, strategy: str, shape: ModelShape, states: ModelStates,
               cal: Calibration = CALIBRATION) -> tuple[dict[str, int], int]:
    """(host RAM per node by component, NVMe bytes per node).

    Every rank on the node holds its own partition of the offloaded states in
    pinned RAM: fp32 master + Adam moments + fp32 grads (optimizer offload) and
    its param partition (param offload). With NVMe offload the master + moments
    (optimizer) or params move to the NVMe file and RAM keeps the fp32 grads and
    swap buffers (count x size, as deepspeed_config.bucket_sizes gives them to DeepSpeed).
    """
    ranks = job.hardware.gpus_per_node
    opt_dev, param_dev = STRATEGIES[strategy].optimizer_offload, STRATEGIES[strategy].param_offload
    per_rank = dict(states.host)
    nvme = 0
    buckets = bucket_sizes(shape)
    if opt_dev == "nvme":
        nvme += per_rank.pop("master_weights", 0) + per_rank.pop("optimizer_states", 0)
        # swap buffers: buffer_count sub-groups of fp32 params + states in flight
        sub = min(param_counts(job, shape).trainable // job.hardware.world_size + 1, ZERO3_SUB_GROUP_ELEMENTS)
        per_rank["nvme_swap_buffers"] = buckets.nvme_optimizer_buffer_count * sub * FP32
    if param_dev == "nvme":
        nvme += per_rank.pop("offloaded_params", 0)
        per_rank["nvme_param_buffers"] = (buckets.nvme_param_buffer_count * buckets.nvme_param_buffer_size
                                          * DTYPE_BYTES[job.model.dtype])
    out = {k: v * ranks for k, v in per_rank.items()}
    out["processes"] = cal.host_process_bytes * ranks
    return out, nvme * ranks


def outside_allocator_bytes(job: JobSpec, cal: Calibration = CALIBRATION) -> int:
    """GPU memory a training process holds outside PyTorch's caching allocator: the CUDA context,
    plus NCCL's buffers when there are several processes."""
    return cal.cuda_context_bytes + (cal.nccl_bytes if job.hardware.world_size > 1 else 0)


# ---------------------------------------------------------------------------
# The estimate


def estimate(job: JobSpec, strategy: str, cal: Calibration = CALIBRATION, shape: ModelShape | None = None) -> MemoryEstimate:
    """Predict per-GPU and per-node memory of ``job`` trained with ``strategy``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    shape = shape or job.shape()
    states = model_states(job, strategy, shape, cal)
    resident = dict(states.gpu)
    resident["zero_buffers"] = zero_buffer_bytes(job, strategy, shape)
    resident["fixed"] = cal.fixed_allocated_bytes

    saved, layer_transient = activation_bytes(job, shape, cal, levers.compiled(job, strategy))
    loss = logits_loss_bytes(job, shape, cal)
    dequant = dequant_buffer_bytes(job, shape, cal)
    live = zero3_live_param_bytes(job, strategy, shape, cal)
    # The loss chunk runs before any layer's backward, so the two transients do not overlap;
    # report whichever is larger under its own name.
    if loss >= layer_transient:
        fb = {"activations": saved, "logits_loss": loss}
    else:
        fb = {"activations": saved + layer_transient, "logits_loss": 0}
    fb.update(dequant_buffer=dequant, zero3_live_params=live, optimizer_step_temp=0)
    step = {"activations": 0, "logits_loss": 0, "dequant_buffer": 0, "zero3_live_params": 0,
            "optimizer_step_temp": states.step_temp}
    if sum(fb.values()) >= sum(step.values()):
        phase, transient = "forward_backward", fb
    else:
        phase, transient = "optimizer_step", step
    breakdown = {k: int({**resident, **transient}.get(k, 0)) for k in COMPONENTS}
    peak = sum(breakdown.values())

    load = load_peak_bytes(job, strategy, shape, states, cal)
    eval_peak = eval_peak_bytes(job, strategy, shape, sum(resident.values()), cal)
    total = int(max(peak, load, eval_peak) * (1 + cal.allocator_slack)) + outside_allocator_bytes(job, cal)
    cpu, nvme = host_bytes(job, strategy, shape, states, cal)
    return MemoryEstimate(strategy=strategy, breakdown=breakdown, peak_allocated=peak, load_peak=load,
                          eval_peak=eval_peak, total=total,
                          cpu_bytes=sum(cpu.values()), nvme_bytes=nvme, phase=phase, cpu_breakdown=cpu)
