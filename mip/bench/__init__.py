"""``mip bench``: load generators for MIP, the Open Inference Protocol and MSIP.

* ``mip bench infer URL``: closed-loop (``--concurrency``) and open-loop (``--request-rate``)
  inference load over MIP, KServe v2 gRPC, or KServe v2 REST (JSON or binary tensors).
* ``mip bench pubsub URL``: MSIP publish-to-delivery throughput and latency, and PING.
* ``mip bench --compare a.json b.json --plot out.png``: put saved runs side by side.

Each prints a table; ``--json FILE`` keeps every figure, ``--plot FILE.png`` draws them.
Targets are always given explicitly: nothing is measured by default.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(x < 1 for x in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return levels


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not rates or any(x <= 0 for x in rates):
        raise argparse.ArgumentTypeError("request rates must be > 0")
    return rates


def _shape(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,16, got {text!r}") from None


def _output_args(p: argparse.ArgumentParser, run: bool = True) -> None:
    if run:
        p.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw throughput and latency against concurrency/rate (PNG)")
    p.add_argument("--compare", nargs="+", metavar="RUN.json", default=[],
                   help="saved 'mip bench infer' JSON files to show with this run "
                        "(table and plot)")


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """Add ``mip bench``'s options and sub-commands to its (sub)parser."""
    _output_args(bench, run=False)
    bench.add_argument("--title", help="title of the --compare plot")
    sub = bench.add_subparsers(dest="bench_command")

    infer = sub.add_parser(
        "infer", help="inference load over MIP, KServe v2 gRPC or REST",
        description="Closed-loop (--concurrency) or open-loop (--request-rate) inference load. "
                    "Latency is measured per request from its send time (closed loop) or its "
                    "scheduled time (open loop, so queueing shows: no coordinated omission). "
                    "Inputs are random data shaped from the model's metadata (gRPC, HTTP) or "
                    "from --shape/--datatype (required for MIP, which has no metadata call).")
    infer.add_argument("url", nargs="?",
                       help="tcp://HOST:PORT or unix:///PATH (MIP), grpc://HOST:PORT, "
                            "http://HOST:PORT")
    infer.add_argument("--model", help="model name (MIP: omit to reach the server's default "
                                       "model with plain requests)")
    infer.add_argument("--version", help="model version")
    infer.add_argument("--protocol", choices=["mip", "grpc", "http", "http-binary"],
                       help="default: from the URL scheme (tcp/unix: mip, grpc: grpc, http: http)")
    infer.add_argument("--shape", type=_shape, action="append", metavar="D0,D1,...",
                       help="input shape (repeat once per input, in order; -1 dims of the "
                            "metadata otherwise become 1)")
    infer.add_argument("--datatype", action="append", metavar="TYPE",
                       help="input datatype, e.g. FP32 (repeat once per input; default: "
                            "metadata, else FP32)")
    infer.add_argument("--concurrency", type=_levels, metavar="N[,N...]",
                       help="closed loop: requests in flight per step (default 1,8,32 unless "
                            "--request-rate is given)")
    infer.add_argument("--request-rate", type=_rates, metavar="R[,R...]",
                       help="open loop: requests per second per step")
    infer.add_argument("--duration", type=float, default=3.0, metavar="SECONDS",
                       help="measured time per step (default 3)")
    infer.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS",
                       help="unmeasured load before each step (default 1)")
    infer.add_argument("--connections", type=int, default=1,
                       help="MIP connections / gRPC channels shared by the requests "
                            "(default 1; HTTP opens one per request in flight)")
    infer.add_argument("--client", choices=("native", "library"), default="native",
                       help="gRPC and REST clients: 'native' (mip's own: HTTP/2 on libnghttp2, "
                            "lean HTTP/1.1; little CPU a request, so the server is what is "
                            "measured) or 'library' (grpc.aio, aiohttp) (default native)")
    infer.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                       help="wait this long for one reply (default 10)")
    infer.add_argument("--max-requests", type=int, default=10_000_000,
                       help="most requests measured per step (default 10,000,000)")
    infer.add_argument("--max-inflight", type=int, default=1024,
                       help="open loop: most requests in flight (default 1024)")
    infer.add_argument("--label", help="name of this run in tables and plots")
    infer.add_argument("--no-progress", action="store_true", help="no progress bar")
    _output_args(infer)

    pubsub = sub.add_parser(
        "pubsub", help="MSIP pub/sub throughput, publish-to-delivery latency and PING",
        description="Publishers and subscribers on one topic of an MSIP broker, then PING "
                    "round trips.")
    pubsub.add_argument("url", help="the broker: tcp://HOST:PORT or unix:///PATH")
    pubsub.add_argument("--publishers", type=int, default=1, help="default 1")
    pubsub.add_argument("--subscribers", type=int, default=1, help="default 1")
    pubsub.add_argument("--size", type=int, default=64, metavar="OCTETS",
                        help="data per message, at least 16 (default 64)")
    pubsub.add_argument("--rate", type=float, metavar="MSG_PER_S",
                        help="messages per second over all publishers (default: as fast as "
                             "delivered, with --window messages in flight)")
    pubsub.add_argument("--window", type=int, default=1000,
                        help="unpaced: messages per subscriber not yet delivered (default 1000)")
    pubsub.add_argument("--duration", type=float, default=3.0, metavar="SECONDS",
                        help="default 3")
    pubsub.add_argument("--warmup", type=float, default=0.5, metavar="SECONDS",
                        help="default 0.5")
    pubsub.add_argument("--ping-duration", type=float, default=1.0, metavar="SECONDS",
                        help="seconds of PING round trips (default 1; 0 = none)")
    pubsub.add_argument("--topic", default="mip.bench", help="default mip.bench")
    pubsub.add_argument("--max-messages", type=int, default=10_000_000,
                        help="most messages published (default 10,000,000)")
    pubsub.add_argument("--subscribe-url", action="append", metavar="URL",
                        help="connect the subscribers to these brokers in turn (repeat the "
                             "flag; default: URL), e.g. the other brokers of a --cluster")
    pubsub.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long after subscribing before publishing (default 0; "
                             "give a cluster time to subscribe in Redis)")
    pubsub.add_argument("--label", help="name of this run")
    pubsub.add_argument("--json", metavar="FILE", help="write every figure to this JSON file")
    pubsub.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run(coro):
    from mip.net.loop import run

    return run(coro)


def _compare(args, docs: list[dict]) -> int:
    from mip.bench import report

    docs = docs + report.load_runs(args.compare or [])
    if not docs:
        print("mip bench: nothing to show: give a URL or --compare FILES", file=sys.stderr)
        return 2
    if len(docs) > 1:
        print(report.format_compare(docs))
    if args.plot:
        report.plot_runs(docs, args.plot, title=getattr(args, "title", None))
        print(f"plot written to {args.plot}")
    return 0


def _infer(args) -> int:
    from mip.bench import infer, report

    if not args.url:
        if args.compare:
            return _compare(args, [])
        print("mip bench infer: a URL is required (there is no default target)", file=sys.stderr)
        return 2
    target = infer.InferTarget(url=args.url, protocol=args.protocol or infer.guess_protocol(args.url),
                               model=args.model, version=args.version,
                               connections=args.connections, timeout=args.timeout,
                               client=args.client)
    concurrencies = args.concurrency or ([] if args.request_rate else [1, 8, 32])
    progress = None if args.no_progress else report.progress_factory()
    doc = _run(infer.run_steps(target, concurrencies=concurrencies, rates=args.request_rate,
                               duration=args.duration, warmup=args.warmup, shapes=args.shape,
                               datatypes=args.datatype, max_requests=args.max_requests,
                               max_inflight=args.max_inflight, label=args.label,
                               progress_factory=progress))
    print(report.format_table(doc))
    if args.json:
        report.write_json(doc, args.json)
        print(f"results written to {args.json}")
    if args.plot or args.compare:
        return _compare(args, [doc])
    return 0


def _pubsub(args) -> int:
    from mip.bench import pubsub, report

    progress = None
    if not args.no_progress:
        make = report.progress_factory()
        if make is not None:
            progress = make("pub/sub", 0, args.duration, args.warmup)
    try:
        doc = _run(pubsub.run_pubsub(
            args.url, publishers=args.publishers, subscribers=args.subscribers, size=args.size,
            rate=args.rate, duration=args.duration, warmup=args.warmup, topic=args.topic,
            ping_duration=args.ping_duration, window=args.window,
            max_messages=args.max_messages, label=args.label,
            subscriber_urls=args.subscribe_url, settle=args.settle, progress=progress))
    finally:
        if progress is not None:
            progress.close()
    print(report.format_pubsub(doc))
    if args.json:
        report.write_json(doc, args.json)
        print(f"results written to {args.json}")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run ``mip bench`` with parsed arguments; returns the exit status."""
    if args.bench_command == "infer":
        return _infer(args)
    if args.bench_command == "pubsub":
        return _pubsub(args)
    if args.compare:
        return _compare(args, [])
    print("mip bench: give 'infer URL', 'pubsub URL' or --compare FILES (see mip bench -h)",
          file=sys.stderr)
    return 2
