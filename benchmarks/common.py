"""Shared benchmark helpers: repeated timing with median/spread, result rows, machine description, Markdown table.

Every bench module exposes ``run(quick: bool, ...) -> list[dict]`` whose rows carry at least
``{name, baseline, ours, ratio, goal}``; ``ratio`` is always "higher is better" (ours/baseline for rates,
baseline/ours for times). Optional keys: ``unit``, ``baseline_spread`` / ``ours_spread`` ((lo, hi) tuples),
``note`` and ``pass`` (an explicit verdict for goals that are not a ratio threshold).
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


# --------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_frames(predictor: Any, images: Sequence[torch.Tensor], frames: int) -> int:
    """``frames`` uint8 images (``images`` cycled) through ``run_pipeline`` into a sink that does nothing, as a
    folder or video run feeds the model (one batch in flight); returns how many came out with a prediction."""
    from src.detection.inference.pipeline import Item, run_pipeline

    items = (Item(data=None, input=im, orig_hw=(im.shape[-2], im.shape[-1]))
             for im in (images[i % len(images)] for i in range(frames)))
    done: list[bool] = []
    run_pipeline(predictor, items, lambda item: done.append(item.pred is not None))
    return sum(done)


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes, GPU-synchronised on both ends."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Time every ``fn`` ``reps`` times, alternating between them each round.

    On a shared machine the load drifts; interleaving makes both sides of a ratio see the same drift instead of
    the baseline getting a quiet minute and ours a busy one. Warm-up rounds (allocator, oneDNN kernels) are
    run first and not counted.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k].append(time_call(fn, device))
    return out


def median_spread(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """(median, (min, max))."""
    return statistics.median(values), (min(values), max(values))


# --------------------------------------------------------------------------------------------------- rows
def make_row(name: str, baseline: Sequence[float], ours: Sequence[float], goal: float, unit: str,
             higher_is_better: bool, note: str = "") -> dict[str, Any]:
    """A result row from repeated measurements of both sides; ``ratio`` is oriented so that higher is better."""
    b, b_spread = median_spread(baseline)
    o, o_spread = median_spread(ours)
    ratio = (o / b if higher_is_better else b / o) if b > 0 and o > 0 else math.nan
    return {"name": name, "baseline": b, "ours": o, "ratio": ratio, "goal": goal, "unit": unit,
            "baseline_spread": b_spread, "ours_spread": o_spread, "reps": len(ours), "note": note}


_GOAL_RE = re.compile(r"(>=|>)\s*([0-9]*\.?[0-9]+)\s*x?\s*$")


def verdict(row: dict[str, Any]) -> str:
    """``pass`` / ``FAIL`` for a ratio goal (a number or ">= N" / ">= Nx"), ``info`` when the goal is not a
    threshold (e.g. "keep if > 1"), or the row's own ``pass`` flag when it has one."""
    if "pass" in row and row["pass"] is not None:
        return "pass" if row["pass"] else "FAIL"
    ratio, goal = row.get("ratio"), row.get("goal")
    if ratio is None or not isinstance(ratio, (int, float)) or math.isnan(ratio):
        return "n/a"
    if isinstance(goal, (int, float)) and not isinstance(goal, bool):
        return "pass" if ratio >= goal else "FAIL"
    m = _GOAL_RE.fullmatch(str(goal).strip()) if goal is not None else None
    if m is None:
        return "info"
    threshold = float(m.group(2))
    ok = ratio >= threshold if m.group(1) == ">=" else ratio > threshold
    return "pass" if ok else "FAIL"


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    a = abs(v)
    return f"{v:.3g}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:,.0f}"


def _cell(row: dict[str, Any], side: str) -> str:
    v = row.get(side)
    if not isinstance(v, (int, float)):
        return str(v)
    text = _num(float(v))
    unit = row.get("unit")
    if unit:
        text += f" {unit}"
    spread = row.get(f"{side}_spread")
    if spread:
        text += f" ({_num(spread[0])}-{_num(spread[1])})"
    return text


def _goal(goal: Any) -> str:
    if isinstance(goal, (int, float)) and not isinstance(goal, bool):
        return f">= {goal:g}x"
    return str(goal)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table: benchmark, baseline, ours, ratio, goal, pass/fail (+ note)."""
    lines = ["| benchmark | baseline | ours | ratio | goal | result | note |",
             "|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio")
        ratio_s = f"{ratio:.2f}x" if isinstance(ratio, (int, float)) and not math.isnan(ratio) else "n/a"
        note = str(r.get("note", "") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['name']} | {_cell(r, 'baseline')} | {_cell(r, 'ours')} | {ratio_s} | "
                     f"{_goal(r.get('goal'))} | {r.get('result') or verdict(r)} | {note} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers depend on: CPU model, cores, threads torch uses, GPU, torch version, load average."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        info["load_avg"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    gpu = info["gpu"] or "none"
    load = info.get("load_avg")
    load_s = " / ".join(f"{v:.2f}" for v in load) if load else "n/a"
    return (f"CPU: {info['cpu']} ({info['cores']} cores, torch uses {info['torch_threads']} threads); GPU: {gpu}; "
            f"torch {info['torch']}, Python {info['python']}; load average (1/5/15 min): {load_s}")


def bench_main(run: Callable[..., list[dict[str, Any]]], doc: str | None, quick_help: str, device: str = "cpu",
               device_help: str = "cpu or cuda[:N]") -> None:
    """The command line of a benchmark whose ``run(quick=..., device=...)`` returns rows: prints their table."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--device", default=device, help=device_help)
    args = ap.parse_args()
    print(markdown_table(run(quick=args.quick, device=args.device)))
