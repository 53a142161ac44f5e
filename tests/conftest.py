"""Suite-wide settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_state_dir(tmp_path_factory):
    """Servers started by the tests (in-process or as `mip serve` subprocesses) keep their job
    queue in a folder of this run, never in the user's state folder."""
    previous = os.environ.get("MIP_STATE_DIR")
    os.environ["MIP_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if previous is None:
        os.environ.pop("MIP_STATE_DIR", None)
    else:
        os.environ["MIP_STATE_DIR"] = previous
