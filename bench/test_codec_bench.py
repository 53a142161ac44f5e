"""Codec benchmarks: mip against a KubeMo-style struct codec, protobuf and memcpy.

Run with ``pytest bench/test_codec_bench.py --benchmark-only``. Each group (one
operation on one payload) holds every implementation, so pytest-benchmark's
table compares them within one run; the ratios and targets are printed at the end.
See ``codec_cases.py`` for the payloads and what each implementation does.
"""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

import codec_cases  # noqa: E402


@functools.lru_cache(maxsize=None)
def _cells(payload):
    cells = codec_cases.msip_cells() if payload == "msip" else codec_cases.mip_cells(payload)
    return {(c.group, c.impl): c for c in cells}


def _params():
    out = []
    for payload in codec_cases.PAYLOADS:
        for op in ("encode", "decode"):
            for impl in codec_cases.MIP_IMPLS:
                if (op, impl) in (("decode", "mip-buffers"), ("encode", "mip-column")):
                    continue
                out.append(pytest.param(payload, "%s-%s" % (op, payload), impl, id="%s-%s-%s" % (op, payload, impl)))
    for op in ("encode", "decode"):
        for impl in codec_cases.MSIP_IMPLS:
            out.append(pytest.param("msip", "msip-" + op, impl, id="msip-%s-%s" % (op, impl)))
    return out


# Rounds of at least 50 us, so that sub-microsecond cells are timed over many
# iterations rather than at the clock's resolution; gc off, as timeit does.
@pytest.mark.benchmark(min_time=50e-6, max_time=0.5, disable_gc=True, warmup=True)
@pytest.mark.parametrize("payload, group, impl", _params())
def test_codec(benchmark, codec_results, payload, group, impl):
    cell = _cells(payload).get((group, impl))
    if cell is None:
        pytest.skip("%s is not available" % impl)
    benchmark.group = group
    result = benchmark(cell.func, *cell.args)
    if cell.check is not None:
        cell.check(result)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        codec_results[(group, impl)] = stats.stats.min
