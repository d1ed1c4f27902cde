"""EarlyStopping: patience counted in evaluations, NaN never improves, state survives a resume."""

from __future__ import annotations

import math

import pytest

from src.detection.core.errors import UserError
from src.detection.engine.early_stopping import EarlyStopping


def test_stops_after_patience_evaluations_without_improvement():
    es = EarlyStopping(patience=2)
    decisions = [es.step(v, step=e) for e, v in enumerate([0.1, 0.3, 0.3, math.nan, 0.5, 0.4, 0.45])]
    # 0.3 again is no improvement, NaN neither -> stop at index 3; the counters reset on 0.5
    assert decisions == [False, False, False, True, False, False, True]
    assert (es.best, es.best_step, es.bad) == (0.5, 4, 2)
    assert "--patience 2" in es.message() and "epoch 4" in es.message()


def test_min_mode_delta_off_and_resume():
    es = EarlyStopping(patience=1, mode="min", min_delta=0.05)
    assert not es.step(1.0) and es.step(0.97)  # an improvement smaller than min_delta does not count
    off = EarlyStopping(patience=0)
    assert not any(off.step(0.0) for _ in range(10))
    a = EarlyStopping(patience=3)
    for v in (0.2, 0.1, 0.1):
        a.step(v)
    b = EarlyStopping(patience=3)
    b.load_state_dict(a.state_dict())
    assert b.step(0.15) and a.step(0.15)
    with pytest.raises(UserError, match="--patience"):
        EarlyStopping(-1)
