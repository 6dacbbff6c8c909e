"""Tallied metrics end up exactly where direct updates would have put them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from tachymail.metrics.instruments import CounterTally, HistogramTally

BUCKETS = (0.01, 0.1, 1.0, 10.0)
VALUES = [0.0, 0.01, 0.010001, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0, 11.0, 1e9]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_a_histogram_tally_flushes_to_the_same_buckets_and_sum() -> None:
    direct_registry, tallied_registry = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "direct", buckets=BUCKETS, registry=direct_registry)
    tally = HistogramTally(
        Histogram("h", "tallied", buckets=BUCKETS, registry=tallied_registry), BUCKETS
    )
    for value in VALUES:
        direct.observe(value)
        tally.observe(value)
    assert samples(tallied_registry) != samples(direct_registry), "nothing before the flush"
    tally.flush()
    assert samples(tallied_registry) == samples(direct_registry)
    tally.flush()  # a second flush adds nothing
    assert samples(tallied_registry) == samples(direct_registry)


def test_a_counter_tally_adds_up_until_flushed() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "counted", registry=registry)
    tally = CounterTally(counter)
    for amount in (1, 1, 2.5):
        tally.inc(amount)
    assert registry.get_sample_value("c_total") == 0
    tally.flush()
    assert registry.get_sample_value("c_total") == 4.5
