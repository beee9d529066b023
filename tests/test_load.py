"""Load: 1,000 concurrent clients (10 processes of 100) subscribed to one
topic, one publisher broadcasting to all of them through a broker process.
Every client receives every message in order, nothing is dropped, and the
broker keeps answering a probe client promptly throughout."""

import json
import resource
import time

import pytest
from support import spawn_python

import busx

PROCESSES, CLIENTS_EACH = 10, 100
MESSAGES = 10_000

# 100 clients in one process, each with its own connection and subscription.
# It reads them one after the other: the others' messages wait in their own
# client buffers meanwhile (50 kB each, far below max_buffer).
CLIENTS = """
import json, sys, busx
url, clients, count, group = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
buses = [busx.connect(url, name=f"load-{group}-{i}", timeout=30) for i in range(clients)]
subs = [bus.subscribe("broadcast") for bus in buses]
print("ready", flush=True)
complete, first_bad, dropped = 0, None, 0
for sub in subs:
    got = []
    while len(got) < count:
        batch = sub.recv_many(max_count=count, timeout=60)
        if not batch:
            break
        got += [msg.data for msg in batch]
    if got == list(range(count)):
        complete += 1
    elif first_bad is None:
        first_bad = got[:10]
    dropped += sub.dropped
print(json.dumps({"complete": complete, "first_bad": first_bad, "dropped": dropped}), flush=True)
for bus in buses:
    bus.close()
"""


@pytest.fixture
def many_fds():
    """Raise this process's (and so its children's) fd limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 4 * PROCESSES * CLIENTS_EACH:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1,000 clients")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def probe_round_trip(probe) -> float:
    started = time.monotonic()
    probe.flush(timeout=10)
    return time.monotonic() - started


@pytest.mark.timeout(300)
def test_a_thousand_clients_receive_every_broadcast_in_order(start_broker, many_fds):
    broker = start_broker()
    groups = []
    try:
        started = time.monotonic()
        groups = [spawn_python(CLIENTS, broker.url, str(CLIENTS_EACH), str(MESSAGES), str(g))
                  for g in range(PROCESSES)]
        for group in groups:
            assert group.stdout.readline().strip() == "ready", group.stderr.read()
        connected = time.monotonic() - started
        with busx.connect(broker.url, name="probe") as probe, \
                busx.connect(broker.url, name="broadcaster") as publisher:
            stats = probe.stats()
            assert stats["subscriptions"] == PROCESSES * CLIENTS_EACH
            assert len(stats["connections"]) == PROCESSES * CLIENTS_EACH + 2

            started = time.monotonic()
            publisher.publish_many(("broadcast", i) for i in range(MESSAGES))
            # While the broker fans out a million messages, it still answers.
            slowest = max(probe_round_trip(probe) for _ in range(20))
            reports = [json.loads(group.stdout.readline() or "null") for group in groups]
            delivered = time.monotonic() - started
            stats = probe.stats()
        for group in groups:
            _, err = group.communicate(timeout=120)
            assert group.returncode == 0, err
    finally:
        for group in groups:
            if group.poll() is None:
                group.kill()
                group.communicate()

    print(f"{PROCESSES * CLIENTS_EACH} clients connected and subscribed in {connected:.1f}s; "
          f"{MESSAGES} messages to each ({MESSAGES * PROCESSES * CLIENTS_EACH} deliveries) in "
          f"{delivered:.1f}s; slowest probe round trip {slowest * 1000:.0f} ms")
    assert reports == [{"complete": CLIENTS_EACH, "first_bad": None, "dropped": 0}] * PROCESSES
    assert stats["dropped"] == 0
    assert stats["msgs_out"] >= MESSAGES * PROCESSES * CLIENTS_EACH
    assert slowest < 3.0, f"the broker took {slowest:.1f}s to answer a PING under load"
