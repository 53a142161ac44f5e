"""The ``mip`` command: ``mip serve``, ``mip infer``, ``mip ping``, ``mip broker``, ``mip bench``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from mip import logs
from mip.errors import MipError
from mip.logs import LOG_FORMATS
from mip.net import grpc_limits, tls

__all__ = ["main"]

log = logging.getLogger("mip")

DEFAULT_MIP_URL = "tcp://127.0.0.1:7070"
DEFAULT_MSIP_URL = "tcp://127.0.0.1:7171"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8000"
DEFAULT_GRPC_ADDRESS = "127.0.0.1:8001"
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _size(text: str) -> int:
    """Parse an octet count with an optional K/M/G suffix (binary multiples)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _rate(text: str) -> str:
    """Check a rate such as ``10/min`` (see ``ratelimit.parse_rate``) and keep its text."""
    from mip.net.ratelimit import parse_rate

    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _datatype(text: str) -> str:
    """A datatype's protocol name (FP32, BYTES, ...) from itself or a numpy name (float32)."""
    import numpy as np

    import mip

    if text.upper() in mip.DATATYPES:
        return text.upper()
    try:
        return mip.datatype_of(np.dtype(text))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown datatype {text!r}: one of {', '.join(sorted(mip.DATATYPES))}, or a numpy "
            "name such as float32") from None


#: optional packages -> the extra that installs them, for a one-line message instead of a
#: traceback when a command needs one that is not installed
EXTRAS = {
    **dict.fromkeys(("onnxruntime", "onnx", "grpc", "google", "starlette", "uvicorn",
                     "httptools", "orjson", "prometheus_client", "jwt", "redis", "uvloop"),
                    "serve"),
    "zstandard": "broker",
    **dict.fromkeys(("matplotlib", "rich", "aiohttp"), "bench"),
}


def _missing_extra(exc: ImportError) -> str | None:
    """The one-line message for an optional package that is not installed, or None."""
    name = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return (f"this needs the Python package {name!r}, which is not installed: "
            f"pip install 'mip-toolkit[{extra}]'")


def _workers(text: str) -> int:
    from mip.workers import parse_workers

    return parse_workers(text)


def _server_ssl(args) -> ssl.SSLContext | None:
    if not args.tls_cert:
        return None
    return tls.server_context(args.tls_cert, args.tls_key, client_ca=args.tls_ca)


def _add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="require client certificates signed by these CAs (mutual TLS) on the "
                        "binary protocols (MIP, MSIP, gRPC)")


def _auth_scope(text: str) -> frozenset:
    """Check an ``--auth-scope`` list (see ``auth.parse_scope``)."""
    from mip.frontends.auth import parse_scope

    try:
        return parse_scope(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_miaas(p: argparse.ArgumentParser) -> None:
    """Options of the /v1 MIaaS API (jobs, registry) served on the HTTP listener, and of the
    credentials it shares with the other HTTP and gRPC endpoints (--auth-scope)."""
    g = p.add_argument_group("MIaaS /v1 API and credentials")
    g.add_argument("--api-keys", metavar="FILE",
                   help="accepted API keys: one key or 'sha256:HEX' digest a line (also "
                        "$MIP_API_KEYS, comma-separated); with neither nor --jwt-keys, a key "
                        "is made for the run and printed. Required by /v1 and the areas of "
                        "--auth-scope")
    g.add_argument("--jwt-issuer", metavar="ISS", help="accept OAuth2 JWTs from this issuer")
    g.add_argument("--jwt-audience", metavar="AUD", help="audience a JWT must name")
    g.add_argument("--jwt-keys", metavar="FILE|URL",
                   help="JWT verification keys: a JWKS file, a JWKS URL or a PEM public key")
    g.add_argument("--open-health", action="store_true",
                   help="answer GET /v1/health without credentials (for load-balancer probes)")
    g.add_argument("--rate-limit", metavar="N[/UNIT]", default="1000/min", type=_rate,
                   help="requests per authenticated identity, e.g. 1000/min or 5/s "
                        "(default 1000/min; shared through Redis when --queue is redis://)")
    g.add_argument("--auth-failures", metavar="N[/UNIT]", default="10/min", type=_rate,
                   help="failed authentications per client address (IPv6: per /64) before it "
                        "gets 429 whatever it sends, e.g. 10/min (default 10/min; shared "
                        "like --rate-limit)")
    g.add_argument("--auth-scope", metavar="AREA[,AREA...]", type=_auth_scope,
                   default=frozenset({"v1"}),
                   help="what needs the API keys or JWTs, as Authorization: Bearer or "
                        "X-API-Key headers or gRPC metadata: v1 (always), inference (REST "
                        "and gRPC infer), metadata (server and model metadata, config), "
                        "control (/v2/repository, gRPC Repository*), metrics (/metrics, "
                        "statistics), or all; health, readiness and reflection stay open "
                        "(default v1: KServe v2 and /metrics open)")
    g.add_argument("--queue", metavar="PATH|URL",
                   help="job queue: a SQLite file or redis://HOST:PORT/DB (default: this "
                        "server's own file, jobs-HOST-PORT.sqlite3 of its --http address in "
                        "$MIP_STATE_DIR or ~/.local/state/mip, refused while another server "
                        "holds it; name one --queue on several servers to share it)")
    g.add_argument("--job-workers", type=int, default=4, metavar="N",
                   help="jobs run at once in this process (0: only 'mip worker' runs them; "
                        "default 4)")
    g.add_argument("--max-jobs", type=int, default=10_000, metavar="N",
                   help="unfinished jobs queued before submissions get 503 (default 10000)")
    g.add_argument("--job-retention", dest="retention", type=float, default=86_400.0,
                   metavar="SECONDS", help="how long finished jobs are kept (default 86400)")
    g.add_argument("--job-lease", dest="lease", type=float, default=30.0, metavar="SECONDS",
                   help="a job whose worker is silent this long is delivered again; use the "
                        "same value on every worker (default 30)")
    g.add_argument("--msip-push", metavar="URL",
                   help="also publish each job's outcome to this MSIP broker on topic "
                        "jobs.{request_id}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mip", description="Wire-protocol toolkit for model inference: MIP and MSIP.")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS,
                        help="logging level (default INFO; also accepted after the command)")
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                        help="log lines as text or as one JSON object each, access log "
                             "included (default text; also accepted after the command)")
    from mip import __version__

    parser.add_argument("--version", action="version", version=f"mip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="serve a model repository over MIP and KServe v2 (gRPC and REST)",
        description="Serve the models of a repository. With no --model-repository, serves the "
                    "built-in demo repository (models 'identity' and 'mlp', built locally).")
    serve.add_argument("--model-repository", metavar="DIR",
                       help="folder of models: NAME/[VERSION/]model.onnx, NAME/config.pbtxt "
                            "(Triton's) or NAME/config.json, NAME/model.py (default: the "
                            "built-in demo repository)")
    serve.add_argument("--mip", metavar="URL", default=DEFAULT_MIP_URL,
                       help=f"MIP listener: tcp://HOST:PORT or unix:///PATH, or 'none' "
                            f"(default {DEFAULT_MIP_URL})")
    serve.add_argument("--mip-model", metavar="NAME",
                       help="model that plain (kind 2) MIP requests reach (default: the "
                            "repository's only model)")
    serve.add_argument("--model", dest="models", action="append", metavar="NAME",
                       help="load only this model (repeatable; default: every model)")
    serve.add_argument("--exit-on-error", action=argparse.BooleanOptionalAction, default=True,
                       help="refuse to start when a model fails to load, saying why (default; "
                            "--no-exit-on-error serves the models that did load)")
    serve.add_argument("--strict-readiness", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="server ready (/v2/health/ready, gRPC ServerReady) only when every "
                            "model meant to be served is ready (default; "
                            "--no-strict-readiness: every model that loaded)")
    serve.add_argument("--max-frame-size", type=_size, default=64 << 20, metavar="OCTETS",
                       help="largest MIP request accepted, e.g. 64M (default 64M)")
    serve.add_argument("--max-connections", type=int, default=1024, metavar="N",
                       help="connections per MIP and REST listener; when all are open the "
                            "longest-idle one is closed for a new one (default 1024)")
    serve.add_argument("--max-connections-per-peer", type=int, default=256, metavar="N",
                       help="connections per client address on each listener (default 256)")
    serve.add_argument("--max-queued-per-peer", type=int, default=None, metavar="N",
                       help="requests one client address may have waiting in a model's queue "
                            "(default: a quarter of the model's max_queue_size)")
    serve.add_argument("--max-pending-reply", type=_size, default=1 << 20, metavar="OCTETS",
                       help="reply octets a MIP or REST connection may leave unread before "
                            "the server stops reading its requests (default 1M)")
    serve.add_argument("--max-buffered-request", type=_size, default=128 << 20,
                       metavar="OCTETS",
                       help="MIP request octets a connection may have unanswered before "
                            "reading pauses (default 128M)")
    serve.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="close MIP connections silent this long with nothing in flight "
                            "(0 = never; default 300)")
    serve.add_argument("--frame-timeout", "--read-timeout", dest="frame_timeout", type=float,
                       default=30.0, metavar="SECONDS",
                       help="a MIP frame must arrive within this time of its first octet, or "
                            "the connection is closed (0 = never; default 30)")
    serve.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                       help="fail requests not answered within this time (default: no limit)")
    serve.add_argument("--access-log", metavar="-|FILE", default=None,
                       help="write one line per inference request, every protocol (time, "
                            "protocol, peer, model, version, status, latency, request id) "
                            "to standard error ('-') or append it to FILE (default: off)")
    serve.add_argument("--http", metavar="HOST:PORT", default=DEFAULT_HTTP_ADDRESS,
                       help=f"KServe v2 REST listener (also GET /metrics), or 'none' "
                            f"(default {DEFAULT_HTTP_ADDRESS})")
    serve.add_argument("--grpc", metavar="HOST:PORT", default=DEFAULT_GRPC_ADDRESS,
                       help=f"KServe v2 gRPC listener, or 'none' (default {DEFAULT_GRPC_ADDRESS})")
    serve.add_argument("--grpc-max-message-size", type=_size, default=64 << 20,
                       metavar="OCTETS",
                       help="largest gRPC request or reply, e.g. 64M (default 64M)")
    serve.add_argument("--grpc-impl", choices=("native", "grpcio"), default=None,
                       help="gRPC transport: 'native' (mip's HTTP/2 on libnghttp2, the default "
                            "where it is built) or 'grpcio'")
    grpc_limits.add_arguments(serve, _size)  # --grpc-max-concurrent-streams etc.
    serve.add_argument("--http-max-body-size", type=_size, default=64 << 20, metavar="OCTETS",
                       help="largest REST request body after decompression, e.g. 64M "
                            "(default 64M)")
    serve.add_argument("--http-max-header-size", type=_size, default=64 << 10,
                       metavar="OCTETS",
                       help="largest REST request head (request line and header fields); "
                            "a larger one is answered 431 and the connection closed "
                            "(0 = none; default 64K)")
    serve.add_argument("--max-shm-regions", type=int, default=64, metavar="N",
                       help="system shared memory regions clients may register at once "
                            "(Triton's /v2/systemsharedmemory; 0 = none; default 64)")
    serve.add_argument("--max-shm-bytes", type=_size, default=1 << 30, metavar="OCTETS",
                       help="octets the registered shared memory regions may map together, "
                            "e.g. 1G (default 1G)")
    serve.add_argument("--shm-any-peer", action="store_true",
                       help="accept shared memory registrations from clients on other hosts "
                            "(default: from this host's addresses and Unix sockets only)")
    for flag, seconds, text in (
            ("--http-header-timeout", 10.0, "a REST request's header block must arrive within "
             "this time of its first octet (408, then close; 0 = never; default 10)"),
            ("--http-body-timeout", 60.0, "a REST request's body must arrive within this time "
             "of its headers (0 = never; default 60)"),
            ("--http-idle-timeout", 5.0, "close REST connections idle this long between "
             "requests (default 5)")):
        serve.add_argument(flag, type=float, default=seconds, metavar="SECONDS", help=text)
    serve.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                       help="processes serving every listener on the same ports (their "
                            "engines as --placement says); 'auto': one per usable core "
                            "(default 1: this process alone)")
    serve.add_argument("--placement", choices=("worker", "shared"), default="worker",
                       help="where the models run with --workers, unless a model's own "
                            "configuration says (placement): 'worker', in every worker "
                            "process; 'shared', in one engine process that batches for every "
                            "worker, tensors passing through shared memory (default worker)")
    serve.add_argument("--shared-arena-bytes", type=_size, default=256 << 20, metavar="OCTETS",
                       help="shared memory for the tensors of --placement shared: half for "
                            "the outputs, half split between the workers for their requests; "
                            "a request that does not fit is refused (503) (default 256M)")
    _add_tls(serve)
    _add_miaas(serve)

    infer = sub.add_parser("infer", help="send one inference request to a MIP server")
    infer.add_argument("url", help="tcp://HOST:PORT or unix:///PATH")
    infer.add_argument("model", nargs="?", help="model name (default: the server's default model)")
    infer.add_argument("--version", help="model version")
    infer.add_argument("--shape", default="1,16", help="input shape, comma-separated (default 1,16)")
    infer.add_argument("--datatype", default="FP32", type=_datatype,
                       help="input datatype: FP32, INT64, ... or a numpy name such as float32 "
                            "(default FP32)")
    infer.add_argument("--input", action="append", metavar="FILE.npy",
                       help="input tensors from .npy files, in the model's input order")
    infer.add_argument("--text", action="append", help="a TEXT input value")

    ping = sub.add_parser("ping", help="PING a MIP server")
    ping.add_argument("url", help="tcp://HOST:PORT or unix:///PATH")
    ping.add_argument("--count", type=int, default=3, help="pings to send (default 3)")

    broker = sub.add_parser("broker", help="run an MSIP pub/sub broker")
    broker.add_argument("--msip", metavar="URL", default=DEFAULT_MSIP_URL,
                        help=f"listen URL (default {DEFAULT_MSIP_URL})")
    broker.add_argument("--max-connections", type=int, default=10_000, metavar="N",
                        help="connections at once; when all are open, the longest-silent one "
                             "that has not sent a frame yet is closed for a new one "
                             "(default 10000)")
    broker.add_argument("--max-connections-per-peer", type=int, default=256, metavar="N",
                        help="connections per client address (default 256)")
    broker.add_argument("--max-pending-reply", type=_size, default=8 << 20, metavar="OCTETS",
                        help="octets queued for a client that does not read; beyond them "
                             "events are dropped (oldest first) and its frames are not read "
                             "until it does (default 8M)")
    broker.add_argument("--frame-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a frame must arrive within this time of its first octet "
                             "(0 = never; default 30)")
    opt = broker.add_argument
    opt("--max-payload", type=_size, default=16 << 20, metavar="OCTETS",
        help="largest frame payload accepted, e.g. 16M (default 16M)")
    opt("--max-topic-length", type=int, default=1024, metavar="OCTETS",
        help="longest topic, in UTF-8 octets (default 1024)")
    opt("--session-ttl", type=float, default=60.0, metavar="SECONDS",
        help="how long an at-least-once session is kept after its connection dropped "
             "(default 60; other sessions end with their connection)")
    opt("--backlog-messages", type=int, default=1000, metavar="N",
        help="events kept per away session, oldest dropped first (default 1000)")
    opt("--backlog-bytes", type=_size, default=1 << 20, metavar="OCTETS",
        help="octets of events kept per away session (default 1M)")
    opt("--max-backlog-bytes", type=_size, default=64 << 20, metavar="OCTETS",
        help="octets of events kept by all away sessions together (default 64M)")
    opt("--idle-timeout", type=float, default=None, metavar="SECONDS",
        help="PING connections silent this long, close them at twice this "
             "(default: never, as the reference broker)")
    opt("--topic-patterns", action="store_true",
        help="'*' and a final '>' are wildcards for every client (default: only for clients "
             "that ask in HELLO; topics are literal, as on the reference broker)")
    opt("--session-takeover", action="store_true",
        help="a HELLO naming a client id in use closes the older connection (default: only "
             "when the HELLO asks; both are served, as on the reference broker)")
    opt("--cluster", metavar="URL", default=None,
        help="redis://HOST:PORT[/DB] (rediss:// for TLS) or nats://HOST:PORT (tls:// for TLS; "
             "JetStream, nats-server -js, for at-least-once sessions): form one MSIP service "
             "with the other brokers using this Redis or NATS; a client on any broker receives "
             "what is published on any other (default: none, this broker alone)")
    opt("--cluster-prefix", metavar="TEXT", default="msip:",
        help="Redis channel of a topic: this prefix + the topic (NATS subject: the prefix "
             "without its final ':' or '.', a dot, the escaped topic); brokers of different "
             "services on one Redis or NATS need different prefixes (default msip:)")
    opt("--cluster-max-pending", type=_size, default=8 << 20, metavar="OCTETS",
        help="local publishes queued for Redis at most; beyond them, while Redis is slow or "
             "down, publishes are not sent to the other brokers (counted, logged; local "
             "delivery goes on) (default 8M)")
    opt("--cluster-stream-max", type=int, default=10_000, metavar="EVENTS",
        help="events kept in Redis (about) per topic that at-least-once sessions subscribe to "
             "(NATS: in JetStream, per topic), so that such a session resumes on any broker, "
             "its backlog in the engine; 0: no streams, at-least-once sessions live in one "
             "broker's memory (default 10000)")
    opt("--cluster-max-patterns", type=int, default=256, metavar="N",
        help="distinct patterns that this broker's at-least-once sessions record in the engine "
             "at most (Redis matches every publish against all brokers' recorded patterns); "
             "beyond, such a subscription is kept in this broker's memory only (default 256)")
    _add_tls(broker)

    worker = sub.add_parser(
        "worker", help="run MIaaS /v1 jobs from a shared queue",
        description="Take jobs submitted to /v1/inference from a shared queue (Redis, or a "
                    "SQLite file on this machine), run them on a model repository, store "
                    "the results.")
    worker.add_argument("--queue", metavar="URL|PATH", required=True,
                        help="redis://HOST:PORT/DB (rediss:// for TLS) or a SQLite file")
    worker.add_argument("--model-repository", metavar="DIR",
                        help="folder of models (default: the built-in demo repository)")
    worker.add_argument("--model", dest="models", action="append", metavar="NAME",
                        help="load only this model (repeatable; default: every model)")
    worker.add_argument("--concurrency", type=int, default=4, metavar="N",
                        help="jobs run at once (default 4)")
    worker.add_argument("--job-lease", dest="lease", type=float, default=30.0,
                        metavar="SECONDS", help="lease of a taken job; the same as the "
                        "control plane's (default 30)")
    worker.add_argument("--job-retention", dest="retention", type=float, default=86_400.0,
                        metavar="SECONDS", help="how long results are kept (default 86400)")
    worker.add_argument("--msip-push", metavar="URL",
                        help="publish each job's outcome to this MSIP broker")
    worker.add_argument("--access-log", metavar="-|FILE", default=None,
                        help="write one line per job run (as mip serve's access log) to "
                             "standard error ('-') or append it to FILE (default: off)")
    worker.add_argument("--tls-ca", metavar="FILE",
                        help="verify the Redis and MSIP servers with these CAs (PEM)")
    worker.add_argument("--tls-cert", metavar="FILE",
                        help="client certificate for Redis and MSIP (mutual TLS)")
    worker.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM)")

    sub.add_parser(
        "proto", help="print the paths of the .proto files of mip's gRPC service",
        description="Print where the installed package keeps inference.proto (the KServe v2 "
                    "service, with Triton's extensions) and model_config.proto (Triton's "
                    "model configuration), for protoc, grpcurl or Kubernetes' gRPC probes.")

    bench = sub.add_parser(
        "bench", help="load-test inference servers (MIP, KServe v2 gRPC/REST) and MSIP brokers",
        description="Load generators with tables, JSON and plots: 'mip bench infer URL', "
                    "'mip bench pubsub URL', 'mip bench --compare A.json B.json --plot OUT.png'.")
    from mip.bench import add_arguments as _bench_arguments
    _bench_arguments(bench)
    _log_level_after_commands(parser)
    return parser


def _log_level_after_commands(parser: argparse.ArgumentParser) -> None:
    """``mip serve --log-level DEBUG`` as well as ``mip --log-level DEBUG serve``: every
    command (and sub-command) takes the option too, without a default of its own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("--log-level", default=argparse.SUPPRESS,
                                     choices=LOG_LEVELS, help="logging level (default INFO)")
                command.add_argument("--log-format", default=argparse.SUPPRESS,
                                     choices=LOG_FORMATS,
                                     help="log lines as text or JSON (default text)")
                _log_level_after_commands(command)


def _repository_root(args) -> str | Path:
    """``--model-repository``, which must be a folder, or the built-in demo repository."""
    if not args.model_repository:
        from mip.serving.demo import build_demo_repository

        return build_demo_repository()
    root = args.model_repository
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the model repository {root} does not exist or is not a "
                                "folder")
    return root


async def _serve(args) -> int:
    """``mip serve``'s process, or one worker of ``--workers`` (``args.worker_role``)."""
    from mip.frontends.mip_handler import MipHandler
    from mip.net.mip_server import MipServer

    role = getattr(args, "worker_role", None)
    if role is not None and role.kind == "engine":  # shared models: the engine process
        from mip.serving.remote import serve_engine

        return await serve_engine(args, role, _started_engine, _wait_for_signal)
    shared = role.shared if role is not None else None
    engine: Any = await _started_engine(args, shared.worker_models if shared else args.models)
    relay = None
    if role is not None:  # a worker: its models of both placements, shm regions: every worker's
        from mip.model_relay import WorkerModels
        from mip.serving.remote import PlacedEngine, RemoteEngine

        relay = WorkerModels(engine, role.control, role.index)
        await relay.replay(role.changes)
        relay.start()
        remote = None
        if shared is not None:  # the shared models' engine process
            remote = RemoteEngine(_repository_root(args), shared, role.index)
            await remote.start()
        engine = PlacedEngine(engine, remote, _repository_root(args), args.placement)
    args.relay = relay
    from mip.frontends.oip.metrics import Metrics

    metrics = Metrics(engine)  # every protocol's requests, labelled by protocol
    if shared is not None:
        from mip.serving.remote import ArenaCollector

        metrics.add_collector(ArenaCollector(engine.used, engine.remote))
    args.access = None
    if args.access_log:  # the mip.access logger, set up by main()
        from mip.frontends.access import AccessLog

        args.access = AccessLog()  # every protocol's requests, one line each
    servers: list = []
    announcements: list = []
    guard = None
    sockets = role.sockets if role is not None else {}
    try:
        guard = _guard(args, announcements) if role is None else role.guard
        if args.mip.lower() != "none":
            handler = MipHandler(engine, request_timeout=args.request_timeout, metrics=metrics,
                                 access_log=args.access)
            server = MipServer(handler, max_frame_size=args.max_frame_size,
                               max_connections=args.max_connections,
                               max_connections_per_peer=args.max_connections_per_peer,
                               max_buffered_octets=args.max_buffered_request,
                               max_pending_reply=args.max_pending_reply,
                               idle_timeout=args.idle_timeout, frame_timeout=args.frame_timeout,
                               ssl=_server_ssl(args),
                               frame_memory=engine.frame_memory if shared else None)
            address = await server.start(args.mip, sockets.get("mip"))
            servers.append(server)
            announcements.append(
                f"mip: serving MIP on {address} (default model: {engine.default_model()})")
        servers += await _start_oip(args, engine, metrics, announcements, guard, sockets)
    except BaseException:
        for server in servers:
            await server.stop()
        if guard is not None:
            await guard.close()
        await engine.stop()
        raise
    for line in announcements:  # every listener is bound before any is announced
        if role is None or role.announce:
            print(line, flush=True)
    if not servers:
        log.error("every listener is off: nothing to serve")
        await guard.close()
        await engine.stop()
        return 2
    # What start-up made (modules, models, sessions) lives as long as the server: keep it
    # out of the cyclic garbage collector's scans, which otherwise revisit it on every
    # full collection while requests churn short-lived objects.
    gc.freeze()
    publisher = None
    if role is not None:
        from mip.frontends.oip.worker_metrics import WorkerMetrics

        if args.http.lower() != "none":  # where /metrics is served
            publisher = WorkerMetrics(metrics, role.metrics_dir)
            publisher.start()
        role.ready()
    await _wait_for_signal()
    log.info("shutting down: finishing requests in flight")
    for server in servers:
        await server.stop()
    if publisher is not None:
        publisher.stop()  # after the last request: the final counts stay in the merge
    if relay is not None:
        relay.stop()
    await guard.close()
    await engine.stop()
    return 0


async def _started_engine(args, models: list[str] | None):
    """The engine of ``args``' repository, started with ``models`` loaded (``None``:
    every model)."""
    from mip.serving.engine import Engine
    from mip.serving.repository import ModelRepository

    root = _repository_root(args)
    if not args.model_repository:
        log.info("serving the built-in demo repository at %s", root)
    engine = Engine(ModelRepository(root), models=models, default_model=args.mip_model,
                    strict_readiness=args.strict_readiness,
                    max_queued_per_peer=args.max_queued_per_peer)
    await engine.start()
    for entry in engine.index():
        if models is None or entry.name in models:
            log.info("model %s version %s: %s%s", entry.name, entry.version, entry.state,
                     f" ({entry.reason})" if getattr(entry, "reason", "") else "")
    failed = _load_failures(engine, models)
    if failed and args.exit_on_error:
        await engine.stop()
        raise ModelLoadFailed(failed)
    return engine


def _serve_workers(args) -> int:
    """``mip serve --workers N`` (N > 1, or any N with ``--placement shared``): bind every
    listener here, fork the workers (and the engine process, when a model's placement or
    ``--placement`` is ``shared``)."""
    from mip.workers import Supervisor, bind_listeners

    if args.grpc.lower() != "none" and args.grpc_impl == "grpcio":
        print("mip: error: --grpc-impl grpcio binds its own sockets, which the worker "
              "processes of --workers cannot share: use --grpc-impl native or --workers 1",
              file=sys.stderr)
        return 2
    if args.queue is None and args.http.lower() != "none":
        from mip.jobs.queue import default_sqlite_path

        # one job queue for every worker: this server's own file (named after its port)
        args.queue = str(default_sqlite_path(args.http))
    from mip.serving.remote import SharedRole, place
    from mip.serving.repository import ModelRepository

    root = _repository_root(args)
    names = args.models if args.models is not None else ModelRepository(root).names()
    per_worker, shared_models = place(root, names, args.placement)
    shared = None
    if args.placement == "shared" or shared_models:  # the arena, mapped before any fork
        shared = SharedRole(args.shared_arena_bytes, args.workers, per_worker, shared_models)
    announcements: list[str] = []
    guard = _guard(args, announcements)  # one API key for every worker, when one is made
    sockets = bind_listeners(args)
    for line in announcements:
        print(line, flush=True)

    def serve(role) -> int:
        args.worker_role = role
        return _run(args)

    return Supervisor(args.workers, sockets, serve, guard=guard, shared=shared).run()


def _load_failures(engine, wanted: list[str] | None) -> list[str]:
    """``NAME: reason`` of every model meant to be served that did not load."""
    from mip.serving.repository import ModelState

    return [f"{entry.name}: {entry.reason}" for entry in engine.index()
            if entry.state != ModelState.READY and entry.reason
            and (wanted is None or entry.name in wanted)]


class ModelLoadFailed(MipError):
    """``mip serve`` refused to start: models failed to load (``--exit-on-error``)."""

    def __init__(self, failures: list[str]):
        reasons = "; ".join(failures)
        missing = re.search(r"(?:No module named|import of) '?([A-Za-z_][\w.]*)", reasons)
        extra = EXTRAS.get(missing.group(1).split(".")[0]) if missing else None
        hint = (f" (pip install 'mip-toolkit[{extra}]')" if extra else "")
        super().__init__(f"{len(failures)} model(s) failed to load: {reasons}{hint}; "
                         "--no-exit-on-error serves the models that did load")


def _proto() -> int:
    from importlib import resources

    for package, name in (("mip.frontends.oip", "inference.proto"),
                          ("mip.serving", "model_config.proto")):
        print(resources.files(package) / name)
    return 0


def _guard(args, announcements: list[str]):
    """The credentials every HTTP and gRPC endpoint of ``mip serve`` checks (the areas of
    --auth-scope); their failure budgets are shared through the queue's Redis when
    --queue is one. A key made for the run (none configured) joins ``announcements``."""
    from mip.frontends.auth import guard_from_args

    queue = args.queue or ""
    redis_url = queue if queue.startswith(("redis://", "rediss://")) else None
    used = args.http.lower() != "none" or (args.grpc.lower() != "none"
                                           and args.auth_scope - {"v1"})
    return guard_from_args(args, redis_url=redis_url,
                           announce=announcements.append if used else lambda line: None)


def _shared_memory(args):
    """The system shared memory regions both KServe v2 listeners serve, as bounded by
    --max-shm-regions and --max-shm-bytes. With several workers, each registration is made
    on every worker (``args.relay``)."""
    from mip.frontends.oip.shm import SystemSharedMemory

    relay = getattr(args, "relay", None)
    if relay is not None:  # --workers N: a registration reaches every worker
        from mip.model_relay import RelayedSharedMemory

        registry = RelayedSharedMemory(args.max_shm_regions, args.max_shm_bytes, None,
                                       args.shm_any_peer)
        relay.attach(registry)
        return registry
    return SystemSharedMemory(args.max_shm_regions, args.max_shm_bytes, None, args.shm_any_peer)


async def _start_oip(args, engine, metrics, announcements: list[str], guard=None,
                     sockets: dict | None = None) -> list:
    """Start the KServe v2 listeners that are not 'none' (sharing the server's metrics and
    its credentials, ``guard``; on the listening ``sockets`` given by listener name, if
    any); what to announce once every listener is bound goes in ``announcements``."""
    sockets = sockets or {}
    grpc_on = args.grpc.lower() != "none"
    http_on = args.http.lower() != "none"
    if not (grpc_on or http_on):
        return []
    started: list = []
    v2_guard = guard if guard is not None and guard.scope - {"v1"} else None
    shared_memory = _shared_memory(args)
    try:
        if grpc_on:
            from mip.frontends.oip.grpc import GrpcServer

            server: Any = GrpcServer(engine, metrics=metrics,
                                max_message_size=args.grpc_max_message_size,
                                request_timeout=args.request_timeout, tls_cert=args.tls_cert,
                                tls_key=args.tls_key, tls_ca=args.tls_ca,
                                implementation=args.grpc_impl,
                                limits=grpc_limits.from_arguments(
                                    args, max_connections=args.max_connections,
                                    idle_timeout=args.idle_timeout),
                                guard=v2_guard, access_log=args.access,
                                shared_memory=shared_memory,
                                message_memory=getattr(engine, "frame_memory", None))
            address = await server.start(args.grpc, sockets.get("grpc"))
            started.append(server)
            announcements.append(
                f"mip: serving KServe v2 gRPC on {address} ({server.implementation})")
        if http_on:
            from mip.frontends.miaas import mount_miaas
            from mip.frontends.oip.rest import build_app
            from mip.net.http_server import HttpLimits, HttpServer

            # /v1 on the same listener
            routes, miaas = mount_miaas(engine, args, metrics, guard=guard,
                                        access_log=args.access)
            app = build_app(engine, extra_routes=routes, metrics=metrics,
                            max_body_size=args.http_max_body_size,
                            request_timeout=args.request_timeout, guard=v2_guard,
                            access_log=args.access, shared_memory=shared_memory)
            # REST carries its own credentials (API keys, JWT): --tls-ca applies to the
            # binary protocols only.
            limits = HttpLimits(max_connections=args.max_connections,
                                max_connections_per_peer=args.max_connections_per_peer,
                                max_pending_reply=args.max_pending_reply,
                                header_timeout=args.http_header_timeout,
                                body_timeout=args.http_body_timeout,
                                max_header_bytes=args.http_max_header_size)
            server = HttpServer(app, ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                                timeout_keep_alive=args.http_idle_timeout, limits=limits)
            await miaas.start()
            try:
                address = await server.start(args.http, sockets.get("http"))
            except BaseException:
                await miaas.stop()
                raise
            started.extend([server, miaas])  # stopped in this order: listener, then jobs
            scheme = "https" if args.tls_cert else "http"
            announcements.append(f"mip: serving KServe v2 REST and /metrics on "
                                 f"{scheme}://{address}")
            announcements.append(f"mip: MIaaS jobs API on {scheme}://{address}/v1")
    except BaseException:
        for server in started:
            await server.stop()
        raise
    return started


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _broker(args) -> int:
    from mip.net.msip_broker import Broker

    if args.cluster:
        use_nats = args.cluster.startswith(("nats://", "tls://"))
        try:
            if use_nats:
                import nats  # noqa: F401
            else:
                import redis.asyncio  # noqa: F401
        except ImportError:
            print(f"mip: error: --cluster needs the Python package "
                  f"'{'nats-py' if use_nats else 'redis'}', which is not installed: "
                  "pip install 'mip-toolkit[broker]'", file=sys.stderr)
            return 1
    broker = Broker(max_connections=args.max_connections,
                    max_connections_per_peer=args.max_connections_per_peer,
                    queue_bytes=args.max_pending_reply, read_timeout=args.frame_timeout or None,
                    max_payload=args.max_payload, max_topic_length=args.max_topic_length,
                    session_ttl=args.session_ttl, backlog_limit=args.backlog_messages,
                    backlog_bytes=args.backlog_bytes, max_backlog_bytes=args.max_backlog_bytes,
                    idle_timeout=args.idle_timeout or None, topic_patterns=args.topic_patterns,
                    session_takeover=args.session_takeover,
                    ssl=_server_ssl(args) if args.tls_cert else None, cluster=args.cluster,
                    cluster_prefix=args.cluster_prefix,
                    cluster_max_pending=args.cluster_max_pending,
                    cluster_stream_max=args.cluster_stream_max,
                    cluster_max_patterns=args.cluster_max_patterns)
    address = await broker.start(args.msip)
    print(f"mip: MSIP broker on {address}", flush=True)
    if args.cluster:
        state = "connected" if broker.stats.cluster_connected else "not reachable yet, retrying"
        print(f"mip: cluster through {args.cluster.split('@')[-1]} ({state})", flush=True)
    await _wait_for_signal()
    await broker.stop()
    return 0


def _client_ssl(args) -> ssl.SSLContext | None:
    if not (args.tls_ca or args.tls_cert):
        return None
    return tls.client_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


async def _worker(args) -> int:
    from mip.frontends.miaas.runner import JobRunner
    from mip.jobs.queue import open_queue
    from mip.jobs.worker import run_worker
    from mip.serving.engine import Engine
    from mip.serving.repository import ModelRepository

    root = _repository_root(args)
    client_ssl = _client_ssl(args)
    engine = Engine(ModelRepository(root), models=args.models)
    await engine.start()
    queue = open_queue(args.queue, lease=args.lease, retention=args.retention,
                       ssl_context=client_ssl)
    await queue.open()
    publisher = None
    if args.msip_push:
        from mip.jobs.push import OutcomePublisher
        publisher = OutcomePublisher(args.msip_push, ssl=client_ssl)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"mip: worker taking jobs from {args.queue}", flush=True)
    try:
        access = None
        if args.access_log:  # the mip.access logger, set up by main()
            from mip.frontends.access import AccessLog

            access = AccessLog()
        await run_worker(queue, JobRunner(engine, access_log=access),
                         concurrency=args.concurrency, publisher=publisher, stop=stop)
    finally:
        await queue.close()
        if publisher is not None:
            await publisher.close()
        await engine.stop()
    return 0


def _infer(args) -> int:
    import numpy as np

    import mip
    from mip.net.mip_client import Client

    batch_item = []
    if args.input:
        batch_item = [np.load(path) for path in args.input]
    if args.text:
        batch_item += [mip.Text(t) for t in args.text]
    if not batch_item:
        shape = [int(d) for d in args.shape.split(",") if d.strip()]
        dtype = mip.DATATYPES[args.datatype]
        rng = np.random.default_rng(0)
        batch_item = [rng.standard_normal(shape).astype(dtype)]
    with Client(args.url) as client:
        items = client.infer([batch_item], model=args.model, version=args.version)
    for i, item in enumerate(items):
        for j, value in enumerate(item):
            print(f"item {i} output {j}: {value!r}")
    return 0


def _ping(args) -> int:
    from mip.net.mip_client import Client

    with Client(args.url) as client:
        for _ in range(args.count):
            print(f"pong from {args.url} in {client.ping() * 1e3:.3f} ms")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mip`` command."""
    args = _parser().parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_format, getattr(args, "access_log", None))
    except OSError as exc:
        print(f"mip: error: cannot open the access log: {exc}", file=sys.stderr)
        return 1
    if args.command in ("serve", "broker", "worker", "bench"):
        # long-lived processes that move large messages: reuse their buffers' memory
        from mip.net import allocator
        allocator.tune()
    return _run(args)


def _run(args) -> int:
    """Run the command of ``args``; errors users make end in a one-line message."""
    try:
        if args.command == "infer":
            return _infer(args)
        if args.command == "ping":
            return _ping(args)
        if args.command == "proto":
            return _proto()
        if args.command == "bench":
            from mip.bench import main as bench_main
            return bench_main(args)
        if (args.command == "serve" and (args.workers > 1 or args.placement == "shared")
                and getattr(args, "worker_role", None) is None):
            return _serve_workers(args)
        if args.command == "worker":
            coro = _worker(args)
        else:
            coro = _serve(args) if args.command == "serve" else _broker(args)
        from mip.net.loop import run

        return run(coro)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear message, not a traceback, for errors users make
        from mip.errors import MipError
        missing = _missing_extra(exc) if isinstance(exc, ImportError) else None
        if missing:
            print(f"mip: error: {missing}", file=sys.stderr)
            return 1
        if isinstance(exc, (MipError, OSError, ValueError)):
            print(f"mip: error: {exc}", file=sys.stderr)
            return 1
        if type(exc).__module__.startswith("redis."):  # the queue's or rate limiter's Redis
            print(f"mip: error: Redis: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
