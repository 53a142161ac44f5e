"""mip.net.http_router and mip.net.http_body on ASGI: which route takes a path, the one error
reply, and a body read within its limit before and after decompression."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import orjson
import pytest
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route as StarletteRoute

from mip.errors import Cancelled, InvalidInput, ModelNotReady, TooLarge
from mip.net.http_body import read_body, request_body
from mip.net.http_router import Route, Router, endpoint


def _run(coro):
    return asyncio.run(coro)


async def _call(app, method: str, path: str, body: bytes = b"", headers=()):
    """(status, headers, body) of ``app``'s reply to one request."""
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "",
             "headers": list(headers), "query_string": b"", "client": ("127.0.0.1", 1)}
    await app(scope, receive, send)
    start = sent[0]
    return (start["status"], dict(start["headers"]),
            b"".join(m.get("body", b"") for m in sent[1:]))


def _echo(name: str):
    async def app(scope, receive, send):
        body = orjson.dumps({"route": name, "params": scope["path_params"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
    return app


def _router(mounts=()):
    async def failing(request):
        raise ModelNotReady("not yet")

    async def buggy(request):
        raise KeyError("oops")

    async def bad_json(request):
        return JSONResponse(orjson.loads(b"{"))

    return Router([
        Route.of("/v2/models/{name}/infer", _echo("infer"), ["POST"]),
        Route.of("/v2/models/stats", _echo("all stats")),
        Route.of("/v2/models/{name}", _echo("metadata")),
        Route.of("/v2/models/{name}/versions/{version}", _echo("version metadata")),
        Route.of("/v2/cuda/{rest:path}", _echo("cuda"), ["GET", "POST"]),
        Route.of("/failing", endpoint(failing)),
        Route.of("/buggy", endpoint(buggy)),
        Route.of("/bad-json", endpoint(bad_json)),
    ], mounts)


def test_first_matching_route_takes_the_path_with_its_parameters():
    router = _router()
    cases = [
        ("POST", "/v2/models/m/infer", "infer", {"name": "m"}),
        ("GET", "/v2/models/stats", "all stats", {}),  # listed before {name}
        ("GET", "/v2/models/infer", "metadata", {"name": "infer"}),
        ("GET", "/v2/models/m/versions/3", "version metadata", {"name": "m", "version": "3"}),
        ("POST", "/v2/cuda/region/a/register", "cuda", {"rest": "region/a/register"}),
    ]
    for method, path, name, params in cases:
        status, _, body = _run(_call(router, method, path))
        assert status == 200 and orjson.loads(body) == {"route": name, "params": params}
    route, params = router.match("/v2/models/m/infer")
    assert route is router.routes[0] and params == {"name": "m"}
    assert router.match("/v2/models/m/infer/more") == (None, {})
    assert router.match("/v2/models//infer") == (None, {})


def test_unknown_path_is_404_and_unknown_method_405_with_allow():
    router = _router()
    status, headers, body = _run(_call(router, "GET", "/nowhere"))
    assert status == 404 and "/nowhere" in orjson.loads(body)["error"]
    assert headers[b"content-type"] == b"application/json"
    status, headers, body = _run(_call(router, "GET", "/v2/models/m/infer"))
    assert status == 405 and headers[b"allow"] == b"POST"
    assert "GET" in orjson.loads(body)["error"]
    status, _, _ = _run(_call(router, "HEAD", "/v2/models/stats"))  # GET brings HEAD
    assert status == 200


def test_errors_answer_with_the_status_of_the_error_tree():
    router = _router()
    status, _, body = _run(_call(router, "GET", "/failing"))
    assert (status, orjson.loads(body)) == (503, {"error": "not yet"})
    status, _, body = _run(_call(router, "GET", "/bad-json"))
    assert status == 400 and "not valid JSON" in orjson.loads(body)["error"]
    status, _, body = _run(_call(router, "GET", "/buggy"))
    assert status == 500 and "KeyError" in orjson.loads(body)["error"]


def test_mounts_take_what_no_route_does():
    async def hello(request):
        return JSONResponse({"who": request.path_params["who"]})

    from starlette.applications import Starlette

    other = Starlette(routes=[StarletteRoute("/hello/{who}", hello)])
    router = _router([Mount("/v1", app=other)])
    status, _, body = _run(_call(router, "GET", "/v1/hello/you"))
    assert (status, orjson.loads(body)) == (200, {"who": "you"})
    assert _run(_call(router, "GET", "/v2/models/stats"))[0] == 200
    assert _run(_call(router, "GET", "/v3/nothing"))[0] == 404


# -- the body reader --------------------------------------------------------------------


def _receiver(*chunks: bytes, disconnect: bool = False):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    if disconnect:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})

    async def receive():
        return messages.pop(0)
    return receive


def test_body_in_chunks_within_the_limit():
    assert _run(read_body(_receiver(b"ab", b"cd", b"e"), 5)) == b"abcde"
    with pytest.raises(TooLarge, match=r"over the limit of 4 octets \(--flag\)"):
        _run(read_body(_receiver(b"ab", b"cd", b"e"), 4, setting="--flag"))
    with pytest.raises(TooLarge):  # refused on its Content-Length, before it is read
        _run(read_body(_receiver(b""), 4, length=b"5"))
    with pytest.raises(Cancelled):
        _run(read_body(_receiver(b"ab", disconnect=True), 5))


def test_body_decompressed_within_the_limit():
    plain = b"x" * 1000
    for encoding, packed in ((b"gzip", gzip.compress(plain)), (b"deflate", zlib.compress(plain)),
                             (b"GZIP", gzip.compress(plain)), (b"identity", plain)):
        assert _run(read_body(_receiver(packed), 1000, encoding=encoding)) == plain
    bomb = gzip.compress(b"\0" * (1 << 20))  # about 1 kB, a MiB once decompressed
    with pytest.raises(TooLarge, match="decompressed request body"):
        _run(read_body(_receiver(bomb), 4096, encoding=b"gzip"))
    with pytest.raises(InvalidInput, match="does not decompress"):
        _run(read_body(_receiver(b"not gzip"), 1000, encoding=b"gzip"))
    with pytest.raises(InvalidInput, match="not supported"):
        _run(read_body(_receiver(b"abc"), 1000, encoding=b"br"))


def test_request_body_reads_its_headers():
    scope = {"headers": [(b"content-encoding", b"gzip"), (b"content-length", b"40")]}
    assert _run(request_body(scope, _receiver(gzip.compress(b"hello")), 100)) == b"hello"

