"""Futures chained by callbacks: how every frontend answers a request without a coroutine."""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["chain"]


def chain(source: asyncio.Future, transform: Callable,
          error: Callable[[BaseException], BaseException] | None = None) -> asyncio.Future:
    """A future of ``transform(source.result())``, completed from ``source``'s callback.

    ``source``'s exception (through ``error`` when given) becomes the new future's, and so
    does one raised by ``transform``; cancelling the new future cancels ``source`` (so a
    request whose client left drops out of the batch queue).
    """
    reply = source.get_loop().create_future()

    def settle(done: asyncio.Future) -> None:
        if reply.done():
            return
        if done.cancelled():
            reply.cancel()
            return
        exc = done.exception()
        if exc is None:
            try:
                reply.set_result(transform(done.result()))
                return
            except Exception as failure:  # an encoding failure is the request's, not the loop's
                exc = failure
        reply.set_exception(error(exc) if error is not None else exc)

    source.add_done_callback(settle)
    reply.add_done_callback(lambda r: source.cancel() if r.cancelled() else None)
    return reply
