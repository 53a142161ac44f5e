"""Futures chained by callbacks: how every frontend answers a request without a coroutine."""

from __future__ import annotations

import asyncio
from typing import Callable

__all__ = ["CANCELLED", "Link", "chain"]

#: what ``settled`` is given for a request whose future was cancelled (its client left).
CANCELLED = asyncio.CancelledError("the request was cancelled")


class Link:
    """A reply future completed from a source future's callback, with one object a request.

    The object is the done-callback of both futures (no closures): when ``source`` is done,
    ``reply`` gets ``transform(source.result())``, or the exception (through ``error``) of
    ``source`` or of ``transform``; cancelling ``reply`` cancels ``source`` (so a request
    whose client left drops out of the batch queue). ``settled(failure)`` is called in the
    same callback once the outcome is known: ``None`` when a result was set, else the
    exception (before ``error`` maps it), or :data:`CANCELLED`.

    Subclasses override :meth:`transform`, :meth:`error` and :meth:`settled`.
    """

    __slots__ = ("source", "reply")

    def __init__(self, source: asyncio.Future):
        self.source = source
        self.reply = reply = source.get_loop().create_future()
        source.add_done_callback(self)
        reply.add_done_callback(self)

    def __call__(self, done: asyncio.Future) -> None:
        reply = self.reply
        if done is reply:  # settled before the source: only a cancellation gets here
            if done.cancelled():
                self.source.cancel()
            return
        failure: BaseException | None = CANCELLED
        if reply.done():
            pass
        elif done.cancelled():
            reply.cancel()
        else:
            # Settled from here: the reply's own callback has nothing left to do.
            reply.remove_done_callback(self)
            failure = done.exception()
            if failure is None:
                try:
                    reply.set_result(self.transform(done.result()))
                except Exception as exc:  # an encoding failure is the request's
                    failure = exc
            if failure is not None:
                reply.set_exception(self.error(failure))
        self.settled(failure)

    def transform(self, result):
        return result

    def error(self, failure: BaseException) -> BaseException:
        return failure

    def settled(self, failure: BaseException | None) -> None:
        pass


class _Chain(Link):
    __slots__ = ("_transform", "_error", "_settled")
    _transform: Callable
    _error: Callable[[BaseException], BaseException] | None
    _settled: Callable[[BaseException | None], None] | None

    def transform(self, result):
        return self._transform(result)

    def error(self, failure: BaseException) -> BaseException:
        return failure if self._error is None else self._error(failure)

    def settled(self, failure: BaseException | None) -> None:
        if self._settled is not None:
            self._settled(failure)


def chain(source: asyncio.Future, transform: Callable,
          error: Callable[[BaseException], BaseException] | None = None,
          settled: Callable[[BaseException | None], None] | None = None) -> asyncio.Future:
    """A future of ``transform(source.result())``, completed from ``source``'s callback
    (a :class:`Link` made of functions: ``error`` maps the exception, ``settled`` is told
    the outcome)."""
    link = _Chain.__new__(_Chain)
    link._transform, link._error, link._settled = transform, error, settled
    Link.__init__(link, source)
    return link.reply
