"""Shared fixtures: the real-CT folder (skips when absent) and small thread counts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
REAL_CT = ROOT.parent / "shared" / "data" / "real_ct"


@pytest.fixture
def real_ct() -> Path:
    """``../shared/data/real_ct`` (the tests that use it skip when it is absent)."""
    if not REAL_CT.is_dir():
        pytest.skip("../shared/data/real_ct is not present")
    return REAL_CT
