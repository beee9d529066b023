"""Large payloads, 64 KiB to 16 MiB: one publisher process -> one subscriber
process, which decodes each (a msgpack bin, so one copy). extra_info.mb_per_s
is payload megabytes delivered per second. A round is a burst of 256 MiB (64
in quick mode), more than busx's max_pending (64 MiB): a subscriber that falls
that far behind has messages dropped, counted and reported (SPEC.md), which
extra_info.drops shows; pyzmq drops at its HWM."""

import pytest

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("system, transport", [
    ("busx", "unix"), ("busx", "tcp"), ("pyzmq", "unix"), ("plain", "unix"),
])
def test_large(measure_transfer, scale, system, transport, size):
    size_bytes = SIZES[size]
    measure_transfer(system, transport, max(4, scale.large_bytes // size_bytes), size=size_bytes)
