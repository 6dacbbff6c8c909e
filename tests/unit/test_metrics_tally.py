"""Tallied metrics end up exactly where direct updates would have put them."""

from __future__ import annotations

import pytest
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


def test_result_sets_count_each_result_as_one_by_one_counting_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """auth_results_of (one tally per set of results) ends up where auth_result for each
    pair does, unknown pairs under "other" included, and so do the sets past the limit."""
    from tachymail.metrics import instruments as m

    sets = [
        (("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")),
        (("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass")),
        (("spf", "odd"), ("novel", "pass")),
    ]
    monkeypatch.setattr(m, "RESULT_SETS_KEPT", 2)  # the third set counts pair by pair

    def counted() -> dict[tuple[str, str], float]:
        m.flush()
        return {
            (s.labels["method"], s.labels["result"]): s.value
            for s in m.auth_results_total.collect()[0].samples
            if s.name.endswith("_total") and s.value
        }

    m.build()
    for results in sets * 3:
        for method, result in results:
            m.auth_result(method, result)
    one_by_one = counted()
    m.build()
    for results in sets * 3:
        m.auth_results_of(results)
    assert counted() == one_by_one
    assert one_by_one[("dkim", "pass")] == 6 and one_by_one[("other", "other")] == 3
    assert one_by_one[("spf", "other")] == 3
    m.build()
