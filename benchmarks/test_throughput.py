"""End-to-end throughput: one publisher process -> (broker) -> one subscriber
process, 100-byte msgpack dicts, the subscriber decoding every message.
busx goes through a busx.Broker in its own process; pyzmq (PUB/SUB, default
HWM) and the plain socket go straight from publisher to subscriber.
extra_info.msgs_per_s is from the workers' clocks; drops are messages the
subscriber never got (pyzmq drops at its HWM)."""

import pytest

from conftest import MESSAGES, make_transfer, report_transfers, time_transfers

SYSTEMS = ["busx", "busx-recv_many", "pyzmq", "plain", "plain-batched"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("system", SYSTEMS)
def test_throughput(benchmark, system, transport, broker, workdir):
    runs = time_transfers(benchmark, lambda: make_transfer(system, transport, broker, workdir,
                                                           MESSAGES))
    report_transfers(benchmark, runs)
    if not system.startswith("pyzmq"):
        # busx promises every message to a subscriber that keeps up; so does a socket.
        assert all(run.drops == 0 for run in runs), [run.received for run in runs]
