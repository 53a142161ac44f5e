"""Suite-wide settings."""

from __future__ import annotations

import os
import re

import pytest
from _redis import redis_server

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


# -- Redis: one private redis-server for the whole run --------------------------------------


@pytest.fixture(scope="session")
def _redis_server() -> str:
    with redis_server() as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def redis_url(_redis_server) -> str:
    """The run's private redis-server (127.0.0.1, a free port), its database emptied for
    this test."""
    import redis

    with redis.Redis.from_url(_redis_server) as client:
        client.flushdb()
    return _redis_server


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory):
    """A private redis-server that speaks only TLS and requires client certificates, with
    certificates made by trustme: ``(url, files)``, ``files`` holding the PEM paths ``ca``,
    ``cert`` and ``key`` of a client certificate the server accepts."""
    import trustme

    folder = tmp_path_factory.mktemp("redis-tls")
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1"), ca.issue_cert("mip-worker")
    files = {name: str(folder / f"{name}.pem") for name in
             ("ca", "server-cert", "server-key", "cert", "key")}
    ca.cert_pem.write_to_path(files["ca"])
    server.cert_chain_pems[0].write_to_path(files["server-cert"])
    server.private_key_pem.write_to_path(files["server-key"])
    client.cert_chain_pems[0].write_to_path(files["cert"])
    client.private_key_pem.write_to_path(files["key"])
    with redis_server("tls", "--tls-cert-file", files["server-cert"], "--tls-key-file",
                      files["server-key"], "--tls-ca-cert-file", files["ca"],
                      "--tls-auth-clients", "yes") as port:
        yield f"rediss://127.0.0.1:{port}/0", files
