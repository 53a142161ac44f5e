"""The sdist and wheel: built with `python -m build`, installed into a fresh venv, smoke-checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Building the sdist and wheel compiles every extension (the first test that asks for them
# waits for it, within its own timeout): minutes on a busy 2-core machine, not the suite's 120 s.
pytestmark = pytest.mark.timeout(900)

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
def build(tmp_path_factory) -> tuple[Path, str]:
    """The sdist and wheel built from this checkout, and everything the build printed."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dists(build) -> Path:
    return build[0]


@pytest.fixture(scope="module")
def venv_python(dists, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (and what building an extension needs)."""
    wheel = next(dists.glob("mip_toolkit-*.whl"))
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel), "Cython>=3.0.10",
                    "setuptools>=77"], check=True, capture_output=True, timeout=600)
    return python


def _clean_env() -> dict:
    return {**os.environ, "PYTHONPATH": ""}


def test_wheel_holds_compiled_modules_and_declarations_not_generated_c(dists):
    wheel = next(dists.glob("mip_toolkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("_stream", "_mip", "_msip"):
        assert any(n.startswith(f"mip/protocol/{module}.") and n.endswith(".so") for n in names), module
        assert f"mip/protocol/{module}.pxd" in names or module == "_stream" and "mip/protocol/_stream.pxd" in names
    # the native gRPC transport, built wherever libnghttp2's headers are (CI installs them)
    assert any(n.startswith("mip/protocol/_h2.") and n.endswith(".so") for n in names)
    assert "mip/protocol/wire.pxd" in names
    assert "mip/include/mip_wire.h" in names  # what wire.pxd includes, for cimport
    assert not [n for n in names if n.endswith((".c", ".pyx", ".html"))]


def test_sdist_holds_sources(dists):
    sdist = next(dists.glob("mip_toolkit-*.tar.gz"))
    names = tarfile.open(sdist).getnames()
    for path in ("csrc/mip_wire.h", "mip/protocol/_mip.pyx", "mip/protocol/_msip.pyx",
                 "mip/protocol/_h2.pyx", "mip/protocol/_stream.pyx", "setup.py", "pyproject.toml"):
        assert any(n.endswith(path) for n in names), path


def test_wheel_installs_into_a_fresh_venv_and_works(venv_python, tmp_path):
    # run from an empty folder so the source tree cannot be imported by accident
    result = subprocess.run([str(venv_python), "-c", SMOKE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_build_prints_no_compiler_warning(build):
    """-Wall -Wextra -Werror=incompatible-pointer-types, and not one warning printed."""
    _, output = build
    assert "-Wextra" in output and "-Werror=incompatible-pointer-types" in output
    # the C compiler's (file.c:LINE:COL: warning: ...) and Cython's (warning: file.pyx:LINE:COL: ...)
    compiler = re.compile(r"\.[ch]:\d+:\d+: warning:|warning: \S+\.(pyx|pxd|pxi):\d+")
    warnings = [line for line in output.splitlines() if compiler.search(line)]
    assert not warnings, "\n".join(warnings[:20])


def test_shared_objects_carry_no_build_machine_paths_nor_debug_info(dists, tmp_path):
    wheel = next(dists.glob("mip_toolkit-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        objects = [n for n in zf.namelist() if n.endswith(".so")]
        zf.extractall(tmp_path, objects)
    assert objects
    for name in objects:
        data = (tmp_path / name).read_bytes()
        assert b".debug_info" not in data, f"{name} carries debug information"
        assert str(Path(sys.base_prefix)).encode() not in data, f"{name} names {sys.base_prefix}"
        assert str(ROOT).encode() not in data, f"{name} names the build tree {ROOT}"


THIRD_PARTY = textwrap.dedent("""
    # A third party's extension on the codec's C level, through the .pxd files the wheel ships.
    from libc.stdint cimport uint32_t
    from mip.protocol.wire cimport (mip_header, mip_parse_header, mip_load_be32, MIP_OK,
                                    MIP_HEADER_SIZE, MIP_KIND_PING)
    from mip.protocol._mip cimport Message, decode_frame_at
    from mip.protocol._msip cimport Frame, FrameParser as MsipParser
    from mip.protocol._stream cimport Chunk, StreamParser

    def header_kind(bytes frame):
        cdef mip_header h
        cdef size_t err_off = 0
        if mip_parse_header(<const unsigned char *>frame, len(frame), 1 << 20, &h, &err_off) != MIP_OK:
            raise ValueError(f"bad header at {err_off}")
        return h.kind, h.remaining, h.kind == MIP_KIND_PING

    def msip_frame_type(frame):
        cdef Frame f = frame
        return f.frame_type

    def decode(bytes frame):
        cdef Message m = decode_frame_at(frame, <const unsigned char *>frame, len(frame), False, 0)
        return m.model, m.batch
""")

THIRD_PARTY_SETUP = textwrap.dedent("""
    import mip, numpy
    from Cython.Build import cythonize
    from setuptools import Extension, setup
    setup(name="thirdparty", ext_modules=cythonize([Extension(
        "thirdparty", ["thirdparty.pyx"],
        include_dirs=[mip.get_include(), numpy.get_include()])],
        compiler_directives={"language_level": "3"}))
""")


def test_third_party_extension_cimports_the_installed_codec(venv_python, tmp_path):
    """`cimport` from the installed wheel: every .pxd it ships, and the headers they include
    (found through mip.get_include()), compile in a third party's extension."""
    (tmp_path / "thirdparty.pyx").write_text(THIRD_PARTY)
    (tmp_path / "setup.py").write_text(THIRD_PARTY_SETUP)
    built = subprocess.run([str(venv_python), "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=_clean_env())
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    check = textwrap.dedent("""
        import numpy as np, mip, thirdparty
        assert mip.get_include().endswith("mip/include"), mip.get_include()
        assert thirdparty.header_kind(mip.encode_ping()) == (1, 0, True)
        assert thirdparty.msip_frame_type(mip.msip.decode(mip.msip.encode(8, 1, b"", 3))) == 8
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        model, batch = thirdparty.decode(mip.encode_request([[x]], model="m"))
        assert model == "m" and (batch[0][0] == x).all()
        print("ok")
    """)
    result = subprocess.run([str(venv_python), "-c", check], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
