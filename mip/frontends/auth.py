"""Credentials for every HTTP and gRPC frontend: API keys and OAuth2 JWT bearer tokens.

One :class:`Guard` per server decides, for the areas it protects (see :data:`AREAS`),
whether a request's credentials verify: the ``/v1`` API always, and with ``mip serve
--auth-scope`` also KServe v2 inference, metadata, model control and metrics, on REST
(headers) and gRPC (metadata) alike. Health endpoints are never protected.

API keys come from a file (``--api-keys FILE``: one key, or ``sha256:HEX`` of a key, per
line; blank lines and ``#`` comments are skipped) and/or the ``MIP_API_KEYS`` environment
variable (comma-separated, same forms). Only their SHA-256 digests are kept, and a
presented key's digest is compared with every stored digest using
:func:`hmac.compare_digest`. A client sends its key as ``Authorization: Bearer KEY`` or
``X-API-Key: KEY`` (HTTP headers, or gRPC metadata of the same lowercase names).

JWTs (``Authorization: Bearer eyJ…``) are verified with PyJWT: signature (asymmetric
algorithms only, keys from a JWKS file or URL or a PEM public key), ``exp``, ``iss`` and
``aud`` against the configured issuer and audience.

The identity of a request (what rate limits are keyed by) is ``key:`` + the first 16 hex
digits of the key's digest, or ``jwt:`` + the token's issuer and subject.

Failed authentications are limited per peer address by :class:`FailureLimit`: once a
peer's budget is spent, its requests are refused before any credential is looked at.
Neither a credential nor any part of one is ever logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mip.errors import AuthError, InvalidCredentials, TooManyAuthFailures, Unauthenticated
from mip.net.ratelimit import FailureLimit, peer_of

__all__ = [
    "AREAS",
    "Authenticator",
    "Guard",
    "Identity",
    "guard_from_args",
    "hash_key",
    "load_api_keys",
    "parse_scope",
]

log = logging.getLogger("mip.auth")

#: the areas of a server that credentials can be required for, and what each covers.
#: ``/v2/health/*``, ``/v2/models/{name}/ready`` and gRPC's ServerLive, ServerReady,
#: ModelReady, ``grpc.health.v1`` and reflection are in none: probes never need a key.
AREAS = {
    "v1": "the MIaaS /v1 API (always protected)",
    "inference": "POST /v2/models/.../infer; gRPC ModelInfer and ModelStreamInfer",
    "metadata": "GET /v2, /v2/models/{name}[/versions/{v}] and .../config; gRPC "
                "ServerMetadata, ModelMetadata and ModelConfig",
    "control": "/v2/repository/... (index, load, unload); gRPC RepositoryIndex, "
               "RepositoryModelLoad and RepositoryModelUnload",
    "metrics": "GET /metrics and the statistics (/v2/models[/{name}]/stats); gRPC "
               "ModelStatistics",
}

#: asymmetric signature algorithms accepted in JWTs (never HS*, never "none").
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                  "ES256", "ES384", "ES512", "EdDSA"]


@dataclass(frozen=True)
class Identity:
    """Who made a request: ``id`` keys the rate limit; ``kind`` is ``api_key`` or ``jwt``;
    ``claims`` are the verified JWT claims (empty for keys)."""

    id: str
    kind: str
    claims: dict | None = None


def hash_key(key: str) -> str:
    """The stored form of an API key: its SHA-256 digest in lowercase hex (64 digits)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _parse_entry(entry: str, where: str) -> str | None:
    entry = entry.strip()
    if not entry or entry.startswith("#"):
        return None
    if entry.lower().startswith("sha256:"):
        digest = entry[7:].strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        return digest
    return hash_key(entry)


def load_api_keys(path: str | os.PathLike | None = None,
                  env: str | None = None) -> list[str]:
    """SHA-256 digests of the keys in ``path`` and in ``env`` (the value of
    ``MIP_API_KEYS`` when not given)."""
    digests: list[str] = []
    if path:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            digest = _parse_entry(line, f"{path}:{number}")
            if digest:
                digests.append(digest)
    env = os.environ.get("MIP_API_KEYS", "") if env is None else env
    for part in env.split(","):
        digest = _parse_entry(part, "MIP_API_KEYS")
        if digest:
            digests.append(digest)
    return list(dict.fromkeys(digests))


class _JwtVerifier:
    """Verifies JWTs against an issuer, an audience and a key source (times in seconds)."""

    def __init__(self, issuer: str | None, audience: str | None, keys: str,
                 leeway: float = 30.0):
        import jwt  # PyJWT, from the 'serve' extra

        self._jwt = jwt
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._pem = None
        self._jwks = None
        self._client = None
        if keys.startswith(("https://", "http://")):
            self._client = jwt.PyJWKClient(keys, cache_keys=True, lifespan=300)
        else:
            text = Path(keys).read_text()
            if text.lstrip().startswith("{"):
                self._jwks = jwt.PyJWKSet.from_dict(json.loads(text))
            else:
                self._pem = text

    def _key(self, token: str):
        if self._pem is not None:
            return self._pem
        if self._client is not None:
            return self._client.get_signing_key_from_jwt(token).key
        kid = self._jwt.get_unverified_header(token).get("kid")
        assert self._jwks is not None  # one of the three sources is always set
        keys = self._jwks.keys
        if kid is None:
            if len(keys) != 1:
                raise self._jwt.InvalidTokenError("the token has no 'kid' and the key set "
                                                  "holds several keys")
            return keys[0].key
        for key in keys:
            if key.key_id == kid:
                return key.key
        raise self._jwt.InvalidTokenError(f"no key with kid {kid!r}")

    def verify(self, token: str) -> dict:
        """The verified claims; raises ``AuthError`` with the reason otherwise."""
        jwt = self._jwt
        try:
            key = self._key(token)
            required = ["exp"] + (["iss"] if self.issuer else []) + (
                ["aud"] if self.audience else [])
            return jwt.decode(token, key, algorithms=JWT_ALGORITHMS, audience=self.audience,
                              issuer=self.issuer, leeway=self.leeway,
                              options={"require": required,
                                       "verify_aud": self.audience is not None})
        except jwt.PyJWKClientConnectionError:  # our key source is down, not the client's fault
            raise AuthError("the token's signing keys cannot be fetched now") from None
        except jwt.ExpiredSignatureError:
            raise InvalidCredentials("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise InvalidCredentials("the token is not meant for this audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidCredentials("the token comes from another issuer") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidCredentials(f"invalid token: {exc}") from None


class Authenticator:
    """Checks a request's credentials.

    Args:
        key_hashes: SHA-256 hex digests of the accepted API keys.
        jwt_issuer / jwt_audience: the ``iss`` / ``aud`` a JWT must carry.
        jwt_keys: a JWKS file, a JWKS URL (``https://…``) or a PEM public key file; JWTs
            are accepted only when this is set.
        jwt_leeway: seconds of clock skew tolerated on ``exp`` / ``nbf``.
    """

    def __init__(self, key_hashes: Sequence[str] = (), *, jwt_issuer: str | None = None,
                 jwt_audience: str | None = None, jwt_keys: str | None = None,
                 jwt_leeway: float = 30.0):
        self._digests = [bytes.fromhex(d) for d in key_hashes]
        self._jwt = _JwtVerifier(jwt_issuer, jwt_audience, jwt_keys,
                                 jwt_leeway) if jwt_keys else None

    @property
    def configured(self) -> bool:
        """Whether any credential is accepted at all."""
        return bool(self._digests) or self._jwt is not None

    @property
    def digests(self) -> list[str]:
        """The accepted API keys' SHA-256 digests, in hex."""
        return [d.hex() for d in self._digests]

    @property
    def waits(self) -> bool:
        """Whether verifying may wait for I/O (JWT keys fetched from a URL): then only
        :meth:`authenticate`, not :meth:`authenticate_now`, can decide."""
        return self._jwt is not None and self._jwt._client is not None

    def check_key(self, key: str) -> Identity | None:
        """The identity of an API key, or ``None`` (constant time in the key's value)."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = False
        for stored in self._digests:  # every digest compared: no early exit
            found |= hmac.compare_digest(digest, stored)
        return Identity("key:" + digest.hex()[:16], "api_key") if found else None

    async def authenticate(self, headers) -> Identity:
        """The identity behind a request's headers (a Starlette ``Headers`` or a mapping
        with lowercase names).

        Raises:
            InvalidCredentials: credentials that do not verify.
            AuthError: no credentials, or a malformed ``Authorization`` header.
        """
        key = _credential(headers)
        identity = self.check_key(key)
        if identity is not None:
            return identity
        if self._jwt is not None and key.count(".") == 2:
            claims = (self._jwt.verify(key) if self._jwt._client is None
                      else await asyncio.to_thread(self._jwt.verify, key))
            return _jwt_identity(claims)
        raise InvalidCredentials("invalid API key")

    def authenticate_now(self, headers) -> Identity:
        """:meth:`authenticate` without a coroutine, for an authenticator that does not
        :attr:`waits`."""
        key = _credential(headers)
        identity = self.check_key(key)
        if identity is not None:
            return identity
        if self._jwt is not None and key.count(".") == 2:
            if self._jwt._client is not None:
                raise TypeError("JWT keys from a URL are verified by authenticate()")
            return _jwt_identity(self._jwt.verify(key))
        raise InvalidCredentials("invalid API key")


def _credential(headers) -> str:
    """The key or token a request presents (``X-API-Key``, else ``Authorization: Bearer``)."""
    key = headers.get("x-api-key")
    authorization = headers.get("authorization")
    if key is None and authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthError("the Authorization header must be 'Bearer <API key or token>'")
        key = value.strip()
    if not key:
        raise AuthError("credentials required: 'authorization: Bearer <API key or token>' or "
                        "'x-api-key: <API key>' (an HTTP header, or gRPC metadata)")
    return key


def _jwt_identity(claims: dict) -> Identity:
    subject = claims.get("sub") or claims.get("client_id") or "?"
    return Identity(f"jwt:{claims.get('iss', '')}:{subject}", "jwt", claims)


def parse_scope(text: str) -> frozenset[str]:
    """The areas named by ``"inference,control"`` (``"all"``: every area); ``v1`` is
    always among them.

    Raises:
        ValueError: an unknown area.
    """
    names = {part.strip().lower() for part in str(text).split(",") if part.strip()}
    if "all" in names:
        return frozenset(AREAS)
    unknown = sorted(names - AREAS.keys())
    if unknown:
        raise ValueError(f"unknown auth scope {', '.join(map(repr, unknown))}: the areas are "
                         f"{', '.join(AREAS)}, or all")
    return frozenset(names | {"v1"})


class Guard:
    """Requires credentials in the areas of :data:`AREAS` it protects, and limits failed
    authentications per client address: the one check every HTTP and gRPC frontend
    makes, so a key works (and a failure counts) the same on all of them.

    Args:
        authenticator: what verifies keys and tokens.
        scope: the areas that need credentials (``v1`` is always one of them).
        failures: the failed authentications a client address may make (a
            :class:`~mip.net.ratelimit.FailureLimit`; default ``10/min`` in this process).
    """

    def __init__(self, authenticator: Authenticator, scope=("v1",),
                 failures: FailureLimit | None = None):
        self.authenticator = authenticator
        self.scope = frozenset(scope) | {"v1"}
        unknown = self.scope - AREAS.keys()
        if unknown:
            raise ValueError(f"unknown auth scope {', '.join(sorted(unknown))}")
        self.failures = failures or FailureLimit("10/min", logger=log)

    def protects(self, area: str | None) -> bool:
        """Whether requests to ``area`` (``None``: a health endpoint) need credentials."""
        return area in self.scope

    @property
    def immediate(self) -> bool:
        """Whether :meth:`authenticate_now` can decide: failure budgets in this process and
        no JWT keys to fetch."""
        return not self.authenticator.waits and self.failures.in_process

    async def authenticate(self, headers, host: str | None) -> Identity:
        """The identity behind ``headers`` (a mapping with lowercase names) from the client
        address ``host``.

        A client past its failure budget is refused before its credentials are examined;
        a failure past the budget (requests racing its end) is refused too, so a budget of
        N failures never yields more than N answers of UNAUTHENTICATED.

        Raises:
            Unauthenticated: no credentials, or credentials that do not verify.
            TooManyAuthFailures: the client's address spent its failure budget.
        """
        peer = peer_of(host)
        refusal = await self.failures.refuse(peer)
        if refusal is None:
            try:
                return await self.authenticator.authenticate(headers)
            except AuthError as exc:  # missing or malformed credentials are not counted
                if isinstance(exc, InvalidCredentials):
                    refusal = await self.failures.failed(peer, str(exc))
                if refusal is None or refusal.allowed:
                    raise Unauthenticated(str(exc)) from None
        raise _too_many(refusal)

    def authenticate_now(self, headers, host: str | None) -> Identity:
        """:meth:`authenticate` without a coroutine, when :attr:`immediate`."""
        peer = peer_of(host)
        refusal = self.failures.refuse_now(peer)
        if refusal is None:
            try:
                return self.authenticator.authenticate_now(headers)
            except AuthError as exc:
                if isinstance(exc, InvalidCredentials):
                    refusal = self.failures.failed_now(peer, str(exc))
                if refusal is None or refusal.allowed:
                    raise Unauthenticated(str(exc)) from None
        raise _too_many(refusal)

    async def close(self) -> None:
        """Log what the failure limit has left to sum up; release its connections."""
        await self.failures.close()


def _too_many(refusal) -> TooManyAuthFailures:
    retry = int(refusal.headers()["Retry-After"])
    return TooManyAuthFailures(f"too many failed authentications from this address; retry "
                               f"after {retry} s", retry_after=retry)


def guard_from_args(args, *, redis_url: str | None = None, ssl_context=None,
                    announce=print) -> Guard:
    """The :class:`Guard` of ``mip serve``'s options (``--api-keys``, ``MIP_API_KEYS``,
    ``--jwt-*``, ``--auth-failures``, ``--auth-scope``); failure budgets in ``redis_url``
    when given.

    With no API key and no JWT key set configured, a random API key is made for this run
    and passed to ``announce`` (printed), so nothing in the scope is open by accident.
    """
    import secrets

    def get(name, default=None):
        return getattr(args, name, default)

    digests = load_api_keys(get("api_keys"))
    scope = get("auth_scope") or frozenset({"v1"})
    if not digests and not get("jwt_keys"):
        key = secrets.token_urlsafe(32)
        digests = [hash_key(key)]
        areas = ", ".join(sorted(scope, key=list(AREAS).index))
        announce(f"mip: API key for this run, for {areas} (choose your own with --api-keys "
                 f"FILE or MIP_API_KEYS): {key}")
    authenticator = Authenticator(digests, jwt_issuer=get("jwt_issuer"),
                                  jwt_audience=get("jwt_audience"), jwt_keys=get("jwt_keys"))
    failures = FailureLimit(get("auth_failures") or "10/min", redis_url, ssl_context,
                            logger=log)
    return Guard(authenticator, scope, failures)
