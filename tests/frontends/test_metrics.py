"""The request series: durations folded a few dozen at a time count as one at a time."""

import random

from prometheus_client.utils import floatToGoString

from mip.frontends.oip.metrics import DURATION_BUCKETS_US, PROTOCOLS, Metrics, _Histogram


class _Engine:
    """What Metrics reads of an engine (no model is run here)."""

    def add_batch_hook(self, hook):
        pass

    def stats(self):
        return {("m", "1"): None}


def test_folded_durations_are_the_sums_and_buckets_of_one_at_a_time():
    rng = random.Random(7)
    metrics = Metrics(_Engine())
    expected = {protocol: (_Histogram(DURATION_BUCKETS_US), [0.0]) for protocol in PROTOCOLS}
    bounds = [b / 1e6 for b in DURATION_BUCKETS_US]
    for index in range(2500):  # more than one fold's worth, and a remainder
        protocol = PROTOCOLS[index % 3]
        seconds = rng.choice([rng.random() * 1e-3, rng.expovariate(200), rng.choice(bounds), 0.0])
        ok = index % 11 != 0
        metrics.observe_request("m", "1", protocol, ok, seconds, 2)
        histogram, total = expected[protocol]
        histogram.observe(seconds * 1e6)
        total[0] += seconds * 1e6
    for protocol in PROTOCOLS[:3]:
        series = metrics._folded()[("m", "1", protocol)]
        histogram, total = expected[protocol]
        assert series.duration_us == total[0]  # exactly: the same float additions in order
        assert series.histogram.total == histogram.total
        assert series.histogram.counts == histogram.counts
        assert not series.seconds
    stats = metrics.statistics("m")[0]
    assert stats["inference_stats"]["success"]["count"] + stats["inference_stats"]["fail"][
        "count"] == 2500
    text = metrics._counters()  # (the counters' text: what /metrics shows first)
    assert (f'nv_inference_request_duration_us{{model="m",protocol="mip",version="1"}} '
            f"{floatToGoString(expected['mip'][1][0])}") in text
