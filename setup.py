"""Build the codec's extension modules; the project's metadata is in pyproject.toml.

Environment switches: MIP_ANNOTATE=1 writes Cython's HTML annotation next to
each .pyx (read it for hot code: yellow lines call into Python);
MIP_DEBUG=1 builds with -O0 -g and Cython's bounds checks on;
MIP_DEBUG=asan builds with AddressSanitizer (-fsanitize=address
-fno-omit-frame-pointer -g -O1; Cython's directives as in a release build, so
the code checked is the code shipped).  An ASan build is loaded into a Python
that is not itself instrumented, so the runtime must come first:

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ...

(detect_leaks=0: the interpreter keeps memory until exit).  MIP_FUZZ=1 adds
-fsanitize=fuzzer-no-link, libFuzzer's coverage instrumentation for Atheris; it
needs clang (CC=clang LDSHARED="clang -shared") and the ASan runtime that
Atheris ships, asan_with_fuzzer.so.  Build either into its own folder so the
in-place build stays as it is: ``make asan-test`` and ``make fuzz`` do that
(docs/fuzzing.md).
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MIP_DEBUG") == "1"
ASAN = os.environ.get("MIP_DEBUG") == "asan"
FUZZ = os.environ.get("MIP_FUZZ") == "1"
ANNOTATE = os.environ.get("MIP_ANNOTATE") == "1"

compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
link_args = []
if ASAN or FUZZ:
    sanitizers = "address,fuzzer-no-link" if FUZZ else "address"
    compile_args = [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-g", "-O1"]
    link_args = [f"-fsanitize={sanitizers}"]
compile_args += ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]

extensions = [
    Extension(
        f"mip.protocol.{name}",
        [f"mip/protocol/{name}.pyx"],
        include_dirs=["csrc", numpy.get_include()],
        depends=["csrc/mip_wire.h", "mip/protocol/wire.pxd", "mip/protocol/_stream.pxd"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
    )
    for name in ("_stream", "_mip", "_msip", "_jsonnum")
]



def _nghttp2_include() -> list[str] | None:
    """Include folders for libnghttp2's headers, or None where they are not installed."""
    import shutil
    import subprocess

    if shutil.which("pkg-config"):
        found = subprocess.run(["pkg-config", "--cflags-only-I", "libnghttp2"],
                               capture_output=True, text=True)
        if found.returncode == 0:
            return [flag[2:] for flag in found.stdout.split()]
    for prefix in filter(None, [os.environ.get("NGHTTP2_PREFIX"), "/usr", "/usr/local"]):
        if os.path.isfile(os.path.join(prefix, "include", "nghttp2", "nghttp2.h")):
            return [os.path.join(prefix, "include")]
    return None


# The gRPC transport (mip.protocol._h2) needs libnghttp2 (Debian: libnghttp2-dev); without
# it the package builds the rest and `mip serve` serves gRPC through grpcio.
NGHTTP2 = None if os.environ.get("MIP_WITHOUT_NGHTTP2") == "1" else _nghttp2_include()
if NGHTTP2 is not None:
    extensions.append(Extension(
        "mip.protocol._h2", ["mip/protocol/_h2.pyx"],
        include_dirs=NGHTTP2, libraries=["nghttp2"],
        extra_compile_args=compile_args, extra_link_args=link_args, define_macros=macros))
else:
    print("mip: libnghttp2 headers not found (apt-get install libnghttp2-dev): "
          "building without mip.protocol._h2, the native gRPC transport")

directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True)

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, annotate=ANNOTATE),
)
