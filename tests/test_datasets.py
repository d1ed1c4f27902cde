"""VOC reader: every parsing case on tiny files written here, config errors, loaders."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.detection.core.errors import UserError
from src.detection.data.datasets import (
    DetectionDataset,
    ReadPolicy,
    SplitSource,
    build_dataloader,
    build_datasets,
    collate_fn,
    image_size,
    load_data_config,
    read_image,
    save_transformed_samples,
)
from src.detection.data.formats import FORMATS
from src.detection.data.transforms import build_transform

CLASSES = ["__background__", "cat", "dog"]


def write_image(path: Path, w: int = 100, h: int = 80, mode: str = "RGB", exif_orientation: int | None = None,
                color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.new("RGB", (w, h), color).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "L":
        im = Image.new("L", (w, h), 77)
    elif mode == "RGBA":
        im = Image.new("RGBA", (w, h), color + (128,))
    else:
        im = Image.new("RGB", (w, h), color)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    if fmt == "WEBP":
        kwargs["lossless"] = True
    im.save(path, format=fmt, **kwargs)
    return path


def write_xml(path: Path, objects=(), size: tuple[int, int] | None = (80, 100), raw: str | None = None) -> Path:
    """objects: (name, (xmin, ymin, xmax, ymax), difficult); coordinates written verbatim."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_text(raw)
        return path
    parts = ["<annotation><filename>x</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>")
    for name, box, diff in objects:
        parts.append(
            f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox>"
            f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
            "</bndbox></object>"
        )
    parts.append("</annotation>")
    path.write_text("".join(parts))
    return path


def voc_dataset(sources: list[SplitSource], classes=CLASSES, ignore_unknown_classes: bool = False,
                skip_bad_samples: bool = False, **kw) -> DetectionDataset:
    """The VOC reader of the format registry + DetectionDataset, as ``read_split`` / ``build_datasets`` use them."""
    policy = ReadPolicy(list(classes), ignore_unknown_classes, skip_bad_samples)
    records = FORMATS["voc"].read(sources, policy)
    return DetectionDataset(records, classes, skip_bad_samples=skip_bad_samples, report=policy.report, **kw)


def folder_dataset(root: Path, **kw) -> DetectionDataset:
    return voc_dataset([SplitSource("TRAIN_IMG", root / "images", root / "labels")], **kw)


# ----------------------------------------------------------------------------------------- coordinates
def test_coordinates_clamped_reordered_and_zero_area_dropped_with_one_warning(tmp_path):
    write_image(tmp_path / "images/a.jpg", 100, 80)
    write_xml(tmp_path / "labels/a.xml", [
        ("cat", (10.5, 20.25, 30.75, 40.5), 0),  # floats kept
        ("dog", (-5, -3, 20, 30), 0),  # negative -> 0
        ("cat", (90, 70, 150, 120), 0),  # beyond the image -> W, H
        ("dog", (50, 60, 40, 45), 0),  # reversed -> reordered
        ("cat", (120, 10, 130, 20), 0),  # fully outside -> no area -> dropped
        ("dog", (30, 30, 30, 50), 0),  # zero width -> dropped
    ])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = folder_dataset(tmp_path)
    msgs = [str(w.message) for w in rec if "box(es)" in str(w.message)]
    assert len(msgs) == 1 and "2 box(es) dropped" in msgs[0] and "3 box(es) clamped" in msgs[0]
    assert (ds.report.clamped_boxes, ds.report.dropped_boxes, ds.report.n_objects) == (3, 2, 4)
    image, target = ds[0]
    assert image.shape == (3, 80, 100) and image.dtype == torch.uint8
    expected = torch.tensor([[10.5, 20.25, 30.75, 40.5], [0, 0, 20, 30], [90, 70, 100, 80], [40, 45, 50, 60]])
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), expected)
    assert target["labels"].tolist() == [1, 2, 1, 2] and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["orig_boxes"], expected)
    assert target["orig_size"] == (80, 100) and target["image_id"] == 0


def test_size_from_decoded_image_not_xml_size(tmp_path):
    write_image(tmp_path / "images/a.png", 100, 80)
    write_xml(tmp_path / "labels/a.xml", [("cat", (50, 50, 500, 500), 0)], size=(1000, 1000))
    ds = folder_dataset(tmp_path, verbose=False)
    assert ds.report.size_mismatch == 1
    torch.testing.assert_close(ds[0][1]["orig_boxes"], torch.tensor([[50.0, 50, 100, 80]]))


def test_difficult_excluded_from_training_but_kept_for_eval(tmp_path):
    write_image(tmp_path / "images/a.jpg")
    write_xml(tmp_path / "labels/a.xml", [("cat", (1, 2, 30, 40), 0), ("dog", (40, 10, 90, 70), 1)])
    _, t = folder_dataset(tmp_path)[0]
    assert t["labels"].tolist() == [1]
    torch.testing.assert_close(t["boxes"].as_subclass(torch.Tensor), torch.tensor([[1.0, 2, 30, 40]]))
    assert t["orig_labels"].tolist() == [1, 2] and t["orig_difficult"].tolist() == [False, True]
    ds = folder_dataset(tmp_path, include_difficult=True)
    assert ds[0][1]["labels"].tolist() == [1, 2] and ds.report.n_difficult == 1


def test_image_without_objects_is_a_valid_negative(tmp_path):
    write_image(tmp_path / "images/a.jpg")
    write_xml(tmp_path / "labels/a.xml", [])
    ds = folder_dataset(tmp_path)
    _, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["orig_boxes"].shape == (0, 4)
    assert ds.report.n_negatives == 1


# ---------------------------------------------------------------------------------------- bad samples
def test_unknown_class_error_names_file_and_class(tmp_path):
    write_image(tmp_path / "images/a.jpg")
    xml = write_xml(tmp_path / "labels/a.xml", [("cat", (1, 1, 20, 20), 0), ("zebra", (5, 5, 30, 30), 0)])
    with pytest.raises(UserError, match=r"a\.xml.*'zebra'.*--ignore-unknown-classes") as exc:
        folder_dataset(tmp_path)
    assert str(xml) in str(exc.value) and "\n" not in str(exc.value)
    ds = folder_dataset(tmp_path, ignore_unknown_classes=True, verbose=False)
    assert ds.report.unknown_classes == {"zebra": 1}
    assert ds[0][1]["labels"].tolist() == [1]


def test_background_is_not_a_valid_object_class(tmp_path):
    write_image(tmp_path / "images/a.jpg")
    write_xml(tmp_path / "labels/a.xml", [("__background__", (1, 1, 20, 20), 0)])
    with pytest.raises(UserError, match="__background__"):
        folder_dataset(tmp_path)


def test_image_without_xml_is_a_background_image_counted_in_the_log(tmp_path):
    write_image(tmp_path / "images/good.jpg")
    write_xml(tmp_path / "labels/good.xml", [("cat", (1, 1, 20, 20), 0)])
    write_image(tmp_path / "images/empty.jpg", 60, 40)  # no XML: as YOLO's image without a label file
    with pytest.warns(UserWarning, match="1 image.s. without a label file or XML, used as background images"):
        ds = folder_dataset(tmp_path)
    assert len(ds) == 2 and ds.report.no_label_file == 1 and ds.report.n_negatives == 1
    k = [r.name for r in ds.records].index("empty.jpg")
    image, target = ds[k]
    assert image.shape == (3, 40, 60) and ds.records[k].annotation is None
    assert target["orig_boxes"].shape == (0, 4) and len(target["labels"]) == 0


@pytest.mark.parametrize("case", ["orphan_xml", "malformed_xml", "garbage_image", "bad_coord"])
def test_bad_sample_error_names_file_or_is_skipped_and_counted(tmp_path, case):
    write_image(tmp_path / "images/good.jpg")
    write_xml(tmp_path / "labels/good.xml", [("cat", (1, 1, 20, 20), 0)])
    if case == "orphan_xml":
        bad = write_xml(tmp_path / "labels/bad.xml", [("cat", (1, 1, 20, 20), 0)])
    elif case == "malformed_xml":
        write_image(tmp_path / "images/bad.jpg")
        bad = write_xml(tmp_path / "labels/bad.xml", raw="<annotation><object><name>cat</name>")
    elif case == "garbage_image":
        bad = tmp_path / "images/bad.jpg"
        bad.write_bytes(b"not an image at all" * 10)
        write_xml(tmp_path / "labels/bad.xml", [])
    else:
        write_image(tmp_path / "images/bad.jpg")
        bad = write_xml(tmp_path / "labels/bad.xml", [("cat", ("abc", 1, 20, 20), 0)])
    with pytest.raises(UserError, match="skip-bad-samples") as exc:
        folder_dataset(tmp_path)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)
    ds = folder_dataset(tmp_path, skip_bad_samples=True, verbose=False)
    assert len(ds) == 1 and ds.image_paths == [tmp_path / "images/good.jpg"]
    assert len(ds.report.bad_files) == 1 and str(bad) in ds.report.bad_files[0][1]


def noisy_jpeg(path: Path) -> Path:
    """A JPEG whose entropy-coded data is large, so cutting it in half leaves the header intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(path, quality=95)
    return path


def test_truncated_image_found_lazily_follows_skip_policy(tmp_path):
    good = noisy_jpeg(tmp_path / "images/a.jpg")
    bad = tmp_path / "images/b.jpg"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # header intact, data truncated
    for stem in "ab":
        write_xml(tmp_path / f"labels/{stem}.xml", [("dog", (1, 1, 20, 20), 0)])
    ds = folder_dataset(tmp_path)  # header-only checks pass: decode errors are found lazily
    assert len(ds) == 2
    with pytest.raises(UserError, match=r"b\.jpg.*skip-bad-samples"):
        ds[1]
    ds = folder_dataset(tmp_path, skip_bad_samples=True)
    with pytest.warns(UserWarning, match=r"skipping .*b\.jpg"):
        image, target = ds[1]
    assert target["image_id"] == 0 and image.shape == (3, 80, 100)  # replaced by the next good sample


def test_decode_error_in_a_worker_is_still_one_line(tmp_path):
    good = noisy_jpeg(tmp_path / "images/a.jpg")
    (tmp_path / "images/b.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    for stem in "ab":
        write_xml(tmp_path / f"labels/{stem}.xml", [], size=None)
    ds = folder_dataset(tmp_path, transform=build_transform("none", (32, 32), train=False))
    with pytest.raises(UserError) as exc:
        list(build_dataloader(ds, batch_size=2, workers=1))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("cannot decode image") and "b.jpg" in msg


def test_duplicate_stems_are_reported(tmp_path):
    write_image(tmp_path / "images/a.jpg")
    write_image(tmp_path / "images/a.png")
    write_xml(tmp_path / "labels/a.xml", [])
    with pytest.raises(UserError, match="share the stem 'a'"):
        folder_dataset(tmp_path)


# ---------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode,expected", [("L", (77, 77, 77)), ("RGBA", (200, 30, 60)), ("P", (200, 30, 60))])
def test_grayscale_rgba_palette_become_rgb(tmp_path, mode, expected):
    path = write_image(tmp_path / f"x_{mode}.png", 20, 10, mode=mode)
    img = read_image(path)
    assert img.shape == (3, 10, 20) and img.dtype == torch.uint8
    assert img[:, 5, 5].tolist() == list(expected)


@pytest.mark.parametrize("name", ["a.JPG", "b.Jpeg", "c.PNG", "d.BMP", "e.WEBP", "f.webp", "g.bmp"])
def test_any_format_any_case_is_listed_and_decoded(tmp_path, name):
    write_image(tmp_path / "images" / name, 30, 20, color=(10, 200, 90))
    write_xml(tmp_path / "labels" / (Path(name).stem + ".xml"), [("cat", (0, 0, 10, 10), 0)], size=None)
    ds = folder_dataset(tmp_path)
    image, _ = ds[0]
    assert image.shape == (3, 20, 30)
    assert (image[:, 10, 15].int() - torch.tensor([10, 200, 90])).abs().max() <= 3  # lossy JPEG tolerance


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_orientation_applied_to_pixels_sizes_and_clamping(tmp_path, ext):
    # 40 wide x 20 high stored; orientation 6 = rotate 90 clockwise for display -> 20 wide x 40 high
    write_image(tmp_path / f"images/a{ext}", 40, 20, exif_orientation=6)
    write_xml(tmp_path / "labels/a.xml", [("cat", (0, 0, 35, 35), 0)], size=(20, 40))
    assert read_image(tmp_path / f"images/a{ext}").shape == (3, 40, 20)
    assert image_size(tmp_path / f"images/a{ext}") == (40, 20)
    ds = folder_dataset(tmp_path, verbose=False)
    _, t = ds[0]
    assert t["orig_size"] == (40, 20)
    torch.testing.assert_close(t["orig_boxes"], torch.tensor([[0.0, 0, 20, 35]]))
    assert ds.report.size_mismatch == 1  # the XML said 40x20, as stored


def test_exif_rotation_moves_pixels(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # left quarter white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.png", exif=exif)
    img = read_image(tmp_path / "r.png")
    # rotating 90 degrees clockwise puts the left edge at the top
    assert img[:, :10].float().mean() > 250 and img[:, 10:].float().mean() < 5


def test_16bit_png_becomes_uint8(tmp_path):
    import cv2

    arr = np.full((10, 12, 3), 0, np.uint16)
    arr[..., 2] = 51400  # red in OpenCV's BGR order; 51400 >> 8 == 200
    cv2.imwrite(str(tmp_path / "p16.png"), arr)
    img = read_image(tmp_path / "p16.png")
    assert img.dtype == torch.uint8 and img[:, 3, 3].tolist() == [200, 0, 0]


def test_read_image_errors_are_user_errors(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"x\.jpg.*empty"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(UserError, match=r"nope\.jpg"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "y.png").write_bytes(b"\x89PNG garbage" * 5)
    with pytest.raises(UserError, match=r"cannot decode image .*y\.png"):
        read_image(tmp_path / "y.png")


# ---------------------------------------------------------------------------------------------- config
def reference_config(tmp_path: Path, text: str) -> Path:
    for split in ("train", "valid"):
        write_image(tmp_path / f"data/{split}/images/a.jpg")
        write_xml(tmp_path / f"data/{split}/labels/a.xml", [("cat", (1, 1, 30, 30), 0)])
    cfg = tmp_path / "cfgs/c.yaml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(text)
    return cfg


REFERENCE_CFG = """TRAIN_IMG: {root}/data/train/images
TRAIN_ANNOT: {root}/data/train/labels
VALID_IMG: ../data/valid/images
VALID_ANNOT: ../data/valid/labels
CLASSES: [__background__, cat, dog]
VISUALIZE_TRANSFORMED_IMAGES: false
"""


def test_reference_config_loads_with_relative_paths_against_config_folder(tmp_path):
    cfg = load_data_config(reference_config(tmp_path, REFERENCE_CFG.format(root=tmp_path)))
    assert cfg.classes == CLASSES and cfg.num_classes == 3
    assert cfg.valid[0].images == (tmp_path / "data/valid/images").resolve()
    assert cfg.visualize_transformed_images is False and cfg.skip_bad_samples is False
    train, valid = build_datasets(cfg, (64, 48), augment="flip")
    image, target = train[0]
    assert image.shape == (3, 48, 64) and target["boxes"].canvas_size == (48, 64)


def test_build_single_split_and_ground_truth_by_file_name(tmp_path):
    from src.detection.data.datasets import load_ground_truth

    cfg = load_data_config(reference_config(tmp_path, REFERENCE_CFG.format(root=tmp_path)))
    write_image(tmp_path / "data/valid/images/b.png")
    write_xml(tmp_path / "data/valid/labels/b.xml", [("dog", (-1, 2, 30, 40), 1), ("cat", (5, 6, 7, 8), 0)])
    with pytest.warns(UserWarning, match=r"c\.yaml valid: 1 box\(es\) clamped"):
        train, valid = build_datasets(cfg, (32, 32), splits=("valid",))
    assert train is None and len(valid) == 2
    with pytest.warns(UserWarning, match="clamped"):
        gts = load_ground_truth(cfg, "valid")
    assert sorted(gts) == ["a.jpg", "b.png"]
    torch.testing.assert_close(gts["b.png"]["boxes"], torch.tensor([[0.0, 2, 30, 40], [5, 6, 7, 8]]))
    assert gts["b.png"]["labels"].tolist() == [2, 1] and gts["b.png"]["difficult"].tolist() == [True, False]


def test_relative_paths_fall_back_to_repo_root(tmp_path):
    from src.detection.core.paths import REPO_ROOT
    text = REFERENCE_CFG.format(root=tmp_path).replace(f"{tmp_path}/data/train/images", "detection_configs")
    cfg = load_data_config(reference_config(tmp_path, text))
    assert cfg.train[0].images == (REPO_ROOT / "detection_configs").resolve()


def test_shipped_voc_config(tmp_path):
    from src.detection.core.paths import REPO_ROOT

    if (REPO_ROOT / "input/voc_07_12/voc_xml_dataset").is_dir():
        assert len(load_data_config("detection_configs/voc.yaml").classes) == 21
    else:  # the data is not downloaded here: the error names the file, the key and where it looked
        with pytest.raises(UserError, match=r"voc\.yaml: TRAIN_IMG: folder .*input/voc_07_12.* not found"):
            load_data_config("detection_configs/voc.yaml")
    import yaml

    raw = yaml.safe_load((REPO_ROOT / "detection_configs/voc.yaml").read_text())
    assert raw["CLASSES"][0] == "__background__" and len(raw["CLASSES"]) == 21


@pytest.mark.parametrize("text,pattern", [
    ("CLASSES: [__background__, cat]\nTRAIN_IMG: x\n", r"c\.yaml: missing key TRAIN_ANNOT, VALID_IMG, VALID_ANNOT"),
    ("TRAIN_IMG: a\n", r"c\.yaml: missing key CLASSES"),
    ("CLASSES: cat\n", r"c\.yaml: CLASSES must be a list"),
    ("CLASSES: [cat, dog]\n", r"c\.yaml: CLASSES must start with '__background__'"),
    ("CLASSES: [__background__, cat, cat]\n", r"c\.yaml: CLASSES lists cat more than once"),
    ("CLASSES: [__background__]\n", r"c\.yaml: CLASSES needs at least one"),
    ("- just a list\n", r"c\.yaml: expected a mapping"),
    ("a: [unclosed\n", r"c\.yaml: not valid YAML"),
    ("VISUALIZE_TRANSFORMED_IMAGES: 3\n", r"c\.yaml: VISUALIZE_TRANSFORMED_IMAGES must be true or false"),
    ("SKIP_BAD_SAMPLES: yes please\n", r"c\.yaml: SKIP_BAD_SAMPLES must be true or false"),
    ("TRAIN_IMG: nowhere/images\n", r"c\.yaml: TRAIN_IMG: folder 'nowhere/images' not found"),
    ("TRAIN_ANNOT: 5\n", r"c\.yaml: TRAIN_ANNOT must be a path string"),
])
def test_config_errors_are_one_line_naming_file_and_key(tmp_path, text, pattern):
    base = REFERENCE_CFG.format(root=tmp_path)
    # override keys of a valid config with the broken lines (YAML: last duplicate wins is not allowed -> rebuild)
    lines = {ln.split(":")[0]: ln for ln in base.splitlines()}
    if text.startswith("- ") or text.startswith("a: "):
        body = text
    else:
        for ln in text.splitlines():
            lines[ln.split(":")[0]] = ln
        if "missing key TRAIN_ANNOT" in pattern:
            lines = {k: v for k, v in lines.items() if not k.startswith(("TRAIN_ANNOT", "VALID"))}
        if "missing key CLASSES" in pattern:
            lines.pop("CLASSES")
        body = "\n".join(lines.values()) + "\n"
    cfg = reference_config(tmp_path, body)
    with pytest.raises(UserError, match=pattern) as exc:
        load_data_config(cfg)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match=r"--config .*nope\.yaml: file not found"):
        load_data_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("content,pattern", [
    (None, r"nope\.yaml: file not found; pass "),
    ("folder", r"nope\.yaml: a folder, not a YAML file"),
    (b"CLASSES: [caf\xe9]\n", r"nope\.yaml: not UTF-8 text \(byte 13\); save it as UTF-8"),
    (b"a: 1\nb: [unclosed\n", r"nope\.yaml: not valid YAML \(.* at line 3\); fix the syntax"),
    (b"", r"nope\.yaml: expected a mapping .*, got an empty file"),
    (b"- a\n- b\n", r"nope\.yaml: expected a mapping .*, got a list"),
])
def test_yaml_problems_read_the_same_in_every_reader(tmp_path, content, pattern):
    """Dataset configs (training and inference) and --cfg run files share one reader: one line naming flag + file."""
    from src.detection.data.datasets import load_config_classes
    from src.detection.engine.config import TrainConfig

    path = tmp_path / "nope.yaml"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    for read, flag in ((load_data_config, "--config"), (load_config_classes, "--config"),
                       (TrainConfig.from_yaml, "--cfg")):
        with pytest.raises(UserError, match=rf"^{flag} .*{pattern}") as exc:
            read(path)
        assert "\n" not in str(exc.value)


def make_devkit(root: Path) -> None:
    for year, ids in (("2007", {"trainval": ["000001", "000002"], "test": ["000003"]}), ("2012", {"trainval": ["2012_1"]})):
        d = root / f"VOC{year}"
        (d / "ImageSets/Main").mkdir(parents=True)
        for split, names in ids.items():
            (d / f"ImageSets/Main/{split}.txt").write_text("\n".join(names) + "\n")
            for n in names:
                write_image(d / f"JPEGImages/{n}.jpg")
                write_xml(d / f"Annotations/{n}.xml", [("dog", (5, 5, 50, 50), 0)])


def test_vocdevkit_config_combines_years(tmp_path):
    make_devkit(tmp_path / "VOCdevkit")
    cfg_path = tmp_path / "devkit.yaml"
    cfg_path.write_text("VOC_ROOT: VOCdevkit\nTRAIN_SETS: [[2007, trainval], [2012, trainval]]\n"
                        "VALID_SETS: [[2007, test]]\nCLASSES: [__background__, cat, dog]\n")
    cfg = load_data_config(cfg_path)
    train, valid = build_datasets(cfg, (64, 64), augment="none")
    assert [p.name for p in train.image_paths] == ["000001.jpg", "000002.jpg", "2012_1.jpg"]
    assert [p.name for p in valid.image_paths] == ["000003.jpg"]
    assert valid[0][1]["labels"].tolist() == [2]

    cfg_path.write_text("VOC_ROOT: VOCdevkit\nTRAIN_SETS: [[2007, train]]\nVALID_SETS: [[2007, test]]\n"
                        "CLASSES: [__background__, dog]\n")
    with pytest.raises(UserError, match=r"devkit\.yaml: TRAIN_SETS: split file .*train\.txt not found"):
        load_data_config(cfg_path)
    cfg_path.write_text("VOC_ROOT: VOCdevkit\nTRAIN_SETS: 2007\nVALID_SETS: [[2007, test]]\nCLASSES: [__background__, dog]\n")
    with pytest.raises(UserError, match=r"devkit\.yaml: TRAIN_SETS must be a list of \[year, split\]"):
        load_data_config(cfg_path)
    cfg_path.write_text("VOC_ROOT: VOCdevkit\nTRAIN_IMG: x\nCLASSES: [__background__, dog]\n")
    with pytest.raises(UserError, match=r"devkit\.yaml: VOC_ROOT and TRAIN_IMG are both set"):
        load_data_config(cfg_path)
    cfg_path.write_text("VOC_ROOT: VOCdevkit\nTRAIN_SETS: [[2009, trainval]]\nVALID_SETS: [[2007, test]]\nCLASSES: [__background__, dog]\n")
    with pytest.raises(UserError, match=r"TRAIN_SETS: no folder VOC2009"):
        load_data_config(cfg_path)


def test_devkit_listed_id_without_image(tmp_path):
    make_devkit(tmp_path / "VOCdevkit")
    (tmp_path / "VOCdevkit/VOC2007/JPEGImages/000002.jpg").unlink()
    src = SplitSource("TRAIN_SETS", devkit_dir=tmp_path / "VOCdevkit/VOC2007", split="trainval")
    with pytest.raises(UserError, match=r"image 000002 listed in .*trainval\.txt not found"):
        voc_dataset([src])


# ---------------------------------------------------------------------------------------------- loaders
def small_dataset(tmp_path: Path, n: int = 6, preset: str = "flip") -> DetectionDataset:
    rng = np.random.default_rng(1)
    for i in range(n):
        path = tmp_path / f"images/{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = 40 + 7 * i, 30 + 5 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        write_xml(tmp_path / f"labels/{i}.xml", [("cat", (2, 3, 20, 25), 0)] * (i % 3), size=(h, w))
    return folder_dataset(tmp_path, transform=build_transform(preset, (48, 32), letterbox=False, train=True))


def test_dataloader_batches_are_uint8_stacked_and_seeded(tmp_path):
    ds = small_dataset(tmp_path)
    loader = build_dataloader(ds, batch_size=4, workers=0, shuffle=True, seed=3)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 32, 48) and images.dtype == torch.uint8 and len(targets) == 4
    assert all(t["boxes"].canvas_size == (32, 48) for t in targets)

    def run(seed):
        torch.manual_seed(123)  # augmentation RNG in the main process (workers=0)
        return [(x.clone(), [t["image_id"] for t in ts]) for x, ts in build_dataloader(ds, 4, 0, True, seed)]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x1, x2) and i1 == i2 for (x1, i1), (x2, i2) in zip(a, b))
    assert [i for _, i in a] != [i for _, i in c]


def test_dataloader_with_workers_is_deterministic(tmp_path):
    ds = small_dataset(tmp_path)

    def run():
        loader = build_dataloader(ds, 3, workers=1, shuffle=True, seed=5)
        assert loader.persistent_workers
        return [x.clone() for x, _ in loader]

    first, second = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_collate_fn_stacks_or_lists():
    a = (torch.zeros(3, 4, 5, dtype=torch.uint8), {"image_id": 0})
    b = (torch.ones(3, 4, 5, dtype=torch.uint8), {"image_id": 1})
    images, targets = collate_fn([a, b])
    assert images.shape == (2, 3, 4, 5) and [t["image_id"] for t in targets] == [0, 1]
    c = (torch.ones(3, 6, 5, dtype=torch.uint8), {"image_id": 2})
    images, _ = collate_fn([a, c])
    assert isinstance(images, list) and len(images) == 2


def test_distributed_sampler(tmp_path):
    import torch.distributed as dist

    ds = small_dataset(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        loader = build_dataloader(ds, 2, workers=0, shuffle=True, seed=0, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        ids = sorted(t["image_id"] for _, ts in loader for t in ts)
        assert ids == list(range(len(ds)))
    finally:
        dist.destroy_process_group()


def test_save_transformed_samples_writes_pngs(tmp_path):
    ds = small_dataset(tmp_path / "d", preset="ssd")
    paths = save_transformed_samples(ds, tmp_path / "vis", n=3)
    assert len(paths) == 3
    for p in paths:
        assert Image.open(p).size == (48, 32)


def test_analyze_reports_problems_and_writes_plots(tmp_path, capsys):
    from src.detection.commands import analyze

    cfg = reference_config(tmp_path, REFERENCE_CFG.format(root=tmp_path))
    write_image(tmp_path / "data/train/images/b.jpg")
    write_xml(tmp_path / "data/train/labels/b.xml", [("zebra", (1, 1, 9, 9), 0), ("dog", (-4, 0, 300, 10), 1),
                                                     ("cat", (5, 5, 5, 9), 0)])
    write_xml(tmp_path / "data/train/labels/orphan.xml", [])
    assert analyze.main(["--config", str(cfg), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| cat | 1 (0) | 1 (0) |" in out and "| dog | 1 (1) | 0 (0) |" in out
    assert "1 box(es) clamped" in out and "1 box(es) dropped" in out and "zebra x1" in out
    assert "1 bad sample(s)" in out and "orphan.xml" in out
    assert (tmp_path / "plots/class_counts.png").stat().st_size > 0
    assert (tmp_path / "plots/box_stats.png").stat().st_size > 0


def test_analyze_decodes_every_image_and_reports_a_truncated_one(tmp_path, capsys):
    from src.detection.commands import analyze

    cfg = reference_config(tmp_path, REFERENCE_CFG.format(root=tmp_path))
    good = noisy_jpeg(tmp_path / "data/train/images/noisy.jpg")
    cut = tmp_path / "data/train/images/cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # header intact: parsing alone passes it
    for stem in ("noisy", "cut"):
        write_xml(tmp_path / f"data/train/labels/{stem}.xml", [("dog", (1, 1, 20, 20), 0)])
    assert analyze.main(["--config", str(cfg), "--out", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    assert "train problem: 1 bad sample(s) skipped" in captured.out and f"cannot decode image {cut}" in captured.out
    assert "train: no problems found" not in captured.out
    assert "decoding train images" in captured.err  # the progress bar


def test_drop_undecodable_names_the_files_or_skips_and_counts_them(tmp_path):
    from src.detection.data.datasets import drop_undecodable

    good = noisy_jpeg(tmp_path / "images/a.jpg")
    for stem in "bc":
        (tmp_path / f"images/{stem}.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for stem in "abc":
        write_xml(tmp_path / f"labels/{stem}.xml", [("dog", (1, 1, 20, 20), 0)])
    ds = folder_dataset(tmp_path, verbose=False)
    with pytest.raises(UserError) as exc:
        drop_undecodable(ds, skip_bad_samples=False, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "2 image(s) cannot be decoded" in msg and "--skip-bad-samples" in msg
    assert str(tmp_path / "images/b.jpg") in msg and str(tmp_path / "images/c.jpg") in msg
    assert len(ds) == 3  # nothing changed on an error
    with pytest.warns(UserWarning, match=r"skipping 2 image\(s\) that cannot be decoded"):
        assert drop_undecodable(ds, skip_bad_samples=True, progress=False) == 2
    assert ds.image_paths == [good] and ds.report.n_images == 1 and ds.report.n_objects == 1
    assert len(ds.report.bad_files) == 2
