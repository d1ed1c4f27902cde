"""Image and video inference on a tiny detector trained in the session (one synthetic scene, one big box).

The scene is 240x180 (non-square, not the 128x128 training size), so finding its box at the right place checks
the mapping back to original coordinates. The CLIs run as subprocesses, headless (no DISPLAY).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from src.detection.checkpoint import build_payload, model_meta, save_checkpoint
from src.detection.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["__background__", "circle", "square"]
SCENE_WH = (240, 180)
BOX = (60.0, 45.0, 180.0, 135.0)  # xyxy in scene pixels, class "square" (label 2)
IMGSZ = (128, 128)


def make_scene(seed: int = 0) -> np.ndarray:
    """BGR scene: grey noise with a solid red rectangle at BOX."""
    rng = np.random.default_rng(seed)
    scene = rng.integers(60, 120, (SCENE_WH[1], SCENE_WH[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = (int(v) for v in BOX)
    cv2.rectangle(scene, (x1, y1), (x2 - 1, y2 - 1), (40, 40, 230), -1)
    return scene


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP spin-waiting on a shared CPU (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(one_thread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a tiny RetinaNet (frozen random ConvNeXt, 1-block stages) on the scene for 40 steps; save it."""
    from src.detection.model import DetectorConfig, build_detector
    from src.detection.transforms import resize_image

    torch.manual_seed(0)
    cfg = DetectorConfig(model_name="dinov3_convnext_atto", num_classes=len(CLASSES), head="retinanet",
                         imgsz=IMGSZ, fpn_channels=64,
                         arch_overrides={"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = build_detector(cfg, verbose=False)
    scene = torch.from_numpy(make_scene()[:, :, ::-1].copy()).permute(2, 0, 1)
    inp = resize_image(scene, IMGSZ)
    sx, sy = IMGSZ[0] / SCENE_WH[0], IMGSZ[1] / SCENE_WH[1]
    target = {"boxes": torch.tensor([[BOX[0] * sx, BOX[1] * sy, BOX[2] * sx, BOX[3] * sy]]),
              "labels": torch.tensor([2])}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(40):
        loss = sum(model(torch.stack([inp, inp]), [target, target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pth"
    save_checkpoint(path, build_payload(model.eval(), model_meta(model, CLASSES, letterbox=False), epoch=1))
    return path


def run_cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["OMP_NUM_THREADS"] = "1"  # see one_thread
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for f in fragments:
        assert f in lines[0]


def best(pred: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    i = int(pred["scores"].argmax())
    return pred["boxes"][i], int(pred["labels"][i])


# ------------------------------------------------------------------------------------------------- Predictor
def test_predictor_finds_box_in_original_coordinates(checkpoint: Path) -> None:
    from src.detection.predictor import Predictor

    rgb = torch.from_numpy(make_scene()[:, :, ::-1].copy()).permute(2, 0, 1)
    predictor = Predictor(checkpoint, device="cpu", score_thresh=0.3, batch_size=2)
    assert predictor.classes == CLASSES and predictor.imgsz == IMGSZ
    small = torch.nn.functional.interpolate(rgb[None].float(), size=(90, 120), mode="bilinear").byte()[0]
    preds = predictor.predict([rgb, small, rgb])
    for pred, scale in zip(preds, (1.0, 0.5, 1.0)):
        box, label = best(pred)
        assert label == 2
        assert box_iou(box[None], torch.tensor([BOX]) * scale).item() > 0.8, box
    assert torch.allclose(preds[0]["boxes"], preds[2]["boxes"], atol=1e-3)  # same image, same result
    assert predictor.model_timer.items == 3


def test_predictor_rejects_contradicting_flags(checkpoint: Path) -> None:
    from src.detection.predictor import Predictor

    with pytest.raises(UserError, match="--head ssd contradicts checkpoint"):
        Predictor(checkpoint, device="cpu", expect={"head": "ssd"})
    with pytest.raises(UserError, match="--config CLASSES"):
        Predictor(checkpoint, device="cpu", expect={"classes": ["__background__", "dog"]})
    Predictor(checkpoint, device="cpu", expect={"model_name": "dinov3_convnext_atto", "classes": CLASSES})


# ------------------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def image_run(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    src = tmp_path_factory.mktemp("images")
    cv2.imwrite(str(src / "scene.jpg"), make_scene(), [cv2.IMWRITE_JPEG_QUALITY, 95])
    (src / "sub").mkdir()
    cv2.imwrite(str(src / "sub" / "other.PNG"), make_scene(seed=1))  # upper-case extension, subfolder
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path_factory.mktemp("out") / "run"
    proc = run_cli("infer_det_image.py", "--input", str(src), "--recursive", "--model", str(checkpoint),
                   "--threshold", "0.5", "--save-xml", "--show", "--device", "cpu", "--batch", "2",
                   "--model-name", "dinov3_convnext_atto", "--head", "retinanet", "--out-dir", str(out))
    return proc, out


def test_image_folder_outputs(image_run) -> None:
    proc, out = image_run
    assert proc.returncode == 0, proc.stderr
    assert "--show ignored" in proc.stdout  # headless: a note, not a crash
    for rel in ("scene.jpg", "sub/other.PNG"):
        img = cv2.imread(str(out / rel))
        assert img is not None and img.shape == (SCENE_WH[1], SCENE_WH[0], 3)
        assert not np.array_equal(img, make_scene())  # boxes were drawn
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} == {"scene.jpg", "sub/other.PNG"}
    assert all(set(p) >= {"image_id", "file_name", "category_id", "bbox", "score"} and p["score"] >= 0.5
               for p in preds)
    top = max((p for p in preds if p["file_name"] == "scene.jpg"), key=lambda p: p["score"])
    assert top["category_id"] == 2
    x, y, w, h = top["bbox"]
    assert box_iou(torch.tensor([[x, y, x + w, y + h]]), torch.tensor([BOX])).item() > 0.8


def test_broken_image_is_reported_and_skipped(image_run) -> None:
    proc, out = image_run
    assert "skipped" in proc.stdout and "broken.jpg" in proc.stdout
    assert "1 unreadable skipped" in proc.stdout
    assert not (out / "broken.jpg").exists()


def test_save_xml_round_trips_through_dataset_reader(image_run) -> None:
    from src.detection.datasets import parse_voc_xml

    _, out = image_run
    preds = json.loads((out / "predictions.json").read_text())
    for rel, xml in (("scene.jpg", out / "labels" / "scene.xml"), ("sub/other.PNG", out / "labels" / "sub" / "other.xml")):
        objects, size = parse_voc_xml(xml)
        assert size == (SCENE_WH[1], SCENE_WH[0])
        mine = sorted((CLASSES[p["category_id"]], [p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2],
                                                   p["bbox"][1] + p["bbox"][3]]) for p in preds if p["file_name"] == rel)
        theirs = sorted((name, box) for name, box, difficult in objects)
        assert [n for n, _ in theirs] == [n for n, _ in mine] and len(mine) >= 1
        for (_, a), (_, b) in zip(theirs, mine):
            assert np.allclose(a, b, atol=0.5)  # XML stores integer pixels


def test_missing_input_is_one_line_error(checkpoint: Path, tmp_path: Path) -> None:
    proc = run_cli("infer_det_image.py", "--input", str(tmp_path / "nope"), "--model", str(checkpoint))
    assert_one_line_error(proc, "--input", "no such file or folder")


# ------------------------------------------------------------------------------------------------- video
def write_video(path: Path, frames: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SCENE_WH)
    assert writer.isOpened()
    for i in range(frames):
        frame = make_scene(seed=i)
        writer.write(frame)
    writer.release()


def test_video_inference_keeps_fps_size_and_frame_count(checkpoint: Path, tmp_path: Path) -> None:
    src = tmp_path / "clip.mp4"
    write_video(src, frames=9, fps=12.0)
    out = tmp_path / "out"
    proc = run_cli("infer_det_video.py", "--input", str(src), "--model", str(checkpoint), "--device", "cpu",
                   "--batch", "4", "--threshold", "0.6", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 9 and summary["mean_model_fps"] > 0 and summary["mean_end_to_end_fps"] > 0
    cap = cv2.VideoCapture(summary["output"])
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (SCENE_WH[1], SCENE_WH[0], 3)
        n += 1
    cap.release()
    assert n == 9
    assert "9 frames" in proc.stdout


def test_video_max_frames_in_process(checkpoint: Path, tmp_path: Path) -> None:
    from src.detection.predictor import Predictor
    from src.detection.video import open_source, process_video

    src = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 7.0, SCENE_WH)
    for i in range(6):
        writer.write(make_scene(seed=i))
    writer.release()
    predictor = Predictor(checkpoint, device="cpu", batch_size=2, score_thresh=0.6)
    summary = process_video(predictor, open_source(str(src)), tmp_path / "annotated", max_frames=4, progress=False)
    assert summary["frames"] == 4 and summary["fps"] == pytest.approx(7.0)
    cap = cv2.VideoCapture(summary["output"])
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    cap.release()


def test_broken_video_is_one_line_error_and_leaves_no_output(checkpoint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a real video" * 4)
    out = tmp_path / "out"
    proc = run_cli("infer_det_video.py", "--input", str(bad), "--model", str(checkpoint), "--out-dir", str(out))
    assert_one_line_error(proc, "broken.mp4")
    assert not out.exists() or not any(out.iterdir())
