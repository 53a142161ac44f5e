"""TLS contexts for every listener and client of the package, made in one place.

A server presents a certificate and, given a CA, requires client certificates signed by
it (mutual TLS); a client trusts a CA (or the system's) and may present a certificate of
its own. ``alpn`` offers application protocols (gRPC offers ``h2``).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable

__all__ = ["client_context", "server_context"]


def server_context(cert: str, key: str | None = None, *, client_ca: str | None = None,
                   alpn: Iterable[str] = ()) -> ssl.SSLContext:
    """A server context presenting ``cert`` (PEM; ``key`` its private key, when not in the
    same file); with ``client_ca``, clients must present a certificate signed by it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    _offer(context, alpn)
    return context


def client_context(*, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   alpn: Iterable[str] = ()) -> ssl.SSLContext:
    """A client context trusting ``ca`` (PEM; ``None``: the system's CAs) and, with
    ``cert`` (and ``key``), presenting that certificate."""
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    _offer(context, alpn)
    return context


def _offer(context: ssl.SSLContext, alpn: Iterable[str]) -> None:
    protocols = list(alpn)
    if protocols:
        context.set_alpn_protocols(protocols)
