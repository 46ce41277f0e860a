"""Which speed levers a run uses: the engine, compiled decoder layers and the attention kernel.

Pure and torch-free. The spec's ``training.engine``, ``training.compile`` and
``model.attn_implementation`` may say ``auto``; the functions here turn them into what
runs, and both sides call the same functions:

* the planner's memory and speed models (``memory.estimate``, ``planner.step_seconds``)
  for the job's own GPUs (``cuda=True``): orch plans for the run the trainer will make;
* the trainer (``modeling.attn_implementation``, ``engine.choose_engine``,
  ``speedups.compile_wanted``) for the device it got, so a CPU test run of the same job
  gets sdpa and eager layers while its GPU run gets flex attention and compiled layers.

What each lever changes in memory is in ``orchestrator/engine.py`` (PlainEngine) and
``orchestrator/speedups.py`` (compiled layers, flex attention); ``memory.py`` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from orchestrator.catalog import ModelShape
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import JobSpec
from orchestrator.strategy import STRATEGIES

ENGINES = ("auto", "deepspeed", "plain")
"""Values of training.engine."""
FLEX_MAX_HEAD_DIM = 128
"""Largest head_dim auto gives flex attention. Its backward kernel at head_dim 256 (Gemma-2/3)
needs more shared memory per block than consumer GPUs have (101,376 B on sm_89/sm_12x:
pytorch/pytorch#133254, #198224) and was never run here on any GPU; head_dim 128 is what the
H100 measurements used (issue 16). An explicit flex_attention still runs at any head_dim."""


@dataclass(frozen=True)
class EngineFacts:
    """What decides whether PlainEngine can run a job, from the spec (planner) or the
    DeepSpeed config the trainer was given (a compiled ``--ds-config`` may have been edited)."""

    zero_stage: int
    """DeepSpeed ZeRO stage: PlainEngine partitions nothing, so only stage 0."""
    fp16: bool
    """fp16 mixed precision: it needs dynamic loss scaling, which only DeepSpeed's engine has here."""
    optimizer: str
    """The optimizer type: PlainEngine runs AdamW (what orch's DeepSpeed config always says)."""

    @classmethod
    def of_job(cls, job: JobSpec, strategy: str) -> "EngineFacts":
        """As ``deepspeed_config.build_ds_config(job, strategy, ...)`` would write them."""
        return cls(zero_stage=STRATEGIES[strategy].zero_stage, fp16=job.model.dtype == "fp16", optimizer="AdamW")

    @classmethod
    def of_deepspeed(cls, config: dict) -> "EngineFacts":
        return cls(zero_stage=config.get("zero_optimization", {}).get("stage", 0),
                   fp16=bool(config.get("fp16", {}).get("enabled")),
                   optimizer=config.get("optimizer", {}).get("type"))

    def unsupported_reason(self) -> Optional[str]:
        """Why PlainEngine cannot run this, or None when it can."""
        if self.zero_stage != 0:
            return f"ZeRO stage {self.zero_stage} partitions state across processes, which needs DeepSpeed"
        if self.fp16:
            return "model.dtype fp16 needs dynamic loss scaling, which only the DeepSpeed engine implements here"
        if self.optimizer != "AdamW":
            return f"optimizer {self.optimizer!r}: PlainEngine runs AdamW only"
        return None


class EngineError(OrchError):
    """PlainEngine cannot run this job (one line naming training.engine). A checkpoint it cannot
    load raises checkpoint.CheckpointError, which the trainer already reports."""

    code = Exit.BAD_SPEC


def choose_engine(setting: str, facts: EngineFacts) -> str:
    """'plain' or 'deepspeed' for ``training.engine`` = ``setting``.

    auto: plain wherever it can run (one device, bf16/fp32), DeepSpeed elsewhere.
    plain: plain, or EngineError naming the field when it cannot run.
    """
    if setting not in ENGINES:
        raise ValueError(f"unknown engine {setting!r}")
    reason = facts.unsupported_reason()
    if setting == "plain" and reason:
        raise EngineError(f"training.engine: plain cannot run this job: {reason}; use auto or deepspeed")
    if setting == "deepspeed" or reason:
        return "deepspeed"
    return "plain"


def engine(job: JobSpec, strategy: str) -> str:
    """The engine the trainer runs ``job`` with under ``strategy``: 'plain' or 'deepspeed'."""
    return choose_engine(job.training.engine, EngineFacts.of_job(job, strategy))


def compile_wanted(setting: Union[str, bool], cuda: bool, zero_stage: int) -> bool:
    """``training.compile`` resolved: auto compiles on CUDA, unless ZeRO-3 partitions the parameters.

    Under ZeRO-3 DeepSpeed gathers each linear layer's weight in hooks that run inside the
    decoder layer; they would break the fullgraph trace (believed from DeepSpeed marking its
    gather code ``torch.compiler.disable``; not run here), so auto leaves compilation off there
    and ``true`` tries it. On the CPU inductor compiles slowly and buys little.
    """
    if setting == "auto":
        return cuda and zero_stage < 3
    return bool(setting)


def compiled(job: JobSpec, strategy: str, cuda: bool = True) -> bool:
    """Whether the trainer compiles ``job``'s decoder layers under ``strategy`` on that device."""
    return compile_wanted(job.training.compile, cuda, STRATEGIES[strategy].zero_stage)


def family_attention(shape: ModelShape) -> str:
    """The kernel a family runs without flex attention: sdpa, or eager where transformers' sdpa
    cannot run it (Gemma-2's attention-logit soft-capping)."""
    return "sdpa" if shape.family.sdpa else "eager"


def attention(job: JobSpec, shape: ModelShape, cuda: bool = True) -> str:
    """``model.attn_implementation`` resolved for a run on CUDA (``cuda``) or the CPU.

    An explicit value stays (the trainer checks it can run: ``modeling.attn_implementation``).
    auto:

    * CPU: the family's kernel (sdpa; eager for Gemma-2). PyTorch has no CPU backward for flex.
    * CUDA, rows packed (``data.packing``), head_dim <= FLEX_MAX_HEAD_DIM: flex_attention.
      sdpa would get a dense micro_batch x seq_len^2 block mask and leave its flash kernel
      (measured on an H100, QLoRA 8B micro batch 4, issue 16: packed 6,500 tok/s with sdpa's
      mask, 7,453 with flex; 9,160 with flex and compiled layers vs 8,690 with sdpa and them).
      transformers' flex path carries what the other families need: Gemma-2's soft-capping as a
      score_mod, sliding windows (Gemma-2/3, Phi-3, Mistral) as mask functions composed with the
      packed-example mask (``masking_utils.create_sliding_window_causal_mask``, 5.17 and 5.23).
    * CUDA, rows not packed: sdpa, which runs ``is_causal`` on its flash kernel without a mask;
      Gemma-2 (no sdpa) takes flex there too, at head_dim <= FLEX_MAX_HEAD_DIM.
    * otherwise the family's kernel.
    """
    setting = job.model.attn_implementation
    if setting != "auto":
        return setting
    fallback = family_attention(shape)
    if not cuda or shape.head_dim_ > FLEX_MAX_HEAD_DIM:
        return fallback
    if job.data.packing or fallback != "sdpa":
        return "flex_attention"
    return fallback


@dataclass(frozen=True)
class Levers:
    """The speed levers one run uses, every auto resolved."""

    engine: str
    """'plain' (orchestrator.engine.PlainEngine) or 'deepspeed'."""
    compile: bool
    """Decoder layers compiled with torch.compile (orchestrator.speedups)."""
    attention: str
    """The attention kernel: sdpa, flex_attention, eager or flash_attention_2."""


def resolve(job: JobSpec, strategy: str, shape: ModelShape, cuda: bool = True) -> Levers:
    """Every lever of ``job`` under ``strategy`` on CUDA (``cuda``, what the planner assumes) or the CPU."""
    return Levers(engine=engine(job, strategy), compile=compiled(job, strategy, cuda),
                  attention=attention(job, shape, cuda))
