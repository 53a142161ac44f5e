"""One ``/metrics`` for every worker of ``mip serve --workers N``.

Each worker keeps its own :class:`~mip.frontends.oip.metrics.Metrics` (plain additions on
its event loop, as with one process) and publishes what it renders to a folder the
supervisor made for the run, every :data:`PUBLISH_EVERY` seconds and when it stops. The
worker that answers a scrape renders its own series afresh and merges the others' latest:

* counters and histograms are summed over every worker, the ones that died too (a
  worker's counts do not vanish with it, so the sums never go back);
* gauges are summed over the live workers (requests waiting, memory, open files), except
  ``process_start_time_seconds`` (the oldest live worker's) and the gauges every worker
  reads from the same place (``mip_models_loaded``, ``mip_job_queue_depth``,
  ``process_max_fds``: the answering worker's).

So the other workers' series are at most :data:`PUBLISH_EVERY` seconds old. (The counters
are not ``prometheus_client`` objects, whose multiprocess mode writes a shared file on
every increment: merging the rendered text keeps the request path as it is.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable

from prometheus_client.utils import floatToGoString

__all__ = ["PUBLISH_EVERY", "WorkerMetrics", "merge", "retire"]

#: seconds between two publications of a worker's series.
PUBLISH_EVERY = 1.0

#: gauges shown as the answering worker reads them, not summed
_OWN = frozenset({"mip_models_loaded", "mip_job_queue_depth", "process_max_fds"})
#: gauges shown as their smallest value over the live workers
_SMALLEST = frozenset({"process_start_time_seconds"})
_LIVE, _DEAD = "live-", "dead-"


class WorkerMetrics:
    """Publishes one worker's series to ``folder`` and makes its ``metrics.render()``
    answer with every worker's (see the module's description).

    Args:
        metrics: the worker's :class:`~mip.frontends.oip.metrics.Metrics`.
        folder: the run's metrics folder, shared by the workers.
    """

    def __init__(self, metrics, folder: str):
        self.metrics = metrics
        self.folder = folder
        self._own_render = metrics.render
        self._path = os.path.join(folder, f"{_LIVE}{os.getpid()}.prom")
        self._published = b""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Publish now and every :data:`PUBLISH_EVERY` seconds; ``/metrics`` merges."""
        self.metrics.render = self.render
        self.publish()
        self._task = asyncio.get_running_loop().create_task(self._publish_often())

    def stop(self) -> None:
        """Publish a last time (the final counts stay in the merge) and stop."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.publish()

    async def _publish_often(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_EVERY)
            self.publish()

    def publish(self, text: bytes | None = None) -> None:
        """Write this worker's series (``text``, or rendered now) where the others read."""
        if text is None:
            text = self._own_render()
        if text == self._published:
            return
        temporary = os.path.join(self.folder, f".{os.getpid()}.tmp")
        with contextlib.suppress(OSError):  # the folder went with the supervisor
            with open(temporary, "wb") as file:
                file.write(text)
            os.replace(temporary, self._path)
            self._published = text

    def render(self) -> bytes:
        """Every worker's series, merged, in the Prometheus text format."""
        own = self._own_render()
        self.publish(own)
        others = []
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(self.folder)):
                path = os.path.join(self.folder, name)
                if path == self._path or not name.startswith((_LIVE, _DEAD)):
                    continue
                with contextlib.suppress(OSError):
                    with open(path, "rb") as file:
                        others.append((file.read(), name.startswith(_LIVE)))
        return merge(own, others)


def retire(folder: str, pid: int) -> None:
    """Keep the counts of worker ``pid``, which has exited, and drop its gauges."""
    with contextlib.suppress(OSError):
        os.replace(os.path.join(folder, f"{_LIVE}{pid}.prom"),
                   os.path.join(folder, f"{_DEAD}{pid}.prom"))


def _parse(text: bytes) -> Iterable[tuple[str, str, str, str, str]]:
    """``(family, type, line kind, key, value)`` of each line: kind ``help``/``type``
    (key: the whole line) or ``sample`` (key: name and labels)."""
    family, kind = "", "untyped"
    for line in text.decode().splitlines():
        if line.startswith("# HELP "):
            family = line.split(" ", 3)[2]
            yield family, kind, "help", line, ""
        elif line.startswith("# TYPE "):
            parts = line.split(" ")
            family, kind = parts[2], parts[3] if len(parts) > 3 else "untyped"
            yield family, kind, "type", line, ""
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            yield family, kind, "sample", key, value


def merge(own: bytes, others: list[tuple[bytes, bool]]) -> bytes:
    """The text of ``own`` with every series of ``others`` merged in (``(text, live)``
    pairs: a worker that has exited has only its counters and histograms counted)."""
    headers: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines
    kinds: dict[str, str] = {}
    samples: dict[str, dict[str, list]] = {}  # family -> key -> [value, integral]
    for text, live, is_own in [(own, True, True)] + [(t, alive, False) for t, alive in others]:
        for family, kind, what, key, value in _parse(text):
            if what != "sample":
                lines = headers.setdefault(family, [])
                if key not in lines:
                    lines.append(key)
                kinds.setdefault(family, kind)
                samples.setdefault(family, {})
                continue
            gauge = kind == "gauge"
            if gauge and (not live or (family in _OWN and not is_own)):
                continue
            try:
                number = float(value)
            except ValueError:
                continue
            integral = value.lstrip("-").isdigit()
            series = samples.setdefault(family, {})
            entry = series.get(key)
            if entry is None:
                series[key] = [number, integral]
            elif gauge and family in _SMALLEST:
                entry[0] = min(entry[0], number)
            else:
                entry[0] += number
                entry[1] = entry[1] and integral
    out: list[str] = []
    for family, series in samples.items():
        out.extend(f"{line}\n" for line in headers.get(family, ()))
        for key, (number, integral) in series.items():
            shown = str(int(number)) if integral else floatToGoString(number)
            out.append(f"{key} {shown}\n")
    return "".join(out).encode()
