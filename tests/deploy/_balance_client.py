"""A client of the replicas test (tests/deploy/test_multihost.py), run on the client's host:

    python _balance_client.py URL

sends identity requests to URL with ``mip.Client``, one after another, until told to stop
(at most 100 000), and answers commands on standard input: ``count`` prints
``ok N failed M FIRST-ERROR``; ``stop`` stops, prints the same and exits."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np

from mip.net.mip_client import Client


def main() -> int:
    url = sys.argv[1]
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = threading.Event()

    def run():
        with Client(url, timeout=10, resolve_every=1.0) as client:
            for _ in range(100_000):
                if stop.is_set():
                    return
                try:
                    (y,), = client.infer([[x]], model="identity")
                    right = np.array_equal(y, x)
                except Exception as exc:  # counted and reported, whatever it is
                    right = False
                    errors.append(repr(exc))
                counts["ok" if right else "failed"] += 1
                time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            stop.set()
            thread.join(30)
        print(f"ok {counts['ok']} failed {counts['failed']} {errors[:1]}", flush=True)
        if stop.is_set():
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
