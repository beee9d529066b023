"""Round-trip latency, one request in flight: ping -> echo process -> pong.
busx: bus.request() to an echo process that answers with msg.respond(), both
through a busx.Broker in its own process (four socket hops). pyzmq REQ/REP
and the plain socket go straight to the echo process (two hops). Every side
decodes and re-encodes the 100-byte dict. extra_info has p50/p99 in µs."""

import pytest
from peers import percentile


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("system", ["busx", "pyzmq", "plain"])
def test_round_trip(benchmark, start_pinger, scale, system, transport):
    pinger = start_pinger(system, transport)
    benchmark.pedantic(pinger.ping, rounds=scale.pings, warmup_rounds=scale.pings // 10,
                       iterations=1)
    if benchmark.stats is not None:     # None under --benchmark-disable
        samples = benchmark.stats.stats.data
        benchmark.extra_info.update(p50_us=round(percentile(samples, 0.50) * 1e6, 1),
                                    p99_us=round(percentile(samples, 0.99) * 1e6, 1))
