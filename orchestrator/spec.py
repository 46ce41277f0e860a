"""The job spec: one YAML file, parsed into typed, validated objects.

Validation is strict: unknown keys, wrong types and out-of-range values are
errors. Every error is one line that names the field path, the bad value, what
is allowed and, where known, the YAML line::

    jobs/x.yaml:14: training.micro_batch_size: got -1; must be >= 1
    jobs/x.yaml (override 'training.lr=2'): training.lr: got 2; must be <= 1.0

Relative paths in a spec (data files, model folder, output dir, NVMe path) are
relative to the directory orch is run from, like other training tools; the
compiled job (`orch compile`) stores them as absolute paths.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from orchestrator import catalog, datacheck, hub
from orchestrator.errors import Exit, OrchError
from orchestrator.strategy import STRATEGIES

StrategyName = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]
Dtype = Literal["bf16", "fp16", "fp32"]
PositiveInt = Annotated[int, Field(ge=1)]

# Printable text on one line: no control characters (newlines would break
# generated scripts and one-line errors). C1 controls (U+0080-U+009F, NEL among
# them) and U+2028/U+2029 count too: Python's splitlines() breaks lines there.
# Used with fullmatch: `$` alone would let one trailing newline through.
_ONE_LINE = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]*")

# Upper bound for step counts and similar integers: far beyond any real run,
# and it keeps values inside the 32-bit ints that schedulers and Slurm use
# (an unbounded int from YAML such as 10**30 would pass validation otherwise).
MAX_COUNT = 2**31 - 1


class SpecError(OrchError):
    """A problem with a job spec. ``str()`` is one line per problem."""

    code = Exit.BAD_SPEC

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    # strict: "4" is not an int, 1.5 is not an int; YAML already gives real types.
    # allow_inf_nan=False: `.nan` and `.inf` are YAML floats; without this a NaN
    # fails a bound check with a misleading message (nan is not <= 10000) or, for
    # unbounded fields (max_grad_norm, alpha's upper side), passes.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True, allow_inf_nan=False)


def _one_line(value: str, what: str) -> str:
    if not _ONE_LINE.fullmatch(value):
        raise ValueError(f"{what} must be one line of printable text")
    # Unicode format characters (category Cf: bidi overrides such as U+202E, zero-width
    # spaces, U+FEFF) are invisible: a name or path that shows as one thing and is another,
    # or a setup line that reads differently from what the shell runs.
    hidden = next((c for c in value if unicodedata.category(c) == "Cf"), None)
    if hidden is not None:
        raise ValueError(f"{what} must not contain invisible format characters (found U+{ord(hidden):04X})")
    return value


class ModelSpec(_Section):
    name: str = Field(
        description="A built-in preset (`orch models` lists them), a local folder with a Hugging Face config.json, or a "
        "Hub id `org/name` (e.g. meta-llama/Llama-3.1-8B) read offline from the local Hugging Face cache (HF_HUB_CACHE, "
        "else HF_HOME/hub, else ~/.cache/huggingface/hub; fill it with `hf download org/name`, orch never downloads). "
        "A local folder of the same name wins over the cache. Families: llama, mistral, qwen2, qwen3, gemma2, gemma3 "
        "(text decoder; a multimodal gemma3 config plans and trains from random weights only), phi3; "
        "mixture-of-experts models are refused.")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="'pretrained' loads the weights in the model folder (or the cached Hub snapshot); 'random' builds "
        "the model from its shape with random weights (benchmarks and smoke tests, no download).",
    )
    tokenizer: Optional[str] = Field(
        None,
        description="Folder with tokenizer files. Default: the model folder (or the cached Hub snapshot); for a preset "
        "with random weights, orch builds a byte-level tokenizer so nothing is downloaded.",
    )
    dtype: Dtype = Field("bf16", description="Dtype of trainable and non-quantized weights and of mixed-precision compute.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager", "flex_attention"] = Field(
        "auto", description="Attention kernel. auto: flex_attention on a GPU when rows are packed (head_dim up to "
        "128); otherwise, and on the CPU, sdpa (eager for Gemma-2). flash_attention_2 needs the flash-attn package and "
        "bf16/fp16. Gemma-2 cannot run sdpa (transformers' sdpa has no attention soft-capping). "
        "flex_attention (GPU only) keeps packed examples apart with a block-sparse mask instead of sdpa's dense "
        "micro_batch x seq_len^2 one.",
    )

    @field_validator("name", "tokenizer")
    @classmethod
    def _text(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            if not v.strip():
                raise ValueError("must not be empty")
            _one_line(v, "value")
        return v

    def is_preset(self) -> bool:
        return self.name in catalog.PRESETS

    def folder(self) -> Optional[Path]:
        """The folder holding config.json (+ weights, tokenizer): None for a preset, the local
        folder, or the Hugging Face cache snapshot of an `org/name` id. Raises hub.NotCached."""
        if self.is_preset():
            return None
        return hub.resolve_folder(self.name)


class LoraSpec(_Section):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' (every linear layer of the decoder blocks) or a list of module names such as [q_proj, v_proj]."
    )

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one module, or be 'all-linear'")
            for name in v:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
                    raise ValueError(f"{name!r} is not a module name")
        return v


class QuantizationSpec(_Section):
    type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the absmax constants too (saves ~0.37 bits per parameter).")
    compute_dtype: Dtype = Field("bf16", description="Dtype the 4-bit weights are dequantized to for matmuls.")
    storage_dtype: Literal["auto", "uint8", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Dtype the packed 4-bit data is stored in. 'auto': the compute dtype when ZeRO-3 shards the weights "
        "(ZeRO-3 cannot shard uint8 next to bf16 params), else uint8.",
    )
    skip_modules: list[str] = Field(["lm_head"], description="Modules kept in full precision (llm_int8_skip_modules).")
    block_size: int = Field(64, description="Elements per absmax block (bitsandbytes uses 64 for 4-bit weights).")

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v not in (64, 128, 256):
            raise ValueError("must be 64, 128 or 256")
        return v

    def storage_for(self, sharded: bool) -> str:
        """The storage dtype to use, resolving 'auto'."""
        if self.storage_dtype != "auto":
            return self.storage_dtype
        return self.compute_dtype if sharded else "uint8"


DataFormat = Literal["text", "alpaca", "chat"]


def _data_path(p: str) -> str:
    if not p.strip():
        raise ValueError("a path must not be empty")
    return _one_line(p, "a path")


class SourceSpec(_Section):
    path: str = Field(description="A JSONL / JSON or Parquet file, or a folder saved with datasets' save_to_disk.")
    format: Optional[DataFormat] = Field(None, description="This source's format (text, alpaca or chat); default: data.format.")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _data_path(v)


class WeightedSourceSpec(SourceSpec):
    weight: float = Field(
        1.0, gt=0, le=1_000_000,
        description="This source's share of the examples of every epoch, relative to the other sources' weights. "
        "An epoch has as many examples N as all training sources together (after data.eval_fraction); source i gets "
        "N x weight_i / sum of weights of them, rounded down, the examples left over going one each to the largest "
        "remainders. It gives them as whole passes over its examples, then the rest drawn without replacement by "
        "training.seed: a source smaller than its share repeats, a larger one is subsampled (the draw is made once "
        "and used in every epoch). The share is of examples, not tokens: summary.json reports the tokens.")


@dataclass(frozen=True)
class DataFile:
    """One data file (or save_to_disk folder) of a source, with the spec key that names it."""

    path: str
    """The path as the spec gives it."""
    key: tuple
    """Its spec key path, for errors and YAML lines: ('data', 'paths', 2) or ('data', 'sources', 1, 'path')."""

    @property
    def field(self) -> str:
        return ".".join(map(str, self.key))


@dataclass(frozen=True)
class DataSource:
    """One source of examples as the trainer reads it: files in one format with a mixing weight."""

    files: tuple[DataFile, ...]
    """Its files, read one after the other (data.paths is one source of all its files)."""
    format: str
    """'text', 'alpaca' or 'chat'."""
    format_key: tuple
    """The spec key that sets the format: ('data', 'format'), or ('data', 'sources', i, 'format')."""
    weight: float
    """Mixing weight (1 for data.paths and for eval sources)."""

    @property
    def format_field(self) -> str:
        return ".".join(map(str, self.format_key))

    @property
    def label(self) -> str:
        """How reports name it: the file name (the first one's, with a count when data.paths has several)."""
        first = Path(self.files[0].path).name or self.files[0].path
        return first if len(self.files) == 1 else f"{first} (+{len(self.files) - 1} files)"


class DataSpec(_Section):
    paths: Optional[Annotated[list[str], Field(min_length=1)]] = Field(
        None, description="Local JSONL or Parquet files, or folders saved with datasets' save_to_disk: one source of "
        "examples in data.format, each example once per epoch. Give paths or sources.")
    sources: Optional[Annotated[list[WeightedSourceSpec], Field(min_length=1)]] = Field(
        None, description="Several sources mixed by weight, each {path, format, weight}: "
        "[{path: a.jsonl, weight: 3}, {path: b.parquet, format: chat}]. Sampled by training.seed before packing; the "
        "trainer prints and records (summary.json, metrics.jsonl) the tokens each source gave. Give paths or sources.")
    format: DataFormat = Field(
        "text", description="'text': a `text` field; 'alpaca': instruction/input/output; 'chat': a `messages` list of "
        "{role, content}. The format of data.paths and data.eval_paths, and of each source that sets none.")
    eval_paths: Optional[Annotated[list[str], Field(min_length=1)]] = Field(
        None, description="Files of the eval split (in data.format), each example evaluated once. At most one of "
        "eval_paths, eval_sources, eval_fraction.")
    eval_sources: Optional[Annotated[list[SourceSpec], Field(min_length=1)]] = Field(
        None, description="The eval split as sources {path, format}, each example evaluated once (no weights: the "
        "eval loss is over every eval example).")
    eval_fraction: Optional[float] = Field(
        None, gt=0, lt=0.5, description="Hold out this fraction of each training source's examples as the eval "
        "split: floor(fraction x examples) per source, chosen by training.seed before packing, so train and eval "
        "never share an example.")
    seq_len: int = Field(2048, ge=8, le=1_048_576, description="Tokens per sequence.")
    packing: bool = Field(True, description="Pack several examples into each sequence (no padding waste); attention does not cross example borders where the kernel supports it.")
    mask_prompt: bool = Field(True, description="Leave prompt tokens out of the loss (alpaca and chat formats).")

    @field_validator("paths", "eval_paths")
    @classmethod
    def _paths(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for p in v or []:
            _data_path(p)
        return v

    @model_validator(mode="after")
    def _one_form(self) -> "DataSpec":
        if (self.paths is None) == (self.sources is None):
            raise ValueError("data.paths: give exactly one of data.paths (one source) or data.sources (a weighted mix)")
        given = [name for name in ("eval_paths", "eval_sources", "eval_fraction") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"data.{given[1]}: give at most one of data.eval_paths, data.eval_sources or data.eval_fraction")
        return self

    def train_sources(self) -> list[DataSource]:
        """The training sources: data.paths as one source, or one per data.sources item."""
        if self.paths is not None:
            files = tuple(DataFile(p, ("data", "paths", i)) for i, p in enumerate(self.paths))
            return [DataSource(files, self.format, ("data", "format"), 1.0)]
        return [DataSource((DataFile(s.path, ("data", "sources", i, "path")),), s.format or self.format,
                           ("data", "sources", i, "format"), s.weight) for i, s in enumerate(self.sources or [])]

    def eval_split_sources(self) -> list[DataSource]:
        """The sources of an eval split read from files (eval_paths / eval_sources); [] otherwise."""
        if self.eval_paths is not None:
            files = tuple(DataFile(p, ("data", "eval_paths", i)) for i, p in enumerate(self.eval_paths))
            return [DataSource(files, self.format, ("data", "format"), 1.0)]
        return [DataSource((DataFile(s.path, ("data", "eval_sources", i, "path")),), s.format or self.format,
                           ("data", "eval_sources", i, "format"), 1.0) for i, s in enumerate(self.eval_sources or [])]

    def has_eval(self) -> bool:
        """True when the job has an eval split."""
        return self.eval_fraction is not None or bool(self.eval_split_sources())


class TrainingSpec(_Section):
    micro_batch_size: Union[
        Literal["auto"], Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 65536})]
    ] = Field(
        1, description="Sequences per GPU per forward pass. 'auto': the planner picks the fastest that fits, among the "
        "divisors of global_batch_size / GPUs (the global batch stays as given).")
    global_batch_size: int = Field(
        8, ge=1, le=16_777_216,
        description="Sequences per optimizer step over all GPUs. Must be a multiple of micro_batch_size x GPUs; "
        "the quotient is the gradient accumulation.",
    )
    gradient_checkpointing: Union[Literal["auto"], bool] = Field(
        True, description="Recompute activations in the backward pass: much less memory, ~30% more compute. 'auto': "
        "the planner decides, with the micro batch, by predicted speed under the memory limit.")
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, le=MAX_COUNT, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_COUNT, description="Optimizer steps to run. Give max_steps or epochs.")
    epochs: Optional[float] = Field(None, gt=0, le=10000, description="Passes over the data set. Give max_steps or epochs.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds model init (random weights), data shuffling and dropout.")
    loss_chunk_tokens: int = Field(
        4096, ge=0, le=16_777_216,
        description="Tokens per chunk of LM head + cross-entropy (each chunk recomputed in backward), so fp32 logits "
        "for the whole vocabulary exist for one chunk only; 0 computes all logits at once (more memory).",
    )
    save_every: int = Field(0, ge=0, le=MAX_COUNT, description="Checkpoint every N optimizer steps (0: only at the end).")
    eval_every: int = Field(
        0, ge=0, le=MAX_COUNT, description="Evaluate on the eval split (data.eval_paths, eval_sources or eval_fraction) "
        "every N optimizer steps; 0: only at the end. The eval loss is the sum of token losses over the whole split "
        "divided by its loss tokens, the same for any number of GPUs.")
    eval_micro_batch_size: Optional[int] = Field(
        None, ge=1, le=65536, description="Sequences per GPU per eval forward pass (no gradients, so it can be larger "
        "than micro_batch_size); default: micro_batch_size. The planner fits the larger of the training and eval peaks.")
    early_stopping_patience: Optional[int] = Field(
        None, ge=0, le=MAX_COUNT, description="Stop after this many evals in a row without a lower eval loss (needs "
        "eval_every > 0); 0 or unset: never stop early.")
    compile: Union[Literal["auto"], bool] = Field(
        "auto", description="torch.compile each decoder layer (one compiled graph shared by all layers): faster steps "
        "after a compile of about a minute at the start. auto: on for CUDA GPUs, off on the CPU.",
    )
    engine: Literal["auto", "deepspeed", "plain"] = Field(
        "auto", description="Training engine. plain: PyTorch only, for strategy single_gpu in bf16/fp32 (same "
        "arithmetic as DeepSpeed's stage 0, less overhead per step); deepspeed: DeepSpeed's engine; auto: plain where "
        "it can run, else deepspeed. Resume with the engine that wrote the checkpoint.",
    )
    output_dir: str = Field("runs/{name}", description="Where checkpoints, adapters and metrics go; {name} is the job name made safe for paths.")

    @field_validator("micro_batch_size")
    @classmethod
    def _micro(cls, v: Union[str, int]) -> Union[str, int]:
        # bounds here, not in the type: inside the union pydantic would report each branch separately
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1")
        if isinstance(v, int) and v > 65536:
            raise ValueError("must be <= 65536")
        return v

    @field_validator("output_dir")
    @classmethod
    def _out(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return _one_line(v, "a path")

    @model_validator(mode="after")
    def _length(self) -> "TrainingSpec":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("training.max_steps: give exactly one of training.max_steps or training.epochs")
        return self


class HardwareSpec(_Section):
    nodes: int = Field(1, ge=1, le=4096, description="Nodes (machines).")
    gpus_per_node: int = Field(1, ge=1, le=64, description="GPUs per node.")
    gpu: Optional[str] = Field(
        "H100-80GB", description=f"GPU model (any case), sets gpu_memory_gb. Known: {', '.join(catalog.GPUS)}."
    )
    gpu_memory_gb: Optional[float] = Field(None, gt=0, le=4096, description="Usable memory per GPU in GiB; overrides `gpu`.")
    host_ram_gb: float = Field(256, gt=0, le=65536, description="Host RAM per node in GiB (for CPU offload).")
    cpus_per_node: int = Field(16, ge=1, le=4096, description="CPU cores per node for the Slurm request.")
    nvme_path: Optional[str] = Field(None, description="Local NVMe folder on every node, for NVMe offload strategies.")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        # Any case: a100-80gb is A100-80GB (stored, and printed, by its catalog name).
        by_lower = {name.lower(): name for name in catalog.GPUS}
        if v.lower() in by_lower:
            return by_lower[v.lower()]
        close = difflib.get_close_matches(v.lower(), list(by_lower), n=1)
        hint = f" (did you mean {by_lower[close[0]]}?)" if close else ""
        raise ValueError(f"unknown GPU{hint}; known: {', '.join(catalog.GPUS)}, or set gpu_memory_gb")

    @field_validator("nvme_path")
    @classmethod
    def _nvme(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _one_line(v, "a path")

    @model_validator(mode="after")
    def _memory(self) -> "HardwareSpec":
        if self.gpu is None and self.gpu_memory_gb is None:
            raise ValueError("hardware.gpu: set hardware.gpu or hardware.gpu_memory_gb")
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def gpu_memory_bytes(self) -> int:
        if self.gpu_memory_gb is not None:
            return int(self.gpu_memory_gb * catalog.GIB)
        return catalog.GPUS[self.gpu].memory_mib * catalog.MIB  # type: ignore[index]

    def gpu_tflops(self) -> float:
        """Dense 16-bit peak of the GPU (H100 when only a memory size is given)."""
        return catalog.GPUS[self.gpu or "H100-80GB"].peak_tflops


# #SBATCH options that orch writes itself (orchestrator/slurm.py), or that contradict one it
# writes, with what to do instead. slurm.extra_sbatch may not set them: both lines would
# reach the script and which one wins would be sbatch's business, not the spec's.
SBATCH_OPTIONS_ORCH_WRITES: dict[str, str] = {
    "--nodes": "set hardware.nodes",
    "--ntasks": "orch runs one launcher task per node",
    "--ntasks-per-node": "orch runs one launcher task per node",
    "--ntasks-per-gpu": "orch runs one launcher task per node",
    "--gpus": "set hardware.gpus_per_node",
    "--gpus-per-node": "set hardware.gpus_per_node",
    "--gpus-per-task": "set hardware.gpus_per_node",
    "--cpus-per-task": "set hardware.cpus_per_node",
    "--cpus-per-gpu": "set hardware.cpus_per_node",
    "--mem": "set slurm.mem_gb",
    "--mem-per-cpu": "set slurm.mem_gb",
    "--mem-per-gpu": "set slurm.mem_gb",
    "--time": "set slurm.time",
    "--job-name": "set name",
    "--output": "orch writes the log where `orch logs` finds it",
    "--error": "orch writes the log where `orch logs` finds it",
    "--open-mode": "orch appends, so a requeued run continues its log",
    "--signal": "set slurm.signal_seconds",
    "--requeue": "orch requeues a job that checkpointed on USR1",
    "--no-requeue": "orch requeues a job that checkpointed on USR1",
    "--partition": "set slurm.partition",
    "--account": "set slurm.account",
    "--qos": "set slurm.qos",
}


def _sbatch_conflict(line: str) -> Optional[str]:
    """Why an extra #SBATCH line may not be used, or None. sbatch reads long options with
    getopt, which also takes an unambiguous prefix (--tim=1:00 is --time), so prefixes count;
    --gres asks for GPUs when one of its items is gpu[:...]."""
    name = re.match(r"--[^=\s]*", line).group()  # type: ignore[union-attr]  # _extra checked the "--"
    taken = name if name in SBATCH_OPTIONS_ORCH_WRITES else next(
        (o for o in SBATCH_OPTIONS_ORCH_WRITES if len(name) > 2 and o.startswith(name)), None)
    if taken is not None:
        shown = taken if taken == name else f"{taken} (abbreviated)"
        return f"{line!r} sets {shown}, which orch writes itself: {SBATCH_OPTIONS_ORCH_WRITES[taken]}"
    if name == "--gres":
        items = re.split(r"[\s=,]+", line[len(name):])
        if any(item == "gpu" or item.startswith("gpu:") for item in items):
            return f"{line!r} asks for GPUs, which orch writes itself as --gpus-per-node: set hardware.gpus_per_node"
    return None


class SlurmSpec(_Section):
    partition: Optional[str] = Field(None, description="Slurm partition (-p).")
    account: Optional[str] = Field(None, description="Slurm account (-A).")
    qos: Optional[str] = Field(None, description="Slurm QOS.")
    time: str = Field("24:00:00", description="Time limit, [D-]HH:MM:SS.")
    mem_gb: Optional[int] = Field(None, ge=1, le=1_048_576, description="Host memory to request per node in GiB (default: hardware.host_ram_gb).")
    extra_sbatch: list[str] = Field(
        [],
        description="Extra #SBATCH options, e.g. ['--exclusive', '--constraint=h100']. An option orch writes itself "
        f"is rejected (also abbreviated, and --gres with gpu): {', '.join(SBATCH_OPTIONS_ORCH_WRITES)}; "
        "set its spec field (hardware.nodes, slurm.time, ...) instead.",
    )
    setup: list[str] = Field([], description="Shell lines run before launch (module load, conda activate). Trusted: they run as written.")
    signal_seconds: int = Field(300, ge=10, le=86400, description="Seconds before the time limit at which Slurm tells orch to checkpoint.")

    @field_validator("partition", "account", "qos")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.,:+-]+", v):
            raise ValueError("must be letters, digits and _ . , : + - only")
        return v

    @field_validator("time", mode="before")
    @classmethod
    def _time_read_as_number(cls, v: Any) -> Any:
        # YAML 1.1 reads an unquoted 24:00:00 as a base-60 integer (86400): say so, with the
        # text the user most likely wrote, instead of only "must be a string".
        if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
            digits = []
            n = v
            while n:
                n, d = divmod(n, 60)
                digits.append(d)
            text = ":".join([str(digits[-1])] + [f"{d:02d}" for d in reversed(digits[:-1])])
            raise ValueError(f'YAML reads an unquoted {text} as the base-60 number {v}: quote it, "{text}"')
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str) -> str:
        # Only forms that Slurm and time_seconds() read the same way: Slurm takes a bare
        # "MM:SS" as minutes:seconds, so "00:20" would be 20 seconds there, 20 minutes here.
        m = re.fullmatch(r"(\d{1,3})-(\d{1,2})(?::(\d{2})(?::(\d{2}))?)?|(\d{1,4}):(\d{2}):(\d{2})", v)
        if not m:
            raise ValueError("must look like HH:MM:SS or D-HH:MM:SS")
        minutes, seconds = (m.group(3), m.group(4)) if m.group(1) else (m.group(6), m.group(7))
        if int(minutes or 0) > 59 or int(seconds or 0) > 59:
            raise ValueError("minutes and seconds must be 00-59")
        if not any(int(x) for x in m.groups() if x):
            raise ValueError("must be more than zero (Slurm reads 0 as no limit)")
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        for line in v:
            _one_line(line, "an #SBATCH option")
            if not line.startswith("--"):
                raise ValueError(f"{line!r} must be a long option starting with '--'")
            conflict = _sbatch_conflict(line)
            if conflict:
                raise ValueError(conflict)
        return v

    @field_validator("setup")
    @classmethod
    def _setup(cls, v: list[str]) -> list[str]:
        for line in v:
            _one_line(line, "a setup line")
        return v

    @model_validator(mode="after")
    def _signal_before_end(self) -> "SlurmSpec":
        if self.signal_seconds >= self.time_seconds():
            raise ValueError(
                f"slurm.signal_seconds: {self.signal_seconds} s must be less than slurm.time "
                f"({self.time} = {self.time_seconds()} s), or the checkpoint signal comes before the job starts working"
            )
        return self

    def time_seconds(self) -> int:
        days, _, rest = self.time.rpartition("-")
        parts = [int(x) for x in rest.split(":")]
        while len(parts) < 3:
            parts.append(0)
        h, m, s = parts
        return (int(days) if days else 0) * 86400 + h * 3600 + m * 60 + s


class LoggingSpec(_Section):
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="'offline' writes runs locally (sync later with `wandb sync`); 'online' needs WANDB_API_KEY in the environment."
    )
    wandb_project: str = Field("orch", description="wandb project.")
    wandb_entity: Optional[str] = Field(None, description="wandb entity (team or user).")
    log_every: int = Field(1, ge=1, le=MAX_COUNT, description="Log loss, memory and throughput every N optimizer steps.")

    @field_validator("wandb_project", "wandb_entity")
    @classmethod
    def _ident(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", v):
            raise ValueError("must be 1-128 letters, digits, _ . -")
        return v


class JobSpec(_Section):
    """A whole finetuning job."""

    name: str = Field(min_length=1, max_length=128, description="Job name: shown in Slurm and logs; file names use a path-safe form of it.")
    model: ModelSpec = Field(description="The model to finetune: preset, local folder or cached Hub id; weights, dtype.")
    method: Literal["qlora", "lora", "full"] = Field(description="qlora: 4-bit base + LoRA; lora: bf16 base + LoRA; full: all weights trained.")
    lora: LoraSpec = Field(LoraSpec(), description="LoRA settings (qlora and lora).")
    quantization: QuantizationSpec = Field(QuantizationSpec(), description="4-bit settings (qlora).")
    data: DataSpec = Field(description="Training data: files, format, sequence length.")
    training: TrainingSpec = Field(description="Batch sizes, optimizer and length of training.")
    hardware: HardwareSpec = Field(HardwareSpec(), description="What the job runs on.")
    strategy: Literal["auto", StrategyName] = Field(  # type: ignore[valid-type]
        "auto", description="'auto' lets the planner choose the fastest strategy that fits; or force one: "
        + "; ".join(f"{s.name} ({s.description})" for s in STRATEGIES.values()) + "."
    )
    slurm: SlurmSpec = Field(SlurmSpec(), description="Slurm batch settings.")
    logging: LoggingSpec = Field(LoggingSpec(), description="Metrics logging.")

    @field_validator("name")
    @classmethod
    def _job_name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return _one_line(v, "the name")

    @model_validator(mode="after")
    def _cross(self) -> "JobSpec":
        world = self.hardware.world_size
        micro = self.training.micro_batch_size
        if micro == "auto" and self.training.global_batch_size % world:
            # auto chooses among the divisors of global / GPUs: there must be one (micro batch 1 at least)
            raise ValueError(
                f"training.global_batch_size: {self.training.global_batch_size} must be a multiple of the "
                f"{world} GPUs for micro_batch_size auto to have a choice")
        if micro != "auto" and self.training.global_batch_size % (micro * world):
            raise ValueError(
                f"training.global_batch_size: {self.training.global_batch_size} must be a multiple of "
                f"micro_batch_size x GPUs = {micro} x {world} = {micro * world}"
            )
        self._check_eval()
        if self.strategy == "single_gpu" and world != 1:
            raise ValueError(f"strategy: single_gpu needs exactly 1 GPU, but hardware gives {world}")
        if self.strategy != "auto" and STRATEGIES[self.strategy].needs_nvme and not self.hardware.nvme_path:
            raise ValueError(f"hardware.nvme_path: strategy {self.strategy} needs a local NVMe folder here")
        if self.model.attn_implementation == "flash_attention_2" and self.model.dtype == "fp32":
            raise ValueError("model.attn_implementation: flash_attention_2 needs model.dtype bf16 or fp16")
        self._check_bf16()
        if self.training.engine == "plain":
            if self.model.dtype == "fp16":
                raise ValueError("training.engine: plain runs model.dtype bf16 or fp32 (fp16 needs DeepSpeed's loss "
                                 "scaling); use auto or deepspeed")
            if world != 1 or self.strategy not in ("auto", "single_gpu"):
                raise ValueError(f"training.engine: plain runs strategy single_gpu on 1 GPU only (here strategy "
                                 f"{self.strategy} on {world}); use auto or deepspeed")
        return self

    def _check_eval(self) -> None:
        """Eval settings need an eval split, and early stopping needs evals to compare."""
        t = self.training
        for name in ("eval_every", "eval_micro_batch_size", "early_stopping_patience"):
            if getattr(t, name) and not self.data.has_eval():
                raise ValueError(f"training.{name}: there is no eval split; set data.eval_paths, data.eval_sources "
                                 "or data.eval_fraction")
        if t.early_stopping_patience and not t.eval_every:
            raise ValueError("training.early_stopping_patience: needs training.eval_every > 0 (with evals only at the "
                             "end there is nothing to stop early)")

    def _check_bf16(self) -> None:
        """A GPU without bf16 (V100) gets no bf16 dtype: its kernels would fail or emulate it slowly."""
        gpu = self.hardware.gpu
        if gpu is None or catalog.GPUS[gpu].bf16:
            return
        used = [("model.dtype", self.model.dtype)]
        if self.method == "qlora":  # (storage_dtype only holds packed bytes: no bf16 arithmetic)
            used.append(("quantization.compute_dtype", self.quantization.compute_dtype))
        for path, dtype in used:
            if dtype == "bf16":
                raise ValueError(f"{path}: hardware.gpu {gpu} has no bf16; set {path}: fp16 (or fp32)")

    # Derived values: methods, so they stay consistent with the fields.
    def slug(self) -> str:
        """The name made safe for file names: no separators, no leading dot."""
        return safe_name(self.name)

    def knobs_resolved(self) -> bool:
        """True when no speed knob is 'auto' (the planner resolves them: planner.resolve)."""
        return "auto" not in (self.training.micro_batch_size, self.training.gradient_checkpointing)

    def grad_accum(self) -> int:
        if self.training.micro_batch_size == "auto":
            raise ValueError("grad_accum of a job whose micro_batch_size is still auto: resolve it first (planner.resolve)")
        return self.training.global_batch_size // (self.training.micro_batch_size * self.hardware.world_size)

    def eval_micro_batch(self) -> int:
        """Sequences per GPU per eval forward: training.eval_micro_batch_size, else the training micro batch."""
        if self.training.eval_micro_batch_size is not None:
            return self.training.eval_micro_batch_size
        if self.training.micro_batch_size == "auto":
            raise ValueError("eval_micro_batch of a job whose micro_batch_size is still auto: resolve it first (planner.resolve)")
        return self.training.micro_batch_size

    def output_dir(self) -> Path:
        return Path(self.training.output_dir.replace("{name}", self.slug()))

    def shape(self) -> catalog.ModelShape:
        """The model's shape: a preset, or the config.json of the folder (local or cached)."""
        folder = self.model.folder()
        if folder is None:
            return catalog.PRESETS[self.model.name]
        return catalog.load_config_json(folder)


SLUG_MAX = 100
"""Longest slug: file names stay well inside the usual 255-byte limit."""
_SLUG_HASH = re.compile(r".*_[0-9a-f]{8}")


def safe_name(name: str) -> str:
    """``name`` as one safe path component: letters, digits, ``. _ -``, not starting with ``. _ -``.

    A name that is already such a component (and no longer than SLUG_MAX) is kept as it
    is, so committed examples keep their file names. Any other name loses characters on
    the way, and two names could lose them to the same slug (``模型一`` and ``模型二``):
    it gets ``_`` and 8 hex digits of its SHA-256 appended. A kept name never ends that way
    (one that does is hashed too), so distinct names give distinct slugs unless two names
    with the same readable part share a 32-bit hash.
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    if base == name and len(name) <= SLUG_MAX and not _SLUG_HASH.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{base[:SLUG_MAX - 9] or 'job'}_{digest}"


# ---------------------------------------------------------------------------
# Loading: YAML -> dict (with line numbers) -> overrides -> JobSpec -> file checks


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a tiny file could otherwise expand into a huge object graph."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not allowed in job specs")
        return super().compose_node(parent, index)


# YAML 1.1 (PyYAML) reads 3e-4 and 1e5 as strings: a float needs a dot there.
# People write learning rates as 3e-4, so also resolve YAML 1.2 exponent floats.
_NoAliasLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _line_map(node: yaml.Node, prefix: tuple = (), out: Optional[dict] = None,
              duplicates: Optional[list] = None) -> dict[tuple, int]:
    """Map each key path to the 1-based YAML line where it appears.

    ``duplicates`` collects (path, first_line, line) for keys given twice in one
    mapping: YAML loaders silently keep the last one, which hides typos such as
    two ``training:`` sections.
    """
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key, value in node.value:
            key_value = key.value if isinstance(key, yaml.ScalarNode) else repr(key.value)
            path = prefix + (key_value,)
            if key_value in seen and duplicates is not None:
                duplicates.append((path, out[path], key.start_mark.line + 1))
            else:
                out[path] = key.start_mark.line + 1
            seen.add(key_value)
            _line_map(value, path, out, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _line_map(item, prefix + (i,), out, duplicates)
    return out


@dataclass
class _Source:
    label: str
    """What error lines start with: the job file's path."""
    lines: dict[tuple, int]
    """Key path -> 1-based YAML line."""
    overrides: dict[tuple, str] = field(default_factory=dict)
    """Key path -> the `key=value` override that set it (errors there name the override, not a file line)."""


MAX_SPEC_BYTES = 1_000_000


def read_yaml(path: Path) -> tuple[dict, _Source]:
    """Read a job file into a plain dict and a key->line map. Raises SpecError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise SpecError([f"{path}: is a directory, expected a YAML job file"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot read ({exc.strerror})"]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"{path}: {len(raw)} bytes is too large for a job spec (limit {MAX_SPEC_BYTES})"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path}: not UTF-8 text (bad byte at offset {exc.start})"]) from None
    return parse_yaml_text(text, str(path))


def _load_yaml_value(text: str) -> Any:
    """yaml.load without aliases. Raises yaml.YAMLError, or ValueError for an
    integer literal longer than Python's int-parsing limit (4300 digits)."""
    return yaml.load(text, Loader=_NoAliasLoader)


MAX_FLOW_DEPTH = 64
"""Deepest [ ] / { } nesting accepted. Real specs use 1-2 levels; PyYAML parses
recursively, and a file of thousands of '[' costs about a second before it hits
Python's recursion limit. Counting brackets first rejects such files at once
(brackets inside quoted strings count too: harmless at this limit)."""


def _too_deep(text: str) -> Optional[int]:
    """The 1-based line where [ / { nesting first exceeds MAX_FLOW_DEPTH, or None."""
    depth = 0
    for m in re.finditer(r"[\[\]{}]", text):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_FLOW_DEPTH:
                return text.count("\n", 0, m.start()) + 1
        else:
            depth = max(depth - 1, 0)
    return None


def parse_yaml_text(text: str, label: str) -> tuple[dict, _Source]:
    deep_line = _too_deep(text)
    if deep_line is not None:
        raise SpecError([f"{label}:{deep_line}: YAML nested too deeply (more than {MAX_FLOW_DEPTH} levels of [ or {{)"])
    try:
        node = yaml.compose(text, Loader=_NoAliasLoader)
        data = _load_yaml_value(text) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{label}{where}: invalid YAML: {' '.join(str(problem).split())}"]) from None
    except RecursionError:
        raise SpecError([f"{label}: YAML nested too deeply"]) from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors fail with plain Python errors
        # int() of > 4300 digits raises ValueError; `!!timestamp x` raises AttributeError
        # inside PyYAML. Either way the file holds a value YAML cannot build.
        raise SpecError([f"{label}: invalid YAML value ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{label}: expected a mapping of sections (name, model, method, data, training, ...), got {type(data).__name__}"])
    duplicates: list = []
    try:
        lines = _line_map(node, duplicates=duplicates)
    except RecursionError:
        raise SpecError([f"{label}: YAML nested too deeply"]) from None
    if duplicates:
        raise SpecError([
            f"{label}:{line}: {_path_text(path)}: duplicate key (first given on line {first})"
            for path, first, line in duplicates
        ])
    return data, _Source(label, lines)


_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; the value is parsed as YAML (so 4 is an int, true a bool)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not _OVERRIDE_KEY.fullmatch(key):
            raise SpecError([f"override {item!r}: expected dotted.key=value, e.g. training.micro_batch_size=4"])
        try:
            value = _load_yaml_value(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. "a: b: c"): keep the text; validation judges it
        except Exception:  # noqa: BLE001 - as in parse_yaml_text: huge ints, bad explicit tags
            raise SpecError([f"override {item[:80]!r}: value is not a usable YAML scalar or list"]) from None
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError([f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section"])
            node = child
        node[parts[-1]] = value
    return data


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_branch_tag(part: Any) -> bool:
    """pydantic names union branches and validator functions in ``loc``
    ("literal['all-linear']", "list[str]", "function-after[...]"): not user keys.
    Field names are plain identifiers, so anything with a bracket or a type name is a tag."""
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "list", "dict") or part.startswith(("function-", "union"))
    )


def _path_text(loc: tuple) -> str:
    """A key path for messages: plain keys joined by dots, odd keys (an unknown key with
    spaces, dots or a newline in it) quoted by repr so the message stays one unambiguous line."""
    parts = []
    for p in loc:
        text = str(p)
        if not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            text = repr(text if len(text) <= 40 else text[:40] + "...")  # shorten first: the quotes stay closed
        parts.append(text)
    return ".".join(parts)


def _tag_positions(loc: tuple, data: Any) -> list[int]:
    """Indexes in ``loc`` that are pydantic branch tags. A part that looks like a tag but
    is a key the user wrote (an unknown key called `str` or `a[1]`) is not one: it is
    what the message must name."""
    tags = []
    node = data
    for i, p in enumerate(loc):
        present = isinstance(node, dict) and p in node
        if _is_branch_tag(p) and not present:
            tags.append(i)
            continue
        if present:
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            node = node[p]
        else:
            node = None
    return tags


def _user_loc(loc: tuple, data: Any) -> tuple:
    """``loc`` without pydantic's branch tags: the path as the user wrote it."""
    tags = set(_tag_positions(loc, data))
    return tuple(p for i, p in enumerate(loc) if i not in tags)


# pydantic's messages, said the way the rest of orch says them.
_PLAIN = {
    "greater_than_equal": lambda c: f"must be >= {c['ge']}",
    "greater_than": lambda c: f"must be > {c['gt']}",
    "less_than_equal": lambda c: f"must be <= {c['le']}",
    "less_than": lambda c: f"must be < {c['lt']}",
    "int_type": lambda c: "must be an integer",
    "int_parsing": lambda c: "must be an integer",
    "float_type": lambda c: "must be a number",
    "float_parsing": lambda c: "must be a number",
    "finite_number": lambda c: "must be a finite number (not NaN or infinity)",
    "bool_type": lambda c: "must be true or false",
    "string_type": lambda c: "must be a string",
    "list_type": lambda c: "must be a list",
    "model_type": lambda c: "must be a section (a mapping of keys)",
    "dict_type": lambda c: "must be a section (a mapping of keys)",
}


def _where(loc: tuple, src: _Source) -> str:
    """`file:line`, or `file (override 'k=v')` when an override set this value."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in src.overrides:
            return f"{src.label} (override {_describe(src.overrides[loc[:n]])})"
    for n in range(len(loc), 0, -1):
        line = src.lines.get(loc[:n])
        if line:
            return f"{src.label}:{line}"
    return src.label


def _format_error(err: dict, data: dict, src: _Source) -> str:
    loc = _user_loc(err["loc"], data)
    path = _path_text(loc) or "(top level)"
    where = _where(loc, src)
    kind = err["type"]
    msg = err["msg"].removeprefix("Value error, ")
    # Cross-field checks name their own field ("training.x: ..."): use it as the path.
    named = re.match(r"^([a-z_]+(?:\.[a-z_]+)*): (.*)$", msg)
    if named and named.group(1).split(".")[0] in JobSpec.model_fields:
        path, msg = named.group(1), named.group(2)
        return f"{_where(tuple(path.split('.')), src)}: {path}: {msg}"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: {path}: unknown key; {hint}allowed: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: {path}: required field is missing"
    got = f"got {_describe(err.get('input'))}; " if "input" in err else ""
    if kind == "literal_error":
        msg = "allowed: " + msg.removeprefix("Input should be ")
    elif kind in _PLAIN:
        msg = _PLAIN[kind](err.get("ctx") or {})
    return f"{where}: {path}: {got}{msg}"


def _merge_union_errors(errors: list[dict], data: Any) -> list[dict]:
    """One error per union-typed field instead of one per branch.

    For ``target_modules: 5`` pydantic reports "not 'all-linear'" and "not a
    list" separately, which reads as two problems. When a branch got further
    (the value is a list, one item is wrong), only that branch's errors matter;
    otherwise the branches' expectations are joined into one message.
    """
    groups: dict[tuple, list[dict]] = {}
    out: list = []
    for err in errors:
        loc = err["loc"]
        cut = next((i for i in _tag_positions(loc, data) if not str(loc[i]).startswith("function-")), None)
        if cut is None:
            out.append(err)
            continue
        key = loc[:cut]
        if key not in groups:
            groups[key] = []
            out.append(key)  # placeholder keeps the original order
        groups[key].append(dict(err, _branch_depth=len(loc) - cut - 1))
    merged: list[dict] = []
    for item in out:
        if isinstance(item, dict):
            merged.append(item)
            continue
        branch_errors = groups[item]
        deeper = [e for e in branch_errors if e["_branch_depth"] > 0]
        if deeper:
            merged.extend(deeper)
            continue
        wants = []
        for e in branch_errors:
            want = e["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
            if e["type"] == "list_type":
                want = "a list"
            if want not in wants:
                wants.append(want)
        first = branch_errors[0]
        merged.append({"type": "union", "loc": item, "msg": "must be " + " or ".join(wants), "input": first.get("input")})
    return merged


def _section_type(ann: Any) -> tuple[Optional[type[BaseModel]], bool]:
    """(the section model a field holds, whether as list items): ``X``, ``Optional[X]``, ``list[X]``,
    ``Optional[Annotated[list[X], ...]]`` all give X."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    if getattr(ann, "__metadata__", None) is not None or (len(args) == 1 and getattr(ann, "__origin__", None) is Union):
        return _section_type(args[0]) if args else (None, False)
    if getattr(ann, "__origin__", None) is list and args:
        return _section_type(args[0])[0], True
    return None, False


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = JobSpec
    in_list = False
    for part in loc:
        if in_list and isinstance(part, int):
            in_list = False  # the item of a list of sections
            continue
        field_info = model.model_fields.get(str(part))
        found, in_list = _section_type(getattr(field_info, "annotation", None) if field_info else None)
        if found is None:
            return None
        model = found
    return None if in_list else model


MAX_PROBLEMS = 20
"""At most this many problems are listed for one spec."""


def validate_dict(data: dict, src: _Source) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = _merge_union_errors(exc.errors(include_url=False), data)
        problems: list[str] = []
        for err in errors:
            line = _format_error(err, data, src)
            if line not in problems:
                problems.append(line)
        if len(problems) > MAX_PROBLEMS:
            # A file of 4000 unknown keys should not print 4000 lines.
            hidden = len(problems) - MAX_PROBLEMS
            problems = problems[:MAX_PROBLEMS] + [f"{src.label}: (top level): {hidden} more problems not shown"]
        raise SpecError(problems) from None
    except RecursionError:
        raise SpecError([f"{src.label}: spec nested too deeply"]) from None


def check_files(job: JobSpec, label: str, for_training: bool = False, lines: Optional[dict[tuple, int]] = None) -> None:
    """Checks that need the file system: data files exist and their first rows fit data.format
    (orchestrator/datacheck.py), model folder has config.json, LoRA targets are layers of the model.

    ``for_training`` adds what only training needs (weights to load); plan and
    compile work from the shape alone. ``lines`` (key path -> YAML line) adds
    the line to each message.
    """
    lines = lines or {}

    def at(*key: Any) -> str:
        line = lines.get(key) or lines.get(key[:-1]) or lines.get(key[:1])
        return f"{label}:{line}" if line else label

    problems = []
    for source in job.data.train_sources() + job.data.eval_split_sources():
        for file in source.files:
            problem = _data_file_problem(file, source)
            if problem is not None:
                key, message = problem
                problems.append(f"{at(*key)}: {'.'.join(map(str, key))}: {message}")
    problems += _model_problems(job, for_training, at)
    if job.model.tokenizer is not None and not Path(job.model.tokenizer).is_dir():
        problems.append(f"{at('model', 'tokenizer')}: model.tokenizer: {job.model.tokenizer!r} is not a folder")
    unknown_targets = _unknown_lora_targets(job)
    if unknown_targets:
        problems.append(f"{at('lora', 'target_modules')}: lora.target_modules: {unknown_targets}")
    if problems:
        raise SpecError(problems)


def _data_file_problem(file: DataFile, source: DataSource) -> Optional[tuple[tuple, str]]:
    """(spec key to name, message) of the first problem of one data file, or None: it exists, has a data
    suffix, can be opened, and its first rows fit the source's format (datacheck)."""
    path, p = Path(file.path), file.path
    if not path.exists():
        return file.key, f"{p!r} does not exist"
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        return file.key, f"{p!r} is not .jsonl, .json or .parquet (or a save_to_disk folder)"
    if path.is_file():
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            return file.key, f"cannot read {p!r} ({exc.strerror})"
    found = datacheck.check_data_path(p, source.format, file.key, source.format_key)
    return None if found is None else (found.key, found.message)


def _unknown_lora_targets(job: JobSpec) -> str:
    """Why lora.target_modules names something that is not a linear layer of the model's decoder
    blocks, or ''. Those layers are what the planner counts LoRA weights for; PEFT skips a name it
    does not find (and fails after the queue wait when it finds none)."""
    if job.method == "full" or job.lora.target_modules == "all-linear":
        return ""
    try:
        linears = list(job.shape().linear_shapes())
    except ValueError:
        return ""  # model.name is wrong: reported on its own
    unknown = [name for name in job.lora.target_modules if name not in linears]
    if not unknown:
        return ""
    close = difflib.get_close_matches(unknown[0], linears, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = "is not a linear layer" if len(unknown) == 1 else "are not linear layers"
    return (f"{', '.join(map(repr, unknown))} {what} of {job.model.name}'s decoder blocks{hint}; "
            f"they are: {', '.join(linears)} (or all-linear)")


def _model_problems(job: JobSpec, for_training: bool, at: Callable[..., str]) -> list[str]:
    """model.name resolves to a preset or a folder (local, or the Hugging Face cache snapshot of
    an org/name id) with a supported config.json; the family runs with the chosen attention;
    training from pretrained weights finds them."""
    try:
        folder = job.model.folder()
    except hub.NotCached as exc:
        return [f"{at('model', 'name')}: model.name: {exc}"]
    if folder is None:
        shape = catalog.PRESETS[job.model.name]
    else:
        if not folder.is_dir():
            close = difflib.get_close_matches(job.model.name, catalog.PRESETS, n=1)
            hint = f" (did you mean preset {close[0]!r}?)" if close else f"; presets: {', '.join(catalog.PRESETS)}"
            return [f"{at('model', 'name')}: model.name: {job.model.name!r} is neither a preset nor a folder{hint}"]
        try:
            shape = catalog.load_config_json(folder)
        except ValueError as exc:
            return [f"{at('model', 'name')}: model.name: {exc}"]
    problems = []
    attn = job.model.attn_implementation
    if attn == "sdpa" and not shape.family.sdpa:
        problems.append(f"{at('model', 'attn_implementation')}: model.attn_implementation: {shape.model_type} cannot run "
                        "with sdpa (transformers' sdpa has no attention-logit soft-capping); use eager or flash_attention_2")
    if for_training and job.model.weights == "pretrained":
        if folder is None:
            problems.append(
                f"{at('model', 'weights')}: model.weights: preset {job.model.name!r} comes without weights; "
                "use weights: random, or set model.name to a local folder (or cached org/name) with weights"
            )
        elif shape.multimodal:
            problems.append(
                f"{at('model', 'weights')}: model.weights: {job.model.name!r} is a multimodal {shape.model_type} checkpoint; "
                "orch trains its text decoder from random weights only (weights: random); for pretrained weights use a "
                "text-only checkpoint (model_type gemma3_text)")
        elif not catalog.has_weights(folder):
            problems.append(f"{at('model', 'name')}: model.name: {job.model.name!r} has no *.safetensors or pytorch_model*.bin weights to train from")
    return problems


def _override_paths(overrides: list[str]) -> dict[tuple, str]:
    """Key path -> override text, for overrides already checked by apply_overrides."""
    return {tuple(item.partition("=")[0].split(".")): item for item in overrides}


def load_job(
    path: Union[str, Path], overrides: Optional[list[str]] = None, check_paths: bool = True, for_training: bool = False,
    warnings: Optional[list[str]] = None,
) -> JobSpec:
    """Read, override, validate. Raises SpecError with one line per problem.

    ``warnings``, when given, receives one line per setting that is valid but probably not
    what was meant (the CLI prints them; the job still runs).
    """
    path = Path(path)
    overrides = list(overrides or [])
    data, src = read_yaml(path)
    data = apply_overrides(data, overrides)
    src.overrides = _override_paths(overrides)
    job = validate_dict(data, src)
    if check_paths:
        check_files(job, str(path), for_training, lines=src.lines)
    if warnings is not None:
        warnings += job_warnings(job, src)
    return job


def with_overrides(job: JobSpec, overrides: list[str]) -> JobSpec:
    """``job`` with ``overrides`` applied and validated again, as `orch validate JOB OVERRIDES...`
    validates them (the files are the job's and were checked with it). Raises SpecError."""
    data = apply_overrides(job.model_dump(mode="json"), overrides)
    return validate_dict(data, _Source(job.name, {}, _override_paths(overrides)))


def job_warnings(job: JobSpec, src: _Source) -> list[str]:
    """Valid settings that are probably mistakes, one line each, naming the field."""
    out = []
    t = job.training
    if t.max_steps is not None and t.warmup_steps >= t.max_steps:
        out.append(f"{_where(('training', 'warmup_steps'), src)}: training.warmup_steps: {t.warmup_steps} warmup steps "
                   f"for {t.max_steps} training steps: the learning rate never gets past warmup")
    try:
        shape = job.shape()
    except ValueError:
        shape = None  # a model folder without a usable config.json: check_files says so
    if shape is not None and job.data.seq_len > shape.max_position_embeddings:
        out.append(f"{_where(('data', 'seq_len'), src)}: data.seq_len: {job.data.seq_len} is above {job.model.name}'s "
                   f"max_position_embeddings {shape.max_position_embeddings}: the model never saw such positions")
    return out


def json_schema() -> dict:
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "orch job spec"
    return schema


def dump_job(job: JobSpec) -> str:
    """The spec as YAML, every default filled in (the compiled job the trainer reads)."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

