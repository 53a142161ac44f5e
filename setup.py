"""Build the codec's extension modules; the project's metadata is in pyproject.toml.

Environment switches: MIP_ANNOTATE=1 writes Cython's HTML annotation next to
each .pyx (read it for hot code: yellow lines call into Python);
MIP_DEBUG=1 builds with -O0 -g and Cython's bounds checks on.
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("MIP_DEBUG") == "1"
ANNOTATE = os.environ.get("MIP_ANNOTATE") == "1"

compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
compile_args += ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]

extensions = [
    Extension(
        f"mip.protocol.{name}",
        [f"mip/protocol/{name}.pyx"],
        include_dirs=["csrc", numpy.get_include()],
        depends=["csrc/mip_wire.h", "mip/protocol/wire.pxd", "mip/protocol/_stream.pxd"],
        extra_compile_args=compile_args,
        define_macros=macros,
    )
    for name in ("_stream", "_mip", "_msip")
]

directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True)

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, annotate=ANNOTATE),
)
