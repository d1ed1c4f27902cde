"""The shared Predictor (checkpoint -> preprocess -> batched forward -> boxes in original coordinates),
the threaded batching pipeline used by image and video inference, and the image-inference command.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from xml.etree import ElementTree as ET

import torch

from .checkpoint import load_checkpoint, model_from_checkpoint
from .errors import UserError
from .utils import REPO_ROOT, increment_path, parse_imgsz, select_device

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# CPU default precision, chosen by benchmarks/bench_infer.py on this project's 2-core AVX-512-BF16 EPYC:
# bf16 autocast made convnext_tiny@640 3.1x faster (backbone features within 0.6 % relative error) where the CPU
# has native bf16; without it bf16 is emulated and slower, so "auto" falls back to fp32 there.
CPU_DEFAULT_PRECISION = "auto"
PRECISIONS = ("fp32", "fp16", "bf16")
SIZE_MULTIPLE = 32  # aspect-preserving input sizes are rounded to the coarsest backbone stride


# --------------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so wall-clock timings are real (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates synchronised wall time and item counts, e.g. ``with sw.time(n_images): model(x)``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds = 0.0
        self.items = 0
        self.last = 0.0

    def time(self, items: int = 1):
        sw = self

        class _Ctx:
            def __enter__(self):
                synchronize(sw.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(sw.device)
                sw.last = time.perf_counter() - self.t0
                sw.seconds += sw.last
                sw.items += items
                return False

        return _Ctx()

    @property
    def rate(self) -> float:
        """Items per second over everything timed so far."""
        return self.items / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------- predictor
def cpu_bf16_supported() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 / AMX); otherwise bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Predictor:
    """Load a checkpoint once, then ``predict(images)`` -> boxes in the images' original coordinates.

    The checkpoint's metadata supplies model name, head, classes, imgsz, letterbox and normalization, so the
    checkpoint alone is enough. ``imgsz``, ``letterbox``, ``score_thresh``, ``nms``, ``max_det`` override it.
    ``expect`` holds what the user claimed on the command line (model_name, head, feature_extractor, classes);
    a contradiction with the checkpoint is a UserError rather than a silently different model.
    ``keep_aspect`` feeds each image at an aspect-preserving size whose long side is ``max(imgsz)`` (no square
    stretch, no padding to compute) - default: on for letterbox-trained checkpoints, where it sees exactly the
    letterboxed content without the padding.
    """

    def __init__(self, checkpoint: str | os.PathLike | dict, device: str | torch.device = "auto", half: bool = False,
                 imgsz: Sequence[int] | int | None = None, letterbox: bool | None = None,
                 score_thresh: float | None = None, nms: float | None = None, max_det: int | None = None,
                 batch_size: int = 8, precision: str | None = None, keep_aspect: bool | None = None,
                 channels_last: bool | None = None, weights: str | None = None, expect: dict[str, Any] | None = None,
                 compile: bool = False) -> None:
        self.device = device if isinstance(device, torch.device) else select_device(str(device))
        ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        self.checkpoint_path = ckpt.get("path", "checkpoint")
        _check_expectations(ckpt["meta"], expect or {}, self.checkpoint_path)
        # imgsz is not a model override: the detectors are fully convolutional, and SSD's number of levels is
        # fixed by the training imgsz (part of the weights). A different --imgsz only changes the input resize.
        overrides = {"score_thresh": score_thresh, "nms": nms, "max_det": max_det}
        self.model, self.meta = model_from_checkpoint(ckpt, self.device, overrides, weights=weights)
        self.classes: list[str] = list(self.meta["classes"])
        self.imgsz: tuple[int, int] = parse_imgsz(imgsz) if imgsz is not None else tuple(self.meta["imgsz"])
        self.meta["imgsz"] = self.imgsz
        self.letterbox = bool(self.meta.get("letterbox", False) if letterbox is None else letterbox)
        self.keep_aspect = self.letterbox if keep_aspect is None else bool(keep_aspect)
        self.batch_size = max(1, int(batch_size))
        self.precision = self._pick_precision(precision, half)
        # channels_last made the CPU forward slower here (0.3-0.9x, oneDNN reorders); it is the fast layout on CUDA.
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.dino = torch.compile(self.model.dino, dynamic=False)
        self.model_timer = Stopwatch(self.device)

    # ------------------------------------------------------------------ setup helpers
    def _pick_precision(self, precision: str | None, half: bool) -> str:
        cuda = self.device.type == "cuda"
        if precision is None:
            if cuda:
                precision = "fp16" if half else "fp32"
            elif half:
                precision = "bf16" if cpu_bf16_supported() else "fp32"
            elif CPU_DEFAULT_PRECISION == "auto":
                precision = self._faster_cpu_precision() if cpu_bf16_supported() else "fp32"
            else:
                precision = CPU_DEFAULT_PRECISION
        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
        if precision == "fp16" and not cuda:
            raise UserError("--precision fp16 / --half need a CUDA device; on CPU use --precision bf16")
        if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision bf16: {torch.cuda.get_device_name(self.device)} has no bf16; use fp16")
        return precision

    @torch.inference_mode()
    def _faster_cpu_precision(self) -> str:
        """Time one forward in fp32 and in bf16 and keep the faster: bf16 was 3x faster for convnext_tiny at 640
        here but 4x slower for the tiny demo backbone at 192 (small convs), so no fixed rule is right."""
        w, h = self.imgsz
        x = torch.zeros((1, 3, h, w), dtype=torch.uint8, device=self.device)
        best: dict[str, float] = {}
        for _ in range(2):  # the first round warms up oneDNN kernels
            for name, ctx in (("fp32", nullcontext), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
                t0 = time.perf_counter()
                with ctx():
                    self.model(x)
                best[name] = time.perf_counter() - t0
        return "bf16" if best["bf16"] < best["fp32"] else "fp32"

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ steps
    def input_size(self, orig_hw: Sequence[int]) -> tuple[int, int]:
        """Model input size (W, H) for an image of original size (H, W)."""
        if not self.keep_aspect:
            return self.imgsz
        h0, w0 = int(orig_hw[0]), int(orig_hw[1])
        side = max(self.imgsz)
        scale = side / max(h0, w0)
        w = max(SIZE_MULTIPLE, round(w0 * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        h = max(SIZE_MULTIPLE, round(h0 * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
        return w, h

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """Original uint8 [3,H,W] -> resized uint8 model input on the device (resized on the GPU when there)."""
        from .transforms import resize_image

        size = self.input_size(image.shape[-2:])
        image = image.to(self.device, non_blocking=True)
        letterbox = self.letterbox and not self.keep_aspect
        return resize_image(image, size, letterbox)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detector forward on a resized uint8 batch [B,3,h,w]; boxes in input coordinates. Timed (synced)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self.model_timer.time(len(batch)), self._autocast():
            out = self.model(batch)
        return out

    def postprocess(self, raw: list[dict[str, torch.Tensor]], orig_sizes: Sequence[Sequence[int]]
                    ) -> list[dict[str, torch.Tensor]]:
        """Boxes back to original (H, W) coordinates as float32 CPU tensors."""
        from .transforms import boxes_to_original

        preds = []
        for det, hw in zip(raw, orig_sizes):
            size = self.input_size(hw)
            boxes = boxes_to_original(det["boxes"].float(), hw, size, self.letterbox and not self.keep_aspect)
            preds.append({"boxes": boxes.cpu(), "scores": det["scores"].float().cpu(),
                          "labels": det["labels"].to(torch.int64).cpu()})
        return preds

    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections for original uint8 [3,H,W] images, in their own coordinates (batched by input size)."""
        results: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_size(img.shape[-2:]), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                batch = torch.stack([self.preprocess(images[i]) for i in chunk])
                preds = self.postprocess(self.forward(batch), [images[i].shape[-2:] for i in chunk])
                for i, p in zip(chunk, preds):
                    results[i] = p
        return results  # type: ignore[return-value]

    def describe(self) -> str:
        m = self.meta
        mode = "aspect-preserving" if self.keep_aspect else ("letterbox" if self.letterbox else "stretch")
        return (f"{m.get('model_name')} + {m.get('head')} ({m.get('feature_extractor')}), "
                f"{len(self.classes) - 1} classes, imgsz {self.imgsz[0]}x{self.imgsz[1]} {mode}, "
                f"{self.device} {self.precision}")


def _check_expectations(meta: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    flags = {"model_name": "--model-name", "head": "--head", "feature_extractor": "--feature-extractor",
             "classes": "--config CLASSES"}
    for key, flag in flags.items():
        want = expect.get(key)
        if want is None:
            continue
        have = meta.get(key)
        if key == "classes":
            want, have = list(want), list(have or [])
        if want != have:
            shown_want = want if key != "classes" else f"{len(want) - 1} classes {want[1:4]}..."
            shown_have = have if key != "classes" else f"{len(have) - 1} classes {have[1:4]}..."
            raise UserError(f"{flag} {shown_want} contradicts checkpoint {where} ({shown_have}); drop the flag "
                            f"(the checkpoint's metadata is used) or pass the matching checkpoint")


# --------------------------------------------------------------------------------------------------- threading
_END = object()


class BackgroundIterator:
    """Iterate ``iterable`` in a daemon thread through a bounded queue (flat memory, overlapped I/O).

    Exceptions in the producer are re-raised in the consumer; ``close()`` stops the producer early.
    """

    def __init__(self, iterable: Iterable[Any], maxsize: int = 8, name: str = "producer") -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True, name=name)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterable: Iterable[Any]) -> None:
        try:
            for item in iterable:
                if not self._put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("__error__", exc, _END))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, tuple) and len(item) == 3 and item[0] == "__error__" and item[2] is _END:
            raise item[1]
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


class BackgroundWorker:
    """Run ``fn(item)`` for each ``submit``-ted item in one thread, in order, with a bounded queue."""

    def __init__(self, fn: Callable[[Any], None], maxsize: int = 4, name: str = "consumer") -> None:
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the submitting thread
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        self._check()
        self._q.put(item)

    def close(self) -> None:
        """Wait for every submitted item to be processed; re-raise the first error."""
        self._q.put(_END)
        self._thread.join()
        self._check()


@dataclass
class Item:
    """One unit through the pipeline: the caller's ``data`` (original image/frame), its model input (None when
    it could not be read; ``error`` says why) and, after the forward, its prediction."""

    data: Any
    input: torch.Tensor | None
    orig_hw: tuple[int, int]
    error: str | None = None
    pred: dict[str, torch.Tensor] | None = None
    model_fps: float = 0.0


def run_pipeline(predictor: Predictor, items: Iterable[Item], sink: Callable[[Item], None],
                 batch_size: int | None = None, queue_size: int | None = None) -> None:
    """Decode/preprocess (``items``, iterated in a background thread) -> batched forward (this thread) ->
    ``sink`` (drawing/encoding, in another thread). Queues are bounded so memory stays flat on long videos.
    Items are delivered to ``sink`` in input order; unreadable ones (``input is None``) pass through untouched.
    """
    bs = batch_size or predictor.batch_size
    qsize = queue_size or 2 * bs
    source = BackgroundIterator(items, maxsize=qsize, name="decode")
    worker = BackgroundWorker(sink, maxsize=qsize, name="encode")
    pending: list[Item] = []

    def flush() -> None:
        if not pending:
            return
        raw = predictor.forward(torch.stack([it.input for it in pending]))
        fps = len(pending) / predictor.model_timer.last if predictor.model_timer.last > 0 else 0.0
        for it, pred in zip(pending, predictor.postprocess(raw, [it.orig_hw for it in pending])):
            it.pred, it.model_fps, it.input = pred, fps, None
            worker.submit(it)
        pending.clear()

    try:
        for it in source:
            if it.input is None:
                flush()
                worker.submit(it)
                continue
            if pending and pending[0].input.shape != it.input.shape:
                flush()
            pending.append(it)
            if len(pending) >= bs:
                flush()
        flush()
    finally:
        source.close()
        worker.close()


# --------------------------------------------------------------------------------------------------- CLI helpers
def add_predictor_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by infer_det_image.py and infer_det_video.py (the seed's names first)."""
    parser.add_argument("--model", required=True, help="detector checkpoint (.pth from train_detection.py)")
    parser.add_argument("--imgsz", type=int, nargs="+", default=None,
                        help="model input size W [H]; default: the checkpoint's")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score of a drawn/saved detection")
    parser.add_argument("--model-name", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--config", default=None, help="dataset YAML; its CLASSES are checked against the checkpoint")
    parser.add_argument("--head", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--feature-extractor", default=None, help="checked against the checkpoint (optional)")
    parser.add_argument("--weights", default=None,
                        help="backbone weights; only needed for checkpoints saved without the backbone")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--half", action="store_true", help="fp16 autocast on CUDA (bf16 on CPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast precision (default: fp32 on CUDA, fp16 with --half; on CPU with native bf16 the "
                             "faster of fp32 and bf16, measured at start-up; else fp32)")
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default 8 on CUDA, 1 on CPU)")
    parser.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                        help="override the checkpoint's letterbox/stretch resize")
    parser.add_argument("--keep-aspect", action=argparse.BooleanOptionalAction, default=None,
                        help="aspect-preserving input size, long side = max(imgsz) (default: on for letterbox models)")
    parser.add_argument("--nms", type=float, default=None, help="NMS IoU threshold (default: the checkpoint's)")
    parser.add_argument("--max-det", type=int, default=None, help="max detections per image")
    parser.add_argument("--out-dir", default=None, help="output folder (default: outputs/inference/<run>_N)")
    parser.add_argument("--show", action="store_true", help="show results in a window (needs a display)")
    parser.add_argument("--no-save", action="store_true", help="do not write annotated images/video")


def config_classes(config: str) -> list[str]:
    """CLASSES of a dataset YAML (only the class list; the data folders need not exist for inference)."""
    import yaml

    path = Path(config)
    if not path.is_file() and not path.is_absolute():
        path = REPO_ROOT / config
    if not path.is_file():
        raise UserError(f"--config {config}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {config}: not valid YAML ({type(exc).__name__})") from None
    classes = data.get("CLASSES") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes:
        raise UserError(f"--config {config}: no CLASSES list; add CLASSES: [__background__, ...]")
    return [str(c) for c in classes]


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """Build the Predictor from the shared flags, with notes for flags that do nothing here."""
    expect = {"model_name": args.model_name, "head": args.head, "feature_extractor": args.feature_extractor,
              "classes": config_classes(args.config) if args.config else None}
    device = select_device(args.device)
    if args.half and device.type != "cuda" and args.precision is None:
        print("note: --half is for CUDA; on CPU it means bf16 autocast where the CPU supports it")
    batch = args.batch or (8 if device.type == "cuda" else 1)
    ckpt = load_checkpoint(args.model)
    if args.weights and ckpt["meta"].get("includes_backbone", True):
        print(f"note: --weights {args.weights} ignored: the checkpoint already contains the backbone weights")
        args.weights = None
    predictor = Predictor(ckpt, device=device, half=args.half, imgsz=args.imgsz, letterbox=args.letterbox,
                          score_thresh=args.threshold, nms=args.nms, max_det=args.max_det, batch_size=batch,
                          precision=args.precision, keep_aspect=args.keep_aspect, weights=args.weights,
                          expect=expect)
    print(f"model: {predictor.describe()}")
    return predictor


def display_available() -> tuple[bool, str]:
    """Whether ``cv2.imshow`` can open a window here, and why not."""
    import cv2

    if os.name != "nt" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is not set)"
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    if gui and "NONE" in gui[0].upper():
        return False, "this OpenCV build has no GUI support (opencv-python-headless)"
    return True, ""


# --------------------------------------------------------------------------------------------------- images
def find_images(source: str, recursive: bool = False) -> tuple[list[Path], Path]:
    """Image files named by ``--input`` (a file, a folder or a glob) and the folder names are relative to."""
    is_glob = any(c in source for c in "*?[")
    path = Path(source).expanduser()
    if not is_glob and not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if is_glob:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else path.parent
    elif path.is_dir():
        it = path.rglob("*") if recursive else path.iterdir()
        files = sorted(p for p in it if p.is_file())
        root = path
    elif path.is_file():
        return [path], path.parent
    else:
        raise UserError(f"--input {source}: no such file or folder")
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
    if not images:
        hint = "" if recursive or is_glob else " (add --recursive to search subfolders)"
        raise UserError(f"--input {source}: no images ({', '.join(IMAGE_EXTS)}) found{hint}")
    return images, root


def write_voc_xml(path: Path, image_path: Path, hw: Sequence[int], pred: dict[str, torch.Tensor],
                  classes: Sequence[str]) -> None:
    """Pascal VOC annotation for one image (pre-labelling): integer pixel boxes, as LabelImg/CVAT write them."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = image_path.parent.name
    ET.SubElement(root, "filename").text = image_path.name
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(int(hw[1]))
    ET.SubElement(size, "height").text = str(int(hw[0]))
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for box, label in zip(pred["boxes"].tolist(), pred["labels"].tolist()):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        if x2 <= x1 or y2 <= y1:
            continue
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = classes[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(bb, k).text = str(v)
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=False)


def coco_results(image_id: int, file_name: str, pred: dict[str, torch.Tensor], classes: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """COCO results-format rows (bbox = [x, y, w, h] in original pixels) plus file and class names."""
    rows = []
    for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
        x1, y1, x2, y2 = box
        rows.append({"image_id": image_id, "file_name": file_name, "category_id": int(label),
                     "category_name": classes[label] if 0 <= label < len(classes) else str(label),
                     "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                     "score": round(float(score), 5)})
    return rows


def infer_images(args: argparse.Namespace) -> dict[str, Any]:
    """The body of infer_det_image.py: predict every image, write annotated images / predictions.json / XML."""
    import cv2
    from tqdm import tqdm

    from .datasets import read_image
    from .draw import draw_on_image

    files, root = find_images(args.input, args.recursive)
    predictor = predictor_from_args(args)
    out_dir = Path(args.out_dir) if args.out_dir else increment_path("outputs/inference", None, "run")
    out_dir.mkdir(parents=True, exist_ok=True)
    show = False
    if args.show:
        show, why = display_available()
        if not show:
            print(f"note: --show ignored: {why}")

    def load(i_path: tuple[int, Path]) -> Item:
        i, path = i_path
        rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        try:
            image = read_image(path)
        except UserError as exc:
            return Item(data=(i, path, rel, None), input=None, orig_hw=(0, 0), error=str(exc))
        return Item(data=(i, path, rel, image), input=predictor.preprocess(image),
                    orig_hw=(int(image.shape[1]), int(image.shape[2])))

    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    counts = {"images": 0, "detections": 0}
    bar = tqdm(total=len(files), unit="img", desc="inference")

    def sink(item: Item) -> None:
        i, path, rel, image = item.data
        bar.update(1)
        if item.error is not None:
            skipped.append(str(path))
            tqdm.write(f"skipped {path}: {item.error}")
            return
        pred = item.pred
        counts["images"] += 1
        counts["detections"] += len(pred["boxes"])
        results.extend(coco_results(i + 1, rel.as_posix(), pred, predictor.classes))
        if args.save_xml:
            write_voc_xml(out_dir / "labels" / rel.with_suffix(".xml"), path, item.orig_hw, pred, predictor.classes)
        if not args.no_save or show:
            frame = draw_on_image(image, pred, predictor.classes)
            if not args.no_save:
                target = out_dir / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if not cv2.imwrite(str(target), frame):
                    cv2.imwrite(str(target.with_suffix(".jpg")), frame)
            if show:
                cv2.imshow("detections", frame)
                cv2.waitKey(1)

    t0 = time.perf_counter()
    try:
        run_pipeline(predictor, (load(x) for x in enumerate(files)), sink)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    pred_path = out_dir / "predictions.json"
    pred_path.write_text(json.dumps(results, indent=1))
    summary = {"images": counts["images"], "skipped": len(skipped), "detections": counts["detections"],
               "model_images_per_s": round(predictor.model_timer.rate, 3),
               "end_to_end_images_per_s": round(counts["images"] / elapsed, 3) if elapsed > 0 else 0.0,
               "out_dir": str(out_dir), "predictions": str(pred_path)}
    note = f", {len(skipped)} unreadable skipped" if skipped else ""
    print(f"{counts['images']} images{note}, {counts['detections']} detections >= {args.threshold}; "
          f"model {summary['model_images_per_s']:.2f} img/s, end-to-end {summary['end_to_end_images_per_s']:.2f} "
          f"img/s; results in {out_dir}")
    if counts["images"] == 0:
        raise UserError(f"--input {args.input}: none of the {len(files)} images could be read")
    return summary


def build_image_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Detect objects in images with a trained checkpoint.")
    parser.add_argument("--input", required=True, help="image file, folder or glob (quote it)")
    parser.add_argument("--recursive", action="store_true", help="also search subfolders of a folder --input")
    parser.add_argument("--save-xml", action="store_true", help="write one Pascal VOC XML per image (labels/)")
    add_predictor_args(parser)
    return parser
