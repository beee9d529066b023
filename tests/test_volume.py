"""A million messages from a publisher process to a subscriber process
through the broker: every one arrives, exactly once, in order."""

import json

import pytest
from support import spawn_python, wait_for

import busx

COUNT = 1_000_000

# Reads until the publisher's "vol.end" (or 15 s of silence, if it was lost),
# checking each payload is the next integer; prints one JSON report.
SUBSCRIBER = """
import json, sys, busx
with busx.connect(sys.argv[1], name="volume-sub") as bus:
    sub = bus.subscribe("vol.>")
    print("ready", flush=True)
    expected, first_bad, total = 0, None, None
    while total is None:
        batch = sub.recv_many(max_count=8192, timeout=15)
        if not batch:
            break
        for msg in batch:
            if msg.topic == "vol.end":
                total = msg.data
            elif msg.data == expected:
                expected += 1
            elif first_bad is None:
                first_bad = [expected, msg.data]
    print(json.dumps({"received": expected, "first_bad": first_bad, "total": total,
                      "dropped": sub.dropped}))
"""

PUBLISHER = """
import sys, busx
count, chunk = int(sys.argv[2]), 10_000
with busx.connect(sys.argv[1], name="volume-pub") as bus:
    if sys.argv[3] == "publish":
        for i in range(count):
            bus.publish("vol.n", i)
    else:
        for start in range(0, count, chunk):
            bus.publish_many(("vol.n", i) for i in range(start, min(start + chunk, count)))
    bus.publish("vol.end", count)
    bus.flush(timeout=60)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("api", ["publish", "publish_many"])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_million_messages_arrive_complete_and_in_order(broker, tcp_url, transport, api):
    url = broker.url if transport == "unix" else tcp_url
    subscriber = spawn_python(SUBSCRIBER, url)
    publisher = None
    try:
        assert subscriber.stdout.readline().strip() == "ready", subscriber.stderr.read()
        publisher = spawn_python(PUBLISHER, url, str(COUNT), api)
        _, pub_errors = publisher.communicate(timeout=120)
        assert publisher.returncode == 0, pub_errors
        out, sub_errors = subscriber.communicate(timeout=120)
        assert subscriber.returncode == 0, sub_errors
    finally:
        for proc in (subscriber, publisher):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    report = json.loads(out)
    assert report["dropped"] == 0, f"the broker dropped {report['dropped']} messages"
    assert report["first_bad"] is None, f"out of order: expected, got {report['first_bad']}"
    assert report["received"] == COUNT and report["total"] == COUNT, report
    assert broker.stats()["dropped"] == 0


BIG = 16 << 20


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_what_follows_a_big_publish_is_sent_without_further_traffic(broker, tcp_url, transport):
    # A publisher that subscribes to nothing gets no traffic from the broker,
    # so nothing but its own writes can move what it queued after a payload
    # that takes many send() calls.
    url = broker.url if transport == "unix" else tcp_url
    with busx.connect(broker.url) as receiver:
        sub = receiver.subscribe("big.>")
        with busx.connect(url) as publisher:
            for round_number in range(3):
                before = publisher.counters["write_calls"]
                publisher.publish("big.payload", b"x" * BIG)
                # Queue the next message once the payload's sending has begun.
                wait_for(lambda before=before: publisher.counters["write_calls"] > before,
                         message="the I/O thread never started sending")
                publisher.publish("big.after", round_number)
                publisher.flush(timeout=5)
                assert len(sub.recv(timeout=5).data) == BIG
                assert sub.recv(timeout=5).data == round_number
