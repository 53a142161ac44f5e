"""Build the codec's extension modules; the project's metadata is in pyproject.toml.

Environment switches:

- ``MIP_ANNOTATE=1`` writes Cython's HTML annotation next to each .pyx (read it for hot
  code: yellow lines call into Python);
- ``MIP_DEBUG=1`` builds with -O0 -g and Cython's bounds checks on (release builds carry no
  debug information);
- ``MIP_DEBUG=asan`` builds with AddressSanitizer (-fsanitize=address -fno-omit-frame-pointer
  -g -O1; Cython's directives as in a release build, so the code checked is the code
  shipped). An ASan build is loaded into a Python that is not itself instrumented, so the
  runtime must come first::

      LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ...

  (detect_leaks=0: the interpreter keeps memory until exit);
- ``MIP_FUZZ=1`` adds -fsanitize=fuzzer-no-link, libFuzzer's coverage instrumentation for
  Atheris; it needs clang (CC=clang LDSHARED="clang -shared") and the ASan runtime that
  Atheris ships, asan_with_fuzzer.so. Build either into its own folder so the in-place build
  stays as it is: ``make asan-test`` and ``make fuzz`` do that (docs/fuzzing.md);
- ``MIP_NO_NATIVE_GRPC=1`` builds without ``mip.protocol._h2``, the native gRPC transport;
  without it the build needs libnghttp2's headers (Debian/Ubuntu ``libnghttp2-dev``, Fedora
  ``libnghttp2-devel``, Alpine ``nghttp2-dev``) and fails, naming them, where they are missing.

The gRPC service and Triton's model configuration are protobuf messages: their ``.proto``
files live in ``proto/`` (laid out as their import paths, ``proto/mip/...``); every build copies
them into the package (``mip proto`` prints where) and generates their modules
(``inference_pb2``, ``inference_pb2_grpc``, ``model_config_pb2``) beside them with grpcio-tools,
a build requirement pinned to the grpcio release the package requires at run time, since the
generated code refuses an older grpcio or protobuf. Neither the copies nor the modules are
tracked; a build makes them again when a ``.proto`` is newer.

Every extension compiles with ``-Wall -Wextra -Werror=incompatible-pointer-types``; the
packaging tests check that a release build prints no warning.
"""

import os
import shutil
import subprocess
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

DEBUG = os.environ.get("MIP_DEBUG") == "1"
ASAN = os.environ.get("MIP_DEBUG") == "asan"
FUZZ = os.environ.get("MIP_FUZZ") == "1"
ANNOTATE = os.environ.get("MIP_ANNOTATE") == "1"
NO_NATIVE_GRPC = os.environ.get("MIP_NO_NATIVE_GRPC") == "1"

compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
# release builds: no debug sections in the shared objects (the interpreter's own flags add -g)
link_args = [] if DEBUG else ["-Wl,--strip-debug"]
if ASAN or FUZZ:
    sanitizers = "address,fuzzer-no-link" if FUZZ else "address"
    compile_args = [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-g", "-O1"]
    link_args = [f"-fsanitize={sanitizers}"]
compile_args += ["-Wall", "-Wextra", "-Werror=incompatible-pointer-types"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
# Warnings in Cython's own utility code, not in ours: GCC 12 at -O3 sees an atomic decrement
# of a typed memoryview's acquisition count (__Pyx_XCLEAR_MEMVIEW) write "into a region of
# size 0" after constant propagation, a known false positive.
QUIRKS = {"_jsonnum": ["-Wno-stringop-overflow"]}

extensions = [
    Extension(
        f"mip.protocol.{name}",
        [f"mip/protocol/{name}.pyx"],
        include_dirs=["csrc", numpy.get_include()],
        depends=["csrc/mip_wire.h", "csrc/mip_jsonnum.h", "mip/protocol/wire.pxd", "mip/protocol/_stream.pxd"],
        extra_compile_args=compile_args + QUIRKS.get(name, []),
        extra_link_args=link_args,
        define_macros=macros,
    )
    for name in ("_stream", "_mip", "_msip", "_jsonnum", "_oip", "_h1", "_batch")
]


def _nghttp2_include() -> list[str] | None:
    """Include folders for libnghttp2's headers, or None where they are not installed."""
    dirs: list[str] = []
    if shutil.which("pkg-config"):
        found = subprocess.run(["pkg-config", "--cflags-only-I", "libnghttp2"],
                               capture_output=True, text=True)
        if found.returncode == 0:
            dirs = [flag[2:] for flag in found.stdout.split()]
    prefixes = filter(None, [os.environ.get("NGHTTP2_PREFIX"), "/usr", "/usr/local"])
    for folder in [*dirs, *(os.path.join(prefix, "include") for prefix in prefixes)]:
        if os.path.isfile(os.path.join(folder, "nghttp2", "nghttp2.h")):
            return [folder]
    return None


if not NO_NATIVE_GRPC:
    NGHTTP2 = _nghttp2_include()
    if NGHTTP2 is None:
        raise SystemExit(
            "mip: libnghttp2's headers were not found; the native gRPC transport needs them. "
            "Install libnghttp2-dev (Debian, Ubuntu), libnghttp2-devel (Fedora) or nghttp2-dev "
            "(Alpine), or set NGHTTP2_PREFIX to its install prefix, or build without the native "
            "transport with MIP_NO_NATIVE_GRPC=1 (gRPC is then served through grpcio).")
    extensions.append(Extension(
        "mip.protocol._h2", ["mip/protocol/_h2.pyx"],
        # libdl: dladdr and dlopen, which look up nghttp2's optional entry points at run
        # time (in libc itself from glibc 2.34 on, where libdl is left empty)
        include_dirs=NGHTTP2, depends=["mip/protocol/_nghttp2.pxd"],
        libraries=["nghttp2"] + (["dl"] if sys.platform.startswith("linux") else []),
        extra_compile_args=compile_args, extra_link_args=link_args, define_macros=macros))


# proto/'s files, each with the generated modules it gets: model_config first (inference imports it)
PROTOS = {"mip/serving/model_config.proto": ("--python_out=.",),
          "mip/frontends/oip/inference.proto": ("--python_out=.", "--grpc_python_out=.")}
# The descriptors go into a private pool: the protocol's message names ("inference.ModelInferRequest",
# "inference.ModelConfig", ...) are the same in every implementation, and protobuf's default pool
# refuses a second file defining them, so without this a process could not hold this server and
# a client such as tritonclient at once. model_config_pb2 creates the pool; inference_pb2 adds
# its file to the same pool, where its import is found.
POOLS = {"mip/serving/model_config.proto": "_descriptor_pool.DescriptorPool()",
         "mip/frontends/oip/inference.proto": "mip_dot_serving_dot_model__config__pb2.POOL"}


def _outputs(proto: str) -> list[str]:
    stem = proto[:-len(".proto")]
    return [proto, f"{stem}_pb2.py"] + ([f"{stem}_pb2_grpc.py"] if len(PROTOS[proto]) > 1 else [])


def generate_protobuf_modules() -> None:
    """Copy each of proto/'s files into the package and generate its modules, where a copy or
    a module is missing or older than its source."""
    for proto, outs in PROTOS.items():
        source = os.path.join("proto", proto)
        if all(os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(source)
               for out in _outputs(proto)):
            continue
        try:
            from grpc_tools import protoc
        except ImportError:
            raise SystemExit("mip: generating the protobuf modules needs grpcio-tools "
                             "(pip install grpcio-tools, or build with pip or python -m build, "
                             "which install it)") from None
        shutil.copyfile(source, proto)
        if protoc.main(["protoc", "-Iproto", *outs, source]) != 0:
            raise SystemExit(f"mip: protoc failed on {source}")
        module = f"{proto[:-len('.proto')]}_pb2.py"
        with open(module) as f:
            text = f.read()
        old = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
        if text.count(old) != 1:
            raise SystemExit(f"mip: protoc's output changed: update setup.py ({module})")
        text = text.replace(old, "# A private pool, so that other copies of the protocol can be "
                                 f"imported too.\nPOOL = {POOLS[proto]}\n"
                                 "DESCRIPTOR = POOL.AddSerializedFile(")
        with open(module, "w") as f:
            f.write(text)


generate_protobuf_modules()


class BuildPyWithHeaders(build_py):
    """Also install csrc's headers as ``mip/include/*.h``: the ``.pxd`` files the package
    ships include them, so a third-party extension that cimports the codec compiles with
    ``include_dirs=[mip.get_include()]``."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "mip", "include")
        self.mkpath(target)
        for name in sorted(os.listdir("csrc")):
            if name.endswith(".h"):
                self.copy_file(os.path.join("csrc", name), os.path.join(target, name))


class BuildExtWithoutRunpath(build_ext):
    """Link without the run-time search paths of the interpreter's own build (a Python built
    under /root/.pyenv links its extensions with ``-Wl,-rpath,/root/.pyenv/...``): a shared
    object in a wheel names no folder of the machine that built it."""

    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx"):
            argv = getattr(self.compiler, attr, None)
            if argv:
                setattr(self.compiler, attr, [a for a in argv if not a.startswith("-Wl,-rpath")])
        super().build_extensions()


directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    directives.update(boundscheck=True, wraparound=True)

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives, annotate=ANNOTATE),
    cmdclass={"build_py": BuildPyWithHeaders, "build_ext": BuildExtWithoutRunpath},
)
