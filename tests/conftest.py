import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The parity fixtures live beside the clone (../shared/fixtures/dinov3); DINOV3_FIXTURES overrides.
FIXTURES = Path(os.environ.get("DINOV3_FIXTURES", REPO.parent / "shared" / "fixtures" / "dinov3"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"DINOv3 parity fixtures not found at {FIXTURES} (set DINOV3_FIXTURES)")
    return FIXTURES
