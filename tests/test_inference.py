"""Image inference on a tiny detector trained in the session (one synthetic scene, one big box); video inference is
in tests/test_video.py.

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
from src.detection.core.errors import UserError

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


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(one_thread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train a tiny RetinaNet (frozen random ConvNeXt, 1-block stages) on the scene for 40 steps; save it."""
    from src.detection.data.transforms import resize_image
    from src.detection.modeling.builder import build_detector
    from src.detection.modeling.config import DetectorConfig

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
    from src.detection.inference.predictor import Predictor

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
    from src.detection.inference.predictor import Predictor

    with pytest.raises(UserError, match="--head ssd contradicts checkpoint"):
        Predictor(checkpoint, device="cpu", expect={"head": "ssd"})
    with pytest.raises(UserError, match=r"--config 1 classes \[.dog.\]"):
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
    assert all(set(p) >= {"image_id", "file_name", "category_id", "bbox", "score"} for p in preds)
    # the JSON keeps detections down to the checkpoint's evaluation threshold (0.05), not only the drawn ones
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictions_score_floor"] == pytest.approx(0.05) and summary["threshold"] == 0.5
    assert summary["complete"] is True and summary["images_found"] == summary["images_done"] == 3
    assert min(p["score"] for p in preds) >= 0.05 and min(p["score"] for p in preds) < 0.5
    assert summary["detections"] == sum(p["score"] >= 0.5 for p in preds) < len(preds)
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
    from src.detection.data.datasets import parse_voc_xml

    _, out = image_run
    preds = json.loads((out / "predictions.json").read_text())
    for rel, xml in (("scene.jpg", out / "labels" / "scene.xml"), ("sub/other.PNG", out / "labels" / "sub" / "other.xml")):
        objects, size = parse_voc_xml(xml)
        assert size == (SCENE_WH[1], SCENE_WH[0])
        mine = sorted((CLASSES[p["category_id"]], [p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2],
                                                   p["bbox"][1] + p["bbox"][3]]) for p in preds
                      if p["file_name"] == rel and p["score"] >= 0.5)  # label files hold the drawn detections
        theirs = sorted((name, box) for name, box, difficult in objects)
        assert [n for n, _ in theirs] == [n for n, _ in mine] and len(mine) >= 1
        for (_, a), (_, b) in zip(theirs, mine):
            assert np.allclose(a, b, atol=0.5)  # XML stores integer pixels


def test_missing_input_is_one_line_error(checkpoint: Path, tmp_path: Path) -> None:
    proc = run_cli("infer_det_image.py", "--input", str(tmp_path / "nope"), "--model", str(checkpoint))
    assert_one_line_error(proc, "--input", "no such file or folder")


def test_coco_config_classes_are_checked_without_the_data_folders(checkpoint: Path, tmp_path: Path) -> None:
    """--config takes every dataset config form; a COCO one names its classes in its annotation file only."""
    ann = tmp_path / "ann" / "instances_train.json"
    ann.parent.mkdir()
    # ids out of order: training sorts the categories by id, so the classes are [circle, square]
    ann.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 9, "name": "square"}, {"id": 4, "name": "circle"}]}))
    cfg = tmp_path / "coco.yaml"  # the image folders do not exist
    cfg.write_text("FORMAT: coco\nTRAIN_JSON: ann/instances_train.json\nTRAIN_IMG: train2017\n"
                   "VALID_JSON: ann/instances_val.json\nVALID_IMG: val2017\n")
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "scene.png"), make_scene())
    proc = run_cli("infer_det_image.py", "-i", str(src), "--model", str(checkpoint), "--config", str(cfg),
                   "--device", "cpu", "--no-save", "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())

    from src.detection.inference.predictor import PredictConfig, build_predictor

    swapped = tmp_path / "data.yaml"  # an Ultralytics data.yaml naming the classes in another order
    swapped.write_text("path: nowhere\ntrain: images/train\nval: images/val\nnames: {0: square, 1: circle}\n")
    with pytest.raises(UserError, match=r"--config 2 classes \['square', 'circle'\]\.\.\. contradicts checkpoint"):
        build_predictor(PredictConfig(model=str(checkpoint), config=str(swapped), device="cpu"), verbose=False)


@pytest.mark.parametrize("where", ["decode", "forward"])
def test_interrupted_run_writes_the_images_done(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys, where: str) -> None:
    """Ctrl-C on the 4th of 5 images (while reading it, or in the model's forward, where a real Ctrl-C lands): the
    images taken so far are finished and written, the summary says the run is incomplete, the command exits 130."""
    import infer_det_image
    from src.detection.inference import images as infer_image
    from src.detection.inference.predictor import Predictor

    src = tmp_path / "in"
    src.mkdir()
    for k in range(5):
        cv2.imwrite(str(src / f"img{k}.png"), make_scene(seed=k))
    if where == "decode":
        real_read = infer_image.read_image

        def read_image(path):
            if path.name == "img3.png":
                raise KeyboardInterrupt
            return real_read(path)

        monkeypatch.setattr(infer_image, "read_image", read_image)
        done = ["img0.png", "img1.png", "img2.png"]
    else:
        real_forward, calls = Predictor.forward, []

        def forward(self, batch):
            calls.append(len(batch))
            if len(calls) == 4:  # once: the pipeline finishes the batch it holds, as after a real Ctrl-C
                raise KeyboardInterrupt
            return real_forward(self, batch)

        monkeypatch.setattr(Predictor, "forward", forward)
        done = ["img0.png", "img1.png", "img2.png", "img3.png"]
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["infer_det_image.py", "-i", str(src), "--model", str(checkpoint),
                                      "--device", "cpu", "--batch", "1", "--out-dir", str(out)])
    assert infer_det_image.main() == 130
    preds = json.loads((out / "predictions.json").read_text())
    assert sorted({p["file_name"] for p in preds}) == done
    assert sorted(p.name for p in out.glob("*.png")) == done  # the annotated images match the JSON
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["complete"], summary["images_done"], summary["images_found"]) == (False, len(done), 5)
    assert f"interrupted: {len(done)} of 5 images done" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- settings
def scene_rgb(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(make_scene(seed)[:, :, ::-1].copy()).permute(2, 0, 1)


def test_same_checkpoint_gives_identical_boxes_across_constructions(checkpoint: Path) -> None:
    """The CPU precision follows a fixed rule (runtime.inference_precision), so two runs agree bit for bit."""
    from src.detection.core.runtime import inference_precision
    from src.detection.inference.predictor import Predictor

    images = [scene_rgb(0), scene_rgb(1)]
    a, b = (Predictor(checkpoint, device="cpu", score_thresh=0.05, batch_size=2) for _ in range(2))
    assert a.precision == b.precision == inference_precision(
        "auto", torch.device("cpu"), sum(p.numel() for p in a.model.dino.parameters()))
    for pa, pb in zip(a.predict(images), b.predict(images)):
        assert len(pa["boxes"]) > 1
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(pa[key], pb[key]), key


def test_compile_compiles_the_module_the_forward_runs(checkpoint: Path) -> None:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from src.detection.inference import predictor as predictor_module

    counter = CompileCounter()  # a backend that counts the graphs dynamo hands it and runs them eagerly
    torch._dynamo.reset()
    compiled = predictor_module.Predictor(checkpoint, device="cpu", score_thresh=0.05, compile=counter)
    eager = predictor_module.Predictor(checkpoint, device="cpu", score_thresh=0.05)
    assert counter.frame_count == 0
    out, ref = compiled.predict([scene_rgb()]), eager.predict([scene_rgb()])
    assert counter.frame_count >= 1 and counter.op_count > 10  # the backbone's convolutions went through dynamo
    torch.testing.assert_close(out[0]["boxes"], ref[0]["boxes"])
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # compiled in place, nothing added
    torch._dynamo.reset()


GUI_BUILD = "General configuration for OpenCV\n  GUI:                           QT5\n    QT:    YES\n"
HEADLESS_BUILD = "General configuration for OpenCV\n  GUI:                           NONE\n    VTK support:  NO\n"


@pytest.mark.parametrize("build", ["installed", "gui", "headless"])
def test_display_available_with_and_without_a_display(monkeypatch: pytest.MonkeyPatch, build: str) -> None:
    """Both OpenCV builds (opencv-python and opencv-python-headless, common on GPU images), whichever is installed."""
    from src.detection.inference.options import display_available

    if build != "installed":
        monkeypatch.setattr(cv2, "getBuildInformation", lambda: GUI_BUILD if build == "gui" else HEADLESS_BUILD)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    ok, why = display_available()
    assert not ok and "DISPLAY" in why
    monkeypatch.setenv("DISPLAY", ":0")
    gui = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    headless = bool(gui) and gui[0].split(":", 1)[1].strip().upper() == "NONE"
    ok, why = display_available()
    assert ok == (not headless) and (why == "" if ok else "headless" in why and "opencv-python" in why)


def test_show_draws_windows_when_a_display_is_present(checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from src.detection.inference import images as infer_image
    from src.detection.inference.predictor import PredictConfig

    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), make_scene())
    shown: list[tuple[int, ...]] = []
    monkeypatch.setattr(cv2, "imshow", lambda name, frame: shown.append(frame.shape))
    monkeypatch.setattr(cv2, "waitKey", lambda ms: -1)
    monkeypatch.setattr(cv2, "destroyAllWindows", lambda: None)

    def run(out: str) -> None:
        cfg = infer_image.ImageInferConfig(PredictConfig(model=str(checkpoint), device="cpu", show=True,
                                                         no_save=True, out_dir=str(tmp_path / out)), input=str(src))
        infer_image.infer_images(cfg)

    monkeypatch.setattr(infer_image, "display_available", lambda: (True, ""))
    run("a")
    assert shown == [(SCENE_WH[1], SCENE_WH[0], 3)]
    monkeypatch.undo()
    monkeypatch.setattr(cv2, "imshow", lambda name, frame: shown.append(frame.shape))
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    run("b")
    assert len(shown) == 1  # no new window
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "--show" in ln]
    assert notes == ["note: --show ignored: no display (DISPLAY is not set)"]


@pytest.mark.parametrize("fmt", ["yolo", "coco"])
def test_save_format_writes_the_drawn_detections(checkpoint: Path, tmp_path: Path, fmt: str) -> None:
    from src.detection.commands.infer_image import build_image_parser, image_config_from_args, infer_images

    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "scene.png"), make_scene())
    out = tmp_path / "out"
    infer_images(image_config_from_args(build_image_parser().parse_args(
        ["-i", str(src), "--model", str(checkpoint), "--device", "cpu", "--threshold", "0.5", "--no-save",
         "--save-labels", "--save-format", fmt, "--out-dir", str(out)])))
    drawn = [p for p in json.loads((out / "predictions.json").read_text()) if p["score"] >= 0.5]
    assert drawn
    if fmt == "yolo":
        lines = (out / "labels" / "scene.txt").read_text().splitlines()
        assert (out / "labels" / "classes.txt").read_text().split() == CLASSES[1:]
        assert sorted(int(ln.split()[0]) + 1 for ln in lines) == sorted(p["category_id"] for p in drawn)
        cx, cy, w, h = (float(v) for v in lines[0].split()[1:])
        assert 0 < cx < 1 and 0 < cy < 1 and 0 < w <= 1 and 0 < h <= 1
    else:
        data = json.loads((out / "labels" / "annotations.json").read_text())
        assert [c["name"] for c in data["categories"]] == CLASSES[1:]
        assert sorted(a["category_id"] for a in data["annotations"]) == sorted(p["category_id"] for p in drawn)
        assert data["images"][0]["file_name"] == "scene.png"


def test_image_help_shows_defaults_and_aliases() -> None:
    proc = run_cli("infer_det_image.py", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    for fragment in ("-i INPUT, --input INPUT", "--threshold THRESHOLD, --score-thresh THRESHOLD", "(default: 0.5)",
                     "--save-labels, --save-xml", "--save-format {voc,coco,yolo}", "(default: voc)",
                     "--precision {auto,fp32,fp16,bf16}", "--out-dir OUT_DIR"):
        assert fragment in text, fragment


def test_half_is_folded_into_precision_while_parsing() -> None:
    """--half is the older spelling of --precision fp16; an explicit --precision wins wherever it is typed."""
    import dataclasses

    from src.detection.commands.infer_image import build_image_parser
    from src.detection.inference.options import PredictConfig, predict_config_from_args

    def precision(*flags: str) -> str:
        args = build_image_parser().parse_args(["-i", "x.jpg", "--model", "m.pth", *flags])
        return predict_config_from_args(args).precision

    assert precision() == "auto" and precision("--half") == "fp16"
    assert precision("--precision", "bf16", "--half") == precision("--half", "--precision", "bf16") == "bf16"
    assert "half" not in {f.name for f in dataclasses.fields(PredictConfig)}


def test_onnx_model_without_the_onnx_module_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from src.detection.inference.predictor import PredictConfig, build_predictor

    real_import = builtins.__import__

    def no_onnx_runtime(name, *args, **kwargs):
        if name.endswith("onnx_runtime"):
            raise ModuleNotFoundError("No module named 'src.detection.inference.onnx_runtime'", name="src.detection.inference.onnx_runtime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx_runtime)
    with pytest.raises(UserError, match=r"--model .*model.onnx: ONNX models are not supported"):
        build_predictor(PredictConfig(model=str(tmp_path / "model.onnx")))


def test_bf16_detections_match_fp32(checkpoint: Path) -> None:
    """What ``--precision auto`` = bf16 on a GPU costs: the same boxes as fp32 (class equal, IoU >= 0.95, corners
    within 1 px) for every detection above the drawing threshold. Run here with CPU bf16 autocast, whose rounding is
    the same bf16 format (README: image inference states the figures measured on the demo model too)."""
    from src.detection.inference.predictor import Predictor

    scenes = [scene_rgb(seed) for seed in range(4)]
    fp32, bf16 = (Predictor(checkpoint, device="cpu", precision=p, score_thresh=0.3).predict(scenes)
                  for p in ("fp32", "bf16"))
    matched = total = 0
    for a, b in zip(fp32, bf16):
        total += len(a["boxes"])
        if len(a["boxes"]) and len(b["boxes"]):
            iou = box_iou(a["boxes"], b["boxes"])
            close = (a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1) <= 1.0
            same = a["labels"][:, None] == b["labels"][None]
            matched += int(((iou >= 0.95) & close & same).any(1).sum())
    assert total >= 4 and matched >= 0.99 * total, (matched, total)
