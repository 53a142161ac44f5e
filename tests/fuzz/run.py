"""Run one harness of harnesses.py under libFuzzer, through Atheris.

    python tests/fuzz/run.py HARNESS [libFuzzer options] [CORPUS_DIR ...]

Every libFuzzer option works (-max_total_time=60, -runs=1000000, -jobs, ...).
The codec's extensions are native code: for libFuzzer to see their branches
they are built with clang's -fsanitize=address,fuzzer-no-link (MIP_DEBUG=asan
MIP_FUZZ=1) and the process preloads the ASan runtime that Atheris ships; the
Python code of mip and of the harness is instrumented by Atheris itself.
``make fuzz`` does all of it (docs/fuzzing.md).
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["mip", "harnesses"]):
    import harnesses


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in harnesses.HARNESSES:
        sys.exit(f"usage: run.py {{{'|'.join(harnesses.HARNESSES)}}} [libFuzzer options] [corpus ...]")
    harness = harnesses.HARNESSES[sys.argv[1]]
    atheris.Setup([sys.argv[0]] + sys.argv[2:], harness)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
