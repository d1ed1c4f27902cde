"""The demo on a GPU, and what bf16 inference costs in accuracy on its validation set.

    python -m benchmarks.bench_demo [--device cuda]

* demo training time: ``scripts/demo.sh``'s own training command (read from the script, so the two cannot drift
  apart) on its synthetic data, wall time of the command (start-up, feature cache, 10 epochs, evaluations);
  goal <= 30 s on a GPU. On a CPU the demo itself reports its time (``make demo``; docs/DEMO.md), so this bench
  only runs on CUDA.
* bf16 vs fp32: the demo's best checkpoint evaluated on the 200 validation images with ``--precision fp32`` and
  ``bf16`` (mAP@[.5:.95] difference, goal <= 0.002), and the share of fp32 detections above the demo threshold
  (0.5) that bf16 reproduces: same class, IoU >= 0.95 and every corner within 1 px (goal >= 99 %).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import bench_main

REPO = Path(__file__).resolve().parents[1]
GOAL_DEMO_S = 30.0
THRESHOLD = 0.5


def demo_train_command(data: Path, out_dir: Path, device: str) -> list[str]:
    """The ``train_detection.py`` command of ``scripts/demo.sh`` with ``$DATA`` and the output folder replaced."""
    lines = (REPO / "scripts" / "demo.sh").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("$PY train_detection.py"))
    text = ""
    for ln in lines[start:]:
        text += ln.rstrip("\\").rstrip() + " "
        if not ln.rstrip().endswith("\\"):
            break
    words = shlex.split(text.replace('"$DATA', f'"{data}'))
    cmd = [sys.executable, *words[1:]]
    i = cmd.index("--out-dir")
    cmd[i + 1] = str(out_dir)
    return [*cmd, "--device", device]


def demo_data_command(data: Path) -> list[str]:
    lines = (REPO / "scripts" / "demo.sh").read_text().splitlines()
    line = next(ln for ln in lines if ln.startswith("$PY -m src.detection.synthetic"))
    words = shlex.split(line.replace('"$DATA"', str(data)))
    if "--video" in words:  # the demo video is not needed here
        i = words.index("--video")
        del words[i:i + 2]
    return [sys.executable, *words[1:]]


def log(message: str) -> None:
    print(f"[bench_demo] {message}", file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {(proc.stderr or proc.stdout).strip().splitlines()[-3:]}")
    return time.perf_counter() - t0


def agreement(ckpt: Path, images: list[Path], device: str) -> dict[str, float]:
    """fp32 vs bf16 detections (scores >= THRESHOLD) of ``ckpt`` on ``images``."""
    import cv2
    from torchvision.ops import box_iou

    from src.detection.inference.predictor import Predictor

    frames = [torch.from_numpy(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)).permute(2, 0, 1)
              for p in images]
    preds = {prec: Predictor(ckpt, device=device, precision=prec, score_thresh=THRESHOLD).predict(frames)
             for prec in ("fp32", "bf16")}
    total = matched = 0
    for a, b in zip(preds["fp32"], preds["bf16"]):
        total += len(a["boxes"])
        if not len(a["boxes"]) or not len(b["boxes"]):
            continue
        iou = box_iou(a["boxes"], b["boxes"])
        same = a["labels"][:, None] == b["labels"][None, :]
        close = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1) <= 1.0
        matched += int(((iou >= 0.95) & same & close).any(1).sum())
    return {"total": total, "matched": matched, "bf16_count": sum(len(p["boxes"]) for p in preds["bf16"])}


def evaluate_map(ckpt: Path, config: Path, precision: str, device: str) -> float:
    from src.detection.checkpoint.source import ModelSource
    from src.detection.core.cli import RuntimeOptions
    from src.detection.engine.evaluation import EvalConfig, evaluate_checkpoint

    runtime = RuntimeOptions(device=device, precision=precision, batch=32, workers=4)
    result = evaluate_checkpoint(EvalConfig(config=str(config), source=ModelSource(model=str(ckpt)), metric="coco",
                                            runtime=runtime))
    return float(result.summary()["map"])


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    if not device.startswith("cuda"):
        log("the demo's CPU time is what `make demo` prints (docs/DEMO.md); this bench runs on CUDA only")
        return []
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        root = Path(tmp)
        data = root / "shapes"
        made = _run(demo_data_command(data))
        cmd = demo_train_command(data, root / "runs", device)
        if quick:
            cmd[cmd.index("--epochs") + 1] = "1"
        train_s = _run(cmd)
        log(f"demo data {made:.0f}s, demo training {train_s:.1f}s")
        ckpt = root / "runs" / "demo" / "best_model.pth"
        config = data / "shapes.yaml"
        maps = {p: evaluate_map(ckpt, config, p, device) for p in ("fp32", "bf16")}
        agree = agreement(ckpt, sorted((data / "valid" / "images").glob("*.jpg")), device)
    log(f"mAP fp32 {maps['fp32']:.4f} bf16 {maps['bf16']:.4f}; {agree}")
    share = agree["matched"] / max(1, agree["total"])
    name = torch.cuda.get_device_name(torch.device(device))
    return [
        {"name": f"`make demo` training command on {name} (s)", "baseline": GOAL_DEMO_S, "ours": train_s,
         "ratio": GOAL_DEMO_S / train_s, "goal": 1.0, "unit": "s",
         "note": f"scripts/demo.sh's train_detection.py command + --device {device}; wall time with start-up and the "
                 f"feature cache; baseline = the goal ({GOAL_DEMO_S:.0f} s); data generation {made:.0f} s apart"},
        {"name": f"bf16 vs fp32 mAP@[.5:.95], demo validation set ({device})", "baseline": maps["fp32"],
         "ours": maps["bf16"], "ratio": float("nan"), "goal": "info", "unit": "mAP",
         "note": f"difference {maps['bf16'] - maps['fp32']:+.4f} (goal: within 0.002)"},
        {"name": f"bf16 detections matching fp32 ones (class, IoU >= 0.95, corners within 1 px) ({device})",
         "baseline": float(agree["total"]), "ours": float(agree["matched"]), "ratio": share, "goal": 0.99,
         "unit": "boxes", "note": f"scores >= {THRESHOLD} on the 200 validation images; bf16 found "
                                  f"{agree['bf16_count']} such boxes"},
    ]


def main() -> None:
    bench_main(run, __doc__, "one training epoch instead of the demo's ten", device="cuda", device_help="cuda[:N]")


if __name__ == "__main__":
    main()
