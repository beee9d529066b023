"""Lock-order stress (hardening contract, item 14): one Bus shared by threads
that publish small messages, messages with an fd and 300 KiB payloads (which
travel as memfds), receive them (closing the fds), flush, and subscribe and
unsubscribe in a loop, while the broker (`busx serve` in its own process) is
restarted every couple of seconds under them. One subscription to the big
payloads is read far slower than they come, so the client's receive side
keeps filling up: reading pauses, the acks of the Bus's own memfds stall,
and round trips read on past the bound - every path between the outbox's
lock and the inbox's.

Every thread records when it last finished an operation - whatever its
outcome: a Timeout or Disconnected while the broker is away is progress too;
only a call that never returns is not. The test fails when any thread makes
no progress for STALL_SECONDS.

A deadlock between the GIL and one of ClientIO's mutexes freezes every Python thread
of the process, the watchdog included, and pytest-timeout with it. So the
watchdog keeps re-arming faulthandler.dump_traceback_later(exit=True): once
Python stops running, faulthandler (a C thread) prints every thread's stack
and ends the process after STALL_SECONDS + a margin, instead of letting the
run hang forever."""

from __future__ import annotations

import faulthandler
import os
import threading
import time
import traceback

import pytest
from support import BrokerProcess

import busx

STRESS_SECONDS = float(os.environ.get("BUSX_STRESS_SECONDS", "15"))
STALL_SECONDS = 10.0
MAX_FDS_AHEAD = 1000    # fd messages published and not yet received
RESTART_EVERY = 2.0
LAG_SECONDS = 0.05          # the lagging reader takes one message per this
HARD_STOP_MARGIN = 5.0      # faulthandler ends a frozen process this long after a stall

# Expected while the broker restarts; anything else fails the test.
TRANSIENT = (busx.Timeout, busx.Disconnected)


class Worker(threading.Thread):
    """Runs step() until stopped, noting the time each call returns."""

    def __init__(self, name: str, step, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.step, self.stop = step, stop
        self.last_progress = time.monotonic()
        self.done = self.transient = 0
        self.error: str | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.step()
                self.done += 1
            except TRANSIENT:
                self.transient += 1
            except BaseException:
                self.error = traceback.format_exc()
                return
            self.last_progress = time.monotonic()

    def stalled_for(self) -> float:
        return time.monotonic() - self.last_progress if self.is_alive() else 0.0


class Restarter:
    """Stops and starts `busx serve` on the same socket path every
    RESTART_EVERY seconds."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.broker = BrokerProcess(directory)
        self.restarts = 0

    def step(self, stop: threading.Event) -> None:
        if stop.wait(RESTART_EVERY):
            return
        self.broker.stop()
        self.broker = BrokerProcess(self.directory)
        self.restarts += 1


@pytest.fixture
def terminal_stderr(capfd):
    """A dup of the stderr pytest started with: a frozen process is ended by
    faulthandler before pytest could show what it captured, so the stacks
    must go straight to the terminal (or CI log)."""
    with capfd.disabled():
        fd = os.dup(2)
    yield fd
    faulthandler.cancel_dump_traceback_later()
    os.close(fd)


@pytest.mark.timeout(STRESS_SECONDS + 120)
def test_one_bus_shared_by_busy_threads_never_stalls_while_the_broker_restarts(
        tmp_path, terminal_stderr):
    def arm_hard_stop():
        faulthandler.dump_traceback_later(STALL_SECONDS + HARD_STOP_MARGIN, exit=True,
                                          file=terminal_stderr)

    arm_hard_stop()     # before the first thread starts: a freeze can come at once
    restarter = Restarter(str(tmp_path))
    bus = busx.connect(restarter.broker.url, name="stress", reconnect=True)
    small_sub = bus.subscribe("stress.small")
    fd_sub = bus.subscribe("stress.fd")
    big_sub = bus.subscribe("stress.big")
    lagging_sub = bus.subscribe("stress.big")
    read_end, write_end = os.pipe()
    big = os.urandom(300 << 10)        # above the memfd threshold (256 KiB)
    padding = b"p" * 4096               # bounds how many fds the 16 MiB buffer can hold
    counter = iter(range(1 << 62))
    received = {"small": 0, "fd": 0, "fds": 0, "big": 0, "sent-fd": 0}
    stop = threading.Event()

    def publish_small():
        bus.publish("stress.small", next(counter), timeout=2)

    def publish_fd():
        # At most MAX_FDS_AHEAD unread: while flush and churn keep round trips
        # in flight, the client reads past its receive limits to reach their
        # answers and drops what exceeds them (docs/guarantees.md); this
        # test counts every fd message, so it never lets it come to that.
        if received["sent-fd"] - received["fd"] < MAX_FDS_AHEAD:
            bus.publish("stress.fd", [next(counter), padding], fds=[read_end], timeout=2)
            received["sent-fd"] += 1

    def publish_big():
        bus.publish("stress.big", big, timeout=2)

    def receiver(kind, sub):
        def step():
            for msg in sub.recv_many(max_count=256, timeout=1):
                received[kind] += 1
                received["fds"] += len(msg.fds)
                for fd in msg.fds:
                    os.close(fd)
                if kind == "big":
                    assert msg.data == big
        return step

    def lag():
        stop.wait(LAG_SECONDS)      # pacing, not synchronisation: this reader is meant to lag
        lagging_sub.recv(timeout=1)

    def flush():
        bus.flush(timeout=5)

    def churn():
        sub = bus.subscribe(f"stress.churn.{next(counter) % 16}")
        sub.unsubscribe()

    workers = [Worker(name, step, stop) for name, step in [
        ("publish-small", publish_small), ("publish-fd", publish_fd), ("publish-big", publish_big),
        ("recv-small", receiver("small", small_sub)), ("recv-fd", receiver("fd", fd_sub)),
        ("recv-big", receiver("big", big_sub)), ("lag-big", lag), ("flush", flush),
        ("churn", churn),
        ("restart", lambda: restarter.step(stop)),
    ]]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        watch(workers, started, arm_hard_stop, terminal_stderr)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=STALL_SECONDS + 10)
        faulthandler.cancel_dump_traceback_later()
        stuck = [worker.name for worker in workers if worker.is_alive()]
        if not stuck:
            bus.close()
            restarter.broker.stop()
        os.close(read_end)
        os.close(write_end)
    assert not stuck, f"threads still running after the stop: {stuck}"
    errors = {worker.name: worker.error for worker in workers if worker.error}
    assert not errors, "\n".join(f"{name}:\n{error}" for name, error in errors.items())
    done = {worker.name: worker.done for worker in workers}
    assert all(done.values()), f"some thread never completed an operation: {done}"
    assert received["small"] and received["fd"] and received["fds"] and received["big"], received
    assert restarter.restarts >= STRESS_SECONDS / RESTART_EVERY / 2, restarter.restarts
    # The lagging reader filled the receive side: messages for it were dropped.
    assert lagging_sub.dropped, bus.counters


def watch(workers: list[Worker], started: float, arm_hard_stop, stderr_fd: int) -> None:
    """Until STRESS_SECONDS have passed: fail on a thread's error or stall."""
    while time.monotonic() - started < STRESS_SECONDS:
        arm_hard_stop()     # pushed back while Python runs; fires only if this loop freezes
        for worker in workers:
            if worker.error:
                pytest.fail(f"{worker.name} failed:\n{worker.error}")
            stalled = worker.stalled_for()
            if stalled > STALL_SECONDS:
                faulthandler.dump_traceback(file=stderr_fd, all_threads=True)
                pytest.fail(f"{worker.name} made no progress for {stalled:.1f}s "
                            f"({time.monotonic() - started:.1f}s into the run); stacks on stderr")
        time.sleep(0.25)    # the watchdog's tick, not a synchronisation
