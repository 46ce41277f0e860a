"""Evaluation during training (trainer side): the eval loss over the whole eval split, and early stopping.

The eval loss is (sum of token losses over every eval row) / (loss tokens of the eval split). Each
rank sums its micro batches' token losses and loss tokens (`data.EvalBatches` gives every eval row
to exactly one rank; padding rows add nothing), and one all-reduce adds the two sums over the ranks.
Dividing once at the end, not averaging per-batch or per-rank means, makes the number independent of
the world size and of the eval micro batch: batches hold different numbers of loss tokens.

`EarlyStopping` is pure bookkeeping over the sequence of eval losses (no torch): which eval is a new
best, and when ``patience`` evals in a row have not improved on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from orchestrator.data import IGNORE, EvalBatches


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of the whole eval split."""

    loss: float
    """Sum of token losses / loss tokens, over every eval row on every rank."""
    perplexity: float
    """exp(loss) (inf when the loss is too large for a float)."""
    tokens: int
    """Loss tokens evaluated (all ranks together): the eval split's loss tokens."""


def evaluate(engine, batches: EvalBatches, rank: int, device: torch.device) -> EvalResult:
    """Evaluate ``engine`` on this rank's share of the eval split; collective when ``batches.world`` > 1.

    ``engine`` is the trainer's engine (DeepSpeed's or engine.PlainEngine) around modeling.CausalLMLoss:
    ``engine(input_ids, position_ids, targets, scale)`` returns scale x the summed token losses of the
    micro batch. It runs in eval mode (no dropout) under torch.no_grad and is put back in the mode it had.
    """
    was_training = engine.module.training
    engine.eval()
    # float64: a split of millions of tokens sums losses without losing the last digits
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [summed token losses, loss tokens]
    one = torch.ones((), dtype=torch.float32, device=device)
    try:
        with torch.no_grad():
            for micro in range(batches.micro_batches):
                arrays = batches.micro_batch_arrays(micro, rank)
                b = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
                sums[0] += engine(b["input_ids"], b["position_ids"], b["targets"], one).double()
                sums[1] += int((arrays["targets"] != IGNORE).sum())
    finally:
        engine.train(was_training)
    if batches.world > 1:
        torch.distributed.all_reduce(sums)
    loss_sum, tokens = sums.tolist()
    loss = loss_sum / max(tokens, 1.0)
    return EvalResult(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, tokens=int(tokens))


@dataclass(frozen=True)
class Verdict:
    """What one eval decides."""

    new_best: bool
    """The eval loss is lower than every earlier one by more than min_delta (the first eval always is)."""
    stop: bool
    """``patience`` evals in a row have not been a new best: stop training."""


@dataclass
class EarlyStopping:
    """The best eval loss so far and how many evals since it; decides new best / stop per eval."""

    patience: Optional[int]
    """Evals in a row without a new best that stop training (training.early_stopping_patience); None or 0: never."""
    min_delta: float = 0.0
    """A new best must be lower than the best so far by more than this."""
    best_loss: Optional[float] = None
    """The lowest eval loss so far (None before the first eval)."""
    best_step: Optional[int] = None
    """The optimizer step of that eval."""
    evals_since_best: int = 0
    """Evals since the best one."""

    def update(self, step: int, loss: float) -> Verdict:
        """Record the eval of ``step`` with ``loss``."""
        if self.best_loss is None or loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.evals_since_best = loss, step, 0
            return Verdict(new_best=True, stop=False)
        self.evals_since_best += 1
        return Verdict(new_best=False, stop=bool(self.patience) and self.evals_since_best >= self.patience)


@dataclass
class Evals:
    """A run's eval split and what its evals found so far (Trainer.evals; the trainer has None without a split)."""

    batches: EvalBatches
    """This run's eval micro batches (every eval row once over all ranks)."""
    stopping: EarlyStopping
    """Best eval loss, its step, and the early-stopping decision."""
    last: Optional[EvalResult] = None
    """The latest eval (None before the first)."""
    last_step: Optional[int] = None
    """The optimizer step of the latest eval."""
    stopped_early: bool = False
    """Early stopping ended training."""

    def record(self, step: int, result: EvalResult) -> Verdict:
        """Keep the eval of ``step`` and decide new best / stop."""
        self.last, self.last_step = result, step
        verdict = self.stopping.update(step, result.loss)
        self.stopped_early = self.stopped_early or verdict.stop
        return verdict

    def state(self) -> dict:
        """What a checkpoint keeps of the evals so far (in its client state; plain numbers): a resumed
        run goes on with the same best eval and early-stopping count."""
        s = self.stopping
        return {"best_loss": s.best_loss, "best_step": s.best_step, "evals_since_best": s.evals_since_best,
                "last": None if self.last is None else asdict(self.last), "last_step": self.last_step}

    def restore(self, state: Optional[dict]) -> None:
        """Go on from a checkpoint's `state` (None: a checkpoint from before orch kept it: start afresh)."""
        if state is None:
            return
        s = self.stopping
        s.best_loss, s.best_step, s.evals_since_best = state["best_loss"], state["best_step"], state["evals_since_best"]
        self.last = None if state["last"] is None else EvalResult(**state["last"])
        self.last_step = state["last_step"]

    def summary(self, checkpoint_root: Path) -> dict:
        """summary.json's eval fields; best_checkpoint is the best step's checkpoint folder when it was saved."""
        from orchestrator.checkpoint import MARKER, tag_for

        best = self.stopping.best_step
        saved = best is not None and (checkpoint_root / tag_for(best) / MARKER).is_file()
        return {"eval_loss": self.last.loss if self.last else None,
                "eval_ppl": self.last.perplexity if self.last else None,
                "eval_step": self.last_step, "eval_tokens": self.last.tokens if self.last else None,
                "best_eval_loss": self.stopping.best_loss, "best_step": best,
                "best_checkpoint": tag_for(best) if saved else None, "early_stopped": self.stopped_early}
