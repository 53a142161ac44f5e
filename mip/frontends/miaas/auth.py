"""Authentication of ``/v1`` requests: API keys and OAuth2 JWT bearer tokens.

API keys come from a file (``--api-keys FILE``: one key, or ``sha256:HEX`` of a key, per
line; blank lines and ``#`` comments are skipped) and/or the ``MIP_API_KEYS`` environment
variable (comma-separated, same forms). Only their SHA-256 digests are kept, and a
presented key's digest is compared with every stored digest using
:func:`hmac.compare_digest`. A client sends its key as ``Authorization: Bearer KEY`` or
``X-API-Key: KEY``.

JWTs (``Authorization: Bearer eyJ…``) are verified with PyJWT: signature (asymmetric
algorithms only, keys from a JWKS file or URL or a PEM public key), ``exp``, ``iss`` and
``aud`` against the configured issuer and audience.

The identity of a request (what rate limits are keyed by) is ``key:`` + the first 16 hex
digits of the key's digest, or ``jwt:`` + the token's issuer and subject.

Failed authentications are limited per peer address by :class:`FailureLimit`: once a
peer's budget is spent, its requests are refused before any credential is looked at.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path


__all__ = [
    "AuthError",
    "Authenticator",
    "Identity",
    "InvalidCredentials",
    "hash_key",
    "load_api_keys",
]

log = logging.getLogger("mip.miaas")

#: asymmetric signature algorithms accepted in JWTs (never HS*, never "none").
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                  "ES256", "ES384", "ES512", "EdDSA"]


class AuthError(Exception):
    """A request without valid credentials (answered with 401)."""


class InvalidCredentials(AuthError):
    """Credentials were presented and did not verify (a failed authentication: counted
    against the peer's failure budget and logged)."""


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

    def __init__(self, key_hashes: list[str] = (), *, jwt_issuer: str | None = None,
                 jwt_audience: str | None = None, jwt_keys: str | None = None,
                 jwt_leeway: float = 30.0):
        self._digests = [bytes.fromhex(d) for d in key_hashes]
        self._jwt = _JwtVerifier(jwt_issuer, jwt_audience, jwt_keys,
                                 jwt_leeway) if jwt_keys else None

    @property
    def configured(self) -> bool:
        """Whether any credential is accepted at all."""
        return bool(self._digests) or self._jwt is not None

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
        key = headers.get("x-api-key")
        authorization = headers.get("authorization")
        if key is None and authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("the Authorization header must be 'Bearer <API key or token>'")
            key = value.strip()
        if not key:
            raise AuthError("credentials required: 'Authorization: Bearer <API key or "
                            "token>' or 'X-API-Key: <API key>'")
        identity = self.check_key(key)
        if identity is not None:
            return identity
        if self._jwt is not None and key.count(".") == 2:
            claims = (self._jwt.verify(key) if self._jwt._client is None
                      else await asyncio.to_thread(self._jwt.verify, key))
            subject = claims.get("sub") or claims.get("client_id") or "?"
            return Identity(f"jwt:{claims.get('iss', '')}:{subject}", "jwt", claims)
        raise InvalidCredentials("invalid API key")
