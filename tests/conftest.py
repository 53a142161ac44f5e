"""Suite-wide settings."""

from __future__ import annotations

import os
import re

import pytest

#: the one reason a test may be skipped in CI: the machine has no GPU
_ALLOWED_SKIP = re.compile(r"\b(CUDA|GPU)", re.IGNORECASE)
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def _disallowed_skips() -> list[tuple[str, str]]:
    return [(node, why) for node, why in _skips if not _ALLOWED_SKIP.search(why)]


def pytest_terminal_summary(terminalreporter):
    bad = _disallowed_skips()
    if not bad:
        return
    strict = bool(os.environ.get("CI"))
    terminalreporter.section("skipped for a reason other than a missing GPU"
                             + (" (a failure in CI)" if strict else ""))
    for node, why in bad:
        terminalreporter.line(f"{node}: {why}")


def pytest_sessionfinish(session, exitstatus):
    """In CI (``$CI`` set) a test skipped for any reason but a missing GPU fails the run:
    every other resource a test needs is installed by the project's own files."""
    if os.environ.get("CI") and _disallowed_skips() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
