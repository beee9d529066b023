"""Brokers that die, restart, or stop on a signal, each in its own process:
reconnecting clients re-subscribe and deliver what they buffered, others
learn they were disconnected, and a live broker's socket is never taken."""

import os
import signal
import socket
import threading
import time

import pytest
from support import spawn_python, wait_for

import busx

SERVE = """
import sys, busx
busx.Broker(unix_path=sys.argv[1]).serve_forever()
"""


def accepts_connections(path):
    """True once something listens at path (a stale socket refuses)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


class BrokerProcesses:
    """Starts `busx.Broker(...).serve_forever()` processes on one path and
    kills whatever is still running at the end of the test."""

    def __init__(self, path):
        self.path = path
        self.url = f"unix://{path}"
        self.started = []

    def start(self):
        proc = spawn_python(SERVE, self.path)
        self.started.append(proc)
        # Callers start a broker only when none is live at the path, so a
        # connect that succeeds reaches this one.
        wait_for(lambda: proc.poll() is not None or accepts_connections(self.path),
                 message="the broker process did not start listening")
        assert proc.poll() is None, proc.communicate()[1]
        return proc

    def kill(self, proc):
        proc.kill()
        proc.wait(10)

    def cleanup(self):
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


def inode(path):
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


@pytest.fixture
def brokers(socket_path):
    processes = BrokerProcesses(socket_path)
    yield processes
    processes.cleanup()


def test_restarted_broker_replaces_the_stale_socket_and_clients_resubscribe(brokers):
    first = brokers.start()
    with busx.connect(brokers.url, reconnect=True) as bus:
        sub = bus.subscribe("r.>")
        bus.publish("r.before", 1)
        assert sub.recv(timeout=5).data == 1

        brokers.kill(first)
        assert os.path.exists(brokers.path), "SIGKILL leaves the socket file behind"
        brokers.start()  # would fail if the stale socket were not replaced

        with busx.connect(brokers.url) as publisher:
            wait_for(lambda: publisher.stats()["subscriptions"] == 1,
                     message="the client did not re-subscribe on the new broker")
            publisher.publish("r.after", 2)
            msg = sub.recv(timeout=10)
        assert msg.data == 2 and msg.topic == "r.after"
        bus.publish("r.own", 3)  # the reconnected connection publishes too
        assert sub.recv(timeout=5).data == 3


def test_recv_waits_through_the_outage(brokers):
    first = brokers.start()
    with busx.connect(brokers.url, reconnect=True) as bus:
        sub = bus.subscribe("w.>")
        received = []
        waiter = threading.Thread(target=lambda: received.append(sub.recv(timeout=30)))
        waiter.start()
        brokers.kill(first)
        brokers.start()
        with busx.connect(brokers.url) as publisher:
            wait_for(lambda: publisher.stats()["subscriptions"] == 1,
                     message="the client did not re-subscribe on the new broker")
            publisher.publish("w.x", "through")
            waiter.join(15)
        assert not waiter.is_alive()
        assert [m.data for m in received] == ["through"]


def test_publishes_during_the_outage_are_buffered_and_sent_after_reconnect(brokers):
    first = brokers.start()
    with busx.connect(brokers.url, reconnect=True) as bus:
        sub = bus.subscribe("buf.>")
        bus.flush(timeout=5)
        brokers.kill(first)  # after wait(): the broker's end is closed, writes cannot land
        for i in range(1000):
            bus.publish("buf.n", i)
        second = brokers.start()
        got = []
        while len(got) < 1000:
            batch = sub.recv_many(timeout=10)
            assert batch, f"only {len(got)} of 1000 buffered messages arrived"
            got += batch
        assert [m.data for m in got] == list(range(1000))
        # stamped by the new broker, which saw this process on the new connection
        assert got[0].sender.pid == os.getpid()
        assert second.poll() is None


def test_publish_blocks_while_the_buffer_is_full_during_the_outage(brokers):
    first = brokers.start()
    max_buffer, count, filler = 64 << 10, 1000, b"x" * 1000
    with busx.connect(brokers.url, reconnect=True, max_buffer=max_buffer) as bus:
        sub = bus.subscribe("full.>")
        brokers.kill(first)
        published = []

        def publish_all():
            for i in range(count):
                bus.publish("full.n", [i, filler])
                published.append(i)

        thread = threading.Thread(target=publish_all, daemon=True)
        thread.start()
        wait_for(lambda: published, message="no publish returned")
        thread.join(0.5)  # ample time for all of them, were nothing blocking
        assert thread.is_alive(), "publish never blocked with the broker down"
        assert len(published) <= max_buffer // len(filler) + 1
        brokers.start()
        got = []
        while len(got) < count:
            batch = sub.recv_many(timeout=10)
            assert batch, f"only {len(got)} of {count} messages arrived"
            got += [m.data[0] for m in batch]
        thread.join(10)
        assert got == list(range(count))


def test_recv_timeout_still_applies_during_the_outage(brokers):
    first = brokers.start()
    with busx.connect(brokers.url, reconnect=True) as bus:
        sub = bus.subscribe("t.>")
        brokers.kill(first)
        started = time.monotonic()
        with pytest.raises(busx.Timeout):
            sub.recv(timeout=1.0)
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 3.0, f"recv(timeout=1.0) returned after {elapsed:.2f}s"
        assert sub.recv_many(timeout=0.3) == []


def test_without_reconnect_recv_raises_disconnected_then_closed(brokers):
    first = brokers.start()
    bus = busx.connect(brokers.url, reconnect=False)
    sub = bus.subscribe("d.>")
    brokers.kill(first)
    started = time.monotonic()
    with pytest.raises(busx.Disconnected) as caught:
        sub.recv(timeout=10)
    assert time.monotonic() - started < 5, "Disconnected must come when the loss is seen"
    assert isinstance(caught.value, ConnectionError)
    assert "broker" in str(caught.value)
    with pytest.raises(busx.Closed):
        sub.recv(timeout=1)
    with pytest.raises(busx.Closed):
        bus.publish("d.x", 1)
    with pytest.raises(busx.Closed):
        bus.subscribe("d.y")
    bus.close()  # still idempotent
    # A broker coming back changes nothing for a closed bus.
    brokers.start()
    with pytest.raises(busx.Closed):
        bus.publish("d.x", 1)


def test_second_broker_on_a_live_path_fails_and_leaves_the_first_working(brokers):
    first = brokers.start()
    socket_inode = inode(brokers.path)
    with busx.connect(brokers.url) as bus:
        sub = bus.subscribe("live")
        for attempt in (lambda b: b.start(), lambda b: b.serve_forever()):
            second = busx.Broker(unix_path=brokers.path)
            with pytest.raises(busx.BusError) as caught:
                attempt(second)
            assert "already running" in str(caught.value)
            second.stop()  # must not remove the live broker's socket
        assert inode(brokers.path) == socket_inode
        with busx.connect(brokers.url) as other:
            other.publish("live", "still here")
        assert sub.recv(timeout=5).data == "still here"
    assert first.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_serve_forever_cleanly(brokers, signum):
    proc = brokers.start()
    bus = busx.connect(brokers.url, reconnect=False)
    sub = bus.subscribe("s")
    bus.flush(timeout=5)
    proc.send_signal(signum)
    assert proc.wait(10) == 0, proc.communicate()[1]
    assert not os.path.exists(brokers.path), "the broker left its socket file behind"
    with pytest.raises(busx.Disconnected):
        sub.recv(timeout=5)
    bus.close()


def test_close_during_the_outage_returns_promptly(brokers):
    # Several buses, so that at least one is closed early in a long backoff
    # pause (each pause is randomised).
    first = brokers.start()
    buses = [busx.connect(brokers.url, reconnect=True) for _ in range(4)]
    brokers.kill(first)
    time.sleep(2.0)  # not synchronisation: the outage must last for the backoff to grow
    durations = []

    def timed_close(bus):
        started = time.monotonic()
        bus.close()
        durations.append(time.monotonic() - started)

    closers = [threading.Thread(target=timed_close, args=(bus,)) for bus in buses]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(10)
    assert len(durations) == len(buses)
    assert max(durations) < 0.5, f"close() took {max(durations):.2f}s during an outage"


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(60)
def test_buffered_memfd_payloads_and_fds_survive_a_move_to_a_tcp_broker(brokers, tmp_path):
    # Published while no broker is up, these carry a payload memfd and one
    # of the user's fds; the next broker in the list is reached over TCP,
    # which carries neither: payloads go inline, fds are counted lost.
    first = brokers.start()
    tcp_url = f"tcp://127.0.0.1:{free_tcp_port()}"
    with busx.connect([brokers.url, tcp_url], reconnect=True) as bus:
        sub = bus.subscribe("big.moved")    # renewed before the buffered publishes
        brokers.kill(first)
        read_end, write_end = os.pipe()
        payloads = [os.urandom(1 << 20) for _ in range(3)]
        for payload in payloads:
            bus.publish("big.moved", payload, fds=[read_end])
        os.close(read_end)
        os.close(write_end)
        port = int(tcp_url.rsplit(":", 1)[1])
        with busx.Broker(unix_path=str(tmp_path / "other.sock"), tcp=("127.0.0.1", port)):
            got = [sub.recv(timeout=20) for _ in payloads]
            assert bus.transport == "tcp"
            assert [m.data for m in got] == payloads
            assert [(m.fds, m.fds_lost) for m in got] == [((), 1)] * 3
            bus.publish("big.moved", b"after")      # and the connection stays up
            assert sub.recv(timeout=10).data == b"after"
