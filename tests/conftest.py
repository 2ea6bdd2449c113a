"""Shared fixtures: tiny seeded configs and a teacher cache shared by the whole session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

BASE = {
    "name": "t",
    "seed": 0,
    "data": {"name": "digits"},
    "student": {"name": "mlp", "options": {"hidden": [16]}},
    "teacher": {
        "name": "mlp",
        "options": {"hidden": [64]},
        "train": {"steps": 150, "batch_size": 64, "optim": {"name": "adam", "lr": 0.003}},
    },
    "distill": {"method": "kd"},
    "optim": {"name": "adam", "lr": 0.003},
    "train": {"steps": 40, "batch_size": 32, "log_every": 10, "checkpoint_every": 20, "progress": False},
}


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory):
    """Runs that name no cache_dir use the per-user cache: point it into the session's tmp
    folder so that tests never read or fill the real one."""
    import os

    from transfuse.paths import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """One teacher cache for the session: the tiny teacher trains once (about a second)."""
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture
def base_config(teacher_cache) -> dict:
    """A fresh copy of a tiny digits KD config (MLP 64->16->10 student, 150-step teacher)."""
    cfg = copy.deepcopy(BASE)
    cfg["teacher"]["cache_dir"] = str(teacher_cache)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
