"""The benchmark suite runs end to end in a tiny configuration and writes its table (no timing assertions)."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import bench_train, bench_video_memory, run_all
from benchmarks.common import markdown_table, verdict

REPO = Path(__file__).resolve().parents[1]

TINY_TRAIN = dict(model_name="dinov3_convnext_atto", imgsz=64, batches=(2,), steps={2: 1}, reps=1, warmup=0,
                  n_images=4, epoch_images=4, epoch_batch=2, epochs=2, variants=False, ops_imgsz=64, ops_steps=1)


def test_quick_suite_writes_table_with_finite_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # even smaller than --quick so the test stays fast; the code paths are the same
    monkeypatch.setattr(bench_train, "settings", lambda quick, device="cpu": dict(TINY_TRAIN))
    monkeypatch.setattr(bench_video_memory, "run", functools.partial(bench_video_memory.run, frames=24))
    # a module in the inference bench's row format (string goals, no unit/spread) must be adapted, not break
    fake = types.ModuleType("fake_infer")
    fake.run = lambda quick: [
        {"name": "images/s batch 1", "baseline": 2.0, "ours": 5.0, "ratio": 2.5, "goal": ">= 2x"},
        {"name": "step: bf16", "baseline": 2.0, "ours": 1.0, "ratio": 0.5, "goal": "keep if > 1"},
    ]
    monkeypatch.setitem(sys.modules, "fake_infer", fake)
    monkeypatch.setitem(run_all.BENCHES, "infer", "fake_infer")

    path, rows = run_all.run_suite(["train", "infer", "memory"], quick=True, devices=["cpu"], out_dir=tmp_path)

    assert path.parent == tmp_path and path.name.endswith("-quick.md") and path.is_file()
    text = path.read_text()
    assert "| benchmark | baseline | ours | ratio | goal | result |" in text
    assert "CPU:" in text and "torch " in text
    names = [r["name"] for r in rows]
    assert any(n.startswith("train images/s, batch 2: reference step vs ours") for n in names)
    assert any(n.startswith("epoch time without vs with --cache-features ram, from epoch 2") for n in names)
    assert any(n.startswith("peak RSS during a 24-frame video run") for n in names)
    for r in rows:
        assert r["result"] != "ERROR", r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("baseline", "ours", "ratio")), r
        assert r["name"] in text
    by_name = {r["name"]: r for r in rows}
    assert by_name["images/s batch 1"]["result"] == "pass" and by_name["step: bf16"]["result"] == "info"
    saved = json.loads(path.with_suffix(".json").read_text())
    assert [r["name"] for r in saved["rows"]] == names and saved["quick"] is True


def test_failing_bench_becomes_error_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    broken = types.ModuleType("broken_bench")

    def run(quick: bool):
        raise RuntimeError("boom")

    broken.run = run
    monkeypatch.setitem(sys.modules, "broken_bench", broken)
    monkeypatch.setitem(run_all.BENCHES, "eval", "broken_bench")
    path, rows = run_all.run_suite(["eval"], quick=True, devices=["cpu"], out_dir=tmp_path)
    assert len(rows) == 1 and rows[0]["result"] == "ERROR" and "RuntimeError: boom" in rows[0]["note"]
    assert "ERROR" in path.read_text()


@pytest.mark.parametrize("goal, ratio, expected", [
    (4.0, 4.5, "pass"), (4.0, 3.9, "FAIL"), (">= 2x", 2.0, "pass"), (">= 0.9", 0.85, "FAIL"),
    ("keep if > 1", 3.0, "info"), ("info", 0.1, "info"), (1.5, math.nan, "n/a"),
])
def test_verdict(goal, ratio, expected):
    assert verdict({"goal": goal, "ratio": ratio}) == expected


def test_table_shows_units_and_spread():
    row = {"name": "x", "baseline": 1.28, "ours": 2.5, "ratio": 1.953, "goal": 1.5, "unit": "img/s",
           "baseline_spread": (1.2, 1.3), "ours_spread": (2.4, 2.6)}
    line = markdown_table([row]).splitlines()[-1]
    assert line.startswith("| x | 1.28 img/s (1.2-1.3) | 2.5 img/s (2.4-2.6) | 1.95x | >= 1.5x | pass |")


def test_cli_rejects_unknown_bench():
    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--only", "train,nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    from benchmarks.run_all import BENCHES

    assert out.stderr.strip() == (f"error: --only 'train,nope': unknown benchmark nope; choose from "
                                  f"{','.join(BENCHES)}")
