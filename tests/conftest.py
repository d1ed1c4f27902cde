import csv
import hashlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
torch.set_num_threads(min(2, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------------------------------
# Parity fixture discovery. The in-repo copy (tests/fixtures/...) makes a bare clone testable; the shared folder beside
# the clone and $DINOV3_FIXTURES / $DINOV3_HF_FIXTURES are searched too, so a fixture folder dropped into any of them
# is checked without code changes. Folders with identical content found in several places are tested once.
# ------------------------------------------------------------------------------------------------------------------

def _roots(in_repo: str, shared: str, env: str) -> list[Path]:
    roots = [REPO / "tests" / "fixtures" / in_repo, REPO.parent / "shared" / "fixtures" / shared]
    if os.environ.get(env):
        roots.append(Path(os.environ[env]).expanduser())
    out: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in {r.resolve() for r in out}:
            out.append(root)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _discover(roots: list[Path], pattern: str, depth: int) -> list[Path]:
    """Folders holding ``pattern`` (``depth`` levels above the matched file), deduplicated by content."""
    seen: dict[str, Path] = {}
    for root in roots:
        for marker in sorted(root.glob(pattern)):
            folder = marker.parents[depth - 1] if depth else marker
            seen.setdefault(_digest(folder), folder)
    return list(seen.values())


OFFICIAL_ROOTS = _roots("dinov3", "dinov3", "DINOV3_FIXTURES")
HF_ROOTS = _roots("dinov3_hf", "dinov3_hf", "DINOV3_HF_FIXTURES")
OFFICIAL_FOLDERS = _discover(OFFICIAL_ROOTS, "*/weights.pth", 1)
HF_FOLDERS = _discover(HF_ROOTS, "*/hf/config.json", 2)


def _ids(folders: list[Path]) -> list[str]:
    """The folder name; where two different folders share a name, the root they came from is appended."""
    names = [f.name for f in folders]
    return [n if names.count(n) == 1 else f"{n}@{f.parent}" for n, f in zip(names, folders)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``official_fixture`` / ``hf_fixture`` arguments run once per discovered fixture folder."""
    for name, folders in (("official_fixture", OFFICIAL_FOLDERS), ("hf_fixture", HF_FOLDERS)):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, folders, ids=_ids(folders))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The first official fixture root (the in-repo copy on a normal checkout): keys/, entrypoints.json, folders."""
    if not OFFICIAL_ROOTS:
        pytest.fail("DINOv3 parity fixtures not found: expected tests/fixtures/dinov3 (or set DINOV3_FIXTURES)")
    return OFFICIAL_ROOTS[0]


@pytest.fixture(scope="session")
def official_fixture_folders() -> list[Path]:
    return list(OFFICIAL_FOLDERS)


@pytest.fixture(scope="session")
def hf_fixture_folders() -> list[Path]:
    return list(HF_FOLDERS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waiting on a shared CPU (10x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------------
# Command helpers. A command runs in-process through its ``main(argv)`` (``run_main``: what its CLI wrapper does,
# without a new interpreter); a subprocess (``run_script``) only where the process itself is tested: a wrapper's exit
# status, a kill, torchrun.
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def run_script():
    """``run_script("train_detection.py", ...)`` / ``run_script("-m", "src.detection.evaluate", ...)``: a Python
    subprocess in the repository, headless (no DISPLAY), one OpenMP thread (see ``one_thread``)."""

    def run(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**base, "OMP_NUM_THREADS": "1", **(env or {})})

    return run


@pytest.fixture
def run_main(capsys):
    """``run_main(main, argv)``: a command's ``main`` run as its CLI wrapper runs it (``errors.run_cli``: exit status
    2 and one ``error:`` line for a UserError, one-line warnings), in-process; returns a ``CompletedProcess`` with
    the captured stdout and stderr."""
    from src.detection.core.errors import run_cli

    def run(main, argv) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = None
        try:
            run_cli(lambda: main([str(a) for a in argv]))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def read_results():
    """``read_results(run_dir)``: a training run's results.csv as rows of floats (NaN where a cell is empty)."""

    def read(run: Path) -> list[dict[str, float]]:
        with open(Path(run) / "results.csv") as f:
            return [{k: float(v) if v else math.nan for k, v in r.items()} for r in csv.DictReader(f)]

    return read


@pytest.fixture(scope="session")
def tiny_train_args() -> list[str]:
    """train_detection.py flags of a tiny, fast run (ConvNeXt-atto, FCOS, 96 px, random backbone)."""
    return ["--model-name", "dinov3_convnext_atto", "--head", "fcos", "--fpn-channels", "64", "--imgsz", "96",
            "--batch", "8", "--workers", "0", "--lr", "2e-3", "--warmup-epochs", "0.3", "--seed", "0"]


TINY_ARCH = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}  # a ConvNeXt-atto of a few thousand parameters


@pytest.fixture(scope="session")
def make_tiny_checkpoint():
    """``make_tiny_checkpoint(path, classes, **detector_config)``: save a tiny random-weight detector (ConvNeXt-atto
    with ``TINY_ARCH``, RetinaNet, 64 px, 64 FPN channels unless overridden) as a checkpoint and return the path.
    ``prepare(model)`` may change the model before it is saved; ``category_ids``/``letterbox`` go into its card."""

    def make(path: Path, classes, *, category_ids=None, letterbox: bool = False, prepare=None, seed: int = 0,
             **config) -> Path:
        from src.detection.checkpoint import build_payload, model_meta, save_checkpoint
        from src.detection.modeling.builder import build_detector
        from src.detection.modeling.config import DetectorConfig

        torch.manual_seed(seed)
        cfg = DetectorConfig(**{"model_name": "dinov3_convnext_atto", "num_classes": len(classes), "head": "retinanet",
                                "imgsz": (64, 64), "fpn_channels": 64, "arch_overrides": TINY_ARCH, **config})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random backbone weights: intended here
            model = build_detector(cfg, verbose=False).eval()
        if prepare is not None:
            prepare(model)
        meta = model_meta(model, list(classes), letterbox=letterbox, category_ids=category_ids)
        save_checkpoint(path, build_payload(model, meta))
        return Path(path)

    return make
