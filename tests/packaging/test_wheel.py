"""The sdist and wheel: built with `python -m build`, installed into a fresh venv, smoke-checked."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SMOKE = textwrap.dedent("""
    import numpy as np, mip, mip.protocol._mip as core
    assert core.__file__.endswith(".so"), core.__file__
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = mip.encode_request([[x, mip.Text("hi")]], model="m")
    m = mip.decode(frame)
    assert m.model == "m" and np.shares_memory(m.batch[0][0], np.frombuffer(frame, np.uint8))
    assert (m.batch[0][0] == x).all() and m.batch[0][1] == mip.Text("hi")
    f = mip.msip.decode(mip.msip.encode(8, 1, b"", 3))
    assert (f.frame_type, f.msg_id) == (8, 3)
    print("ok", mip.__version__)
""")


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    return out


def test_wheel_holds_compiled_modules_and_declarations_not_generated_c(dists):
    wheel = next(dists.glob("mip_toolkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("_stream", "_mip", "_msip"):
        assert any(n.startswith(f"mip/protocol/{module}.") and n.endswith(".so") for n in names), module
        assert f"mip/protocol/{module}.pxd" in names or module == "_stream" and "mip/protocol/_stream.pxd" in names
    # the native gRPC transport, built wherever libnghttp2's headers are (CI installs them)
    assert any(n.startswith("mip/protocol/_h2.") and n.endswith(".so") for n in names)
    assert "mip/protocol/wire.pxd" in names
    assert not [n for n in names if n.endswith((".c", ".pyx", ".html"))]


def test_sdist_holds_sources(dists):
    sdist = next(dists.glob("mip_toolkit-*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    for path in ("csrc/mip_wire.h", "mip/protocol/_mip.pyx", "mip/protocol/_msip.pyx",
                 "mip/protocol/_h2.pyx", "mip/protocol/_stream.pyx", "setup.py", "pyproject.toml"):
        assert any(n.endswith(path) for n in names), path


def test_wheel_installs_into_a_fresh_venv_and_works(dists, tmp_path):
    wheel = next(dists.glob("mip_toolkit-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    # run from an empty folder so the source tree cannot be imported by accident
    result = subprocess.run([str(python), "-c", SMOKE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
