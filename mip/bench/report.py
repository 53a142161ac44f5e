"""What ``mip bench`` shows: a live progress bar per step, text tables, JSON and plots.

The progress bar (``rich``) goes to stderr and only when stderr is a terminal.  Plots use
matplotlib's Agg backend (no display needed): one row per measured cell (model and input
shapes), throughput on the left, p50 (dashed) and p99 (solid) latency on the right, one line
per run, so several servers or protocols sit side by side.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from mip.bench.pubsub import _Counts

__all__ = ["StepProgress", "progress_factory", "format_table", "format_pubsub",
           "write_json", "load_runs", "plot_runs", "cell_key"]


class StepProgress:
    """A live bar for one step: elapsed time against warm-up + duration, and the number of
    replies so far.  Refreshed by :meth:`follow` every ``interval`` seconds."""

    def __init__(self, description: str, total_s: float, stream: IO | None = None,
                 interval: float = 0.25):
        from rich.console import Console
        from rich.progress import (BarColumn, Progress, TextColumn, TimeRemainingColumn)

        self.interval = interval
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(), console=Console(file=stream or sys.stderr),
            auto_refresh=False, transient=False)
        self.task = self.progress.add_task(description, total=total_s, status="")
        self.progress.start()

    async def follow(self, rec, t_start: float, t_warm: float, t_end: float) -> None:
        """Update the bar until cancelled (``rec``: the step's recorder)."""
        while True:
            now = time.perf_counter()
            phase = "warm-up" if now < t_warm else "measuring"
            done = len(rec.latencies)
            status = f"{phase}  {done:,} ok  {rec.errors:,} err"
            self.progress.update(self.task, completed=min(now, t_end) - t_start, status=status)
            self.progress.refresh()
            await asyncio.sleep(self.interval)

    async def follow_pubsub(self, state: _Counts, t_start: float, t_end: float) -> None:
        """Update the bar of a pub/sub run until cancelled (``state``: its counters)."""
        while True:
            now = time.perf_counter()
            status = f"{state.published:,} published  {state.delivered:,} delivered"
            self.progress.update(self.task, completed=min(now, t_end) - t_start, status=status)
            self.progress.refresh()
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        """Fill the bar and stop it (it stays on screen)."""
        total = self.progress.tasks[0].total if self.progress.tasks else None
        if total is not None:
            self.progress.update(self.task, completed=total)
        self.progress.stop()


def progress_factory(enabled: bool | None = None):
    """A factory ``(kind, level, duration, warmup) -> StepProgress`` or ``None`` when bars
    are off (``enabled=None``: on when stderr is a terminal and rich is installed)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        import rich  # noqa: F401
    except ImportError:
        return None

    def make(kind: str, level, duration: float, warmup: float) -> StepProgress:
        name = {"concurrency": f"concurrency {level}", "rate": f"rate {level:g}/s"}.get(kind, kind)
        return StepProgress(name, duration + warmup)
    return make


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def format_table(doc: dict, *, title: bool = True) -> str:
    """The steps of one ``mip bench infer`` document as a text table."""
    rows = []
    for s in doc["steps"]:
        lat = s["latency_ms"]
        level = (f"c={s['concurrency']}" if s.get("concurrency") is not None
                 else f"{s['request_rate']:g}/s")
        errors = str(s["errors"])
        if s.get("unsent"):
            errors += f" (+{s['unsent']} unsent)"
        rows.append([level, f"{s['throughput_rps']:,.0f}", _fmt(lat["p50"], ".3f"),
                     _fmt(lat["p90"], ".3f"), _fmt(lat["p99"], ".3f"), _fmt(lat["max"], ".3f"),
                     f"{s['requests']:,}", errors,
                     f"{s['client_cpu_percent']:.0f}% {_fmt(s['client_cpu_us_per_request'], '.0f')}us"])
    head = ["load", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests", "errors",
            "client CPU (/req)"]
    out = []
    if title:
        t = doc["target"]
        shapes = ", ".join(f"{i['datatype']}{i['shape']}" for i in t["inputs"])
        out.append(f"{doc['label']}: {t['protocol']} {t['url']} model={t['model']} [{shapes}] "
                   f"({doc['steps'][0]['request_bytes'] if doc['steps'] else 0} B/request)")
    out.append(_table(head, rows))
    errs: dict[str, object] = {}
    for s in doc["steps"]:
        for k, v in s.get("error_examples", {}).items():
            errs.setdefault(k, v)
    for k, v in errs.items():
        out.append(f"  error {k}: {v}")
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else \
        [len(h) for h in head]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def format_compare(docs: list[dict]) -> str:
    """Several runs in one table: one row per run and step, grouped by cell."""
    head = ["cell", "run", "load", "req/s", "p50 ms", "p99 ms", "errors", "client CPU"]
    rows = []
    for doc in sorted(docs, key=lambda d: cell_key(d)):
        for s in doc["steps"]:
            level = (f"c={s['concurrency']}" if s.get("concurrency") is not None
                     else f"{s['request_rate']:g}/s")
            rows.append([cell_key(doc), doc["label"], level, f"{s['throughput_rps']:,.0f}",
                         _fmt(s["latency_ms"]["p50"], ".3f"), _fmt(s["latency_ms"]["p99"], ".3f"),
                         str(s["errors"]), f"{s['client_cpu_percent']:.0f}%"])
    return _table(head, rows)


def format_pubsub(doc: dict) -> str:
    """A ``mip bench pubsub`` document as text."""
    p = doc["pubsub"]
    lat = p["latency_ms"]
    ping = doc["ping"]
    rows = [[f"{doc['config']['publishers']}x{doc['config']['subscribers']}",
             f"{doc['config']['size']}", f"{p['published_per_s']:,.0f}",
             f"{p['delivered_per_s']:,.0f}", _fmt(lat["p50"], ".3f"), _fmt(lat["p99"], ".3f"),
             _fmt(lat["max"], ".3f"), f"{p['lost']:,}", f"{doc['client_cpu_percent']:.0f}%"]]
    out = [f"{doc['label']}: MSIP pub/sub {doc['target']['url']} topic {doc['config']['topic']!r}",
           _table(["pub x sub", "size B", "published/s", "delivered/s", "p50 ms", "p99 ms",
                   "max ms", "lost", "client CPU"], rows)]
    if ping["count"]:
        out.append(f"PING: {ping['count']:,} round trips, {ping['per_s']:,.0f}/s, "
                   f"p50 {ping['latency_ms']['p50']:.3f} ms, p99 {ping['latency_ms']['p99']:.3f} ms")
    return "\n".join(out)


def write_json(doc: dict, path: str | os.PathLike) -> None:
    """Write one document as indented JSON."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def load_runs(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Read ``mip bench infer`` JSON documents: each file one document, a list of them, or
    an object whose ``runs`` lists them (what ``bench/serve_compare.py`` writes)."""
    docs = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            data = data["runs"]
        for doc in data if isinstance(data, list) else [data]:
            if not str(doc.get("schema", "")).startswith("mip-bench/infer/"):
                raise ValueError(f"{path}: not a 'mip bench infer' JSON document")
            docs.append(doc)
    return docs


def cell_key(doc: dict) -> str:
    """What a run measured, independent of server and protocol: model and input shapes."""
    t = doc["target"]
    shapes = " ".join(f"{i['datatype']} {'x'.join(str(d) for d in i['shape'])}"
                      for i in t["inputs"])
    return f"{t['model'] or '(default)'} {shapes}"


def plot_runs(docs: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    """Draw throughput and latency against concurrency (or rate), one line per run, one row
    per cell, into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[str, list[dict]] = {}
    for doc in docs:
        cells.setdefault(cell_key(doc), []).append(doc)
    n = len(cells)
    fig, axes = plt.subplots(n, 2, figsize=(12, 3.6 * n), squeeze=False)
    labels = sorted({d["label"] for d in docs})
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    color = {label: cmap(i % cmap.N) for i, label in enumerate(labels)}
    for row, (cell, runs) in enumerate(sorted(cells.items())):
        ax_t, ax_l = axes[row]
        xlabel = "concurrency (requests in flight)"
        ticks: set = set()
        for doc in runs:
            closed = [s for s in doc["steps"] if s.get("concurrency") is not None]
            steps = closed or doc["steps"]
            if closed:
                xs = [s["concurrency"] for s in steps]
            else:
                xs = [s["request_rate"] for s in steps]
                xlabel = "request rate (requests/s)"
            ticks.update(xs)
            c = color[doc["label"]]
            ax_t.plot(xs, [s["throughput_rps"] for s in steps], "o-", color=c, label=doc["label"])
            p99 = [s["latency_ms"]["p99"] for s in steps]
            p50 = [s["latency_ms"]["p50"] for s in steps]
            ax_l.plot(xs, p99, "o-", color=c, label=f"{doc['label']} p99")
            ax_l.plot(xs, p50, "x--", color=c, alpha=0.6)
        for ax in (ax_t, ax_l):
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            if xlabel.startswith("concurrency"):
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
                ax.minorticks_off()
        ax_t.set_yscale("log")
        ax_t.set_ylabel("throughput (requests/s)")
        ax_t.set_title(f"{cell}: throughput")
        ax_l.set_yscale("log")
        ax_l.set_ylabel("latency (ms): p99 solid, p50 dashed")
        ax_l.set_title(f"{cell}: latency")
        ax_t.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
