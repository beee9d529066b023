"""Fixtures for the benchmarks: a busx broker in its own process, and helpers
that set up worker processes outside the timed part (see peers.py).

    pytest benchmarks/ --benchmark-only                      # the full suite, a few minutes
    BUSX_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only   # CI: fewer rounds and messages
"""

from __future__ import annotations

import os
import statistics

import pytest

import peers

QUICK = os.environ.get("BUSX_BENCH_QUICK") == "1"

MESSAGES = 50_000 if QUICK else 200_000          # per round, end-to-end throughput
FANOUT_MESSAGES = 20_000 if QUICK else 100_000   # per round, to each of 4 subscribers
LARGE_BYTES = 64 << 20 if QUICK else 256 << 20   # per round, large payloads
ROUNDS = 1 if QUICK else 3                       # rounds of a process-based benchmark
PINGS = 300 if QUICK else 3000                   # round trips per latency benchmark


def pytest_configure(config):
    # Runs before pytest-benchmark's own (trylast) configure reads the option.
    if QUICK and float(config.getoption("benchmark_max_time", 0)) == 1.0:
        config.option.benchmark_max_time = 0.2


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A short directory for socket files (sun_path holds 108 bytes)."""
    return str(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="session")
def broker(workdir):
    broker = peers.BrokerProcess(workdir)
    yield broker
    broker.finish()


def needs_zmq(system: str) -> None:
    if system.startswith("pyzmq") and not peers.zmq_available():
        pytest.skip("pyzmq is not installed")


def zmq_endpoint(workdir: str, transport: str, name: str) -> str:
    return f"ipc://{workdir}/{name}.ipc" if transport == "unix" else "tcp://127.0.0.1:*"


def raw_address(workdir: str, transport: str) -> str:
    return f"unix:{workdir}" if transport == "unix" else "tcp"


def make_transfer(system: str, transport: str, broker, workdir: str, count: int,
                  size: int = 100, subscribers: int = 1) -> peers.Transfer:
    """Start the processes for one transfer; system is one of busx,
    busx-recv_many, pyzmq, plain, plain-batched."""
    needs_zmq(system)
    if system.startswith("busx"):
        return peers.busx_transfer(broker.url(transport), count, size, subscribers,
                                   many=system == "busx-recv_many")
    if system == "pyzmq":
        return peers.zmq_transfer(zmq_endpoint(workdir, transport, "pub"), count, size,
                                  subscribers)
    batch = peers.RAW_BATCH if system == "plain-batched" else 0
    return peers.raw_transfer(raw_address(workdir, transport), count, size, subscribers, batch)


def time_transfers(benchmark, start_processes, rounds: int = ROUNDS) -> list:
    """Time only Transfer.start(): process start-up happens in pedantic's setup."""
    runs = []
    benchmark.pedantic(lambda transfer: runs.append(transfer.start()),
                       setup=lambda: ((start_processes(),), {}), rounds=rounds, iterations=1)
    return runs


def report_transfers(benchmark, runs: list, size: int = 100) -> None:
    """extra_info from the workers' own clocks (no process start-up, no quiet timeout)."""
    seconds = statistics.median(run.seconds for run in runs)
    count = runs[0].count
    benchmark.extra_info.update(
        messages=count, msgs_per_s=round(count / seconds),
        mb_per_s=round(count * size / seconds / 1e6, 1),
        drops=max(run.drops for run in runs))


def make_pinger(system: str, transport: str, broker, workdir: str):
    needs_zmq(system)
    if system == "busx":
        return peers.BusxPinger(broker.url(transport))
    if system == "pyzmq":
        return peers.ZmqPinger(zmq_endpoint(workdir, transport, "echo"))
    where = f"unix:{workdir}/echo.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    return peers.RawPinger(where)
