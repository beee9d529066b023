"""Routing at scale (benchmarks/scale.py): C peers through `busx serve`, the
broker's cost as subscriptions, hot topics, wildcards and subscription
churn grow. The subscriber and its subscriptions are set up outside the
timed part; each round times one C publisher's run, first write to PONG.
extra_info.msgs_per_s is the publisher's own figure."""

import statistics

import pytest
import scale as routing

# (subscriptions, percent wildcards, hot topics, churn); the full matrix is scale.py's.
CELLS = [(1, 0, 1, False), (10_000, 0, 1_000, False), (100_000, 0, 100_000, False),
         (100_000, 10, 100_000, False), (100_000, 0, 100_000, True)]


@pytest.fixture(scope="module")
def blast(workdir):
    return routing.build(workdir)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("subscriptions,wildcards,topics,churn", CELLS,
                         ids=[f"{s}subs-{w}pct-wild-{t}topics{'-churn' if c else ''}"
                              for s, w, t, c in CELLS])
def test_routing_scale(benchmark, blast, workdir, scale, subscriptions, wildcards, topics,
                       churn):
    count = scale.messages * 4
    scene = routing.Scene(blast, workdir, subscriptions, wildcards, churn,
                          count * scale.rounds)
    rates = []
    try:
        benchmark.pedantic(lambda: rates.append(scene.publish(topics, count)),
                           rounds=scale.rounds, iterations=1)
    finally:
        dropped, churn_rate = scene.finish()
    benchmark.extra_info.update(messages=count, msgs_per_s=round(statistics.median(rates)),
                                drops=dropped)
    if churn:
        assert churn_rate and churn_rate >= routing.CHURN_RATE, churn_rate     # SUBs + UNSUBs
