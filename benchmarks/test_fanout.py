"""Fan-out 1 -> 4: one publisher process, four subscriber processes, each
decoding every 100-byte message. Timed until the last subscriber has its
last message; msgs_per_s counts messages published (each delivered 4 times)."""

import pytest

from conftest import FANOUT_MESSAGES, make_transfer, report_transfers, time_transfers

SUBSCRIBERS = 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("system, transport", [
    ("busx", "unix"), ("busx", "tcp"), ("pyzmq", "unix"), ("plain-batched", "unix"),
])
def test_fanout(benchmark, system, transport, broker, workdir):
    runs = time_transfers(benchmark, lambda: make_transfer(
        system, transport, broker, workdir, FANOUT_MESSAGES, subscribers=SUBSCRIBERS))
    report_transfers(benchmark, runs)
    benchmark.extra_info["deliveries_per_s"] = benchmark.extra_info["msgs_per_s"] * SUBSCRIBERS
    if system != "pyzmq":
        assert all(run.drops == 0 for run in runs), [run.received for run in runs]
