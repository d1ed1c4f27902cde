"""Dataset analysis: what is in a dataset (VOC, COCO or YOLO) and what is wrong with it, as a table and PNG plots.

    python -m src.detection.analyze --config detection_configs/voc.yaml [--out-dir DIR]

Parses annotations with the same reader training uses, in the forgiving mode (unknown classes and bad samples are
counted, not fatal), and decodes every image (a thread pool, with a progress bar) to find corrupt or truncated
files, so it reports every problem at once.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.cli import new_parser
from ..core.errors import run_cli
from ..core.io import save_figure
from ..core.paths import increment_path, resolve_path

if TYPE_CHECKING:  # imported where used: --help must not import torch (seconds)
    from ..data.datasets import DetectionDataset
    from ..modeling.config import DetectorConfig


def dataset_stats(ds: DetectionDataset) -> dict[str, Any]:
    """Per-split numbers: class counts (difficult included), objects per image, box sizes and aspects."""
    per_class: Counter = Counter()
    per_class_difficult: Counter = Counter()
    objects_per_image, widths, heights = [], [], []
    for i in range(len(ds)):
        ann = ds.annotations(i)
        objects_per_image.append(len(ann["labels"]))
        for lab, diff in zip(ann["labels"].tolist(), ann["difficult"].tolist()):
            per_class[ds.classes[lab]] += 1
            per_class_difficult[ds.classes[lab]] += int(diff)
        b = ann["boxes"].numpy()
        widths += (b[:, 2] - b[:, 0]).tolist()
        heights += (b[:, 3] - b[:, 1]).tolist()
    return {
        "per_class": per_class,
        "per_class_difficult": per_class_difficult,
        "objects_per_image": np.asarray(objects_per_image, np.int64),
        "widths": np.asarray(widths, np.float32),
        "heights": np.asarray(heights, np.float32),
        "report": ds.report,
    }


def format_report(classes: list[str], stats: dict[str, dict[str, Any]]) -> str:
    """Markdown-style table of class counts per split, then summary and problem lines per split."""
    splits = list(stats)
    lines = ["| class | " + " | ".join(f"{s} objects (difficult)" for s in splits) + " |",
             "|---|" + "---|" * len(splits)]
    for c in classes[1:]:
        cells = [f"{st['per_class'][c]} ({st['per_class_difficult'][c]})" for st in stats.values()]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    for s, st in stats.items():
        rep, opi = st["report"], st["objects_per_image"]
        area = np.sqrt(st["widths"] * st["heights"]) if len(st["widths"]) else np.zeros(1)
        lines += [
            "",
            f"{s}: {rep.n_images} images ({rep.n_negatives} without objects), {rep.n_objects} objects "
            f"({rep.n_difficult} difficult); objects/image mean {opi.mean() if len(opi) else 0:.2f}, "
            f"max {opi.max() if len(opi) else 0}; box sqrt(area) median {np.median(area):.1f} px "
            f"(small <32: {(area < 32).sum()}, medium: {((area >= 32) & (area < 96)).sum()}, large >=96: {(area >= 96).sum()})",
        ]
        problems = rep.problems()
        lines += [f"{s} problem: {p}" for p in problems] or [f"{s}: no problems found"]
        lines += [f"{s} bad file: {reason}" for _, reason in rep.bad_files[:20]]
        if len(rep.bad_files) > 20:
            lines.append(f"{s}: ... and {len(rep.bad_files) - 20} more bad files")
        lines += [f"{s} unmatched: {what}" for what in rep.unmatched_annotations[:20]]
        if len(rep.unmatched_annotations) > 20:
            lines.append(f"{s}: ... and {len(rep.unmatched_annotations) - 20} more annotations without an image")
    return "\n".join(lines)


def save_plots(classes: list[str], stats: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = classes[1:]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4))
    x = np.arange(len(names))
    width = 0.8 / max(1, len(stats))
    for k, (s, st) in enumerate(stats.items()):
        ax.bar(x + k * width, [st["per_class"][c] for c in names], width, label=s)
    ax.set_xticks(x + width * (len(stats) - 1) / 2, names, rotation=45, ha="right")
    ax.set_ylabel("objects")
    ax.set_title("objects per class")
    ax.legend()
    paths.append(_save(fig, out_dir / "class_counts.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for s, st in stats.items():
        w, h = st["widths"], st["heights"]
        if len(w):
            axes[0].hist(np.sqrt(w * h), bins=40, alpha=0.6, label=s)
            axes[1].hist(np.log2(w / np.maximum(h, 1e-6)), bins=40, alpha=0.6, label=s)
        opi = st["objects_per_image"]
        axes[2].hist(opi, bins=np.arange(opi.max() + 2 if len(opi) else 2) - 0.5, alpha=0.6, label=s)
    for ax, title in zip(axes, ("box size sqrt(w*h) [px]", "aspect log2(w/h)", "objects per image")):
        ax.set_title(title)
        ax.legend()
    paths.append(_save(fig, out_dir / "box_stats.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def analyze_dataset(config: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> tuple[str, list[Path]]:
    """Table text and plot paths for the config's train and valid splits."""
    from ..data.datasets import DetectionDataset, drop_undecodable, load_data_config, read_split

    cfg = load_data_config(config)
    stats = {}
    for split in ("train", "valid"):
        records, report = read_split(cfg, split, ignore_unknown_classes=True, skip_bad_samples=True)
        ds = DetectionDataset(records, cfg.classes, report=report, name=split, verbose=False)
        drop_undecodable(ds, skip_bad_samples=True, verbose=False)  # listed as bad files in the report
        stats[split] = dataset_stats(ds)
    table = f"{cfg.path.name}: {cfg.format} dataset, {len(cfg.classes) - 1} classes\n\n" + format_report(cfg.classes, stats)
    out = Path(out_dir) if out_dir else increment_path("outputs/analyze", None, cfg.path.stem)
    return table, save_plots(cfg.classes, stats, out)


# The anchor fit describes the model training would build: the training defaults unless the flags say otherwise.
ANCHOR_FIT_MAX_BOXES = 50_000  # a seeded sample beyond this (a few seconds; the estimate is within ~0.5 %)


def label_report(config: str | os.PathLike, out_dir: str | os.PathLike,
                 detector: DetectorConfig | None = None) -> tuple[str, list[Path]]:
    """``labels.png`` of the train split (valid when train is empty) and, for a RetinaNet / SSD ``detector``, the
    anchor-fit lines of that split's boxes at the detector's input size. Returns (text, [labels.png])."""
    from ..data.datasets import DetectionDataset, load_data_config, read_split
    from ..data.label_stats import LabelStats
    from ..modeling.anchor_fit import ANCHOR_HEADS, dataset_input_boxes, fit_config

    cfg = load_data_config(config)
    for split in ("train", "valid"):
        records, report = read_split(cfg, split, ignore_unknown_classes=True, skip_bad_samples=True)
        ds = DetectionDataset(records, cfg.classes, report=report, name=split, verbose=False)
        if len(ds):
            break
    png = LabelStats.from_dataset(ds).plot(Path(out_dir) / "labels.png", title=f"{cfg.path.name}: {split} labels")
    lines = []
    if detector is not None and detector.head not in ANCHOR_HEADS:
        lines.append(f"anchor fit: not applicable to --head {detector.head} (RetinaNet and SSD only)")
    elif detector is not None:
        boxes = dataset_input_boxes(ds, detector.imgsz, detector.letterbox)
        fit = fit_config(boxes, detector, max_boxes=ANCHOR_FIT_MAX_BOXES)
        lines.append(f"{split} ({detector.head}, {detector.model_name} {detector.feature_extractor}, "
                     f"{detector.imgsz[0]}x{detector.imgsz[1]}{' letterbox' if detector.letterbox else ''}) "
                     + fit.describe())
    return "\n".join(lines), [png]


def main(argv: list[str] | None = None) -> int:
    ap = new_parser(description="Count classes/objects and find annotation problems in a dataset "
                                "(Pascal VOC XML, COCO JSON or YOLO).")
    ap.add_argument("--config", required=True,
                    help="dataset YAML (VOC, FORMAT: coco / yolo, or an Ultralytics data.yaml)")
    ap.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                    help="folder for the PNG plots (default: outputs/analyze/<config>_N)")
    fit = ap.add_argument_group("anchor fit (the model training would build)")
    fit.add_argument("--head", default="retinanet", choices=("retinanet", "ssd", "fcos", "none"),
                     help="detection head whose default anchors are checked (none: skip the anchor fit)")
    fit.add_argument("--model-name", default="dinov3_convnext_tiny", help="backbone (sets the feature strides)")
    fit.add_argument("--feature-extractor", default="multi", choices=("multi", "last"),
                     help="pyramid (multi) or single level (last), as train --feature-extractor")
    fit.add_argument("--imgsz", type=int, nargs="+", default=[640, 640], metavar="N", help="model input W H")
    fit.add_argument("--letterbox", action="store_true", help="aspect-preserving resize, as train --letterbox")
    fit.add_argument("--anchor-sizes", type=int, nargs="+", default=None, metavar="PX",
                     help="RetinaNet anchor sizes to check, as train --anchor-sizes (default: the training default)")
    fit.add_argument("--anchor-ratios", type=float, nargs="+", default=None, metavar="H/W",
                     help="RetinaNet anchor aspect ratios to check, as train --anchor-ratios")
    args = ap.parse_args(argv)
    from ..modeling.config import DetectorConfig
    from ..modeling.entrypoints import entry_point

    detector = None if args.head == "none" else DetectorConfig(  # checked before the (long) analysis
        entry_point(args.model_name) and args.model_name, 2, head=args.head,
        feature_extractor=args.feature_extractor, imgsz=args.imgsz, letterbox=args.letterbox,
        anchor_sizes=args.anchor_sizes, anchor_ratios=args.anchor_ratios)
    table, plots = analyze_dataset(args.config, resolve_path(args.out_dir) if args.out_dir else None)
    print(table)
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    text, label_plots = label_report(args.config, plots[0].parent, detector)
    print(f"\n{text}\nlabels: {label_plots[0]}" if text else f"\nlabels: {label_plots[0]}")
    return 0


if __name__ == "__main__":
    run_cli(main)
