"""Large payloads, 64 KiB to 16 MiB: one publisher process -> one subscriber
process, which decodes each (a msgpack bin, so one copy). extra_info.mb_per_s
is payload megabytes per second."""

import pytest

from conftest import LARGE_BYTES, make_transfer, report_transfers, time_transfers

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("system, transport", [
    ("busx", "unix"), ("busx", "tcp"), ("pyzmq", "unix"), ("plain", "unix"),
])
def test_large(benchmark, system, transport, size, broker, workdir):
    size_bytes = SIZES[size]
    count = max(4, LARGE_BYTES // size_bytes)
    runs = time_transfers(benchmark, lambda: make_transfer(
        system, transport, broker, workdir, count, size=size_bytes))
    report_transfers(benchmark, runs, size=size_bytes)
    if system != "pyzmq":
        assert all(run.drops == 0 for run in runs), [run.received for run in runs]
