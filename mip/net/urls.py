"""Listen and connect addresses written as URLs: ``tcp://HOST:PORT`` and ``unix:///PATH``."""

from __future__ import annotations

import dataclasses
import urllib.parse

__all__ = ["Address", "parse_url"]


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """A parsed address.

    Attributes:
        scheme: ``"tcp"`` or ``"unix"``.
        host: host name or IP literal (without brackets) for TCP, else ``None``.
        port: TCP port number (0 lets the system choose when listening), else ``None``.
        path: filesystem path of a Unix socket, else ``None``.
    """

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_url(url: str, default_port: int | None = None) -> Address:
    """Parse ``tcp://HOST:PORT`` or ``unix:///PATH`` into an :class:`Address`.

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
        return Address("unix", path=path)
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
    return Address("tcp", host=host, port=port)
