"""Inference speed: our Predictor vs a reference-style per-image loop, the speed steps, and the video pipeline.

    python -m benchmarks.bench_infer [--quick] [--compile] [--only onnx]

``dinov3_convnext_tiny`` random weights at 640x640 (``--quick``: a small ConvNeXt at 256), same 4:3 frames,
measured in the same run (median of several repetitions, after warm-up).

* baseline = the reference project's model (single-level RetinaNet on the last feature map, its dense 768-channel
  head) in the reference's loop: one float32 image at a time, stretched to imgsz, through torchvision's own
  ``GeneralizedRCNNTransform`` (which resizes again), contiguous memory, ``no_grad``.
* ours = a checkpoint of our default detector (multi-level RetinaNet, dense head) through ``Predictor``.
* steps = each speed option switched on alone against our fp32 batch-1 path (same checkpoint) (channels_last, bf16 autocast,
  aspect-preserving input size, batching, optionally torch.compile) - the ratio says what each step buys here.
* onnx = the same checkpoint exported (``src.detection.commands.export``, fp32) and run by ``OnnxPredictor`` with
  onnxruntime's CPU provider, batch 1, as many threads as torch: against the per-image loop, our best PyTorch row
  of this run, and our fp32 PyTorch path (forced fp32: what CPUs without native bf16, e.g. AVX2-only, run).
* video = end-to-end FPS of the threaded decode -> batch -> draw/encode pipeline divided by model-only FPS.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from src.detection.checkpoint import build_payload, model_meta, save_checkpoint
from src.detection.core.runtime import cpu_bf16_supported
from src.detection.data.transforms import resize_image
from src.detection.inference.predictor import Predictor


def _frames(n: int, wh: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Smooth random BGR frames (compress like real video, unlike white noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
        img = cv2.resize(low, wh, interpolation=cv2.INTER_CUBIC)
        out.append(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8))
    return out


def _rate(fn: Callable[[], int], reps: int) -> float:
    """Median items/s of ``fn`` (returns how many items it processed) over ``reps`` runs after one warm-up."""
    fn()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _row(name: str, baseline: float, ours: float, goal: str, note: str = "") -> dict[str, Any]:
    return {"name": name, "baseline": round(baseline, 3), "ours": round(ours, 3),
            "ratio": round(ours / baseline, 3) if baseline else 0.0, "goal": goal, "note": note}


def run(quick: bool = False, compile: bool = False, only: str | None = None, device: str = "cpu"
        ) -> list[dict[str, Any]]:
    """All rows; ``only="onnx"``: just the onnxruntime rows (with the measurements they are compared with).
    On CUDA: the GPU rows only (``gpu_rows``)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from src.detection.inference.video import open_source, process_video
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

    if quick:
        model_name, imgsz, frame_wh, n_img, reps, n_video = "dinov3_convnext_atto", 256, (320, 240), 8, 2, 24
    else:
        model_name, imgsz, frame_wh, n_img, reps, n_video = "dinov3_convnext_tiny", 640, (640, 480), 8, 3, 48
    ref_cfg = DetectorConfig(model_name=model_name, num_classes=21, head="retinanet", feature_extractor="last",
                             imgsz=(imgsz, imgsz))
    our_cfg = DetectorConfig(model_name=model_name, num_classes=21, imgsz=(imgsz, imgsz))  # a user's defaults
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_detector(ref_cfg, verbose=False).eval()
        torch.manual_seed(0)
        ours = build_detector(our_cfg, verbose=False).eval()
    classes = ["__background__"] + [f"c{i}" for i in range(1, 21)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    ckpt = save_checkpoint(tmp / "model.pth", build_payload(ours, model_meta(ours, classes, letterbox=False)))
    frames = _frames(n_img, frame_wh)
    images = [torch.from_numpy(f[:, :, ::-1].copy()).permute(2, 0, 1) for f in frames]
    rows: list[dict[str, Any]] = []
    if device != "cpu":
        return gpu_rows(model, ckpt, frame_wh, imgsz, device, reps)

    # --- baseline: the reference's per-image float32 loop through torchvision's own transform
    dino = model.dino
    ref_transform = GeneralizedRCNNTransform(imgsz, imgsz, list(dino.mean), list(dino.std))
    own_transform = model.transform

    def reference_loop() -> int:
        model.transform = ref_transform
        try:
            with torch.no_grad():
                for f in frames:
                    img = cv2.resize(f, (imgsz, imgsz))[:, :, ::-1].astype(np.float32) / 255.0
                    model([torch.from_numpy(img.copy()).permute(2, 0, 1)])
        finally:
            model.transform = own_transform
        return len(frames)

    ref = _rate(reference_loop, reps)

    def predictor(**kw: Any) -> Predictor:
        return Predictor(ckpt, device="cpu", **kw)

    def images_per_s(p: Predictor) -> float:
        return _rate(lambda: len(p.predict(images)), reps)

    # --- ours with its defaults (bf16 where native, contiguous memory on CPU) vs the reference loop
    best: dict[str, Any] = {}
    for bs in (1, 8) if only != "onnx" else (1,):
        p = predictor(batch_size=bs)
        layout = ", channels_last" if p.channels_last else ""
        r = images_per_s(p)
        best = best if best and best["rate"] >= r else {"rate": r, "what": f"{p.precision}{layout}, batch {bs}"}
        rows.append(_row(f"images/s batch {bs} (ours: {p.precision}{layout}) vs per-image loop", ref, r, ">= 2x"))

    # --- steps, each against our plain fp32 / contiguous / square / batch-1 path
    plain = images_per_s(predictor(precision="fp32", channels_last=False, batch_size=1))
    if only == "onnx":
        return rows + _onnx_rows(ckpt, images, reps, ref, best, plain)
    steps = [("channels_last", dict(precision="fp32", channels_last=True, batch_size=1)),
             ("aspect-preserving size (4:3 frame, no square stretch)",
              dict(precision="fp32", channels_last=False, batch_size=1, keep_aspect=True, letterbox=True)),
             ("batch 8", dict(precision="fp32", channels_last=False, batch_size=8))]
    bf16_note = ""
    if cpu_bf16_supported():
        steps.insert(1, ("bf16 autocast (CPU)", dict(precision="bf16", channels_last=False, batch_size=1)))
        # accuracy of bf16: relative error of the backbone features on the same input
        x = resize_image(images[0], (imgsz, imgsz))[None]
        with torch.inference_mode():
            normed = model.transform(x)[0].tensors
            f32 = model.dino.forward_last(normed).float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf = model.dino.forward_last(normed).float()
        bf16_note = f"backbone feature rel. error {float((bf - f32).norm() / f32.norm()):.1e}"
    else:
        bf16_note = "no native bf16 on this CPU: not measured"
    if compile:
        steps.append(("torch.compile (backbone)", dict(precision="fp32", channels_last=False, batch_size=1,
                                                       compile=True)))
    for name, kw in steps:
        r = images_per_s(predictor(**kw))
        rows.append(_row(f"step: {name}", plain, r, "keep if > 1",
                         bf16_note if "bf16" in name else ("same model input" if "batch" in name else "")))

    rows += _onnx_rows(ckpt, images, reps, ref, best, plain)

    # --- video: end-to-end FPS over model-only FPS with the threaded pipeline
    video = tmp / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, frame_wh)
    for f in _frames(n_video, frame_wh, seed=1):
        writer.write(f)
    writer.release()
    p = predictor(batch_size=4)
    p.predict(images[:4])  # warm-up
    p.model_timer.seconds, p.model_timer.items = 0.0, 0
    summary = process_video(p, open_source(str(video)), tmp / "out", progress=False)
    rows.append(_row("video end-to-end FPS / model-only FPS", summary["mean_model_fps"],
                     summary["mean_end_to_end_fps"], ">= 0.9", f"{summary['frames']} frames {frame_wh[0]}x{frame_wh[1]}"))
    return rows


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def gpu_rows(model, ckpt: Path, frame_wh: tuple[int, int], imgsz: int, device: torch.device | str, reps: int
             ) -> list[dict[str, Any]]:
    """On a GPU: the reference loop (fp32, cv2 resize on the CPU, one image at a time) against our ``Predictor``
    with its defaults (``--precision auto``) at batch 1, 8 and 32, uint8 images in and boxes out; and our batched
    end-to-end rate against the frozen backbone's forward alone (the ceiling) at the same batch and precision.

    Batch 1 is one ``predict`` call per image. Batches of 8 and 32 are a stream of frames through ``run_pipeline``,
    as a folder or video run feeds them: batch k+1 is submitted before batch k is collected, so the host's work
    (filling the pinned upload buffer, mapping boxes back) overlaps the device's."""
    from benchmarks.bench_train import backbone_ceiling
    from benchmarks.common import stream_frames, sync

    device = torch.device(device)
    frames = _frames(32, frame_wh)
    images = [torch.from_numpy(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)).permute(2, 0, 1) for f in frames]
    model = model.to(device)

    def reference_loop() -> int:
        with torch.no_grad():
            for f in frames[:16]:
                img = cv2.resize(f, (imgsz, imgsz))[:, :, ::-1].astype(np.float32) / 255.0
                model([torch.from_numpy(img.copy()).permute(2, 0, 1).to(device)])
        sync(device)
        return 16

    ref = _rate(reference_loop, reps)
    rows = []
    eager = Predictor(ckpt, device=device, batch_size=1, cuda_graphs=False)

    def eager_loop() -> int:
        out = eager.predict(images[:16])
        sync(device)
        return len(out)

    eager_rate = _rate(eager_loop, reps)
    passes = 8  # the 32 frames 8 times over: 256 frames a run, so filling and draining the pipeline weighs little
    for bs in (1, 8, 32):
        p = Predictor(ckpt, device=device, batch_size=bs)

        def batched(p: Predictor = p) -> int:
            out = p.predict(images[:16])
            sync(device)
            return len(out)

        def streamed(p: Predictor = p) -> int:
            done = stream_frames(p, images, passes * len(images))
            sync(device)
            return done

        for _ in range(3):  # CUDA graphs: two eager warm-up calls and the capture come before the timed runs
            p.predict(images[:bs])

        rate = _rate(batched if bs == 1 else streamed, reps)
        how = "" if bs == 1 else f"; {passes * len(images)} frames through run_pipeline, one batch in flight"
        rows.append(_row(f"images/s batch {bs} (ours: {p.precision}, channels_last) vs per-image loop ({device.type})",
                         ref, rate, ">= 2x" if bs == 1 else "info",
                         note=f"{describe_device(device)}; uint8 {frame_wh[0]}x{frame_wh[1]} frames in, "
                              f"boxes out; reference: fp32, one image at a time; CUDA graphs "
                              f"{'on' if p.cuda_graphs else 'off'}{how}"))
        if bs == 1:
            rows.append(_row(f"images/s batch 1: ours --no-cuda-graphs vs ours (default: CUDA graphs) "
                             f"({device.type})", eager_rate, rate, "info",
                             note="the same predictor launching its kernels one by one vs replaying a CUDA graph"))
        if bs > 1:
            amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.precision)
            ceiling = statistics.median(backbone_ceiling(p.model, bs, imgsz, amp, device, reps))
            rows.append(_row(f"images/s batch {bs}: backbone forward alone (ceiling) vs ours end to end ({device.type})",
                             ceiling, rate, ">= 0.8x" if bs == 32 else "info",
                             note=f"{p.precision}, channels-last, no_grad; ours: a stream of frames through "
                                  f"run_pipeline; ratio = share of the ceiling we reach"))
    return rows


def _onnx_rows(ckpt: Path, images: list[torch.Tensor], reps: int, ref: float, best: dict[str, Any],
               plain: float) -> list[dict[str, Any]]:
    """onnxruntime (CPU, fp32, batch 1, same thread count) against the reference loop, our best PyTorch path and
    our fp32 PyTorch path (what CPUs without native bf16 run), all measured in this run on the same images."""
    try:
        import onnxruntime  # noqa: F401

        from src.detection.commands.export import ExportConfig, export_onnx
        from src.detection.inference.onnx_runtime import OnnxPredictor
    except ModuleNotFoundError as exc:
        return [_row("onnxruntime rows", 0.0, 0.0, "info", f"not measured: {exc.name} is not installed")]
    t0 = time.perf_counter()
    exported = export_onnx(ExportConfig(model=str(ckpt), output=str(ckpt.with_suffix(".onnx"))))
    export_s = time.perf_counter() - t0
    p = OnnxPredictor(exported["onnx"], device="cpu", batch_size=1)
    rate = _rate(lambda: len(p.predict(images)), reps)
    diff = max(exported["verification"].get("max_rel_diff", {"-": float("nan")}).values())
    note = f"export {export_s:.0f}s, head outputs vs PyTorch max rel. diff {diff:.1e}"
    fp32_note = "our fp32 path: what CPUs without native bf16 (e.g. AVX2-only) run; ours = fp32 forced here"
    return [
        _row("onnxruntime (fp32, batch 1) vs per-image loop", ref, rate, "info", note),
        _row(f"onnxruntime vs our best PyTorch path ({best['what']})", best["rate"], rate, "info"),
        _row("ours fp32 forced (no native bf16) vs per-image loop", ref, plain, "info", fp32_note),
        _row("onnxruntime vs ours fp32 forced (no native bf16)", plain, rate, "info"),
    ]


def to_markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "", "| benchmark | baseline | ours | ratio | goal | note |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['baseline']:.2f} | {r['ours']:.2f} | {r['ratio']:.2f}x | {r['goal']} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small backbone at 256 px (a few minutes at most)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile on CPU)")
    ap.add_argument("--only", choices=["onnx"], default=None,
                    help="onnx: only the onnxruntime rows (and the PyTorch measurements they compare with)")
    args = ap.parse_args()
    rows = run(quick=args.quick, compile=args.compile, only=args.only)
    size = "dinov3_convnext_atto @256, 320x240 frames" if args.quick else "dinov3_convnext_tiny @640, 640x480 frames"
    print(to_markdown(rows, f"Inference ({size}, CPU x{torch.get_num_threads()} threads, "
                            f"CPU default precision auto (bf16 native: {cpu_bf16_supported()}); images/s or FPS)"))


if __name__ == "__main__":
    main()
