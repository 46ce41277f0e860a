"""`orch export RUN_DIR --out DIR`: a run's latest complete checkpoint as a plain Hugging Face model folder.

DIR gets what ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
load with neither orch nor PEFT installed: ``config.json`` (model.dtype, use_cache on), the weights
as safetensors (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards and
``model.safetensors.index.json`` past ``max_shard_bytes``), the tokenizer the run trained with,
``generation_config.json`` when the model folder has one, and ``orch_export.json`` (what was
exported from where and, for lora/qlora, how far the exported model's logits are from orch's own
forward on a fixed batch). The adapter-only PEFT folder the trainer writes (``RUN_DIR/adapter``)
is left as it is.

The source is the run's ``job.yaml`` (compiler.write_run_job) and one complete checkpoint (its
COMPLETE marker is written), never a partial one: the latest (default), the best eval's
(``--checkpoint best``: summary.json's ``best_checkpoint``), or a named step (``--checkpoint
stepNNNNNNNN``):

* full: every weight is read from the checkpoint one tensor at a time and cast to model.dtype.
  PlainEngine's ``plain_engine.pt`` and DeepSpeed's stage 0-2 ``mp_rank_00_model_states.pt`` hold
  the whole module; they are memory-mapped, so a tensor is read from disk when it is written.
  ZeRO-3 keeps only each rank's fp32 partition of the flattened parameters; DeepSpeed's own
  reader (``zero_to_fp32`` in lazy mode: the partition files memory-mapped) joins one parameter's
  pieces at a time. A bf16 run's fp32 masters round to exactly its bf16 weights.
* lora: the base is rebuilt as the trainer built it (modeling.load_model: the model folder's
  weights, or the same seeded random weights), the adapters are loaded from the checkpoint, and
  each adapted linear layer is written as W + (alpha / r) B A, summed in fp32 and rounded once to
  model.dtype.
* qlora: the same with W the dequantized 4-bit weight, the values the 4-bit forward multiplies
  with. That is not bit-identical to the 4-bit forward, which adds the two products in the
  compute dtype instead of rounding their sum's weights; `measure` says by how much.

Memory: the shard being filled (at most ``max_shard_bytes``) plus the tensor being read; for
lora/qlora also the model as the trainer held it on one device (the 4-bit base for qlora) plus
one merged weight at a time -- the whole exported model is never in memory at once.

It runs on GPU 0 when there is one, else on the CPU. A lora/qlora run from ``weights: random``
must be exported on the kind of device it trained on: CUDA and CPU random generators give
different numbers for the same seed, so the rebuilt base would not be the trained one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from orchestrator import catalog, hub
from orchestrator import checkpoint as C
from orchestrator import modeling as M
from orchestrator.compiler import RUN_JOB_FILE
from orchestrator.errors import Exit, OrchError
from orchestrator.spec import JobSpec, SpecError, load_job, with_overrides

METADATA_FILE = "orch_export.json"
"""What the export folder says about itself (ExportResult as JSON)."""
IN_PROGRESS = ".orch-export-in-progress"
"""Marks ``<DIR>.tmp`` as orch's own while it is written, so an interrupted export's leftovers can be removed."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Largest safetensors file (5 GB, a common size on the Hub); a single larger tensor gets a file of its own."""
MODULE_PREFIX = "lm."
"""What the trainer's module (modeling.CausalLMLoss, attribute ``lm``) puts before every checkpoint name."""
BATCH_ROWS, BATCH_TOKENS, BATCH_SEED = 2, 64, 0
"""The fixed batch `measure` runs: 2 rows of 64 token ids drawn from the vocabulary with seed 0."""
ZERO3_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"
DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
"""DeepSpeed's model file: ZeRO-3 (one per rank, parameters partitioned) and stage 0-2 (the whole module)."""


class ExportError(OrchError):
    """The run cannot be exported, or DIR cannot take it (one line)."""

    code = Exit.BAD_SPEC


# ---------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class Run:
    """What `orch export` reads from a run folder."""

    folder: Path
    """The run's output dir (training.output_dir)."""
    job: JobSpec
    """The job that trained it, from ``<folder>/job.yaml``."""
    checkpoint: C.CheckpointInfo
    """The complete checkpoint to export (`pick_checkpoint`)."""


LATEST, BEST = "latest", "best"
"""`orch export --checkpoint` values besides a step's folder name."""


def pick_checkpoint(folder: Path, which: str) -> C.CheckpointInfo:
    """The complete checkpoint of the run in ``folder`` that ``which`` names: LATEST, BEST (the best
    eval's, as the run's summary.json records it) or a folder name under checkpoints/ (stepNNNNNNNN).
    ExportError (one line) when there is none such."""
    root = folder / "checkpoints"
    if which == LATEST:
        info = C.latest(root)
        if info is None:
            raise ExportError(f"{folder}: no complete checkpoint in {root} (a checkpoint is complete once its "
                              f"{C.MARKER} marker is written); nothing to export")
        return info
    tag = which
    if which == BEST:
        try:
            tag = json.loads((folder / "summary.json").read_text()).get("best_checkpoint")
        except (OSError, ValueError, AttributeError):
            tag = None
        if not tag:
            raise ExportError(f"--checkpoint best: {folder / 'summary.json'} names no best checkpoint (the run has no "
                              "eval split, or has not finished); give --checkpoint latest or stepNNNNNNNN")
    if "/" in tag or tag in ("", ".", ".."):
        raise ExportError(f"--checkpoint: {which!r} is not a checkpoint folder name (latest, best or stepNNNNNNNN)")
    info = C.read_info(root / tag)
    if info is None:
        raise ExportError(f"--checkpoint {which}: {root / tag} is not a complete checkpoint")
    return info


def read_run(folder: Path, which: str = LATEST) -> Run:
    """The run in ``folder`` with the checkpoint ``which`` names (`pick_checkpoint`). ExportError (one
    line) when there is no readable job or no such complete checkpoint."""
    job_file = folder / RUN_JOB_FILE
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such run folder")
    if not job_file.is_file():
        raise ExportError(f"{job_file}: no such file; the trainer writes it when a run starts, so {folder} is not a "
                          "run folder, or its run started before orch wrote job.yaml")
    try:
        job = load_job(job_file, check_paths=False)  # the training data may be gone: export does not read it
    except SpecError as exc:
        raise ExportError(f"cannot read the run's job: {str(exc).splitlines()[0]}") from None
    try:
        model_folder = job.model.folder()
    except hub.NotCached as exc:
        raise ExportError(f"{job_file}: model.name: {exc}") from None
    if model_folder is not None and not (model_folder / "config.json").is_file():
        raise ExportError(f"{job_file}: model.name: {model_folder} has no config.json (the run's model folder moved?)")
    if model_folder is not None and job.method != "full" and job.model.weights == "pretrained" \
            and not catalog.has_weights(model_folder):
        raise ExportError(f"{job_file}: model.name: {model_folder} has no weights; a {job.method} export merges the "
                          "adapters into the base the run trained on")
    return Run(folder, job, pick_checkpoint(folder, which))


class CheckpointWeights:
    """The weights in one checkpoint folder by parameter name (the trained module's names without
    MODULE_PREFIX), each read only when asked for."""

    def __init__(self, info: C.CheckpointInfo, method: str):
        self.path = info.path
        """The checkpoint folder."""
        self._tensors = {name.removeprefix(MODULE_PREFIX): t for name, t in _open(info, method).items()}

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor on the CPU (ZeRO-3: its pieces from every rank's partition joined)."""
        return self._tensors[name].contiguous()


def _open(info: C.CheckpointInfo, method: str) -> dict:
    """Name -> tensor (memory-mapped) or DeepSpeed GatheredTensor (``.contiguous()`` joins it), by layout."""
    folder = info.path
    if C.written_by(folder) == "plain":
        return torch.load(folder / C.PLAIN_STATE_FILE, map_location="cpu", mmap=True, weights_only=True)["module"]
    if (folder / ZERO3_MODEL_FILE).is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not orch's output
            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=info.tag, lazy_mode=True,
                                                            exclude_frozen_parameters=method != "full")
    if (folder / DEEPSPEED_MODEL_FILE).is_file():
        # DeepSpeed's own file (its config and client state are pickled objects, hence weights_only=False)
        return torch.load(folder / DEEPSPEED_MODEL_FILE, map_location="cpu", mmap=True, weights_only=False)["module"]
    raise ExportError(f"{folder}: has neither PlainEngine's {C.PLAIN_STATE_FILE} nor DeepSpeed's model files")


# ---------------------------------------------------------------------------
# the Hugging Face layout and where each tensor comes from


@dataclass(frozen=True)
class HFLayout:
    """The Hugging Face model class of the run's config and the tensors its folder holds."""

    architecture: str
    """Class name for config.json's ``architectures`` (LlamaForCausalLM, ...)."""
    keys: tuple[str, ...]
    """State-dict keys written, in the model's order; a tied tensor once, under its first name."""
    tied: tuple[str, ...]
    """The other names of tied tensors (lm_head.weight with tied embeddings): not written, from_pretrained ties them."""


def hf_layout(config, dtype: torch.dtype) -> HFLayout:
    """What ``AutoModelForCausalLM.from_config(config)`` holds, from a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    keys, tied, seen = [], [], set()
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        (tied if id(tensor) in seen else keys).append(name)
        seen.add(id(tensor))
    return HFLayout(type(skeleton).__name__, tuple(keys), tuple(tied))


def checkpoint_source(weights: CheckpointWeights, layout: HFLayout) -> Callable[[str], torch.Tensor]:
    """Full finetune: each key's tensor straight from the checkpoint, which must hold exactly the model's weights."""
    missing = [k for k in layout.keys if k not in weights.names]
    unknown = [n for n in weights.names if n not in layout.keys and n not in layout.tied]
    if missing or unknown:
        raise ExportError(f"{weights.path}: does not hold the weights of the run's job.yaml model ({len(missing)} missing, "
                          f"e.g. {missing[:1]}; {len(unknown)} unknown, e.g. {unknown[:1]})")
    return weights.tensor


def load_adapted(job: JobSpec, weights: CheckpointWeights, device: torch.device) -> M.LoadedModel:
    """The model as the trainer held it, in eval mode: the base rebuilt by modeling.load_model (one process,
    nothing sharded), its LoRA weights from the checkpoint."""
    loaded = M.load_model(job, "single_gpu", device, job.training.seed)
    trainable = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    known = set(loaded.model.state_dict())
    missing = [n for n in trainable if n not in weights.names]
    unknown = [n for n in weights.names if n not in known]
    if missing or unknown:
        raise ExportError(f"{weights.path}: its adapters are not those of the run's job.yaml ({len(missing)} missing, "
                          f"e.g. {missing[:1]}; {len(unknown)} unknown, e.g. {unknown[:1]})")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights.tensor(name))
    loaded.model.eval()
    return loaded


def _is_4bit(p) -> bool:
    return type(p).__name__ == "Params4bit"


def _lora_layer(module: nn.Module):
    """``module`` when it is a PEFT LoRA layer, else None."""
    from peft.tuners.lora import LoraLayer

    return module if isinstance(module, LoraLayer) else None


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer a LoRA layer wraps (its weight and bias are the base's), or ``module`` itself."""
    lora = _lora_layer(module)
    return lora.get_base_layer() if lora is not None else module


def _merged_unit(module: nn.Module) -> bool:
    """A layer whose exported weight is computed, not copied: LoRA-adapted (merged) or 4-bit (dequantized)."""
    return _lora_layer(module) is not None or _is_4bit(getattr(module, "weight", None))


def exported_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a LoRA-adapted or 4-bit linear layer has in the export: its base weight (dequantized when
    4-bit: the values the 4-bit forward multiplies with) plus, when adapted, (alpha / r) B A; summed in fp32 and
    rounded once to ``dtype``."""
    lora = _lora_layer(module)
    weight = _base_layer(module).weight
    if _is_4bit(weight):
        import bitsandbytes as bnb

        weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    merged = weight.float()
    if lora is not None:
        for name in lora.active_adapters:
            merged = merged + (lora.lora_B[name].weight.float() @ lora.lora_A[name].weight.float()) * lora.scaling[name]
    return merged.to(dtype)


def model_source(base: nn.Module, dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """lora/qlora: each key's tensor from the in-memory model, merged or dequantized where `_merged_unit` says."""

    def tensor(key: str) -> torch.Tensor:
        path, _, attr = key.rpartition(".")
        module = base.get_submodule(path)
        if attr == "weight" and _merged_unit(module):
            return exported_weight(module, dtype)
        return getattr(_base_layer(module), attr)

    return tensor


# ---------------------------------------------------------------------------
# 4-bit / unmerged vs exported, on a fixed batch


@dataclass(frozen=True)
class Difference:
    """The exported model's logits vs orch's own forward (the trainer's model: adapters unmerged, the 4-bit
    base for qlora) on `fixed_batch`."""

    tokens: int
    """Positions compared (rows x tokens per row; tokens is data.seq_len when that is shorter)."""
    max_abs: float
    """Largest |exported logit - orch logit|."""
    max_logit: float
    """Largest |orch logit|: the scale max_abs is to be read against."""
    top1_agreement: float
    """Fraction of positions where both pick the same most likely next token."""


def fixed_batch(vocab: int, seq_len: int) -> torch.Tensor:
    """The batch `measure` compares on: BATCH_ROWS rows of BATCH_TOKENS (at most seq_len) token ids, seed BATCH_SEED."""
    tokens = min(BATCH_TOKENS, seq_len)
    return torch.randint(0, vocab, (BATCH_ROWS, tokens), generator=torch.Generator().manual_seed(BATCH_SEED))


def measure(base: nn.Module, dtype: torch.dtype, vocab: int, seq_len: int, device: torch.device) -> Difference:
    """Run the fixed batch twice in one forward: rows [0, n) through orch's model as it is, rows [n, 2n)
    with every merged unit's output replaced by the exported weight's (a forward hook). Everything
    else -- embeddings, norms, attention, the head -- is the same code on independent rows, so the
    second half is the exported model's forward, with one merged weight in memory at a time."""
    ids = fixed_batch(vocab, seq_len)
    lora_bases = {id(_base_layer(m)) for m in base.modules() if _lora_layer(m) is not None}
    units = [m for m in base.modules() if _merged_unit(m) and id(m) not in lora_bases]

    def exported_second_half(module, args, output):
        x = args[0]
        tail = torch.nn.functional.linear(x[BATCH_ROWS:], exported_weight(module, dtype), _base_layer(module).bias)
        return torch.cat([output[:BATCH_ROWS], tail.to(output.dtype)])

    hooks = [m.register_forward_hook(exported_second_half) for m in units]
    try:
        with torch.no_grad():
            logits = base(input_ids=torch.cat([ids, ids]).to(device), use_cache=False).logits.float()
    finally:
        for h in hooks:
            h.remove()
    orch, exported = logits[:BATCH_ROWS], logits[BATCH_ROWS:]
    return Difference(tokens=ids.numel(), max_abs=(exported - orch).abs().max().item(),
                      max_logit=orch.abs().max().item(),
                      top1_agreement=(exported.argmax(-1) == orch.argmax(-1)).float().mean().item())


# ---------------------------------------------------------------------------
# writing


class ShardWriter:
    """Tensors into safetensors files of at most ``max_bytes`` each (a larger tensor gets a file of its own),
    each file written as soon as the next tensor would not fit; `close` gives the files Hugging Face's names
    and writes the index when there is more than one."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        """Tensor names of each file written so far."""
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()  # a memory-mapped tensor is read when written
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.shards)}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        os.chmod(path, 0o644)  # safetensors creates it private; a model folder is for sharing, like config.json
        self.shards.append(list(self.pending))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending; return the weight file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"part-{i}.safetensors").rename(self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {key: name for name, keys in zip(names, self.shards) for key in keys}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _start_output(out: Path) -> Path:
    """``<out>.tmp``, created empty and marked as orch's; refuses an ``out`` that is anything but an empty folder."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(f"--out: {out} exists and is not an empty folder; orch export never overwrites, name a new one")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        if not (tmp / IN_PROGRESS).is_file():
            raise ExportError(f"--out: {tmp} exists and orch export did not make it; move it away")
        shutil.rmtree(tmp)  # left by an interrupted export
    tmp.mkdir(parents=True)
    (tmp / IN_PROGRESS).touch()
    return tmp


def _write_config(config, layout: HFLayout, dtype: torch.dtype, folder: Path) -> None:
    config = copy.deepcopy(config)
    config.architectures = [layout.architecture]
    config.dtype = dtype
    config.use_cache = True  # for generation; the trainer turned it off
    config.save_pretrained(folder)


@dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote; also ``DIR/orch_export.json``."""

    out: str
    """The export folder."""
    run: str
    """The run folder it came from."""
    job: str
    """The job's name."""
    method: str
    """qlora, lora or full."""
    checkpoint: str
    """The checkpoint folder read."""
    step: int
    """Its optimizer step."""
    dtype: str
    """model.dtype: the dtype of every floating-point weight written."""
    files: list[str]
    """The safetensors files."""
    difference: Optional[Difference]
    """lora/qlora: exported vs orch's own forward on the fixed batch; None for full (the weights are the checkpoint's)."""
    note: str
    """How the weights were made, in a sentence."""


NOTES = {
    "full": "the checkpoint's weights cast to model.dtype (a bf16 run's fp32 masters round to exactly its bf16 weights)",
    "lora": "each adapted layer is W + (alpha/r) B A, summed in fp32 and rounded once to model.dtype; orch's forward adds "
            "the two products instead, so logits differ by rounding",
    "qlora": "the adapters merged into the dequantized 4-bit base: not bit-identical to the 4-bit forward (each merged "
             "weight is rounded to model.dtype, and the exported model computes in model.dtype, not the 4-bit compute dtype)",
}


def export_run(run_dir: Path, out: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               device: Optional[torch.device] = None, which: str = LATEST) -> ExportResult:
    """Export the complete checkpoint ``which`` names (`pick_checkpoint`) of ``run_dir`` into the new
    folder ``out`` (see the module docstring).

    Everything is written into ``<out>.tmp``, which becomes ``out`` only when complete; on failure it is removed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run = read_run(Path(os.path.abspath(run_dir)), which)
    out = Path(os.path.abspath(out))
    tmp = _start_output(out)
    try:
        result = _export(run, out, tmp, max_shard_bytes, device or _device())
        (tmp / IN_PROGRESS).unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _export(run: Run, out: Path, tmp: Path, max_shard_bytes: int, device: torch.device) -> ExportResult:
    from orchestrator import data as D

    job = run.job
    dtype = M.torch_dtype(job.model.dtype)
    config = M.hf_config(job)
    layout = hf_layout(config, dtype)
    weights = CheckpointWeights(run.checkpoint, job.method)
    difference = None
    if job.method == "full":
        source = checkpoint_source(weights, layout)
    else:
        # Nothing trains here: no checkpointing; eager attention runs the one forward (the fixed batch) on any
        # device, whatever kernel training used.
        build = with_overrides(job, ["model.attn_implementation=eager", "training.gradient_checkpointing=false"])
        loaded = load_adapted(build, weights, device)
        difference = measure(loaded.base, dtype, config.vocab_size, job.data.seq_len, device)
        source = model_source(loaded.base, dtype)
    writer = ShardWriter(tmp, max_shard_bytes)
    for key in layout.keys:
        tensor = source(key)
        writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    files = writer.close()
    _write_config(config, layout, dtype, tmp)
    D.load_tokenizer(job, job.shape().vocab_size).save_pretrained(str(tmp))
    model_folder = job.model.folder()
    if model_folder is not None and (model_folder / "generation_config.json").is_file():
        shutil.copy2(model_folder / "generation_config.json", tmp / "generation_config.json")
    result = ExportResult(out=str(out), run=str(run.folder), job=job.name, method=job.method,
                          checkpoint=str(run.checkpoint.path), step=run.checkpoint.step, dtype=job.model.dtype,
                          files=files, difference=difference, note=NOTES[job.method])
    (tmp / METADATA_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def render(result: ExportResult) -> str:
    """What `orch export` prints."""
    lines = [f"exported {result.job} ({result.method}, step {result.step}) to {result.out}: "
             f"{len(result.files)} safetensors file(s), {result.dtype}",
             f"  {result.note}"]
    d = result.difference
    if d is not None:
        lines.append(f"  measured on a fixed batch ({d.tokens} positions): exported logits differ from orch's own forward "
                     f"by at most {d.max_abs:.3g} (logits up to {d.max_logit:.3g}); the top-1 token agrees at "
                     f"{100 * d.top1_agreement:.1f} % of positions")
    lines.append(f"  load it with AutoModelForCausalLM.from_pretrained({result.out!r}); details in {METADATA_FILE}")
    return "\n".join(lines)
