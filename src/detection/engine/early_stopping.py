"""Early stopping: stop after ``patience`` evaluations without improvement of the selection metric."""

from __future__ import annotations

import math
from typing import Any

from ..core.errors import UserError


class EarlyStopping:
    """``step(value)`` after each evaluation; True when the run should stop. An improvement is a value better than
    the best so far by more than ``min_delta`` (``mode`` max: higher is better); NaN never improves.
    ``patience`` 0 disables it. ``state_dict`` / ``load_state_dict`` carry it through a checkpoint, so a resumed run
    stops where an uninterrupted one would."""

    def __init__(self, patience: int, mode: str = "max", min_delta: float = 0.0) -> None:
        if int(patience) < 0:
            raise UserError(f"--patience {patience}: use 0 (off) or the number of evaluations without improvement")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience = int(patience)
        self.mode = mode
        self.min_delta = abs(float(min_delta))
        self.best = -math.inf if mode == "max" else math.inf
        self.best_step: int | None = None
        self.bad = 0  # evaluations since the last improvement
        self.stopped = False

    def improved(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def step(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation (at ``step``, e.g. the epoch); True when patience has run out."""
        if self.improved(value):
            self.best, self.best_step, self.bad = float(value), step, 0
        else:
            self.bad += 1
        self.stopped = self.patience > 0 and self.bad >= self.patience
        return self.stopped

    def message(self) -> str:
        at = f" at epoch {self.best_step}" if self.best_step is not None else ""
        return (f"early stopping: no improvement in the last {self.bad} evaluations (--patience {self.patience}); "
                f"best {self.best:.4f}{at}")

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters (the patience stays this run's: a resume may change ``--patience``)."""
        self.best, self.best_step, self.bad = float(state["best"]), state.get("best_step"), int(state["bad"])
