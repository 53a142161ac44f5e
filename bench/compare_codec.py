"""Time the codec cells with timeit and print µs per operation, ratios and targets.

    python bench/compare_codec.py            # about 60 s
    python bench/compare_codec.py --quick    # about 10 s
    python bench/compare_codec.py --json results.json

Each cell is ``func(*args)`` timed by ``timeit`` with no wrapper around the
call (gc off, as timeit does). Cells run in interleaved rounds, so a burst of
load from another process spoils one round of every cell rather than every
round of one; each cell reports its best round. See ``codec_cases.py`` for the
payloads and implementations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import timeit

import numpy as np

import codec_cases


def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import google.protobuf as pb
        from google.protobuf.internal import api_implementation

        protobuf = "%s (%s)" % (pb.__version__, api_implementation.Type())
    except ImportError:
        protobuf = None
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "protobuf": protobuf,
        "loadavg": os.getloadavg(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }


def _timer(cell: codec_cases.Cell) -> timeit.Timer:
    names = ["a%d" % i for i in range(len(cell.args))]
    env = dict(zip(names, cell.args), f=cell.func)
    return timeit.Timer("f(%s)" % ", ".join(names), globals=env)


def run(cells, budget: float, rounds: int, max_rounds: int, log=None) -> dict:
    """Best seconds per operation for each cell, within about ``budget`` seconds.

    A calibration pass checks each result and sizes ``number`` so that one round
    of a cell takes about budget / (cells x rounds); then rounds over all cells
    repeat while the next one fits in the budget (at least 3, at most ``max_rounds``).
    """
    start = time.perf_counter()
    per_round = budget / (len(cells) * rounds)
    plan = []
    for cell in cells:
        if cell.check is not None:
            cell.check(cell.func(*cell.args))
        t = _timer(cell)
        one = t.timeit(1)
        # re-time a fast cell over more calls: a single call is at the clock's resolution
        if one < 1e-4:
            n = max(1, int(1e-3 / max(one, 1e-8)))
            one = t.timeit(n) / n
        plan.append((cell, t, max(1, int(per_round / max(one, 1e-9)))))
    best = {(c.group, c.impl): float("inf") for c in cells}
    done, last = 0, 0.0
    # stop before a round that would end past the budget
    while done < max_rounds and (done < 3 or time.perf_counter() - start + last <= budget):
        t_round = time.perf_counter()
        for cell, t, number in plan:
            key = (cell.group, cell.impl)
            best[key] = min(best[key], t.timeit(number) / number)
        done += 1
        last = time.perf_counter() - t_round
        if log:
            log("round %d done, %.1f s" % (done, time.perf_counter() - start))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 10 s instead of about 60 s")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--verbose", action="store_true", help="report progress on stderr")
    args = ap.parse_args(argv)

    budget, rounds = (10.0, 3) if args.quick else (60.0, 7)
    t0 = time.perf_counter()
    info = machine()
    cells = codec_cases.all_cells()
    setup = time.perf_counter() - t0
    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    results = run(cells, max(1.0, budget - setup), rounds, max_rounds=4 * rounds, log=log)
    info["loadavg_after"] = os.getloadavg()
    info["seconds"] = round(time.perf_counter() - t0, 1)

    print("cpu: %(cpu)s, %(nproc)s cpus; python %(python)s, numpy %(numpy)s, protobuf %(protobuf)s" % info)
    print("load average before/after: %s / %s; %.1f s" % (
        " ".join("%.2f" % x for x in info["loadavg"]),
        " ".join("%.2f" % x for x in info["loadavg_after"]), info["seconds"]))
    print()
    print("best time per operation in us (MSIP in ns); ratios are time over time")
    print(codec_cases.ratio_table(results))
    print()
    targets = codec_cases.check_targets(results)
    print(codec_cases.format_targets(targets))

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({
                "machine": info,
                "seconds_per_op": {"%s/%s" % k: v for k, v in sorted(results.items())},
                "targets": [{"name": t.name, "measured": t.measured, "pass": t.ok} for t in targets],
            }, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
