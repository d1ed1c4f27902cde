"""Head cost: FLOPs and cached training-step / evaluation time per ``head_convs`` (conv layers per head branch).

    python -m benchmarks.bench_head [--preset full|demo] [--convs 4 2 1] [--separable] [--channels-last] [--reps 5]

With a frozen backbone and ``--cache-features`` a training step runs only the trainable part (FPN neck + head), so
its cost is what this measures: every variant gets the same cached backbone maps and the same targets, and its
step (forward, losses, backward, gradient clipping, AdamW) and evaluation forward (incl. box decoding and NMS) are
timed with the variants' repetitions interleaved. The first variant is the baseline of every ratio.

* ``full``: ``dinov3_convnext_tiny`` at 640x640, multi-level RetinaNet, 128-channel FPN (the training defaults).
* ``demo``: ``make demo``'s model - ``dinov3_convnext_atto`` at 192x192, FCOS, 64-channel FPN.

GFLOP/image counts the forward of neck + head (``torch.utils.flop_counter.FlopCounterMode``: convolutions and
matrix products, 2 FLOPs per multiply-add) on one image; a training step costs about 3x that (forward + backward).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import make_row, markdown_table, time_interleaved

PRESETS = {
    "full": dict(model_name="dinov3_convnext_tiny", imgsz=640, head="retinanet", fpn_channels=128, batch=8),
    "demo": dict(model_name="dinov3_convnext_atto", imgsz=192, head="fcos", fpn_channels=64, batch=8),
}
NUM_CLASSES = 21


def head_gflops(model: torch.nn.Module, feats: list[torch.Tensor]) -> float:
    """Forward GFLOPs of neck + head per image (feats: one image's backbone maps)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.head(list(model.backbone.neck(feats).values()))
    return counter.get_total_flops() / 1e9


def make_batches(imgsz: int, batch: int, n_batches: int, root: Path) -> list:
    from src.detection.data.datasets import build_datasets, collate_fn, load_data_config
    from src.detection.data.synthetic import generate_dataset

    config = generate_dataset(root / "shapes", batch * n_batches, 1, imgsz=imgsz, seed=0)
    ds, _ = build_datasets(load_data_config(config), imgsz=(imgsz, imgsz), augment="none", verbose=False,
                           splits=("train",))
    return [collate_fn([ds[b * batch + j] for j in range(batch)]) for b in range(n_batches)]


def variant(name: str, convs: int, separable: bool, channels_last: bool, p: dict[str, Any],
            batches: list) -> dict[str, Any]:
    """Model, optimizer and the two timed callables for one head variant."""
    from src.detection.engine.loop import padded_targets
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig
    from src.detection.modeling.detector import count_parameters

    torch.manual_seed(0)
    cfg = DetectorConfig(p["model_name"], NUM_CLASSES, head=p["head"], feature_extractor="multi",
                         imgsz=(p["imgsz"], p["imgsz"]), fpn_channels=p["fpn_channels"], head_convs=convs,
                         head_separable=separable)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning
        model = build_detector(cfg, verbose=False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [[f.contiguous(memory_format=fmt) for f in model.backbone_features(images)] for images, _ in batches]
    if channels_last:
        model.backbone.neck.to(memory_format=fmt)
        model.head.to(memory_format=fmt)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cpu = torch.device("cpu")

    def train() -> None:
        model.train()
        for (images, targets), f in zip(batches, feats):
            with model.cached_features(f):
                loss = sum(model(images, padded_targets(targets, cpu)).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()

    def evaluate() -> None:
        model.eval()
        with torch.inference_mode():
            for (images, _), f in zip(batches, feats):
                with model.cached_features(f):
                    model(images)

    one = [f[:1] for f in feats[0]]
    return {"name": name, "train": train, "eval": evaluate, "gflops": head_gflops(model, one),
            "params": count_parameters(model)[1]}


def run(preset: str = "full", convs: tuple[int, ...] = (4, 2, 1), channels_last: bool = False,
        separable: bool = False, reps: int = 5, n_batches: int = 2, threads: int | None = None) -> list[dict[str, Any]]:
    if threads:
        torch.set_num_threads(threads)
    p = PRESETS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        batches = make_batches(p["imgsz"], p["batch"], n_batches, Path(tmp))
    variants = [variant(f"head_convs={n}", n, False, False, p, batches) for n in convs]
    if separable:
        variants += [variant(f"head_convs={n} separable", n, True, False, p, batches) for n in convs]
    if channels_last:
        variants += [variant(f"head_convs={n} channels-last", n, False, True, p, batches) for n in convs]
    base = variants[0]
    where = f"{p['model_name']} {p['imgsz']}px {p['head']} FPN {p['fpn_channels']}, batch {p['batch']}"
    rows = []
    for kind in ("train", "eval"):
        times: dict[str, list[float]] = time_interleaved({v["name"]: v[kind] for v in variants}, reps, warmup=1)
        for v in variants:
            t = [x / n_batches for x in times[v["name"]]]
            tb = [x / n_batches for x in times[base["name"]]]
            rows.append(make_row(f"cached {kind} step: {base['name']} vs {v['name']}", tb, t, "info", "s",
                                 higher_is_better=False,
                                 note=f"{where}; neck+head {v['gflops']:.2f} GFLOP/img fwd "
                                      f"(vs {base['gflops']:.2f}); trainable {v['params']:,}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full", help="model / size to measure")
    ap.add_argument("--convs", type=int, nargs="+", default=[4, 2, 1],
                    help="head_convs values; the first is the baseline of the ratios")
    ap.add_argument("--channels-last", action="store_true", help="also time each variant in channels-last")
    ap.add_argument("--separable", action="store_true", help="also time each depth with depthwise-separable convs")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (interleaved)")
    ap.add_argument("--batches", type=int, default=2, help="batches per repetition")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (None: torch's default)")
    a = ap.parse_args(argv)
    rows = run(a.preset, tuple(a.convs), a.channels_last, a.separable, a.reps, a.batches, a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", file=sys.stderr)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
