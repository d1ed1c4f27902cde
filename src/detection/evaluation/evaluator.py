"""The evaluator interface every scoring path uses: ``reset()``, ``process(predictions, targets)`` per batch,
``evaluate()`` once at the end (the shape of detectron2's ``DatasetEvaluator``).

Training-time evaluation and ``evaluate --model`` feed it batches of a model's predictions with the loader's
targets; ``evaluate --predictions`` feeds it the rows of a predictions file grouped per image with the dataset's
ground truth. ``metrics.DetectionEvaluator`` implements it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any


class DatasetEvaluator(ABC):
    """Accumulates per-image predictions and their ground truth, then scores them."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything processed so far (called before a new evaluation)."""

    @abstractmethod
    def process(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        """Add a batch: per image a prediction dict and its target, both in original image coordinates."""

    @abstractmethod
    def evaluate(self) -> Any:
        """The results over everything processed (under torch.distributed: on rank 0, ``None`` elsewhere)."""


class EvaluatorGroup(DatasetEvaluator):
    """Fans one evaluation pass out to several evaluators: the ``primary`` one's result is the pass's result,
    the others (confusion matrix, a sample of predictions, ...) see the same batches and keep their own results
    (``results``: one per evaluator, in order, primary first). ``evaluate`` calls every evaluator in the same order
    on every rank, so evaluators that gather under torch.distributed stay in step."""

    def __init__(self, primary: DatasetEvaluator, *others: DatasetEvaluator) -> None:
        self.evaluators = [primary, *others]
        self.results: list[Any] = [None] * len(self.evaluators)

    @property
    def primary(self) -> DatasetEvaluator:
        return self.evaluators[0]

    def reset(self) -> None:
        for ev in self.evaluators:
            ev.reset()
        self.results = [None] * len(self.evaluators)

    def process(self, predictions: Sequence[dict[str, Any]], targets: Sequence[dict[str, Any]]) -> None:
        for ev in self.evaluators:
            ev.process(predictions, targets)

    def evaluate(self) -> Any:
        self.results = [ev.evaluate() for ev in self.evaluators]
        return self.results[0]
