"""labels.png statistics from annotations only, checked against the boxes they were made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.detection.data.datasets import DetectionDataset
from src.detection.data.formats.common import Record
from src.detection.data.label_stats import LabelStats

CLASSES = ["__background__", "cat", "dog"]


def _dataset(per_image, size=(100, 200)):
    records = []
    for i, (boxes, labels) in enumerate(per_image):
        records.append(Record(image=Path(f"/nonexistent/{i}.jpg"), name=f"{i}.jpg",
                              boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                              labels=np.asarray(labels, np.int64), difficult=np.zeros(len(labels), bool), size=size))
    return DetectionDataset(records, CLASSES, name="train", verbose=False)


def test_stats_and_picture(tmp_path):
    ds = _dataset([
        ([[0, 0, 20, 10], [100, 50, 140, 90]], [1, 2]),
        ([], []),
        ([[150, 0, 250, 40]], [1]),  # clamped to the 200 px wide image: 150..200
    ])
    st = LabelStats.from_dataset(ds)
    assert st.class_counts.tolist() == [2, 1]
    assert st.objects_per_image.tolist() == [2, 0, 1]
    np.testing.assert_allclose(st.widths, [20, 40, 50])
    np.testing.assert_allclose(st.heights, [10, 40, 40])
    # centres as fractions of (W, H) = (200, 100)
    np.testing.assert_allclose(st.centers, [[10 / 200, 5 / 100], [120 / 200, 70 / 100], [175 / 200, 20 / 100]])
    png = st.plot(tmp_path / "labels.png", title="train")
    assert png.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob(".*tmp"))


def test_empty_split_still_draws(tmp_path):
    st = LabelStats.from_dataset(_dataset([([], [])]))
    assert len(st.labels) == 0 and st.objects_per_image.tolist() == [0]
    assert st.plot(tmp_path / "labels.png").is_file()
