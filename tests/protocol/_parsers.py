"""What the streaming parsers' tests share."""

from __future__ import annotations

import pytest


def expect_error(parser, data, exc):
    """Feeding ``data`` raises ``exc`` now, or returns nothing and raises on the next call;
    returns the exception."""
    try:
        got = parser.feed(data)
    except exc as e:
        return e
    assert got == []
    with pytest.raises(exc) as info:
        parser.feed(b"")
    return info.value
