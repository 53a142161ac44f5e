"""Fixtures for serving tests: repositories in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def repo(tmp_path) -> Path:
    """An empty repository folder."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def rng():
    """A seeded random generator."""
    return np.random.default_rng(7)
