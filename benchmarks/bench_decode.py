"""Image decoding speed: torchvision.io vs OpenCV vs PIL, each producing an RGB uint8 tensor [3,H,W].

    python -m benchmarks.bench_decode [--n 40] [--quick]

Every decoder is timed on the same in-memory files in the same run (median of several repetitions) and the
table prints ms/image and the speed ratio against PIL (the slowest common baseline). The winner is what
``datasets.read_image`` uses first. A correctness column checks each decoder against PIL's pixels.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
from torchvision.io import ImageReadMode, decode_image  # noqa: E402


def dec_torchvision(data: bytes) -> torch.Tensor:
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                        apply_exif_orientation=True)


def dec_cv2(data: bytes) -> torch.Tensor:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return torch.from_numpy(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def dec_pil(data: bytes) -> torch.Tensor:
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


DECODERS = {"torchvision.io.decode_image": dec_torchvision, "cv2.imdecode": dec_cv2, "PIL": dec_pil}


def make_files(n: int, size: tuple[int, int], ext: str) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
        img = cv2.resize(low, size, interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(ext, img, [cv2.IMWRITE_JPEG_QUALITY, 90] if ext == ".jpg" else [])
        out.append(buf.tobytes())
    return out


def bench(files: list[bytes], fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for d in files:
            fn(d)
        times.append((time.perf_counter() - t0) / len(files))
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="files per format")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="few small files (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.reps = 5, 2
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    cases = [("jpg 500x375 (VOC)", (500, 375), ".jpg"), ("jpg 1280x720", (1280, 720), ".jpg"),
             ("png 500x375", (500, 375), ".png"), ("webp 500x375", (500, 375), ".webp")]
    print(f"| format | {' | '.join(DECODERS)} | fastest vs PIL | max mean abs pixel diff vs PIL |")
    print("|---|" + "---|" * (len(DECODERS) + 2))
    for label, size, ext in cases:
        files = make_files(args.n, size, ext)
        ref = dec_pil(files[0]).int()
        ms = {name: bench(files, fn, args.reps) for name, fn in DECODERS.items()}
        diff = max((fn(files[0]).int() - ref).abs().float().mean().item() for fn in DECODERS.values())
        cells = [f"{ms[n]:.2f} ms ({ms['PIL'] / ms[n]:.2f}x)" for n in DECODERS]
        best = min(ms, key=ms.get)
        print(f"| {label} | {' | '.join(cells)} | {best} {ms['PIL'] / ms[best]:.2f}x | {diff:.2f} |")
    print("\nms per image (median of reps, 1 thread); (Nx) = speed relative to PIL in this run.")


if __name__ == "__main__":
    main()
