import hashlib
import os
import sys
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
