# ruff: noqa: F811  (pytest fixtures imported from _miaas are arguments here)
"""Authentication (API keys, JWT) and rate limits of the /v1 API."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from _miaas import API_KEY, AUTH, engine, repository, serve  # noqa: F401

from mip.frontends.miaas import MiaasConfig, standalone_app
from mip.errors import AuthError
from mip.frontends.auth import Authenticator, hash_key, load_api_keys
from mip.net.ratelimit import (
    MemoryRateLimiter,
    RedisRateLimiter,
    parse_rate,
)

pytestmark = pytest.mark.timeout(60)

jwt = pytest.importorskip("jwt")

ISSUER, AUDIENCE = "https://issuer.example", "mip-api"


@pytest.fixture(scope="module")
def rsa_keys():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, other, pem


def token(private, *, kid="k1", iss=ISSUER, aud=AUDIENCE, exp_in=300.0, sub="client-7",
          alg="RS256") -> str:
    claims = {"sub": sub, "iss": iss, "aud": aud, "exp": int(time.time() + exp_in)}
    return jwt.encode(claims, private, algorithm=alg, headers={"kid": kid})


def jwks_file(tmp_path, private) -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk |= {"kid": "k1", "use": "sig", "alg": "RS256"}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return str(path)


def test_key_file_and_environment(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# keys\nplain-key\n\nsha256:{hash_key('hashed-key')}\n")
    digests = load_api_keys(path, env=" env-key , sha256:" + hash_key("env-hashed"))
    assert digests == [hash_key(k) for k in ("plain-key", "hashed-key", "env-key",
                                             "env-hashed")]
    auth = Authenticator(digests)
    for key in ("plain-key", "hashed-key", "env-key", "env-hashed"):
        assert auth.check_key(key).id == "key:" + hash_key(key)[:16]
    assert auth.check_key("plain-key ") is None
    assert auth.check_key(hash_key("hashed-key")) is None  # a digest is not a key
    (tmp_path / "bad").write_text("sha256:xyz\n")
    with pytest.raises(ValueError, match="64 hex"):
        load_api_keys(tmp_path / "bad", env="")


async def test_header_forms():
    auth = Authenticator([hash_key("k")])
    assert (await auth.authenticate({"authorization": "Bearer k"})).kind == "api_key"
    assert (await auth.authenticate({"x-api-key": "k"})).kind == "api_key"
    for headers in ({}, {"authorization": "Basic k"}, {"authorization": "Bearer"},
                    {"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}):
        with pytest.raises(AuthError):
            await auth.authenticate(headers)


@pytest.mark.parametrize("source", ["jwks", "pem"])
async def test_jwt_verification(tmp_path, rsa_keys, source):
    private, other, pem = rsa_keys
    if source == "pem":
        (tmp_path / "key.pem").write_bytes(pem)
        keys = str(tmp_path / "key.pem")
    else:
        keys = jwks_file(tmp_path, private)
    auth = Authenticator([], jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_keys=keys)
    identity = await auth.authenticate({"authorization": f"Bearer {token(private)}"})
    assert identity.id == f"jwt:{ISSUER}:client-7" and identity.claims["sub"] == "client-7"
    bad = {"signed by another key": token(other),
           "wrong audience": token(private, aud="someone-else"),
           "wrong issuer": token(private, iss="https://evil.example"),
           "expired": token(private, exp_in=-120),
           "HS256 with the public key": jwt.encode(
               {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
               "s" * 40, algorithm="HS256", headers={"kid": "k1"}),
           "garbage": "a.b.c"}
    for reason, value in bad.items():
        with pytest.raises(AuthError):
            await auth.authenticate({"authorization": f"Bearer {value}"})
            pytest.fail(reason)


async def test_auth_failures_over_http(engine, tmp_path, rsa_keys):
    private, other, _ = rsa_keys
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=str(tmp_path / "q.sqlite3"),
                      jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
                      jwt_keys=jwks_file(tmp_path, private), auth_failures="100/min")
    async with serve(standalone_app(engine, cfg)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
            assert (await client.get("/v1/models",
                                     headers={"X-API-Key": API_KEY})).status_code == 200
            good = {"Authorization": f"Bearer {token(private)}"}
            assert (await client.get("/v1/models", headers=good)).status_code == 200
            failures = {
                "missing": {},
                "bad key": {"Authorization": "Bearer not-a-key"},
                "bad x-api-key": {"X-API-Key": "not-a-key"},
                "bad JWT": {"Authorization": f"Bearer {token(other)}"},
                "wrong audience": {"Authorization": f"Bearer {token(private, aud='x')}"},
                "expired": {"Authorization": f"Bearer {token(private, exp_in=-120)}"},
            }
            for reason, headers in failures.items():
                for method, path in (("GET", "/v1/models"), ("GET", "/v1/health"),
                                     ("POST", "/v1/inference"), ("GET", "/v1/inference/x"),
                                     ("GET", "/v1/models/mlp")):
                    r = await client.request(method, path, headers=headers)
                    assert r.status_code == 401, (reason, path, r.text)
                    assert r.json()["error"]["code"] == "unauthorized"
            r = await client.get("/v1/models",
                                 headers={"Authorization": f"Bearer {token(private, exp_in=-120)}"})
            assert "expired" in r.json()["error"]["message"]


async def test_no_credentials_configured_refuses_everything(engine, tmp_path):
    cfg = MiaasConfig(queue=str(tmp_path / "q.sqlite3"))
    async with serve(standalone_app(engine, cfg)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/v1/health", headers=AUTH)).status_code == 401


def test_parse_rate():
    assert parse_rate("1000") == (1000, 60.0)
    assert parse_rate("5/min") == (5, 60.0)
    assert parse_rate("5/s") == (5, 1.0)
    assert parse_rate("10/30s") == (10, 30.0)
    assert parse_rate("100/hour") == (100, 3600.0)
    for bad in ("0/min", "5/fortnight", "x"):
        with pytest.raises(ValueError):
            parse_rate(bad)


async def test_gcra_in_memory():
    limiter = MemoryRateLimiter(5, 60.0)
    decisions = [await limiter.check("a") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    denied = decisions[-1]
    assert 11.0 < denied.retry_after <= 12.0  # one slot every 60/5 s
    assert denied.headers()["Retry-After"] == "12"
    assert (await limiter.check("b")).allowed  # per identity


async def test_gcra_in_redis_is_shared(redis_url):
    one = RedisRateLimiter(redis_url, 5, 60.0, prefix=f"test:{time.time()}")
    two = RedisRateLimiter(redis_url, 5, 60.0, prefix=one.prefix)
    try:
        decisions = [await (one if i % 2 else two).check("a") for i in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert decisions[4].remaining == 0
        assert 11.0 < decisions[5].retry_after <= 12.0
        assert (await one.check("b")).allowed
    finally:
        await one.close()
        await two.close()


async def test_rate_limit_over_http(engine, tmp_path):
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY), hash_key("other")], rate_limit="5/min",
                      queue=str(tmp_path / "q.sqlite3"))
    async with serve(standalone_app(engine, cfg)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            responses = [await client.get("/v1/health", headers=AUTH) for _ in range(6)]
            assert [r.status_code for r in responses] == [200] * 5 + [429]
            assert responses[0].headers["X-RateLimit-Limit"] == "5"
            assert responses[0].headers["X-RateLimit-Remaining"] == "4"
            assert int(responses[0].headers["X-RateLimit-Reset"]) in (12, 13)
            limited = responses[-1]
            assert limited.json()["error"]["code"] == "rate_limited"
            assert limited.headers["Retry-After"] == "12"
            assert limited.headers["X-RateLimit-Remaining"] == "0"
            assert (await client.get("/v1/health",
                                     headers={"X-API-Key": "other"})).status_code == 200


async def test_rate_limit_across_replicas(engine, tmp_path, redis_url):
    """Two control planes sharing one Redis share each client's budget."""
    configs = [MiaasConfig(api_keys=[hash_key(API_KEY)], rate_limit="4/min", queue=redis_url,
                           job_workers=0) for _ in range(2)]
    async with serve(standalone_app(engine, configs[0])) as a, \
            serve(standalone_app(engine, configs[1])) as b:
        async with httpx.AsyncClient() as client:
            codes = [(await client.get(f"{(a, b)[i % 2]}/v1/health", headers=AUTH)).status_code
                     for i in range(5)]
    assert codes == [200] * 4 + [429]
