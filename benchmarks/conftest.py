"""Fixtures for the benchmarks: a busx broker in its own process, and helpers
that start worker processes outside the timed part (see peers.py).

    pytest benchmarks/ --benchmark-only                      # the full suite, about a minute
    BUSX_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only   # CI: fewer rounds and messages

The benchmark modules get everything through fixtures (never `import
conftest`, which would find tests/conftest.py when both folders are run).
"""

from __future__ import annotations

import os
import statistics
from types import SimpleNamespace

import peers
import pytest

QUICK = os.environ.get("BUSX_BENCH_QUICK") == "1"
SCALE = SimpleNamespace(
    messages=50_000 if QUICK else 500_000,         # per round, end-to-end throughput
    fanout_messages=20_000 if QUICK else 100_000,  # per round, to each of 4 subscribers
    large_bytes=64 << 20 if QUICK else 256 << 20,  # per round, large payloads
    rounds=1 if QUICK else 3,                      # rounds of a process-based benchmark
    pings=300 if QUICK else 3000,                  # round trips per latency benchmark
)
SUMMARY_KEYS = ["msgs_per_s", "deliveries_per_s", "mb_per_s", "drops", "p50_us", "p99_us"]


def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) configure reads the option.
    if QUICK and float(config.getoption("benchmark_max_time", 0)) == 1.0:
        config.option.benchmark_max_time = 0.2


@pytest.fixture(scope="session")
def scale():
    return SCALE


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A short directory for socket files (sun_path holds 108 bytes)."""
    return str(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="session")
def broker(workdir):
    broker = peers.BrokerProcess(workdir)
    yield broker
    broker.finish()


@pytest.fixture
def skip_without_zmq():
    """Call with a system name: skips the test when it is pyzmq and pyzmq is missing."""
    def check(system: str) -> None:
        if system.startswith("pyzmq") and not peers.zmq_available():
            pytest.skip("pyzmq is not installed")
    return check


def zmq_endpoint(workdir: str, transport: str, name: str) -> str:
    return f"ipc://{workdir}/{name}.ipc" if transport == "unix" else "tcp://127.0.0.1:*"


def start_transfer(system: str, transport: str, broker, workdir: str, count: int,
                   size: int, subscribers: int) -> peers.Transfer:
    """system: busx, busx-recv_many, pyzmq, plain (one sendall a frame) or plain-batched."""
    if system.startswith("busx"):
        return peers.busx_transfer(broker.url(transport), count, size, subscribers,
                                   many=system == "busx-recv_many")
    if system == "pyzmq":
        return peers.zmq_transfer(zmq_endpoint(workdir, transport, "pub"), count, size,
                                  subscribers)
    batch = peers.RAW_BATCH if system == "plain-batched" else 0
    address = f"unix:{workdir}" if transport == "unix" else "tcp"
    return peers.raw_transfer(address, count, size, subscribers, batch)


def check_delivery(system: str, runs: list) -> None:
    """A plain socket loses nothing; busx may drop for a subscriber that falls
    max_pending behind (SPEC.md), but never silently; pyzmq drops at its HWM."""
    if system.startswith("plain"):
        assert all(run.drops == 0 for run in runs), [run.received for run in runs]
    elif system.startswith("busx"):
        assert all(run.silent_drops == 0 for run in runs), \
            [(run.received, run.reported) for run in runs]


@pytest.fixture
def measure_transfer(benchmark, broker, workdir, skip_without_zmq):
    """measure_transfer(system, transport, count, size=100, subscribers=1):
    time SCALE.rounds transfers with pedantic (process start-up in its
    setup, so only the transfer is timed), record the workers' own numbers
    in extra_info (median run; no start-up, no quiet timeout in them), and
    check delivery. Returns the runs."""
    def measure(system: str, transport: str, count: int, size: int = 100,
                subscribers: int = 1) -> list:
        skip_without_zmq(system)
        runs = []
        benchmark.pedantic(
            lambda transfer: runs.append(transfer.start()),
            setup=lambda: ((start_transfer(system, transport, broker, workdir, count, size,
                                           subscribers),), {}),
            rounds=SCALE.rounds, iterations=1)
        rate = statistics.median(run.msgs_per_s for run in runs)
        benchmark.extra_info.update(
            messages=count, msgs_per_s=round(rate), mb_per_s=round(rate * size / 1e6, 1),
            drops=max(run.drops for run in runs))
        check_delivery(system, runs)
        return runs
    return measure


@pytest.fixture
def start_pinger(broker, workdir, skip_without_zmq):
    """start_pinger(system, transport): an echo process and this process's
    end of it, closed after the test."""
    started = []

    def start(system: str, transport: str):
        skip_without_zmq(system)
        if system == "busx":
            pinger = peers.BusxPinger(broker.url(transport))
        elif system == "pyzmq":
            pinger = peers.ZmqPinger(zmq_endpoint(workdir, transport, "echo"))
        else:
            pinger = peers.RawPinger(f"unix:{workdir}/echo.sock" if transport == "unix"
                                     else "tcp:127.0.0.1:0")
        started.append(pinger)
        return pinger
    yield start
    for pinger in started:
        pinger.close()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    """After pytest-benchmark's table, show the workers' own measurements
    (extra_info), which it keeps only in --benchmark-json output."""
    session = getattr(config, "_benchmarksession", None)
    rows = [(bench.name, bench.extra_info) for bench in getattr(session, "benchmarks", [])
            if any(key in bench.extra_info for key in SUMMARY_KEYS)]
    if not rows:
        return
    terminalreporter.section("busx benchmarks: measured by the workers")
    width = max(len(name) for name, _ in rows)
    terminalreporter.write_line(f"{'benchmark':{width}}  "
                                + "  ".join(f"{key:>16}" for key in SUMMARY_KEYS))
    for name, info in sorted(rows):
        cells = [f"{info[key]:>16,}" if key in info else f"{'':>16}" for key in SUMMARY_KEYS]
        terminalreporter.write_line(f"{name:{width}}  " + "  ".join(cells))
