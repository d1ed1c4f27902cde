"""``python -m src.detection.synthetic``: write the synthetic shapes dataset (see ``data/synthetic.py``)."""

from __future__ import annotations

from ..core.cli import new_parser
from ..core.errors import run_cli
from ..data.annotations import LABEL_FORMATS


def main(argv: list[str] | None = None) -> int:
    ap = new_parser(description="Generate the synthetic shapes dataset (images, labels and a config).")
    ap.add_argument("--out-dir", "--out", dest="out_dir", default="input/shapes", help="output folder")
    ap.add_argument("--format", default="voc", choices=LABEL_FORMATS,
                    help="annotation format: Pascal VOC XML, COCO JSON or YOLO text (Ultralytics layout)")
    ap.add_argument("--train", type=int, default=400, help="training images")
    ap.add_argument("--valid", type=int, default=100, help="validation images")
    ap.add_argument("--imgsz", type=int, default=256, help="square image size in pixels")
    ap.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    ap.add_argument("--video", type=int, default=0, metavar="FRAMES",
                    help="also write <out-dir>/demo.mp4 with this many frames of moving, crossing and occluded "
                         "shapes (24 fps) and its MOTChallenge ground truth <out-dir>/demo_gt.txt")
    args = ap.parse_args(argv)
    from ..core.paths import resolve_path
    from ..data.synthetic import generate_dataset  # after parsing: --help does not load OpenCV

    out = resolve_path(args.out_dir)
    cfg = generate_dataset(out, args.train, args.valid, imgsz=args.imgsz, seed=args.seed, format=args.format)
    print(f"wrote {args.train} train / {args.valid} valid images ({args.format}) and config {cfg}")
    if args.video:
        from ..data.synthetic_video import generate_tracking_video

        video, gt = generate_tracking_video(out / "demo.mp4", args.video, width=args.imgsz, seed=args.seed)
        print(f"wrote {args.video}-frame video {video} and its ground truth {gt}")
    return 0


if __name__ == "__main__":
    run_cli(main)
