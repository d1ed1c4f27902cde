"""End-to-end training on a tiny synthetic set: outputs, learning, resume after a kill, errors, --eval-only.

The command runs in-process through ``commands.train.main`` (``run_main``); a subprocess only where the process
matters: the CLI wrapper's exit status and the run killed mid-epoch (with the runs it is compared with).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from src.detection.checkpoint.source import ModelSource
from src.detection.commands.train import main as train_main
from src.detection.commands.train import parse_train_config
from src.detection.core.cli import RuntimeOptions
from src.detection.engine.evaluation import EvalConfig, evaluate_checkpoint
from src.detection.engine.training import eval_only_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs: tiny models, as the subprocesses run them


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from src.detection.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("shapes"), 48, 16, imgsz=96, seed=1)


@pytest.fixture
def train(run_main):
    """train_detection.py's command in-process: ``train(args)`` -> CompletedProcess (exit status, stdout, stderr)."""
    return lambda args: run_main(train_main, args)


def evaluate_run(config: Path, model: Path, batch: int) -> object:
    """Scored on the CPU: the runs compared with it train with --device cpu (a GPU's sums differ in the last digits)."""
    return evaluate_checkpoint(EvalConfig(config=str(config), source=ModelSource(model=str(model)),
                                          runtime=RuntimeOptions(device="cpu", batch=batch, workers=0)))


@pytest.mark.slow
def test_training_writes_every_output_and_learns(shapes: Path, tmp_path: Path, train, tiny_train_args,
                                                 read_results):
    # Scored on its own training images: a frozen *random* backbone needs ~1,600 images to generalise (see
    # docs/DEMO.md), but fitting 48 images proves that targets, losses, optimiser and evaluation line up.
    fit = tmp_path / "fit.yaml"
    fit.write_text(shapes.read_text().replace("valid/", "train/").replace("train/", f"{shapes.parent}/train/"))
    out = train(["--config", str(fit), *tiny_train_args, "--batch", "4", "--epochs", "16", "--eval-interval", "8",
                 "--out-dir", str(tmp_path), "--name", "r", "--cache-features", "ram", "--augment", "none",
                 "--precision", "fp32", "--device", "cpu"])
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "r"
    for name in ("best_model.pth", "last_model.pth", "results.csv", "train_loss.png", "map.png", "args.yaml",
                 "per_class_ap.csv", "per_class_ap.txt", "per_class_ap.png", "pr_curves.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    r = read_results(run)
    assert [int(x["epoch"]) for x in r] == list(range(1, 17))
    assert [x["epoch"] for x in r if not math.isnan(x["map"])] == [8, 16]  # --eval-interval
    assert r[-1]["train_loss"] < r[0]["train_loss"]  # epoch-mean loss goes down
    assert r[-1]["map50"] > 0.1  # stated floor; an untrained model scores < 0.01 here
    assert "total parameters." in out.stdout and "WARNING" in out.stderr and "RANDOM" in out.stderr.upper()
    # a model that learned recommends its best-F1 threshold, stored for --threshold auto
    best_meta = torch.load(run / "best_model.pth", weights_only=True)["meta"]
    assert f"best score threshold {best_meta['best_threshold']:.3f}: F1 " in out.stdout
    assert "(inference: --threshold auto)" in out.stdout and best_meta["best_threshold_f1"] > 0
    ckpt = torch.load(run / "last_model.pth", weights_only=True)
    assert ckpt["epoch"] == 16 and ckpt["meta"]["classes"][0] == "__background__"
    assert ckpt["meta"]["input"]["imgsz"] in ([96, 96], (96, 96)) and ckpt["meta"]["head"] == "fcos"
    assert ckpt["train_config"] == yaml.safe_load((run / "args.yaml").read_text())
    assert ckpt["train_config"]["cache_features"] == "ram" and ckpt["train_config"]["epochs"] == 16
    # the run records the head it built (not "the default"), as the model metadata does
    # (here the default: torchvision's dense head; the CPU recipe passes --head-separable)
    assert ckpt["train_config"]["head_separable"] is False and ckpt["meta"]["head_separable"] is False
    assert ckpt["train_config"]["head_convs"] == ckpt["meta"]["head_convs"] == 4
    # validation ran on cached maps (fp16): evaluating the checkpoint on the images agrees to the tolerance the
    # README states for --cache-features (1e-3; exact without the cache, test_ema_best_model_...)
    result = evaluate_run(fit, run / "best_model.pth", batch=4)
    assert result.map == pytest.approx(r[-1]["map"], abs=1e-3) and result.map50 == pytest.approx(r[-1]["map50"], abs=1e-3)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(shapes: Path, tmp_path: Path, run_script, tiny_train_args,
                                                     read_results):
    # every run in its own process, as the killed one must be: the same threads and kernels for an exact comparison
    def train(args):
        return run_script("train_detection.py", *args)

    common = ["--config", str(shapes), *tiny_train_args, "--epochs", "3", "--out-dir", str(tmp_path), "--workers", "1"]
    ref = train([*common, "--name", "ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "train_detection.py", *common, "--name", "killed"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = tmp_path / "killed" / "results.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:  # epoch 1 finished and saved
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "killed" / "last_model.pth").exists()

    resumed = train(["--resume", str(tmp_path / "killed" / "last_model.pth")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_results(tmp_path / "ref"), read_results(tmp_path / "killed")
    assert [int(x["epoch"]) for x in b] == [1, 2, 3]
    for x, y in zip(a, b):
        for key in ("train_loss", "map", "map50"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (key, x["epoch"])
    wa = torch.load(tmp_path / "ref" / "last_model.pth", weights_only=True)["model"]
    wb = torch.load(tmp_path / "killed" / "last_model.pth", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)

    # a finished run can be extended with a larger --epochs
    more = train(["--resume", str(tmp_path / "ref" / "last_model.pth"), "--epochs", "4"])
    assert more.returncode == 0, more.stderr[-2000:]
    assert [int(x["epoch"]) for x in read_results(tmp_path / "ref")] == [1, 2, 3, 4]


def test_cli_wrapper_exits_2_with_one_error_line(run_script, tmp_path: Path):
    out = run_script("train_detection.py", "--eval-only", "--out-dir", str(tmp_path / "runs"), timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--model" in lines[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, expected", [
    (b"not a checkpoint at all", "corrupt"),
    (None, "not a checkpoint of this toolkit"),
])
def test_resume_with_bad_checkpoint_is_one_clear_line(tmp_path: Path, run_main, content, expected):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    else:
        path.write_bytes(content)
    out = run_main(train_main, ["--resume", str(path)])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0]


def test_user_mistakes_give_one_line(tmp_path: Path, shapes: Path, run_main, tiny_train_args):
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["--config", str(shapes), "--model-name", "dinov3_convnext_huge"], "dinov3_convnext_tiny"),
        (["--config", str(shapes), "--weights", "nope.pth"], "nope.pth"),
        (["--config", str(shapes), *tiny_train_args, "--augment", "ssd", "--cache-features", "ram"], "--cache-features"),
        (["--config", str(shapes), *tiny_train_args, "--augment", "strong", "--resize-on-device"],
         "--resize-on-device"),
        (["--eval-only"], "--model"),
        (["--eval-only", "--model", str(tmp_path / "missing.pth"), "--config", str(shapes)], "missing.pth"),
    ]
    for args, needle in cases:
        out = run_main(train_main, [*args, "--out-dir", str(tmp_path / "runs")])
        assert out.returncode == 2, (args, out.stderr[-1000:])
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (args, out.stderr)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a failed start must not leave run folders behind"


def test_resizing_on_the_device_trains_as_the_loader_resize(shapes: Path, tmp_path: Path, train, tiny_train_args,
                                                             read_results):
    """The same run with the images resized in the loader and by the training step (on the CPU here: the equal
    pixels make equal losses and scores; the pipelines themselves are compared in test_device_resize.py)."""
    rows = {}
    for flag in ("--resize-on-device", "--no-resize-on-device"):
        out = train(["--config", str(shapes), *tiny_train_args, "--epochs", "1", "--out-dir", str(tmp_path),
                     "--name", flag.lstrip("-"), "--precision", "fp32", "--device", "cpu", "--augment", "flip", flag])
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("resized on cpu in batches" in out.stdout) == (flag == "--resize-on-device")
        rows[flag] = read_results(tmp_path / flag.lstrip("-"))[0]
    deferred, loader = rows["--resize-on-device"], rows["--no-resize-on-device"]
    assert deferred["train_loss"] == pytest.approx(loader["train_loss"], rel=1e-5)
    assert deferred["map"] == pytest.approx(loader["map"], abs=1e-4) and loader["train_loss"] > 0


def test_eval_only_scores_a_checkpoint(shapes: Path, tmp_path: Path, run_main, tiny_train_args, read_results):
    out = run_main(train_main, ["--config", shapes, *tiny_train_args, "--epochs", "1", "--out-dir", tmp_path,
                                "--name", "e"])
    assert out.returncode == 0, out.stderr[-2000:]
    ev = run_main(train_main, ["--eval-only", "--model", tmp_path / "e" / "best_model.pth", "--config", shapes,
                               "--workers", "0"])
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "AP50" in ev.stdout and "circle" in ev.stdout
    logged = read_results(tmp_path / "e")[0]["map50"]
    reported = [ln for ln in ev.stdout.splitlines() if ln.startswith("all")][0].split()
    assert float(reported[2]) == pytest.approx(logged, abs=1e-3)


def test_eval_only_hands_over_the_model_options_the_user_gave(tmp_path: Path):
    argv = ["--eval-only", "--model", "ref.pth", "--config", "data.yaml", "--model-name", "dinov3_vits16",
            "--imgsz", "320", "--device", "cpu", "--batch", "2", "--precision", "fp32"]
    cfg = eval_only_config(*parse_train_config(argv))
    src = cfg.source
    assert (src.model, src.model_name, src.imgsz, src.head, src.feature_extractor, src.weights) == (
        "ref.pth", "dinov3_vits16", (320, 320), None, None, None)  # untyped: the checkpoint's own
    assert (cfg.runtime.device, cfg.runtime.batch, cfg.runtime.precision) == ("cpu", 2, "fp32")
    assert cfg.score_thresh is None and cfg.config == "data.yaml"  # the checkpoint's evaluation threshold
    for spelling in ("--eval-score-thresh", "--score-thresh", "--threshold"):  # older spellings still work
        assert eval_only_config(*parse_train_config([*argv, spelling, "0.3"])).score_thresh == 0.3
    assert eval_only_config(*parse_train_config(["--eval-only", "--model", "x.pth"])).runtime.precision == "auto"


def test_eval_only_takes_a_reference_checkpoint_described_by_flags(shapes: Path, tmp_path: Path, run_main,
                                                                   fixtures_dir: Path):
    """``--eval-only --model ref.pth --model-name X``: the reference project's checkpoint, described by the same
    flags the other commands take (architecture of the fixture-size ConvNeXt through --cfg)."""
    from torchvision.models.detection.retinanet import RetinaNetHead

    from src.detection.checkpoint import REFERENCE_BACKBONE_PREFIX
    from src.detection.data.synthetic import CLASSES

    folder = fixtures_dir / "convnext_tiny_random"
    backbone = torch.load(folder / "weights.pth", weights_only=True)
    torch.manual_seed(1)
    head = RetinaNetHead(64, 15, len(CLASSES))  # the torchvision head the reference put on the last map
    state = {REFERENCE_BACKBONE_PREFIX + k: v for k, v in backbone.items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    ref = tmp_path / "reference.pth"
    torch.save({"epoch": 3, "model_state_dict": state}, ref)
    arch = tmp_path / "arch.yaml"
    arch.write_text(yaml.safe_dump({"arch_overrides": json.loads((folder / "config.json").read_text())[
        "constructor_kwargs"]}))
    argv = ["--eval-only", "--model", ref, "--config", shapes, "--workers", "0", "--device", "cpu", "--imgsz", "64",
            "--out-dir", tmp_path / "runs"]
    out = run_main(train_main, ["--cfg", arch, *argv, "--model-name", "dinov3_convnext_tiny"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "AP50" in out.stdout and "triangle" in out.stdout
    missing = run_main(train_main, ["--cfg", arch, *argv])  # the run's default --model-name is no claim
    assert missing.returncode == 2 and "pass --model-name" in missing.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def partial_run(shapes: Path, tmp_path_factory, tiny_train_args, one_thread) -> Path:
    """One epoch with the last backbone stage trained (a finished run: --epochs 1)."""
    out_dir = tmp_path_factory.mktemp("partial")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert train_main(["--config", str(shapes), *tiny_train_args, "--epochs", "1", "--unfreeze-last", "1",
                           "--backbone-lr", "1e-3", "--layer-decay", "0.5", "--out-dir", str(out_dir),
                           "--name", "p"]) == 0
    assert "backbone last 1 of 4 layers trained" in stdout.getvalue()
    return out_dir / "p"


@pytest.mark.slow
def test_resume_with_more_epochs_extends_a_partially_unfrozen_run(partial_run: Path, tmp_path: Path, train,
                                                                  read_results):
    run = tmp_path / "p"
    shutil.copytree(partial_run, run)
    out = train(["--resume", str(run / "last_model.pth"), "--epochs", "2", "--lr", "0.5"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert [int(x["epoch"]) for x in read_results(run)] == [1, 2]  # the typed --epochs 2 replaced the saved 1
    note = [ln for ln in out.stdout.splitlines() if ln.startswith("note:")]
    assert len(note) == 1 and "--lr" in note[0]  # a typed flag a resume cannot change is reported, not used
    first = torch.load(partial_run / "last_model.pth", weights_only=True)
    second = torch.load(run / "last_model.pth", weights_only=True)
    assert second["epoch"] == 2 and second["train_config"]["lr"] == first["train_config"]["lr"]
    changed = {k for k in first["model"] if not torch.equal(first["model"][k], second["model"][k])}
    stage = "backbone.dino.model.stages."
    assert any(k.startswith(stage + "3.") for k in changed)  # the unfrozen last stage kept training
    assert not any(k.startswith(stage + "0.") for k in changed)  # the frozen ones did not


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_without_neck_weights(partial_run: Path, tmp_path: Path, train):
    run = tmp_path / "p"
    shutil.copytree(partial_run, run)
    ckpt = torch.load(run / "last_model.pth", weights_only=True)
    neck = [k for k in ckpt["model"] if k.startswith("backbone.neck.")]
    assert neck
    del ckpt["model"][neck[0]]
    torch.save(ckpt, run / "last_model.pth")
    out = train(["--resume", str(run / "last_model.pth"), "--epochs", "2"])
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and neck[0] in lines[0]


@pytest.mark.slow
def test_ema_best_model_holds_the_weights_that_were_scored(shapes: Path, tmp_path: Path, train, tiny_train_args,
                                                            read_results):
    out = train(["--config", str(shapes), *tiny_train_args, "--epochs", "1", "--ema", "--ema-decay", "0.5",
                 "--precision", "fp32", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "ema"])
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "ema"
    best = torch.load(run / "best_model.pth", weights_only=True)
    last = torch.load(run / "last_model.pth", weights_only=True)
    shadow = {k: v for k, v in last["ema"]["shadow"].items() if k in last["model"]}  # persistent tensors
    assert any(k.startswith("head.") for k in shadow)
    for k, v in shadow.items():
        torch.testing.assert_close(best["model"][k], v, rtol=0, atol=0)
    assert any(not torch.equal(shadow[k], last["model"][k]) for k in shadow)  # EMA != live weights here
    result = evaluate_run(shapes, run / "best_model.pth", batch=8)
    logged = read_results(run)[0]
    assert result.map == pytest.approx(logged["map"], abs=1e-6) and result.map50 == pytest.approx(logged["map50"], abs=1e-6)


@pytest.mark.slow
def test_reference_command_runs_end_to_end(shapes: Path, tmp_path: Path, fixtures_dir: Path, train, read_results):
    """The reference's literal command (scaled down: 64 px, 1 epoch) with a fixture-size official ConvNeXt."""
    folder = fixtures_dir / "convnext_tiny_random"
    arch = json.loads((folder / "config.json").read_text())["constructor_kwargs"]
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"arch_overrides": arch}))
    out = train(["--cfg", str(tiny),
                 "--weight", str(folder / "weights.pth"), "--model-name", "dinov3_convnext_tiny", "--imgsz", "64",
                 "64", "--lr", "0.0001", "--epochs", "1", "--workers", "0", "--batch", "8", "--config", str(shapes),
                 "--head", "retinanet", "--optimizer", "AdamW", "--scheduler", "--scheduler-epochs", "20",
                 "--feautre-extractor", "last", "--out-dir", str(tmp_path), "--name", "ref"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RANDOM" not in out.stderr.upper()  # the weights file was loaded
    saved = yaml.safe_load((tmp_path / "ref" / "args.yaml").read_text())
    assert (saved["optimizer"], saved["scheduler"], saved["lr_steps"], saved["feature_extractor"]) == (
        "adamw", "multistep", [20], "last")
    assert saved["arch_overrides"]["dims"] == arch["dims"] and len(read_results(tmp_path / "ref")) == 1


def test_results_csv_keeps_integer_columns_through_a_resume(tmp_path: Path):
    from src.detection.engine.training import read_csv, write_csv

    path = tmp_path / "results.csv"
    write_csv(path, [{"epoch": e, "train_loss": 1.5 / e, "map": math.nan, "skipped_steps": 0} for e in (1, 2)])
    rows = read_csv(path)  # what a resumed run starts from
    write_csv(path, [*rows, {"epoch": 3, "train_loss": 0.4, "map": 0.25, "skipped_steps": 2}])
    lines = path.read_text().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["epoch", "1", "2", "3"]
    skipped = lines[0].split(",").index("skipped_steps")
    assert [ln.split(",")[skipped] for ln in lines[1:]] == ["0", "0", "2"]
    assert read_csv(path)[2]["train_loss"] == pytest.approx(0.4) and math.isnan(read_csv(path)[0]["map"])


def test_resume_of_a_missing_run_names_the_folders(tmp_path: Path, run_main):
    runs = tmp_path / "runs"
    (runs / "run_1").mkdir(parents=True)
    (runs / "run_1" / "last_model.pth").write_bytes(b"")
    out = run_main(train_main, ["--resume", "--name", "nope", "--out-dir", runs])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(runs / "nope") in lines[0] and "run_1" in lines[0], lines
    assert "--model" not in lines[0]  # the --eval-only flag is no advice for a resume
    missing = run_main(train_main, ["--resume", tmp_path / "gone" / "last_model.pth", "--out-dir", runs])
    assert missing.returncode == 2 and "no such file" in missing.stderr and "run_1" in missing.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["run_1"]


def test_resume_of_a_finished_run_changes_nothing(partial_run: Path, tmp_path: Path, train):
    run = tmp_path / "p"
    shutil.copytree(partial_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for extra in ([], ["--epochs", "1"]):
        out = train(["--resume", str(run / "last_model.pth"), *extra])
        assert out.returncode == 2, out.stderr[-2000:]
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "p already finished 1/1 epochs; pass a larger --epochs" in lines[0]
        assert "resuming" not in out.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_eval_only_without_config_uses_the_checkpoints_dataset(partial_run: Path, run_main):
    out = run_main(train_main, ["--eval-only", "--model", partial_run / "best_model.pth", "--workers", "0",
                                "--device", "cpu"])
    assert out.returncode == 0, out.stderr[-2000:]
    recorded = yaml.safe_load((partial_run / "args.yaml").read_text())["config"]
    assert f"--config not given: using the dataset the checkpoint was trained on, {recorded}" in out.stdout
    assert "circle" in out.stdout and "AP50" in out.stdout


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c_and_prints_the_resume_command(shapes: Path, tmp_path: Path,
                                                                          tiny_train_args):
    proc = subprocess.Popen([sys.executable, "train_detection.py", "--config", str(shapes), *tiny_train_args,
                             "--epochs", "40", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "t"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = tmp_path / "t" / "results.csv"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 2:  # epoch 1 finished and saved
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what a job scheduler sends
    _, err = proc.communicate(timeout=120)
    last = tmp_path / "t" / "last_model.pth"
    assert proc.returncode == 130, err[-2000:]
    assert f"continue with: python train_detection.py --resume {last}" in err and "Traceback" not in err
    assert torch.load(last, weights_only=True)["epoch"] >= 1


def test_undecodable_image_stops_training_before_the_run_folder_or_is_skipped(shapes: Path, tmp_path: Path,
                                                                              run_main, tiny_train_args):
    data = tmp_path / "data"
    shutil.copytree(shapes.parent, data)
    image = sorted((data / "train" / "images").iterdir())[3]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact, pixels cut
    config = data / shapes.name
    runs = tmp_path / "runs"
    out = run_main(train_main, ["--config", config, *tiny_train_args, "--epochs", "1", "--out-dir", runs])
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(image) in lines[0] and "--skip-bad-samples" in lines[0], out.stderr[-2000:]
    assert not runs.exists()

    out = run_main(train_main, ["--config", config, *tiny_train_args, "--epochs", "1", "--out-dir", runs,
                                "--skip-bad-samples", "--name", "s"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipping 1 image(s) that cannot be decoded" in out.stderr
    assert "data: 47 training / 16 validation images" in out.stdout


def test_anchor_settings_train_travel_with_the_checkpoint_and_rebuild_the_model(shapes: Path, tmp_path: Path, train,
                                                                               tiny_train_args, read_results):
    from src.detection.checkpoint.build import model_from_checkpoint

    base = list(tiny_train_args)
    base[base.index("--head") + 1] = "retinanet"
    args = ["--config", shapes, *base, "--epochs", "1", "--device", "cpu", "--out-dir", tmp_path, "--name", "a",
            "--anchor-sizes", "12", "20", "40", "80", "160", "--anchor-ratios", "0.7", "1.4"]
    out = train(args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "matched by the --anchor-sizes/--anchor-ratios anchors" in out.stdout
    assert "anchor_sizes:\n- 12\n- 20\n" in (tmp_path / "a/args.yaml").read_text()
    model, card = model_from_checkpoint(tmp_path / "a/best_model.pth")
    assert model.config.anchor_sizes == (12, 20, 40, 80, 160) and model.config.anchor_ratios == (0.7, 1.4)
    assert model.anchor_generator.sizes[0] == (12, 15, 19) and model.anchor_generator.num_anchors_per_location()[0] == 6
    assert card["anchor_sizes"] == [12, 20, 40, 80, 160]  # the model card says what was built
    # the rebuilt model scores as the run did (a default-anchor rebuild would not even load: 6 anchors, not 9)
    ev = evaluate_run(shapes, tmp_path / "a/best_model.pth", batch=8)
    assert ev.map50 == pytest.approx(read_results(tmp_path / "a")[0]["map50"], abs=1e-4)
    bad = train([*args[:-9], "--name", "b", "--head", "fcos", "--anchor-sizes", "16"])
    assert bad.returncode == 2 and "--anchor-sizes: only RetinaNet has anchors to set" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
