# ruff: noqa: F811  (pytest fixtures imported from _miaas are arguments here)
"""Failed authentications of the /v1 API: limited per client address (in memory and shared
through Redis), refused before any credential is examined, logged within limits; API keys
compared in constant time; bounded tables."""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging

import httpx
import pytest
from _miaas import API_KEY, AUTH, engine, repository, serve  # noqa: F401

from mip.frontends.miaas import MiaasConfig, config_from_args, standalone_app
from mip.frontends.auth import Authenticator, hash_key
from mip.net.ratelimit import FailureLimit, MemoryRateLimiter, RedisRateLimiter, peer_of

pytestmark = pytest.mark.timeout(90)

WRONG = {"Authorization": "Bearer wrong-key-4242"}
PEER_LINE = "failed authentication from "
SUMMARY_LINE = "failed authentications in the last "


def _client(base: str, address: str | None = None) -> httpx.AsyncClient:
    """A client whose connections come from ``address`` (any 127.0.0.0/8 address)."""
    transport = httpx.AsyncHTTPTransport(local_address=address) if address else None
    return httpx.AsyncClient(base_url=base, transport=transport)


def _lines(caplog, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name in ("mip.miaas", "mip.auth") and r.getMessage().startswith(start)]


def _count_comparisons(service) -> list[int]:
    """Counts calls of the service's API-key check (the real one still runs)."""
    calls = [0]
    check = service.auth.check_key

    def counted(key):
        calls[0] += 1
        return check(key)

    service.auth.check_key = counted
    return calls


async def test_wrong_keys_from_one_address(engine, tmp_path, caplog):
    """1,500 wrong keys from 127.0.0.1: the first 10 get 401, every later one 429 with
    Retry-After and without a key comparison (even the right key), while the right key from
    127.0.0.2 keeps working. The log has one line for the peer and one summary."""
    caplog.set_level(logging.WARNING)
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=str(tmp_path / "q.sqlite3"),
                      auth_failures="10/hour", job_workers=0)
    app = standalone_app(engine, cfg)
    comparisons = _count_comparisons(app.state.service)
    async with serve(app) as url:
        async with _client(url) as attacker, _client(url, "127.0.0.2") as user:
            codes, good = [], []
            for i in range(1500):
                r = await attacker.get("/v1/models", headers=WRONG)
                codes.append(r.status_code)
                if len(codes) == 11:
                    refused = r
                if i % 100 == 0:
                    good.append((await user.get("/v1/models", headers=AUTH)).status_code)
            assert codes == [401] * 10 + [429] * 1490
            assert good == [200] * 15
            assert refused.json()["error"]["code"] == "too_many_auth_failures"
            assert 1 <= int(refused.headers["Retry-After"]) <= 360  # one failure per 360 s
            assert "X-RateLimit-Limit" not in refused.headers
            assert comparisons[0] == 10 + 15
            right = await attacker.get("/v1/models", headers=AUTH)
            assert right.status_code == 429  # the budget is spent: nothing is examined
            assert comparisons[0] == 10 + 15
            # no credentials at all, or a malformed header, are not attempts on a key
            other = "127.0.0.3"
            async with _client(url, other) as careless:
                for headers in ({}, {"Authorization": "Basic abc"}) * 10:
                    assert (await careless.get("/v1/models", headers=headers)).status_code == 401
                assert (await careless.get("/v1/models", headers=AUTH)).status_code == 200
    assert _lines(caplog, PEER_LINE) == [f"{PEER_LINE}127.0.0.1: invalid API key"]
    (summary,) = _lines(caplog, SUMMARY_LINE)  # when the service stops
    assert summary.endswith(" s: 9 more not logged; refused for too many failures: 1491")
    assert "wrong-key" not in caplog.text and API_KEY not in caplog.text


async def test_concurrent_attempts_never_get_more_than_the_budget(engine, tmp_path):
    """Wrong keys sent 20 at a time: still exactly N answers of 401."""
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=str(tmp_path / "q.sqlite3"),
                      auth_failures="7/hour", job_workers=0)
    async with serve(standalone_app(engine, cfg)) as url:
        async with _client(url) as attacker:
            async def attempts(n):
                return [(await attacker.get("/v1/health", headers=WRONG)).status_code
                        for _ in range(n)]
            codes = sum(await asyncio.gather(*(attempts(15) for _ in range(20))), [])
    assert collections.Counter(codes) == {401: 7, 429: 293}


async def test_budget_shared_through_redis(engine, redis_url):
    """Two control planes sharing a Redis queue share each address's failure budget, also
    under concurrent attempts through both; other addresses are unaffected."""
    configs = [MiaasConfig(api_keys=[hash_key(API_KEY)], queue=redis_url, job_workers=0,
                           auth_failures="6/hour") for _ in range(2)]
    async with serve(standalone_app(engine, configs[0])) as a, \
            serve(standalone_app(engine, configs[1])) as b:
        async with _client(a) as at_a, _client(b) as at_b, \
                _client(a, "127.0.0.2") as user_a, _client(b, "127.0.0.2") as user_b, \
                _client(a, "127.0.0.4") as crowd_a, _client(b, "127.0.0.4") as crowd_b:
            codes = [(await (at_a, at_b)[i % 2].get("/v1/models", headers=WRONG)).status_code
                     for i in range(12)]
            assert codes == [401] * 6 + [429] * 6
            assert (await at_b.get("/v1/models", headers=AUTH)).status_code == 429
            for user in (user_a, user_b):
                assert (await user.get("/v1/models", headers=AUTH)).status_code == 200

            async def attempts(client, n):
                return [(await client.get("/v1/health", headers=WRONG)).status_code
                        for _ in range(n)]
            together = sum(await asyncio.gather(*(attempts((crowd_a, crowd_b)[i % 2], 10)
                                                  for i in range(10))), [])
            assert collections.Counter(together) == {401: 6, 429: 94}
    # the budgets live in Redis, expiring once whole again
    import redis.asyncio as aioredis

    r0 = aioredis.from_url(redis_url, decode_responses=True)
    try:
        keys = sorted(await r0.keys("mip:authfail:*"))
        assert keys == ["mip:authfail:127.0.0.1", "mip:authfail:127.0.0.4"]
        assert 0 < await r0.pttl(keys[0]) <= 3_600_000
    finally:
        await r0.aclose()


async def test_peek_does_not_count():
    for limiter in (MemoryRateLimiter(2, 60.0),):
        assert all([(await limiter.check("a", count=False)).allowed for _ in range(5)])
        assert [(await limiter.check("a")).allowed for _ in range(3)] == [True, True, False]
        assert not (await limiter.check("a", count=False)).allowed


async def test_peek_does_not_count_in_redis(redis_url):
    limiter = RedisRateLimiter(redis_url, 2, 60.0, prefix="test:peek")
    try:
        await limiter.redis.delete("test:peek:a")
        assert all([(await limiter.check("a", count=False)).allowed for _ in range(5)])
        assert await limiter.redis.exists("test:peek:a") == 0
        assert [(await limiter.check("a")).allowed for _ in range(3)] == [True, True, False]
        refused = await limiter.check("a", count=False)
        assert not refused.allowed and 29 < refused.retry_after <= 30
    finally:
        await limiter.close()


async def test_memory_table_is_bounded():
    """A flood from many addresses: the table keeps the most recently counted ones."""
    limiter = MemoryRateLimiter(3, 60.0, max_identities=50)
    for i in range(10_000):
        await limiter.check(f"10.0.{i >> 8}.{i & 255}")
    assert len(limiter) == 50
    recent = "10.0.39.15"  # i = 9999
    assert [(await limiter.check(recent)).allowed for _ in range(3)] == [True, True, False]
    assert len(limiter) == 50
    assert (await limiter.check("10.0.0.0")).remaining == 2  # forgotten, counted afresh


async def test_failure_table_bounded_over_http(engine, tmp_path):
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=str(tmp_path / "q.sqlite3"),
                      job_workers=0, auth_failures="2/hour", auth_failure_peers=4)
    app = standalone_app(engine, cfg)
    failures = app.state.service.failures
    async with serve(app) as url:
        for host in range(10, 30):
            async with _client(url, f"127.0.0.{host}") as client:
                for _ in range(3):
                    await client.get("/v1/health", headers=WRONG)
            assert len(failures.limiter) <= 4
    assert len(failures.limiter) == 4


async def test_log_is_limited_across_addresses(caplog):
    """One line per peer per interval, at most log_lines in all, then one summary."""
    caplog.set_level(logging.WARNING)
    limit = FailureLimit("100/min", log_lines=3)
    for peer in range(10):
        for _ in range(4):
            assert (await limit.failed(f"10.0.0.{peer}", "invalid API key")).allowed
    assert await limit.refuse("10.0.0.1") is None
    await limit.close()
    assert _lines(caplog, PEER_LINE) == [f"{PEER_LINE}10.0.0.{i}: invalid API key"
                                         for i in range(3)]
    (summary,) = _lines(caplog, SUMMARY_LINE)
    assert summary.endswith(" s: 37 more not logged; refused for too many failures: 0")


async def test_reason_is_printable_and_short(caplog):
    caplog.set_level(logging.WARNING)
    limit = FailureLimit("5/min")
    await limit.failed("10.0.0.1", "invalid token: kid 'a\nb\x1b[31m'" + "x" * 1000)
    await limit.close()
    (line,) = _lines(caplog, PEER_LINE)
    assert "\n" not in line and "\x1b" not in line and len(line) < 260


def test_peer_of():
    assert peer_of("192.0.2.7") == "192.0.2.7"
    assert peer_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert peer_of("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"  # one /64, one budget
    assert peer_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert peer_of("fe80::1%eth0") == "fe80::/64"
    assert peer_of(None) == "unknown" and peer_of("") == "unknown"
    assert peer_of("not:an:address") == "not:an:address"


def test_key_comparison_examines_every_digest(monkeypatch):
    """The presented key's digest is compared with every stored digest, with
    hmac.compare_digest, whether it matches the first, the last or none; keys configured
    plainly or as sha256: digests behave the same."""
    from mip.frontends.auth import load_api_keys

    keys = [f"key-{i}" for i in range(5)]
    digests = load_api_keys(env=",".join(
        [keys[0], f"sha256:{hash_key(keys[1])}", keys[2], f"SHA256:{hash_key(keys[3]).upper()}",
         keys[4]]))
    auth = Authenticator(digests)
    seen = []
    real = hmac.compare_digest

    def compare(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    for presented, expected in [(k, True) for k in keys] + [("key-5", False), ("", False)]:
        seen.clear()
        identity = auth.check_key(presented)
        assert (identity is not None) == expected
        assert len(seen) == len(keys)
        assert {b for _, b in seen} == {bytes.fromhex(d) for d in digests}
        assert all(a == bytes.fromhex(hash_key(presented)) for a, _ in seen)
        if expected:
            assert identity.id == "key:" + hash_key(presented)[:16]


def test_auth_failures_option():
    from mip.cli import _parser

    args = _parser().parse_args(["serve", "--auth-failures", "3/30s"])
    assert config_from_args(args).auth_failures == "3/30s"
    assert config_from_args(_parser().parse_args(["serve"])).auth_failures == "10/min"
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--auth-failures", "0/min"])


async def test_summary_comes_one_interval_after_the_first_left_out(caplog):
    caplog.set_level(logging.WARNING)
    limit = FailureLimit("2/hour", log_interval=0.3)
    for _ in range(5):
        await limit.failed("10.0.0.1", "invalid API key")
    assert await limit.refuse("10.0.0.1") is not None
    assert _lines(caplog, SUMMARY_LINE) == []
    for _ in range(100):  # the summary is due 0.3 s after the second failure
        if _lines(caplog, SUMMARY_LINE):
            break
        await asyncio.sleep(0.05)
    (summary,) = _lines(caplog, SUMMARY_LINE)
    assert summary.endswith(" s: 4 more not logged; refused for too many failures: 1")
    await limit.close()  # nothing left: no second summary
    assert len(_lines(caplog, SUMMARY_LINE)) == 1
    assert len(_lines(caplog, PEER_LINE)) == 1


async def test_jwt_failures_count_unreachable_key_source_does_not(engine, tmp_path):
    """A token that does not verify is a failure; a token that cannot be checked because
    the JWKS URL does not answer is not the client's: it is refused without counting."""
    from _serve_process import free_port

    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mip.errors import AuthError, InvalidCredentials

    key, trusted = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    forged = jwt.encode({"sub": "x", "exp": 2**31}, key, algorithm="ES256",
                        headers={"kid": "k1"})
    pem = tmp_path / "trusted.pem"
    pem.write_bytes(trusted.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(InvalidCredentials, match="invalid token"):
        await Authenticator(jwt_keys=str(pem)).authenticate(
            {"authorization": f"Bearer {forged}"})
    with pytest.raises(AuthError, match="cannot be fetched") as caught:
        await Authenticator(jwt_keys=f"http://127.0.0.1:{free_port()}/jwks.json").authenticate(
            {"authorization": f"Bearer {forged}"})
    assert not isinstance(caught.value, InvalidCredentials)
    closed = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    cfg = MiaasConfig(api_keys=[hash_key(API_KEY)], queue=str(tmp_path / "q.sqlite3"),
                      job_workers=0, auth_failures="2/hour", jwt_keys=closed)
    async with serve(standalone_app(engine, cfg)) as url:
        async with _client(url) as client:
            bearer = {"Authorization": f"Bearer {forged}"}
            answers = [await client.get("/v1/health", headers=bearer) for _ in range(4)]
            assert [r.status_code for r in answers] == [401] * 4
            assert "cannot be fetched" in answers[0].json()["error"]["message"]
            codes = [(await client.get("/v1/health", headers=WRONG)).status_code
                     for _ in range(3)]
            assert codes == [401, 401, 429]
