"""Listen and connect addresses written as URLs: ``tcp://HOST:PORT`` and ``unix:///PATH``."""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import ClassVar, TypeAlias

__all__ = ["Address", "TcpAddress", "UnixAddress", "parse_url", "tcp_address"]


@dataclasses.dataclass(frozen=True, slots=True)
class TcpAddress:
    """A TCP address.

    Attributes:
        host: host name or IP literal (without brackets).
        port: port number (0 lets the system choose when listening).
    """

    host: str
    port: int
    scheme: ClassVar[str] = "tcp"

    @property
    def hostport(self) -> str:
        """``HOST:PORT``, an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"tcp://{self.hostport}"


@dataclasses.dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix socket address.

    Attributes:
        path: filesystem path of the socket.
    """

    path: str
    scheme: ClassVar[str] = "unix"

    def __str__(self) -> str:
        return f"unix://{self.path}"


#: a parsed address: ``scheme`` is ``"tcp"`` or ``"unix"``
Address: TypeAlias = TcpAddress | UnixAddress


def parse_url(url: str, default_port: int | None = None) -> Address:
    """Parse ``tcp://HOST:PORT`` into a :class:`TcpAddress` or ``unix:///PATH`` into a
    :class:`UnixAddress`.

    A bare ``HOST:PORT`` is read as TCP. ``default_port`` is used when a TCP URL has no
    port. Raises ``ValueError`` for anything else.
    """
    if "://" not in url:
        url = "tcp://" + url
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        path = parts.path or parts.netloc
        if parts.netloc and parts.path:
            path = parts.netloc + parts.path  # unix://relative/path
        if not path:
            raise ValueError(f"unix URL without a path: {url!r}")
        return UnixAddress(path)
    if scheme != "tcp":
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r} (use tcp:// or unix://)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"unexpected path or query in TCP URL {url!r}")
    host = parts.hostname
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    if port is None:
        port = default_port
    if not host or port is None:
        raise ValueError(f"TCP URL needs a host and a port: {url!r}")
    return TcpAddress(host, port)


def tcp_address(text: str, what: str = "the address") -> TcpAddress:
    """Parse ``HOST:PORT`` (or ``tcp://HOST:PORT``) into a :class:`TcpAddress`; anything else
    raises ``ValueError`` saying that ``what`` (e.g. ``"--http"``) must be ``HOST:PORT``."""
    try:
        address = parse_url(text)
    except ValueError:
        address = None
    if not isinstance(address, TcpAddress):
        raise ValueError(f"{what} must be HOST:PORT, not {text!r}")
    return address
