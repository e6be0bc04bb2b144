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


@pytest.fixture(scope="session")
def preprocessed_phantoms(tmp_path_factory) -> Path:
    """A tiny preprocessed phantom dataset (4 training cases, 2 mm / 3 mm voxels), made once per session.

    Shared by the training tests; treat it as read-only.
    """
    from medseg.config import DataConfig
    from medseg.data.phantoms import make_phantom_dataset
    from medseg.data.pipeline import preprocess_dataset

    root = tmp_path_factory.mktemp("phantoms")
    make_phantom_dataset(root / "raw", n_train=4, n_test=1, seed=0, shape=(48, 48, 24))
    preprocess_dataset(root / "raw", root / "pre", data_cfg=DataConfig(target_spacing=[2.0, 2.0, 3.0]), progress=False)
    return root / "pre"
