"""``make bench``: run every benchmark, print ONE Markdown table and save it to ``outputs/bench/<timestamp>.md``.

    python -m benchmarks.run_all [--quick] [--only train,epoch,eval,infer,memory,tracking,video,logging,demo] [--device auto|cpu|cuda] [--out-dir DIR]

Each bench module exposes ``run(quick, ...) -> list[dict]`` rows ``{name, baseline, ours, ratio, goal}`` (see
``benchmarks/common.py``). Modules whose ``run`` takes a ``device`` run on the CPU and, when a GPU is present,
again on CUDA; the others run once (CPU). A module that fails becomes an ``error`` row and the exit status is 1,
so one broken bench does not hide the others' numbers. A ``.json`` with the raw rows is written next to the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import describe_machine, machine_info, markdown_table, verdict
from src.detection.core.errors import UserError, run_cli
from src.detection.core.paths import resolve_path

BENCHES = {
    "train": "benchmarks.bench_train",
    "epoch": "benchmarks.bench_epoch",
    "eval": "benchmarks.bench_eval",
    "infer": "benchmarks.bench_infer",
    "memory": "benchmarks.bench_video_memory",
    "tracking": "benchmarks.bench_tracking",
    "video": "benchmarks.bench_video",
    "logging": "benchmarks.bench_logging",
    "demo": "benchmarks.bench_demo",
}


def parse_only(value: str | None) -> list[str]:
    if not value:
        return list(BENCHES)
    keys = [k.strip() for k in value.split(",") if k.strip()]
    unknown = [k for k in keys if k not in BENCHES]
    if unknown or not keys:
        raise UserError(f"--only {value!r}: unknown benchmark {', '.join(unknown) or '(none)'}; "
                        f"choose from {','.join(BENCHES)}")
    return [k for k in BENCHES if k in keys]


def devices_for(device: str) -> list[str]:
    if device == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: use auto, cpu or cuda[:N]")
    return [device]


def normalize(row: dict[str, Any], bench: str) -> dict[str, Any]:
    """Adapt a module's row to the common format: required keys present, numbers as floats, ratio recomputed
    from baseline/ours only when a module left it out."""
    out = dict(row)
    out.setdefault("name", bench)
    for key in ("baseline", "ours", "ratio"):
        v = out.get(key)
        out[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    if math.isnan(out["ratio"]) and out["baseline"] and not math.isnan(out["ours"]):
        out["ratio"] = out["ours"] / out["baseline"]
    out.setdefault("goal", "info")
    out["bench"] = bench
    out["result"] = verdict(out)
    return out


def run_bench(key: str, quick: bool, devices: list[str]) -> list[dict[str, Any]]:
    """Import ``BENCHES[key]`` and run it once per device it supports; failures become one error row."""
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(BENCHES[key])
        fn: Callable[..., list[dict[str, Any]]] = module.run
        takes_device = "device" in inspect.signature(fn).parameters
        rows: list[dict[str, Any]] = []
        for device in devices if takes_device else ["cpu"]:
            kwargs = {"device": device} if takes_device else {}
            rows += [normalize(r, key) for r in fn(quick=quick, **kwargs)]
    except Exception as exc:  # noqa: BLE001 - report and go on with the other benches
        traceback.print_exc()
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return [{"name": f"{key}: error", "baseline": math.nan, "ours": math.nan, "ratio": math.nan, "goal": "-",
                 "bench": key, "result": "ERROR", "pass": False, "note": msg[:300]}]
    print(f"[bench] {key}: {len(rows)} rows in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict[str, Any]], info: dict[str, Any], quick: bool, started: dt.datetime,
           seconds: float) -> str:
    mode = "quick (tiny models, small images)" if quick else "full (dinov3_convnext_tiny @640 for the model rows)"
    lines = [f"# Benchmark results - {started:%Y-%m-%d %H:%M}", "",
             f"- mode: {mode}; whole suite {seconds / 60:.1f} min",
             f"- machine: {describe_machine(info)}", "",
             markdown_table(rows), "",
             "baseline / ours: median of the repetitions (min-max in brackets); ratio > 1 means ours is better "
             "(rate ratio, or time ratio baseline/ours); result: pass/FAIL against the goal, info = no goal.", ""]
    return "\n".join(lines)


def run_suite(keys: list[str], quick: bool, devices: list[str], out_dir: str | Path = "outputs/bench"
              ) -> tuple[Path, list[dict[str, Any]]]:
    """Run the benches ``keys``; write ``<out_dir>/<timestamp>[-quick].md`` (+ ``.json``); return (path, rows)."""
    started = dt.datetime.now()
    info = machine_info()  # load average at the start: what the other processes were doing
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for key in keys:
        if key == "memory" and any("rss" in r["name"].lower() for r in rows if r.get("bench") == "infer"):
            continue  # the inference bench already measured it
        rows += run_bench(key, quick, devices)
    info["load_avg_end"] = machine_info().get("load_avg")
    text = render(rows, info, quick, started, time.perf_counter() - t0)
    out = resolve_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (started.strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "") + ".md")
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps({"machine": info, "quick": quick, "rows": rows}, indent=2,
                                                    default=str))
    print(text)
    print(f"saved {path}")
    return path, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny configuration: the whole suite in a few minutes")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when present), cpu or cuda[:N]")
    ap.add_argument("--out-dir", default="outputs/bench", help="where <timestamp>.md / .json go")
    args = ap.parse_args(argv)
    path, rows = run_suite(parse_only(args.only), args.quick, devices_for(args.device), args.out_dir)
    errors = [r["name"] for r in rows if r.get("result") == "ERROR"]
    if errors:
        print(f"error: {', '.join(errors)} (tracebacks above; table in {path})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
