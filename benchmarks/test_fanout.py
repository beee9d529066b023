"""Fan-out 1 -> 4: one publisher process, four subscriber processes, each
decoding every 100-byte message. Timed until the last subscriber has its
last message; msgs_per_s is per subscriber, deliveries_per_s all four.
The plain socket's publisher writes each 64 KiB batch to the four sockets
in turn; pyzmq's PUB does the fan-out itself."""

import pytest

SUBSCRIBERS = 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("system, transport", [
    ("busx", "unix"), ("busx", "tcp"), ("pyzmq", "unix"), ("plain-batched", "unix"),
])
def test_fanout(benchmark, measure_transfer, scale, system, transport):
    measure_transfer(system, transport, scale.fanout_messages, subscribers=SUBSCRIBERS)
    benchmark.extra_info["deliveries_per_s"] = benchmark.extra_info["msgs_per_s"] * SUBSCRIBERS
