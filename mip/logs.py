"""What mip's commands write to their logs: text or JSON lines, and the access log.

``--log-format text`` (the default) writes ``TIME LEVEL LOGGER: MESSAGE`` lines;
``--log-format json`` writes one JSON object a line (``time``, ``level``, ``logger``,
``message``, and ``exception`` with the traceback when there is one) for every log of the
process, access lines included, so a log shipper needs no parsing rules.

The access log (``mip serve --access-log -|FILE``) is the ``mip.access`` logger: one
record an inference request, written by :class:`LineHandler`, which holds the lines logged
on the event loop for at most :data:`FLUSH_INTERVAL` seconds (or :data:`HOLD_AT_MOST`
octets) and writes them in one call, as nginx's ``access_log ... buffer= flush=`` does,
instead of a write and a flush for every request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import TextIO

__all__ = ["ACCESS_FIELDS", "ACCESS_LOGGER", "LOG_FORMATS", "JsonFormatter", "LineHandler",
           "TextAccessFormatter", "configure"]

#: the logger of the access log
ACCESS_LOGGER = "mip.access"
#: what ``--log-format`` takes
LOG_FORMATS = ("text", "json")
#: the fields of an access record, in the order of its ``args``
ACCESS_FIELDS = ("protocol", "peer", "model", "version", "status", "latency_ms", "request_id")
#: the text form of an access record (its message, formatted from its ``args``)
ACCESS_MESSAGE = "%s %s %s %s %s %.3fms %s"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: seconds a line logged on the event loop may wait to be written (with the others)
FLUSH_INTERVAL = 0.5
#: octets of lines held before they are written at once
HOLD_AT_MOST = 64 << 10
#: seconds between two checks that a log file was not moved away (logrotate)
_REOPEN_CHECK = 1.0

try:
    import orjson

    def _dumps(document: dict) -> str:
        return orjson.dumps(document).decode()
except ImportError:  # the base install: mip's commands other than serve
    import json

    def _dumps(document: dict) -> str:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


_second = [-1, ""]  # the last second formatted, and its text (records come in bursts)


def _utc(record: logging.LogRecord) -> str:
    """``record``'s time, ISO 8601 in UTC with milliseconds: ``2024-01-01T00:00:00.000Z``."""
    second = int(record.created)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int(record.msecs):03d}Z"


def _utc_at(created: float) -> str:
    second = int(created)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((created - second) * 1000):03d}Z"


class TextAccessFormatter(logging.Formatter):
    """An access record as ``TIME PROTOCOL PEER MODEL VERSION STATUS LATENCYms REQUEST_ID``
    (``-`` for what is unknown)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{_utc(record)} {record.getMessage()}"

    def access_line(self, created: float, args: tuple, name: str = ACCESS_LOGGER) -> str:
        """:meth:`format` of an access record made at ``created`` with ``args``, without
        the record."""
        return f"{_utc_at(created)} {ACCESS_MESSAGE % args}"


class JsonFormatter(logging.Formatter):
    """Every record as one JSON object: ``time`` (ISO 8601, UTC), ``level``, ``logger``
    and ``message`` (and ``exception``: the traceback, when there is one); an access
    record (its message :data:`ACCESS_MESSAGE`) has its :data:`ACCESS_FIELDS` instead of
    ``message`` (``null`` when unknown)."""

    def access_line(self, created: float, args: tuple, name: str = ACCESS_LOGGER) -> str:
        """The line of an access record of logger ``name`` made at ``created`` with
        ``args``, without the record."""
        protocol, peer, model, version, status, latency, request_id = args
        return _dumps({"time": _utc_at(created), "level": "INFO", "logger": name,
                       "protocol": protocol, "peer": None if peer == "-" else peer,
                       "model": None if model == "-" else model,
                       "version": None if version == "-" else version, "status": status,
                       "latency_ms": round(latency, 3),
                       "request_id": None if request_id == "-" else request_id})

    def format(self, record: logging.LogRecord) -> str:
        args = record.args
        if record.msg is ACCESS_MESSAGE and isinstance(args, tuple) and len(args) == len(ACCESS_FIELDS):
            return self.access_line(record.created, args, record.name)
        else:
            document = {"time": _utc(record), "level": record.levelname,
                        "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return _dumps(document)


class LineHandler(logging.Handler):
    """Writes formatted records to a stream (``-``: standard error) or a file (appended
    to, and opened again when it is moved away, as logrotate does), one line each.

    Records logged on an event loop's thread are held for at most :data:`FLUSH_INTERVAL`
    seconds (or until :data:`HOLD_AT_MOST` octets are held) and written in one call;
    records from other threads are written at once, and so is everything held when the
    handler is flushed or closed (as logging does when the process exits).
    """

    lock: threading.RLock  # made by logging.Handler.__init__

    def __init__(self, target: str):
        super().__init__()
        self.path = None if target == "-" else os.path.abspath(target)
        self.stream: TextIO = sys.stderr
        self._identity: tuple[int, int] | None = None
        self._checked = 0.0
        if self.path is not None:
            self._open()
        self._held: list[str] = []
        self._held_octets = 0
        self._loop = None
        self._loop_thread = None
        self._flush_due = False

    def _open(self) -> None:
        assert self.path is not None  # a file, not standard error
        self.stream = open(self.path, "a", encoding="utf-8", buffering=1 << 16)
        status = os.fstat(self.stream.fileno())
        self._identity = (status.st_dev, status.st_ino)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._hold(line)

    def access(self, args: tuple, name: str = ACCESS_LOGGER) -> None:
        """Write an access line (fields :data:`ACCESS_FIELDS`) of logger ``name`` made now:
        what logging a record of it does, without the record (see
        :class:`mip.frontends.access.AccessLog`)."""
        line = self.formatter.access_line(time.time(), args, name) + "\n"  # type: ignore[union-attr]
        with self.lock:
            self._hold(line)

    def _hold(self, line: str) -> None:
        self._held.append(line)
        self._held_octets += len(line)
        if self._held_octets >= HOLD_AT_MOST:
            self._write()
            return
        loop = self._loop_now()
        if loop is None:
            self._write()
        elif not self._flush_due:
            self._flush_due = True
            loop.call_later(FLUSH_INTERVAL, self.flush)

    def _loop_now(self):
        """The event loop running on this thread (remembered: looking it up costs a system
        call), or ``None``."""
        ident = threading.get_ident()
        loop = self._loop
        if loop is not None and ident == self._loop_thread and not loop.is_closed():
            return loop
        loop = asyncio._get_running_loop()
        if loop is not None and loop is not self._loop:
            self._loop, self._loop_thread = loop, ident
            self._flush_due = False  # a flush due on another loop will not come
        return loop

    def flush(self) -> None:
        with self.lock:
            self._flush_due = False
            self._write()

    def _write(self) -> None:
        if not self._held:
            return
        text = "".join(self._held)
        self._held.clear()
        self._held_octets = 0
        try:
            if self.path is not None:
                if self.stream.closed:  # closed by a logging reconfiguration: open again
                    self._open()
                self._reopen_if_moved()
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError) as exc:  # a full disk must not fail requests
            sys.stderr.write(f"mip: cannot write the log {self.path or '-'}: {exc}\n")

    def _reopen_if_moved(self) -> None:
        now = time.monotonic()
        if now - self._checked < _REOPEN_CHECK:
            return
        self._checked = now
        try:
            status = os.stat(self.path)  # type: ignore[arg-type]  # called for a file only
            moved = (status.st_dev, status.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if moved:
            self.stream.close()
            self._open()

    def close(self) -> None:
        with self.lock:
            self._write()
            if self.path is not None and not self.stream.closed:
                self.stream.close()
        super().close()


def configure(level: str = "INFO", log_format: str = "text",
              access_log: str | None = None) -> bool:
    """Set up the process's logs: standard error at ``level`` in ``log_format``
    (:data:`LOG_FORMATS`); with ``access_log`` (``-`` or a file path), the ``mip.access``
    logger writes there at INFO whatever ``level`` is, and only there. Returns whether the
    access log is on.

    Raises:
        OSError: the access log file cannot be opened.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, "
                         f"not {log_format!r}")
    # No record field these formats show needs the process, thread or caller looked up.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    access = logging.getLogger(ACCESS_LOGGER)
    for old in list(access.handlers):
        access.removeHandler(old)
        old.close()
    if access_log is None:
        access.propagate = True
        access.setLevel(logging.NOTSET)
        return False
    line_handler = LineHandler(access_log)
    line_handler.setFormatter(JsonFormatter() if log_format == "json" else
                              TextAccessFormatter())
    access.addHandler(line_handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    return True
