"""Futures chained by callbacks: how every frontend answers a request without a coroutine."""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["CANCELLED", "chain"]

#: what ``settled`` is given for a request whose future was cancelled (its client left).
CANCELLED = asyncio.CancelledError("the request was cancelled")


def chain(source: asyncio.Future, transform: Callable,
          error: Callable[[BaseException], BaseException] | None = None,
          settled: Callable[[BaseException | None], None] | None = None) -> asyncio.Future:
    """A future of ``transform(source.result())``, completed from ``source``'s callback.

    ``source``'s exception (through ``error`` when given) becomes the new future's, and so
    does one raised by ``transform``; cancelling the new future cancels ``source`` (so a
    request whose client left drops out of the batch queue). ``settled(failure)``, when
    given, is called in the same callback once the outcome is known: ``None`` when a
    result was set, else the exception (before ``error`` maps it), or :data:`CANCELLED`.
    """
    reply = source.get_loop().create_future()

    def settle(done: asyncio.Future) -> None:
        exc = CANCELLED
        if reply.done():
            pass
        elif done.cancelled():
            reply.cancel()
        else:
            exc = done.exception()
            if exc is None:
                try:
                    reply.set_result(transform(done.result()))
                except Exception as failure:  # an encoding failure is the request's
                    exc = failure
            if exc is not None:
                reply.set_exception(error(exc) if error is not None else exc)
        if settled is not None:
            settled(exc)

    source.add_done_callback(settle)
    reply.add_done_callback(lambda r: source.cancel() if r.cancelled() else None)
    return reply
