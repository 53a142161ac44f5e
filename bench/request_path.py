"""The cost of ``mip serve``'s MIP request path in instructions, not seconds.

Runs the MIP frontend, the data plane, the engine and the batcher in one process, without
sockets: rounds of 32 decoded requests are started together (one batch of 32, as pipelined
clients make), awaited, and their replies encoded. Every batch runs on the event loop's thread,
so the count does not depend on thread scheduling. Under ``valgrind --tool=callgrind`` only the
measured rounds are counted (they run inside a call of libc's ``qsort``, whose ``qsort_r``
callgrind is told to count: ``--toggle-collect=qsort_r``), on the thread that runs them; the
count is the same from run to run (to 0.1%) whatever else the machine does::

    python bench/request_path.py                       # this checkout, identity model
    python bench/request_path.py --python ~/.cache/mip-bench/revisions/1f44a448c2a4/bin/python
    python bench/request_path.py --time                # seconds instead (noisy on a busy machine)

``--python`` measures another installation of mip (e.g. a revision ``ab_compare.py`` installed),
with the same models (``serve_compare.write_models``). ONNX Runtime's thread pool spins while a
multi-threaded kernel runs, so only models whose kernels stay on one thread (``identity``) give
a repeatable count.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUND = 32  # requests started together


def _inner(repository: str, model: str, rounds: int) -> None:
    """The measured program: ``rounds`` rounds of ``ROUND`` requests after 20 of warm-up."""
    import numpy as np

    import mip
    try:
        from mip.frontends.mip_handler import MipHandler
    except ImportError:  # a revision from before the module's rename
        from mip.frontends.mip import MipHandler
    from mip.serving import batching
    from mip.serving.engine import Engine
    from mip.serving.repository import ModelRepository

    batching.Batcher._inline = lambda self, rows: True  # every batch on the loop's thread

    async def setup():
        engine = Engine(ModelRepository(repository), models=[model])
        await engine.start()
        options = {}
        if "metrics" in inspect.signature(MipHandler).parameters:
            from mip.frontends.oip.metrics import Metrics

            options["metrics"] = Metrics(engine)
        handler = MipHandler(engine, **options)
        width = engine.repository.get(model).inputs[0].shape[-1]
        frame = mip.encode_request([[np.ones((1, width), np.float32)]], model=model)
        messages = [mip.FrameParser().feed(frame)[0] for _ in range(ROUND)]
        with_source = "source" in inspect.signature(handler.start).parameters
        return engine, handler, messages, with_source

    async def rounds_of(count, handler, messages, with_source):
        for _ in range(count):
            replies = [handler.start(m, "127.0.0.1") if with_source else handler.start(m)
                       for m in messages]
            for reply in replies:
                await reply

    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    engine, handler, messages, with_source = loop.run_until_complete(setup())
    loop.run_until_complete(rounds_of(20, handler, messages, with_source))  # warm-up
    measured = {}

    def measure(a, b):
        # Run inside libc's qsort, so that callgrind (--toggle-collect=qsort) counts this
        # and nothing else.
        started = time.process_time()
        loop.run_until_complete(rounds_of(rounds, handler, messages, with_source))
        measured["seconds"] = time.process_time() - started
        return 0

    libc = ctypes.CDLL(None)
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(measure)
    pair = (ctypes.c_int * 2)(0, 1)
    libc.qsort(pair, 2, ctypes.sizeof(ctypes.c_int), compare)
    print(f"seconds {measured['seconds'] / (rounds * ROUND)}")
    loop.run_until_complete(engine.stop())
    loop.close()


def _callgrind(python: str, repository: str, model: str, rounds: int) -> int:
    """Instructions of the measured rounds alone, on the thread that runs them."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=qsort_r",
             f"--callgrind-out-file={out}", python, __file__, "--inner", repository, model,
             str(rounds)],
            capture_output=True, text=True, check=True)
    found = re.search(r"Collected : (\d+)", run.stderr)
    if not found:
        raise SystemExit(f"no instruction count in valgrind's output:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--inner":
        _inner(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default=sys.executable,
                   help="the Python of the mip installation to measure (default: this one)")
    p.add_argument("--model", default="identity", help="identity, mlp or identity_1m")
    p.add_argument("--rounds", type=int, default=100, help="rounds of 32 requests measured")
    p.add_argument("--time", action="store_true",
                   help="CPU seconds a request instead of instructions (no valgrind)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_compare as sc  # bench/ is not a package

    with tempfile.TemporaryDirectory() as tmp:
        repository = str(sc.write_models(Path(tmp))["mip-batching"])
        if args.time:
            out = subprocess.run([args.python, __file__, "--inner", repository, args.model,
                                  str(args.rounds)], capture_output=True, text=True, check=True)
            seconds = float(out.stdout.split()[-1])
            print(f"{args.model}: {seconds * 1e6:.1f} µs CPU a request ({args.python})")
            return 0
        counted = _callgrind(args.python, repository, args.model, args.rounds)
    per_request = counted / (args.rounds * ROUND)
    print(f"{args.model}: {per_request:,.0f} instructions a request ({args.python})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
