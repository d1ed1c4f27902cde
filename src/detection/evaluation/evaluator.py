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
