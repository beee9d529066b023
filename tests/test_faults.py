"""Faults around the broker: peers killed in the middle of large frames, a
broker out of file descriptors, a broker stopped while messages are still in
flight. In each, the broker keeps what it promised: whole messages in order,
nothing it accepted lost, no spinning, no leaked fds."""

import json
import os
import signal
import socket
import threading
import time
import zlib

import pytest
from support import open_fds, spawn_python, stop_process, wait_for

import busx

BIG = 1 << 20       # far more than a socket buffer: a kill lands mid-frame


def kill(process) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_idle(pid: int) -> None:
    """Process pid uses at most 5% of a CPU over an idle second."""
    before = process_cpu_seconds(pid)
    time.sleep(1.0)     # not synchronisation: the idle second being measured
    used = process_cpu_seconds(pid) - before
    assert used <= 0.05, f"the idle broker used {used:.2f}s of CPU in 1s: it spins"


# ---- peers killed mid-frame ----

# Publishes [number, crc, blob] until killed, each blob BIG bytes that differ
# by number, so a message stitched from two frames cannot pass the crc check.
# It runs at most WINDOW messages ahead of the watcher's acks, so the watcher
# keeps up and the broker never has to drop for it.
BIG_PUBLISHER = """
import sys, zlib, busx
url, name, size, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bus = busx.connect(url, name=name)
acks = bus.subscribe("ack." + name)
number, acknowledged = 0, -1
while True:
    while number - acknowledged > window:
        acknowledged = acks.recv_many(timeout=30)[-1].data
    blob = number.to_bytes(8, "little") * (size // 8)
    bus.publish("big." + name, [number, zlib.crc32(blob), blob])
    number += 1
"""
WINDOW = 4

# Receives big messages, then sits with its socket full until it is killed.
# It says when the broker has its subscription: the publishers stop WINDOW
# messages ahead of acks that only come once it has received one.
BIG_SUBSCRIBER = """
import signal, sys, busx
bus = busx.connect(sys.argv[1], name="doomed-sub", max_buffer=1 << 20)
sub = bus.subscribe("big.>")
bus.flush(timeout=30)
print("subscribed", flush=True)
sub.recv(timeout=30)
print("received", flush=True)
signal.pause()
"""


@pytest.mark.timeout(120)
def test_peers_killed_mid_frame_leave_only_whole_messages_in_order(broker, tcp_url):
    with busx.connect(broker.url, name="watcher") as watcher:
        watched = watcher.subscribe("big.>")
        watcher.flush(timeout=5)
        fds_before, msgs_in_before = open_fds(), broker.stats()["msgs_in"]
        doomed_sub = spawn_python(BIG_SUBSCRIBER, broker.url)
        assert doomed_sub.stdout.readline().strip() == "subscribed", doomed_sub.stderr.read()
        publishers = {name: spawn_python(BIG_PUBLISHER, url, name, str(BIG), str(WINDOW))
                      for name, url in (("unix1", broker.url), ("unix2", broker.url),
                                        ("tcp", tcp_url))}
        received = {name: [] for name in publishers}

        def take(batch):
            for msg in batch:
                name = msg.topic.split(".")[1]
                received[name].append(msg.data)
                watcher.publish(f"ack.{name}", msg.data[0])
        try:
            assert doomed_sub.stdout.readline().strip() == "received", doomed_sub.stderr.read()

            def every_publisher_delivered(least):
                take(watched.recv_many(timeout=0.1))
                return all(len(got) >= least for got in received.values())

            wait_for(lambda: every_publisher_delivered(3), timeout=30)
            # The broker is partway through the frames it queued for doomed_sub.
            wait_for(lambda: any(c["name"] == "doomed-sub" and c["pending_bytes"] > BIG
                                 for c in broker.stats()["connections"]))
            kill(doomed_sub)
            for process in publishers.values():
                kill(process)
                every_publisher_delivered(0)   # receive while the others go on
        finally:
            for process in (doomed_sub, *publishers.values()):
                kill(process)
        while batch := watched.recv_many(timeout=0.5):
            take(batch)
        assert watched.dropped == 0
        for name, messages in received.items():
            assert [m[0] for m in messages] == list(range(len(messages))), name
            for number, crc, blob in messages:
                assert len(blob) == BIG and zlib.crc32(blob) == crc, f"{name} #{number} is torn"
        # Every message the broker accepted from the dead reached the watcher
        # (the watcher's own publishes are its acks).
        stats = broker.stats()
        (acks,) = [c["msgs_in"] for c in stats["connections"] if c["name"] == "watcher"]
        accepted = stats["msgs_in"] - msgs_in_before - acks
        assert accepted == sum(len(m) for m in received.values())
        wait_for(lambda: open_fds() <= fds_before, message="the broker kept a dead peer's fd")
        watcher.publish("big.after", [0, 0, b""])
        assert watched.recv(timeout=5).topic == "big.after"


# ---- out of file descriptors ----

# The broker's own process, with RLIMIT_NOFILE lowered before the broker
# exists: it can hold only a few connections.
LIMITED_BROKER = """
import os, resource, sys, busx
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
broker = busx.Broker(unix_path=sys.argv[1])
print("ready", flush=True)
broker.serve_forever()
"""
FD_LIMIT = 48


def greeted(sock: socket.socket, timeout: float) -> bool:
    """True when the broker's greeting (its preamble) arrives in time."""
    sock.settimeout(timeout)
    try:
        return sock.recv(8, socket.MSG_PEEK) != b""
    except TimeoutError:
        return False


def nothing_to_read(sock: socket.socket) -> bool:
    try:
        sock.recv(8, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


@pytest.mark.timeout(60)
def test_broker_out_of_fds_keeps_serving_and_accepts_again(socket_path):
    process = spawn_python(LIMITED_BROKER, socket_path, str(FD_LIMIT))
    held, waiting = [], []
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        wait_for(lambda: os.path.exists(socket_path))
        url = f"unix://{socket_path}"
        with busx.connect(url) as publisher, busx.connect(url) as subscriber:
            sub = subscriber.subscribe("fds.>")
            publisher.flush(timeout=5)
            # Fill the broker's fd table, then queue a few more connections
            # in its listen backlog: those it cannot accept.
            while open_fds(process.pid) < FD_LIMIT:
                held.append(socket.socket(socket.AF_UNIX))
                held[-1].connect(socket_path)
                assert greeted(held[-1], 10), "the broker stopped accepting below its limit"
            for _ in range(5):
                waiting.append(socket.socket(socket.AF_UNIX))
                waiting[-1].connect(socket_path)    # completes in the backlog
            publisher.publish("fds.at-limit", 1)
            assert sub.recv(timeout=5).data == 1, "existing clients must still be served"
            assert all(nothing_to_read(sock) for sock in waiting)
            assert open_fds(process.pid) == FD_LIMIT
            assert_idle(process.pid)
            assert all(nothing_to_read(sock) for sock in waiting)

            for sock in held:
                sock.close()
            assert all(greeted(sock, 10) for sock in waiting), "no accept after fds came back"
            with busx.connect(url) as late:
                late.publish("fds.late", 2)
            assert sub.recv(timeout=5).data == 2
    finally:
        for sock in held + waiting:
            sock.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, process.stderr.read()
        process.communicate()


# ---- stopping with messages in flight ----

# Reads until the broker goes away; prints the numbers it received.
RECEIVE_ALL = """
import json, sys, busx
bus = busx.connect(sys.argv[1], name="stop-sub", reconnect=False)
sub = bus.subscribe("stop.>")
print("ready", flush=True)
numbers = []
try:
    while True:
        numbers += [msg.data[0] for msg in sub.recv_many(max_count=65536, timeout=30)]
except busx.BusError as exc:
    print(json.dumps({"numbers": numbers, "error": type(exc).__name__}))
"""


@pytest.mark.timeout(60)
def test_stop_delivers_what_the_broker_accepted(socket_path):
    broker = busx.Broker(unix_path=socket_path).start()
    subscriber = spawn_python(RECEIVE_ALL, broker.url)
    try:
        assert subscriber.stdout.readline().strip() == "ready", subscriber.stderr.read()
        publisher = busx.connect(broker.url, name="stop-pub", reconnect=False)
        stop_process(subscriber.pid)    # so that the broker holds a queue for it
        try:
            count, filler = 20_000, b"x" * 1000
            publisher.publish_many(("stop.n", [i, filler]) for i in range(count))
            wait_for(lambda: any(c["name"] == "stop-sub" and c["pending_bytes"] > 1 << 20
                                 for c in broker.stats()["connections"]))
            stopper = threading.Thread(target=broker.stop)
            stopper.start()     # while the publisher still has messages unsent
        finally:
            os.kill(subscriber.pid, signal.SIGCONT)
        stopper.join(30)
        assert not stopper.is_alive()
        out, err = subscriber.communicate(timeout=30)
        assert subscriber.returncode == 0, err
        publisher.close()
    finally:
        broker.stop()
        kill(subscriber)
    report = json.loads(out)
    accepted = broker._loop.msgs_in     # what the broker routed before it stopped
    assert accepted > 0
    assert report["numbers"] == list(range(accepted)), "stop() lost messages it had accepted"
    assert report["error"] == "Disconnected"


# ---- busy polling ----

def answer_requests(bus: busx.Bus, topic: str) -> None:
    """Echo every request on topic from a daemon thread."""
    requests = bus.subscribe(topic)

    def answer():
        for msg in requests:
            msg.respond(msg.data)
    threading.Thread(target=answer, daemon=True).start()


@pytest.mark.timeout(60)
def test_the_broker_polls_only_briefly_after_request_reply_traffic(start_broker):
    # Broker(busy_poll_us=...) polls after a trickle of frames instead of
    # sleeping at once; once the traffic stops, so must the polling.
    broker = start_broker("--busy-poll-us", "1000")
    with busx.connect(broker.url) as service, busx.connect(broker.url) as client:
        answer_requests(service, "poll.echo")
        assert [client.request("poll.echo", i, timeout=5).data for i in range(300)] == \
            list(range(300))
        stats = client.stats()
        assert stats["busy_poll_hits"] > 0, "no request was caught by polling"
        assert stats["busy_poll_window_us"] > 0
        assert_idle(broker.pid)


@pytest.mark.timeout(60)
def test_the_broker_stops_polling_for_traffic_sparser_than_its_poll(start_broker):
    # Round trips grow the poll; lone messages further apart than
    # busy_poll_us shrink it to nothing, and then cost no polling at all.
    broker = start_broker("--busy-poll-us", "500")
    with busx.connect(broker.url) as service, busx.connect(broker.url) as client:
        answer_requests(service, "poll.echo")
        for i in range(100):
            client.request("poll.echo", i, timeout=5)
        assert client.stats()["busy_poll_window_us"] > 0

        ticks = client.subscribe("poll.tick")
        client.flush()

        def sparse_ticks_then_stats(count):
            # time.sleep is not synchronisation here: it is the traffic's
            # pace, and the stats request keeps that pace too.
            for i in range(count):
                time.sleep(0.005)
                service.publish("poll.tick", i)
                assert ticks.recv(timeout=5).data == i
            time.sleep(0.005)
            return client.stats()
        settled = sparse_ticks_then_stats(20)   # halves the poll from at most 500 µs to 0
        assert settled["busy_poll_window_us"] == 0
        assert sparse_ticks_then_stats(20)["busy_polls"] == settled["busy_polls"]


@pytest.mark.parametrize("value", [-1, 1_000_001])
def test_busy_poll_out_of_range_is_refused(value):
    with pytest.raises(busx.BusError, match="busy_poll_us"):
        busx.Broker(unix_path="/tmp/unused.sock", busy_poll_us=value)
