"""End-to-end throughput: one publisher process -> (broker) -> one subscriber
process, 100-byte msgpack dicts, the subscriber decoding every message.
busx goes through a busx.Broker in its own process; pyzmq (PUB/SUB, default
HWM) and the plain socket go straight from publisher to subscriber.
extra_info.msgs_per_s is from the workers' clocks; drops are messages the
subscriber never got (pyzmq drops at its HWM)."""

import pytest

SYSTEMS = ["busx", "busx-recv_many", "pyzmq", "plain", "plain-batched"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("system", SYSTEMS)
def test_throughput(measure_transfer, scale, system, transport):
    measure_transfer(system, transport, scale.messages)
