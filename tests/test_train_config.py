"""TrainConfig and its parser: the reference's command line, typed-flag tracking for --resume, --cfg round trips,
help texts, and the training precision rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from src.detection.commands.train import build_parser, parse_train_config, typed_options
from src.detection.commands.train import main as train_main
from src.detection.core.errors import UserError
from src.detection.core.runtime import amp_settings
from src.detection.engine.config import RESUME_OVERRIDABLE, DetectorOptions, TrainConfig, resume_config
from src.detection.engine.training import saved_config
from src.detection.modeling.config import DetectorConfig

REFERENCE = ("--weight dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth --model-name dinov3_convnext_tiny "
             "--imgsz 640 640 --lr 0.0001 --epochs 30 --workers 8 --batch 8 --config detection_configs/voc.yaml "
             "--head retinanet").split()


def test_reference_command_parses_to_the_right_config():
    cfg, typed = parse_train_config(REFERENCE)
    assert (cfg.weights, cfg.detector.model_name, cfg.detector.imgsz, cfg.lr, cfg.epochs, cfg.runtime.workers,
            cfg.runtime.batch, cfg.config, cfg.detector.head) == (
        "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth", "dinov3_convnext_tiny", (640, 640), 1e-4, 30, 8, 8,
        "detection_configs/voc.yaml", "retinanet")
    assert cfg.weight_decay == TrainConfig().weight_decay  # --weight is not an abbreviation of --weight-decay
    assert typed == {"weights", "model_name", "imgsz", "lr", "epochs", "workers", "batch", "config", "head"}
    # the reference's optional flags, spelled as it spells them
    cfg, _ = parse_train_config([*REFERENCE, "--optimizer", "AdamW", "--scheduler", "--scheduler-epochs", "20",
                                 "--feautre-extractor", "last"])
    assert (cfg.optimizer, cfg.scheduler, cfg.lr_steps, cfg.detector.feature_extractor) == (
        "adamw", "multistep", [20], "last")
    assert parse_train_config(["--optimizer", "SGD"])[0].optimizer == "sgd"
    assert parse_train_config(["--scheduler", "cosine"])[0].scheduler == "cosine"  # our own values keep working
    cfg, _ = parse_train_config(["--repo-dir", "dinov3/dinov3", "--backbone-impl", "hub"])
    assert cfg.repo_dir == "dinov3/dinov3"


def test_no_abbreviations_and_clear_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--weight-dec", "0.1"])  # allow_abbrev=False
    with pytest.raises(UserError, match="--scheduler-epochs"):
        parse_train_config(["--scheduler"])  # the reference's bare switch needs milestones
    with pytest.raises(UserError, match="--fine-tune"):
        parse_train_config(["--fine-tune", "--unfreeze-last", "2"])
    for argv in (["--unfreeze-last", "1"], ["--fine-tune"], ["--augment", "ssd"]):  # features change every epoch
        with pytest.raises(UserError, match="--cache-features"):
            parse_train_config(["--cache-features", *argv])


def test_amp_is_an_alias_of_precision():
    for argv, expected in ((["--amp", "none"], "fp32"), (["--amp"], "auto"), (["--amp", "bf16"], "bf16"),
                           (["--precision", "fp16"], "fp16"), ([], "auto")):
        cfg, typed = parse_train_config(argv)
        assert cfg.runtime.precision == expected, argv
        assert ("precision" in typed) == bool(argv)


def test_typed_options_are_the_ones_on_the_command_line_whatever_their_value():
    default = TrainConfig()
    argv = ["--epochs", str(default.epochs), "--letterbox", "--imgsz", "640", "--cache-features", "--score-thresh",
            "0.05"]
    assert typed_options(argv) == {"epochs", "letterbox", "imgsz", "cache_features", "score_thresh"}
    assert typed_options([]) == set()


def test_resume_takes_typed_flags_even_at_their_default_value():
    saved = TrainConfig.from_dict({"epochs": 10, "eval_interval": 5, "lr": 1e-3, "workers": 0})
    given, typed = parse_train_config(["--resume", "x.pth", "--epochs", "30", "--eval-interval", "1", "--lr", "5e-4"])
    assert (given.epochs, given.eval_interval) == (TrainConfig().epochs, TrainConfig().eval_interval)  # defaults
    merged, ignored = resume_config(saved, given, typed)
    assert (merged.epochs, merged.eval_interval) == (30, 1)  # typed: replace the saved values
    assert merged.lr == 1e-3 and ignored == ["lr"]  # not resume-overridable: kept, and reported
    assert merged.runtime.workers == 0 and merged.resume == "x.pth"  # not typed: saved value
    merged, ignored = resume_config(saved, *parse_train_config(["--resume"]))
    assert merged.epochs == 10 and ignored == []
    # typing the saved value of a fixed option is not "ignoring" it
    assert resume_config(saved, *parse_train_config(["--resume", "--lr", "1e-3"]))[1] == []
    assert {"epochs", "workers", "device", "eval_interval", "precision"} <= RESUME_OVERRIDABLE


def test_cfg_file_round_trip_and_typed_overrides(tmp_path: Path):
    cfg, _ = parse_train_config(["--model-name", "dinov3_vits16", "--imgsz", "320", "256", "--letterbox",
                                 "--scheduler", "multistep", "--lr-steps", "5", "8", "--amp", "none",
                                 "--name", "run_a", "--resume", "some.pth"])
    path = cfg.save_yaml(tmp_path / "args.yaml")
    again, typed = parse_train_config(["--cfg", str(path)])
    assert typed == frozenset()
    # the run-control options are not part of the stored run
    assert again == cfg.replace(name=None, resume=None)
    assert again.to_dict() == cfg.to_dict()
    changed, typed = parse_train_config(["--cfg", str(path), "--epochs", "3", "--imgsz", "640"])
    assert changed == again.replace(epochs=3, imgsz=(640, 640)) and typed == {"epochs", "imgsz"}
    # args.yaml stays flat: one key per option, as files of older versions have them
    assert set(path.read_text().split("\n")[1:]) >= {"epochs: 30", "batch: 8", "model_name: dinov3_vits16"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nnot_an_option: 1\n")
    with pytest.raises(UserError, match="not_an_option"):
        parse_train_config(["--cfg", str(bad)])
    with pytest.raises(UserError, match="missing.yaml"):
        parse_train_config(["--cfg", str(tmp_path / "missing.yaml")])


def test_checkpoints_of_the_argparse_era_still_resume():
    old = {"path": "old.pth", "args": {**vars(build_parser().parse_args([])), "amp": "none", "epochs": 7}}
    old["args"].pop("precision")
    cfg = saved_config(old)
    assert cfg.runtime.precision == "fp32" and cfg.epochs == 7


def test_runs_saved_before_the_separable_head_resume_with_their_dense_head():
    """A stored run without ``head_separable`` was trained with dense head convs: resuming it must rebuild those
    (whatever the default is now), while a run that recorded its head keeps it."""
    stored = {k: v for k, v in TrainConfig().to_dict().items() if k != "head_separable"}
    assert saved_config({"path": "old.pth", "train_config": stored}).detector.head_separable is False
    old_args = {**vars(build_parser().parse_args([]))}
    old_args.pop("head_separable")
    assert saved_config({"path": "old.pth", "args": old_args}).detector.head_separable is False
    recorded = {**stored, "head_separable": True}
    assert saved_config({"path": "new.pth", "train_config": recorded}).detector.head_separable is True


def test_every_option_has_help_and_help_shows_defaults(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    assert set(TrainConfig().options()) - {a.dest for a in parser._actions} == {"arch_overrides"}
    with pytest.raises(SystemExit) as exc:
        train_main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for needle in ("(default: 30)", "(default: auto)", "--feautre-extractor", "--weight", "--cfg", "optimisation",
                   "--eval-score-thresh"):
        assert needle in out, needle
    # training's --threshold (the evaluation score threshold) is not the inference commands' drawing threshold:
    # its older spellings still parse (test_eval_only_hands_over_the_model_options_the_user_gave) but are not offered
    assert "[--threshold" not in out and "[--score-thresh" not in out


def test_the_detector_options_are_the_detector_config_fields():
    """TrainConfig holds the detector as one part: its fields and defaults are DetectorConfig's, built without
    copying (the class count comes from the data; mean/std/size multiple from the built backbone)."""
    config = {f.name: f for f in dataclasses.fields(DetectorConfig)}
    options = dataclasses.fields(DetectorOptions)
    assert {f.name for f in options} == set(config) - {"num_classes", "mean", "std", "size_multiple"}
    for f in options:
        if f.name != "model_name":  # required in DetectorConfig
            assert f.default == config[f.name].default, f.name
    cfg, _ = parse_train_config(["--model-name", "dinov3_vits16", "--head", "fcos", "--imgsz", "320", "256",
                                 "--eval-score-thresh", "0.1", "--no-head-separable"])
    det = cfg.detector_config(5)
    assert (det.model_name, det.head, det.imgsz, det.score_thresh, det.head_separable, det.num_classes) == (
        "dinov3_vits16", "fcos", (320, 256), 0.1, False, 5)
    with pytest.raises(UserError, match="--head 'yolo' is not valid"):  # checked once, by DetectorConfig
        TrainConfig.from_dict({"head": "yolo"})


@pytest.mark.parametrize("capability, dtype, scaled", [((7, 5), torch.float16, True), ((7, 0), torch.float16, True),
                                                       ((8, 0), torch.bfloat16, False), ((9, 0), torch.bfloat16, False)])
def test_precision_auto_on_gpus_follows_native_bf16(monkeypatch, capability, dtype, scaled):
    # torch reports bf16 "supported" on T4/V100 too (emulated, slow): the compute capability must decide
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    got, scaler = amp_settings("auto", torch.device("cuda", 0))
    assert got == dtype and (scaler is not None) == scaled
    assert amp_settings("fp32", torch.device("cuda", 0)) == (None, None)


def test_precision_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(UserError, match="--precision fp16"):
        amp_settings("fp16", torch.device("cpu"))
    assert amp_settings("fp32", torch.device("cpu")) == (None, None)
