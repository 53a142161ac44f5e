"""A native transport built against libnghttp2 on a machine where the library has gone: the
message names the missing run-time library, never the build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from wheel_smoke import system_nghttp2

ROOT = Path(__file__).resolve().parents[2]


def _without_nghttp2(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace where libnghttp2.so.14 is an empty file."""
    lib = system_nghttp2()
    if lib is None or os.geteuid() != 0 or not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("hiding libnghttp2 needs root, unshare -m and the system's libnghttp2")
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind /dev/null '{lib}' && exec \"$@\"",
                           "sh", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_reason_names_the_run_time_library():
    result = _without_nghttp2([sys.executable, "-c",
                              "from mip.frontends.oip.grpc import native_unavailable_reason as r; "
                              "print(r())"])
    assert result.returncode == 0, result.stderr
    assert "run-time library libnghttp2 is missing" in result.stdout
    assert "libnghttp2-14" in result.stdout and "built" not in result.stdout


def test_mip_serve_asked_for_the_native_transport_says_what_to_install(tmp_path):
    result = _without_nghttp2([sys.executable, "-m", "mip.cli", "--log-level", "ERROR", "serve",
                               "--mip", "none", "--http", "none", "--grpc", "127.0.0.1:0",
                               "--grpc-impl", "native"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("mip: error: the native gRPC transport cannot be used: the run-time "
                               "library libnghttp2 is missing")
    assert "--grpc-impl grpcio" in lines[0]


def test_build_without_libnghttp2_headers_fails_naming_the_package(tmp_path):
    """No silent fallback at build time: missing headers stop the build with the package to
    install, unless MIP_NO_NATIVE_GRPC=1 asks for a build without the native transport."""
    if not os.path.isdir("/usr/include/nghttp2"):
        pytest.skip("libnghttp2's headers are not under /usr/include here")
    empty = tmp_path / "empty"
    empty.mkdir()

    def setup_name(**env):
        if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"],
                                               capture_output=True).returncode != 0:
            pytest.skip("hiding the headers needs root and unshare -m")
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind '{empty}' /usr/include/nghttp2 && exec \"$@\"",
             "sh", sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
            timeout=120, env={**os.environ, **env})

    refused = setup_name()
    assert refused.returncode != 0
    assert "libnghttp2-dev" in refused.stderr and "MIP_NO_NATIVE_GRPC=1" in refused.stderr
    allowed = setup_name(MIP_NO_NATIVE_GRPC="1")
    # (setup.py cythonizes at import: Cython may print what it compiles before the name)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip().splitlines()[-1] == "mip-toolkit"
