"""The DeepSpeed JSON for a job and a strategy: concrete values, no "auto".

orch drives the DeepSpeed engine itself, so every value is decided here from the
spec and the model shape, and the same dict is what the trainer passes to
``deepspeed.initialize``. Pure: no torch or deepspeed import.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.catalog import ModelShape
from orchestrator.spec import JobSpec
from orchestrator.strategy import STRATEGIES

# DeepSpeed's scheduler for each spec schedule.
_SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


@dataclass(frozen=True)
class BucketSizes:
    """DeepSpeed's buffer sizes for one model shape, in elements (the memory model counts their bytes)."""

    reduce_bucket_size: int
    """Gradients reduced per collective (ZeRO-2 keeps two such buckets, ZeRO-3 one)."""
    allgather_bucket_size: int
    """ZeRO-2: updated parameters all-gathered per collective."""
    stage3_prefetch_bucket_size: int
    """ZeRO-3: parameters gathered ahead of their use."""
    stage3_param_persistence_threshold: int
    """ZeRO-3: parameters smaller than this stay whole on every rank."""
    stage3_max_live_parameters: int
    """ZeRO-3: gathered parameters kept alive at most."""
    stage3_max_reuse_distance: int
    """ZeRO-3: a released parameter is kept gathered when it is used again within this many elements."""
    nvme_param_buffer_size: int
    """NVMe parameter offload: elements per swap buffer (holds the largest single parameter)."""
    nvme_optimizer_buffer_count: int = 4
    """NVMe optimizer offload: swap buffers of optimizer sub-groups in flight (DeepSpeed's default)."""
    nvme_param_buffer_count: int = 5
    """NVMe parameter offload: swap buffers in flight (DeepSpeed's default)."""


def bucket_sizes(shape: ModelShape) -> BucketSizes:
    """Communication bucket sizes scaled to the hidden size.

    These follow the rule DeepSpeed's HF integration applies for "auto"
    (reduce bucket h*h, prefetch 0.9*h*h, persistence 10*h): buckets of about one
    h x h matrix keep every collective large enough to use the link bandwidth
    without holding more than a layer's worth of extra memory.
    """
    h = shape.hidden_size
    layer = shape.layer_linear_params() + shape.layer_other_params()
    # ZeRO-3 keeps at most this many gathered parameters alive: at least two
    # decoder layers (the one computing and the one being prefetched), so the
    # prefetch never has to wait for a release; 1e9 (DeepSpeed's default) where
    # that is larger, since small models gain nothing from releasing early.
    live = max(1_000_000_000, 2 * layer)
    # NVMe parameter swapping needs a buffer that holds the largest single
    # parameter (the embedding or lm_head for most models, vocab x hidden).
    largest = max(shape.vocab_size * h, shape.hidden_size * shape.intermediate_size)
    return BucketSizes(
        reduce_bucket_size=h * h,
        allgather_bucket_size=max(h * h, 50_000_000),
        stage3_prefetch_bucket_size=int(0.9 * h * h),
        stage3_param_persistence_threshold=10 * h,
        stage3_max_live_parameters=live,
        stage3_max_reuse_distance=live,
        nvme_param_buffer_size=max(100_000_000, largest),
    )


def scheduler_block(job: JobSpec, total_steps: int) -> dict:
    """DeepSpeed's scheduler for the spec's schedule over ``total_steps`` optimizer steps.

    DeepSpeed's Warmup* schedulers reject ``warmup_num_steps: 0`` (the spec's
    default), so "no warmup" is written as one warmup step that already starts
    at the peak: min lr = max lr (WarmupLR, WarmupDecayLR) or
    ``warmup_min_ratio: 1`` (WarmupCosineLR). The first step then runs at
    training.lr, as the spec means.
    """
    t = job.training
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    start = 0.0 if warmup else t.lr
    kind = _SCHEDULERS[t.lr_schedule]
    if kind == "WarmupCosineLR":
        params = {"total_num_steps": total_steps, "warmup_num_steps": max(warmup, 1),
                  "warmup_min_ratio": 0.0 if warmup else 1.0, "cos_min_ratio": 0.1, "warmup_type": "linear"}
    elif kind == "WarmupDecayLR":
        params = {"total_num_steps": total_steps, "warmup_num_steps": max(warmup, 1), "warmup_min_lr": start,
                  "warmup_max_lr": t.lr, "warmup_type": "linear"}
    else:
        params = {"warmup_num_steps": max(warmup, 1), "warmup_min_lr": start, "warmup_max_lr": t.lr,
                  "warmup_type": "linear"}
    return {"type": kind, "params": params}


def build_ds_config(job: JobSpec, strategy: str, shape: ModelShape, total_steps: int | None = None) -> dict:
    """The DeepSpeed config dict for ``job`` run with ``strategy``.

    ``total_steps`` is the number of optimizer steps for the LR schedule; it
    defaults to ``training.max_steps``. Jobs given in epochs only know it once
    the data is tokenized, so their compiled file holds the placeholder 1 (JSON
    has no comments to say so); the trainer, having counted the steps, replaces
    that file's scheduler block before DeepSpeed reads it (``recipe.setup_ds_config``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}")
    t, hw = job.training, job.hardware
    s = STRATEGIES[strategy]
    stage, opt_dev, param_dev = s.zero_stage, s.optimizer_offload, s.param_offload
    buckets = bucket_sizes(shape)

    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_scatter=True,
            reduce_bucket_size=buckets.reduce_bucket_size,
        )
    if stage == 2:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = buckets.allgather_bucket_size
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=buckets.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=buckets.stage3_param_persistence_threshold,
            stage3_max_live_parameters=buckets.stage3_max_live_parameters,
            stage3_max_reuse_distance=buckets.stage3_max_reuse_distance,
            # orch saves LoRA adapters by gathering only adapter params, and full
            # models through the ZeRO checkpoint: no 16-bit gather of the whole model.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    for key, device in (("offload_optimizer", opt_dev), ("offload_param", param_dev)):
        if device == "cpu":
            zero[key] = {"device": "cpu", "pin_memory": True}
        elif device == "nvme":
            zero[key] = {"device": "nvme", "nvme_path": hw.nvme_path, "pin_memory": True}
            if key == "offload_optimizer":
                zero[key]["buffer_count"] = buckets.nvme_optimizer_buffer_count
            else:
                zero[key].update(buffer_count=buckets.nvme_param_buffer_count, buffer_size=buckets.nvme_param_buffer_size)

    steps = total_steps if total_steps is not None else (t.max_steps or 1)
    optimizer_params: dict = {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay}
    if opt_dev == "none":
        # torch's AdamW (foreach) needs no JIT-compiled op and is as fast as
        # FusedAdam for LoRA-sized parameter sets; offload uses DeepSpeedCPUAdam.
        optimizer_params["torch_adam"] = True
    config: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": job.grad_accum(),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": scheduler_block(job, steps),
        "zero_allow_untested_optimizer": True,
        "activation_checkpointing": {
            # orch checkpoints through transformers (gradient_checkpointing_enable);
            # DeepSpeed's own partitioned checkpointing is for Megatron models.
            "partition_activations": False,
            "cpu_checkpointing": False,
            "contiguous_memory_optimization": False,
        },
        "steps_per_print": 1_000_000_000,  # orch logs itself
        "wall_clock_breakdown": False,
        "wandb": {"enabled": False},
        "tensorboard": {"enabled": False},
        "csv_monitor": {"enabled": False},
    }
    if s.needs_nvme:
        # Async I/O for NVMe swapping: 1 MiB requests, 8 in flight per thread
        # (DeepSpeed's defaults, written out so the file says what runs).
        config["aio"] = {"block_size": 1_048_576, "queue_depth": 8, "single_submit": False, "overlap_events": True}
    dtype = job.model.dtype
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    return config
