"""Slow consumers, with the broker in its own process (`busx serve`): the
slow-consumer policy applies to the subscriber that fell behind and to no one
else, every drop is counted and told, and a subscriber that never reads costs
the broker at most max_pending bytes however much is published."""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
from certs import PKI
from support import json_result, spawn_python, stop_process, wait_for

import busx

MAX_PENDING = 256 << 10
PAYLOAD = b"x" * 1000
WINDOW = 64          # messages the test publishes before catching its fast subscriber up



def connection(stats: dict, name: str) -> dict:
    (found,) = [c for c in stats["connections"] if c["name"] == name]
    return found


def receive(sub, count: int) -> list:
    got = []
    while len(got) < count:
        batch = sub.recv_many(max_count=count - len(got), timeout=10)
        assert batch, f"only {len(got)} of {count} messages arrived"
        got += [msg.data[0] for msg in batch]
    return got


def publish_in_step(publisher, fast_sub, first: int, count: int, until=None) -> list:
    """Publish [i, PAYLOAD] for i in first..first+count-1, WINDOW at a time,
    reading fast_sub after each window: it keeps up by construction (the
    broker never queues more than a window for it). Stops early once
    until() is true. Returns what fast_sub received."""
    received = []
    for start in range(first, first + count, WINDOW):
        stop = min(start + WINDOW, first + count)
        publisher.publish_many(("burst.n", [i, PAYLOAD]) for i in range(start, stop))
        received += receive(fast_sub, stop - start)
        if until is not None and until():
            break
    return received


# ---- slow_consumer="drop" ----

# Subscribes, says ready, and is then stopped by the test; once resumed it
# reads until what it received plus what it was told was dropped accounts
# for every message, and then checks that nothing more comes.
DROP_SUBSCRIBER = """
import json, sys, busx
count = int(sys.argv[2])
with busx.connect(sys.argv[1], name="slow") as bus:
    sub = bus.subscribe("burst.>")
    print("ready", flush=True)
    seen = []
    while len(seen) + sub.dropped < count:
        batch = sub.recv_many(timeout=15)
        if not batch:
            break
        seen += [msg.data[0] for msg in batch]
    extra = [msg.data[0] for msg in sub.recv_many(timeout=0.5)]
    print(json.dumps({"seen": seen, "dropped": sub.dropped, "extra": extra}))
"""


def test_drop_counts_and_reports_only_the_slow_subscriber(start_broker):
    broker = start_broker("--max-pending", str(MAX_PENDING), "--slow-consumer", "drop")
    count = 4000        # 4 MB: many times what the slow one's socket and queue hold
    slow = spawn_python(DROP_SUBSCRIBER, broker.url, str(count))
    try:
        assert slow.stdout.readline().strip() == "ready", slow.stderr.read()
        with busx.connect(broker.url, name="publisher") as publisher, \
                busx.connect(broker.url, name="fast") as fast:
            fast_sub = fast.subscribe("burst.>")
            stop_process(slow.pid)
            try:
                received = publish_in_step(publisher, fast_sub, 0, count)
                publisher.flush(timeout=30)     # every drop is decided by now
                stats = publisher.stats()
            finally:
                os.kill(slow.pid, signal.SIGCONT)
            report = json_result(slow)
            assert received == list(range(count))
            assert fast_sub.dropped == 0
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.communicate()

    slow_dropped = connection(stats, "slow")["dropped"]
    assert slow_dropped > 0, "nothing was dropped: the subscriber was not slow"
    assert connection(stats, "slow")["pending_bytes"] <= MAX_PENDING
    assert connection(stats, "fast")["dropped"] == 0
    assert connection(stats, "publisher")["dropped"] == 0
    assert stats["dropped"] == slow_dropped
    # The subscriber learns exactly the broker's count, and what it got is the
    # published sequence with gaps: never reordered, never repeated.
    assert report["dropped"] == slow_dropped
    seen = report["seen"]
    assert len(seen) + slow_dropped == count, report
    assert seen == sorted(set(seen)), "reordered or duplicated"
    assert set(seen) <= set(range(count)) and report["extra"] == []


# ---- slow_consumer="disconnect" ----

# Reads until the slow-consumer policy disconnects it, printing what it got
# and the error; with reconnect it then prints every "burst.after" message.
STALLED_SUBSCRIBER = """
import json, sys, busx
reconnect = sys.argv[2] == "reconnect"
bus = busx.connect(sys.argv[1], name="stalled", reconnect=reconnect,
                   tls_ca=sys.argv[3] if len(sys.argv) > 3 else None)
sub = bus.subscribe("burst.>")
print("ready", flush=True)
seen = []
try:
    while True:
        seen += [msg.data[0] for msg in sub.recv_many(timeout=30)]
except busx.BusError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc), "seen": seen}), flush=True)
if reconnect:
    for msg in sub:
        print(json.dumps({"after": msg.data}), flush=True)
else:
    try:
        sub.recv(timeout=1)
        print(json.dumps({"then": "a message"}))
    except busx.BusError as exc:
        print(json.dumps({"then": type(exc).__name__}))
"""


def read_json_line(child: subprocess.Popen) -> dict:
    line = child.stdout.readline()
    assert line, child.stderr.read()
    return json.loads(line)


@contextlib.contextmanager
def stall_until_disconnected(broker, mode: str, stall: float = 0.0, url: str = "",
                             tls_ca: str = ""):
    """A stalled subscriber process (SIGSTOP; at url, by default the broker's
    UNIX socket) and a fast one (here) while the test publishes until the
    broker disconnects the stalled one; the stalled one resumes `stall`
    seconds later. Gives (child, its first report, fast subscriber,
    publisher, messages published)."""
    child = spawn_python(STALLED_SUBSCRIBER, url or broker.url, mode,
                         *([tls_ca] if tls_ca else []))
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        with busx.connect(broker.url, name="publisher") as publisher, \
                busx.connect(broker.url, name="fast") as fast:
            fast_sub = fast.subscribe("burst.>")
            stop_process(child.pid)
            try:
                def stalled_is_gone():
                    return all(c["name"] != "stalled" for c in publisher.stats()["connections"])

                received = publish_in_step(publisher, fast_sub, 0, 20_000, until=stalled_is_gone)
                assert stalled_is_gone(), "20 MB did not make the broker disconnect it"
                if stall:
                    time.sleep(stall)   # not synchronisation: the stall under test
            finally:
                os.kill(child.pid, signal.SIGCONT)
            assert received == list(range(len(received)))
            yield child, read_json_line(child), fast_sub, publisher, len(received)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()


def assert_slow_consumer_error(report: dict, published: int) -> None:
    assert report["error"] == "Disconnected", report
    assert "slow consumer" in report["message"], report
    seen = report["seen"]
    assert seen == list(range(len(seen))) and len(seen) < published


def test_disconnect_without_reconnect_raises_then_closes(start_broker):
    broker = start_broker("--max-pending", str(MAX_PENDING), "--slow-consumer", "disconnect")
    with stall_until_disconnected(broker, "no-reconnect") as (
            child, report, fast_sub, publisher, published):
        assert_slow_consumer_error(report, published)
        assert read_json_line(child) == {"then": "Closed"}
        # The fast subscriber goes on, losing nothing.
        publish_in_step(publisher, fast_sub, published, WINDOW)
        assert fast_sub.dropped == 0
        assert publisher.stats()["dropped"] > 0


def test_a_tls_subscriber_is_told_why_it_was_disconnected(start_broker, tmp_path):
    # Over TLS the bytes OpenSSL has sealed into a record must go out whole
    # before the ERROR that says why: cutting the queue may not cut them.
    pki = PKI(tmp_path / "pki")
    broker = start_broker("--max-pending", str(MAX_PENDING), "--slow-consumer", "disconnect",
                          "--tcp", "127.0.0.1:0", "--tls-cert", pki.server.cert,
                          "--tls-key", pki.server.key)
    url = f"tls://127.0.0.1:{broker.tcp_address[1]}"
    with stall_until_disconnected(broker, "no-reconnect", url=url, tls_ca=pki.ca_file) as (
            child, report, fast_sub, publisher, published):
        assert_slow_consumer_error(report, published)
        assert read_json_line(child) == {"then": "Closed"}


def test_disconnect_with_reconnect_raises_once_then_resumes(start_broker):
    broker = start_broker("--max-pending", str(MAX_PENDING), "--slow-consumer", "disconnect")
    with stall_until_disconnected(broker, "reconnect") as (
            child, report, fast_sub, publisher, published):
        assert_slow_consumer_error(report, published)
        wait_for(lambda: any(c["name"] == "stalled" and c["subscriptions"] == 1
                             for c in publisher.stats()["connections"]),
                 message="the disconnected subscriber did not reconnect and re-subscribe")
        publisher.publish_many(("burst.after", i) for i in range(3))
        assert [read_json_line(child) for _ in range(3)] == [{"after": i} for i in range(3)]
        assert [fast_sub.recv(timeout=5).data for _ in range(3)] == [0, 1, 2]
        assert fast_sub.dropped == 0


def test_disconnect_reason_survives_a_stall_longer_than_two_seconds(start_broker):
    # A consumer stuck for a few seconds (a long GC, a slow job) is the
    # common slow consumer. It must still learn why it was disconnected, not
    # just that the broker closed the connection.
    broker = start_broker("--max-pending", str(MAX_PENDING), "--slow-consumer", "disconnect")
    with stall_until_disconnected(broker, "no-reconnect", stall=3.0) as (
            _, report, _, _, published):
        assert_slow_consumer_error(report, published)


# ---- memory stays bounded ----

FLOOD_BYTES = 2 << 30
FLOOD_PAYLOAD = 64 << 10
FLOOD_MAX_PENDING = 8 << 20
FLOOD_WINDOW = 64       # messages (4 MiB) the publisher may run ahead of the fast subscriber
PROGRESS_EVERY = 16

NEVER_READS = """
import os, signal, sys, busx
bus = busx.connect(sys.argv[1], name="never-reads")
bus.subscribe("flood.data")
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""

# Checks every message is the next one and reports its progress, which the
# publisher waits for: so the fast subscriber keeps up by construction.
FAST_SUBSCRIBER = """
import json, sys, busx
url, count, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with busx.connect(url, name="fast") as bus:
    sub = bus.subscribe("flood.data")
    print("ready", flush=True)
    received, first_bad = 0, None
    while received < count:
        batch = sub.recv_many(timeout=30)
        if not batch:
            break
        for msg in batch:
            if msg.data[0] != received and first_bad is None:
                first_bad = [received, msg.data[0]]
            received += 1
            if received % every == 0:
                bus.publish("flood.progress", received)
    print(json.dumps({"received": received, "first_bad": first_bad, "dropped": sub.dropped}))
"""

WINDOWED_PUBLISHER = """
import sys, busx
url, count, size, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
payload = bytes(size)
with busx.connect(url, name="flood-pub") as bus:
    progress = bus.subscribe("flood.progress")
    acknowledged = 0
    for i in range(count):
        while i - acknowledged >= window:
            acknowledged = progress.recv_many(timeout=30)[-1].data
        bus.publish("flood.data", [i, payload])
    bus.flush(timeout=60)
"""


@pytest.mark.timeout(300)
def test_a_subscriber_that_never_reads_costs_at_most_max_pending(start_broker):
    broker = start_broker("--max-pending", str(FLOOD_MAX_PENDING))
    count = FLOOD_BYTES // FLOOD_PAYLOAD
    children = []
    try:
        for code, args in ((NEVER_READS, ()), (FAST_SUBSCRIBER, (str(count), str(PROGRESS_EVERY)))):
            children.append(spawn_python(code, broker.url, *args))
            assert children[-1].stdout.readline().strip() == "ready", children[-1].stderr.read()
        stop_process(children[0].pid)      # it stopped itself; wait until it has
        baseline_rss = broker.rss_bytes()
        started = time.monotonic()
        publisher = spawn_python(WINDOWED_PUBLISHER, broker.url, str(count),
                                 str(FLOOD_PAYLOAD), str(FLOOD_WINDOW))
        children.append(publisher)
        peak_rss = baseline_rss
        while publisher.poll() is None:
            peak_rss = max(peak_rss, broker.rss_bytes())
            try:
                publisher.wait(timeout=0.02)    # the sampling interval
            except subprocess.TimeoutExpired:
                pass
        elapsed = time.monotonic() - started
        assert publisher.returncode == 0, publisher.stderr.read()
        report = json_result(children[1])
        with busx.connect(broker.url) as observer:
            stats = observer.stats()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()

    print(f"{FLOOD_BYTES >> 20} MiB in {elapsed:.1f}s; broker RSS {baseline_rss >> 20} MiB "
          f"before, {peak_rss >> 20} MiB at most")
    assert report == {"received": count, "first_bad": None, "dropped": 0}
    never_reads = connection(stats, "never-reads")
    assert never_reads["dropped"] > count // 2, "the stopped subscriber was not flooded"
    assert never_reads["pending_bytes"] <= FLOOD_MAX_PENDING
    assert peak_rss < FLOOD_MAX_PENDING + (100 << 20), f"broker RSS reached {peak_rss >> 20} MiB"
