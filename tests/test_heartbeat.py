"""Heartbeats (SPEC.md, Heartbeats): both ends PING a connection they have
sent nothing on for `heartbeat` seconds and treat one they heard nothing from
for 3 x heartbeat as dead; 0 turns them off. Tested for real: a network path
cut between two network namespaces, a broker frozen with SIGSTOP, raw peers
that fall silent, and idle, busy or back-pressured connections that must
stay up."""

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from netns import NamespacePair, check, ip, is_up, two_hosts
from support import BrokerProcess, RawPeer, stop_process, wait_for

import busx
from busx import protocol

FRAME = protocol.HEADER_SIZE        # an empty PING or PONG on the wire
SCHEDULING = 1.0                    # seconds allowed beyond a bound for threads to be scheduled


# ---- two hosts, and a client process on the other one ----

@pytest.fixture
def hosts():
    with two_hosts() as pair:
        yield pair


def set_broker_link(hosts: NamespacePair, up: bool) -> None:
    """Take the broker's end of the veth pair down (the path is cut, and the
    client's end loses its carrier) or back up. No error reaches either
    socket: TCP just stops getting through, as when a cable is pulled."""
    check(ip("-n", hosts.broker_ns, "link", "set", hosts.broker_if, "up" if up else "down"))
    if up:
        for ns, interface in ((hosts.broker_ns, hosts.broker_if),
                              (hosts.client_ns, hosts.client_if)):
            wait_for(lambda ns=ns, interface=interface: is_up(ns, interface),
                     message=f"{interface} in {ns} did not come back up")


# Runs in the client's namespace. Reports what it sees as JSON lines on
# stdout, each with its CLOCK_MONOTONIC time (the same clock in every
# process); takes commands as JSON lines on stdin until stdin closes.
REMOTE = """
import json, logging, sys, threading, time
import busx
url, heartbeat = sys.argv[1], float(sys.argv[2])
out = threading.Lock()

def report(event, **fields):
    with out:
        print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)

class Reporter(logging.Handler):
    def emit(self, record):
        report("log", logger=record.name, message=record.getMessage())

logging.getLogger("busx").addHandler(Reporter())
logging.getLogger("busx").setLevel(logging.INFO)
bus = busx.connect(url, name="remote", heartbeat=heartbeat, timeout=2.0, max_buffer=64 << 10)
sub = bus.subscribe("hb.>")
report("ready", generation=bus.generation)

def watch():
    generation = bus.generation
    while not bus.closed:
        if bus.generation != generation:
            generation = bus.generation
            report("generation", value=generation)
        time.sleep(0.005)

def receive():
    try:
        for msg in sub:
            report("msg", topic=msg.topic, data=msg.data)
    except Exception as exc:
        report("error", where="receive", error=repr(exc))

threading.Thread(target=watch, daemon=True).start()
threading.Thread(target=receive, daemon=True).start()
for line in sys.stdin:
    command = json.loads(line)
    if command["do"] == "publish":
        for i in range(command["count"]):
            bus.publish(command["topic"], i)
        report("published", count=command["count"], generation=bus.generation)
bus.close()
"""


class Remote:
    """The client process in the client's namespace; a thread collects its
    reports."""

    def __init__(self, hosts: NamespacePair, url: str, heartbeat: float, stderr_path: str) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", hosts.client_ns, sys.executable, "-c",
                 textwrap.dedent(REMOTE), url, str(heartbeat)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.events: list[dict] = []
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.events.append(json.loads(line))

    def find(self, event: str, where=lambda e: True) -> dict | None:
        return next((e for e in list(self.events) if e["event"] == event and where(e)), None)

    def wait(self, event: str, where=lambda e: True, timeout: float = 10.0, message: str = ""):
        return wait_for(lambda: self.find(event, where) or self._check_alive(), timeout=timeout,
                        message=f"{message or event}; the client reported {self.events}; "
                                f"its stderr: {self.stderr()}")

    def _check_alive(self) -> None:
        assert self.process.poll() is None, f"the client exited: {self.stderr()} {self.events}"

    def received(self, topic: str) -> list:
        return [e["data"] for e in list(self.events) if e["event"] == "msg" and e["topic"] == topic]

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def stderr(self) -> str:
        with open(self.stderr_path) as stderr:
            return stderr.read()

    def stop(self) -> None:
        """Close stdin (the client closes its bus and exits), or kill it."""
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.reader.join(10)
        self.process.stdout.close()


@pytest.fixture
def cut_path(hosts, tmp_path):
    """A `busx serve --heartbeat 0.5` in the broker's namespace (on TCP at its
    veth address, and on a UNIX socket this test process reaches, since a
    socket file belongs to no network namespace), an observer connected
    over that socket, and a function that starts the remote client."""
    heartbeat = 0.5
    directory = tmp_path / "broker"
    directory.mkdir()
    broker = BrokerProcess(str(directory), "--tcp", f"{hosts.broker_addr}:0",
                           "--allow-anonymous-tcp", "--heartbeat", str(heartbeat),
                           prefix=("ip", "netns", "exec", hosts.broker_ns))
    remotes: list[Remote] = []
    try:
        found = re.search(r"tcp://\[?([^\]\s]+?)\]?:(\d+)", broker.log())
        assert found, broker.log()
        url = f"tcp://{found.group(1)}:{found.group(2)}"

        def start_remote() -> Remote:
            remotes.append(Remote(hosts, url, heartbeat, str(tmp_path / "remote.err")))
            return remotes[-1]

        with busx.connect(broker.url, name="observer") as observer:
            yield heartbeat, broker, observer, start_remote
    finally:
        set_broker_link(hosts, True)    # a broker behind a cut path would wait to drain
        for remote in remotes:
            remote.stop()
        broker.stop()


def remote_connection(stats: dict) -> dict | None:
    return next((c for c in stats["connections"] if c["name"] == "remote"), None)


def cut_until_both_notice(hosts, heartbeat, observer, remote, subscriptions_left: int) -> None:
    """Cut the path, then watch both ends until each has given the other up,
    each within its bound. subscriptions_left: the observer's own."""
    cut_at = time.monotonic()
    set_broker_link(hosts, False)
    deadline = cut_at + 3.25 * heartbeat + 2.0
    freed_at = None
    while time.monotonic() < deadline:
        stats = observer.stats(timeout=5)
        if (freed_at is None and remote_connection(stats) is None
                and stats["subscriptions"] == subscriptions_left
                and stats["heartbeat_timeouts"] >= 1):
            freed_at = time.monotonic()
        if freed_at is not None and remote.find("log", lambda e: "reconnecting" in e["message"]):
            break
        time.sleep(0.01)
    notice = remote.find("log", lambda e: "reconnecting" in e["message"])
    assert notice is not None, (f"the client did not notice the cut within "
                                f"{deadline - cut_at:.2f}s: {remote.events} {remote.stderr()}")
    assert freed_at is not None, (f"the broker did not free the dead client within "
                                  f"{deadline - cut_at:.2f}s: {observer.stats()}")
    # Found by silence: nothing else tells either end that the path is gone.
    assert "sent nothing for" in notice["message"], notice
    assert notice["logger"].startswith("busx"), notice
    noticed = notice["t"] - cut_at
    # The broker was heard at most about a heartbeat before the cut.
    assert 2 * heartbeat - 0.2 <= noticed <= 3 * heartbeat + SCHEDULING, \
        f"the client noticed {noticed:.2f}s after the cut (heartbeat {heartbeat}s)"
    assert freed_at - cut_at <= 3.25 * heartbeat + SCHEDULING, \
        f"the broker freed the dead client {freed_at - cut_at:.2f}s after the cut"
    assert "heartbeat" in notice["message"], notice


def wait_resubscribed(observer, remote, generation: int) -> None:
    remote.wait("generation", lambda e: e["value"] > generation, timeout=10,
                message="the client did not reconnect once the path was back")
    wait_for(lambda: (remote_connection(observer.stats(timeout=5)) or {}).get("subscriptions") == 1,
             timeout=10, message="the client did not re-subscribe after reconnecting")


@pytest.mark.timeout(60)
def test_a_cut_path_is_noticed_by_both_ends_and_the_client_comes_back(hosts, cut_path):
    heartbeat, broker, observer, start_remote = cut_path
    remote = start_remote()
    generation = remote.wait("ready", timeout=15, message="the client did not connect")["generation"]
    wait_for(lambda: (remote_connection(observer.stats()) or {}).get("subscriptions") == 1,
             message="the broker does not show the client's subscription")
    observer.publish("hb.before", "up")
    remote.wait("msg", lambda e: e["topic"] == "hb.before", message="the path does not work")
    assert observer.stats()["heartbeat_timeouts"] == 0

    cut_until_both_notice(hosts, heartbeat, observer, remote, subscriptions_left=0)
    assert observer.stats()["heartbeat_timeouts"] == 1

    set_broker_link(hosts, True)
    wait_resubscribed(observer, remote, generation)
    count = 200
    for i in range(count):
        observer.publish("hb.after", i)
    observer.flush(timeout=5)
    wait_for(lambda: len(remote.received("hb.after")) >= count, timeout=10,
             message="not every message published after the reconnect arrived")
    assert remote.received("hb.after") == list(range(count))
    # One reconnect: the attempts that failed while the path was cut made no connection.
    assert [e["value"] for e in remote.events if e["event"] == "generation"] == [generation + 1]
    assert not remote.find("error"), remote.events


@pytest.mark.timeout(60)
def test_publishes_made_while_the_path_is_cut_are_sent_after_the_reconnect(hosts, cut_path):
    # SPEC.md, Guarantees (Reconnect): once the client has given up the
    # connection, publishes are buffered up to max_buffer (64 KiB here; these
    # take a few KiB) and sent after reconnecting. Frames the kernel took
    # before the loss was noticed die with that connection (at most once).
    heartbeat, broker, observer, start_remote = cut_path
    watcher = observer.subscribe("cut.>")
    remote = start_remote()
    generation = remote.wait("ready", timeout=15, message="the client did not connect")["generation"]
    wait_for(lambda: remote_connection(observer.stats()) is not None,
             message="the broker does not show the client")

    cut_until_both_notice(hosts, heartbeat, observer, remote, subscriptions_left=1)
    count = 500
    remote.send(do="publish", topic="cut.n", count=count)
    published = remote.wait("published", timeout=5,
                            message="publish blocked although the buffer had room")
    assert published["generation"] == generation, "the path is cut: no connection can exist"
    assert watcher.recv_many(timeout=0.2) == [], "nothing can cross a cut path"

    set_broker_link(hosts, True)
    wait_resubscribed(observer, remote, generation)
    got = []
    while len(got) < count:
        batch = watcher.recv_many(timeout=10)
        assert batch, f"only {len(got)} of {count} buffered publishes arrived"
        got += batch
    assert [m.data for m in got] == list(range(count))
    assert got[0].sender.address[0] == hosts.client_addr
    assert watcher.recv_many(timeout=0.2) == [], "a buffered publish arrived twice"


# ---- a broker frozen by SIGSTOP ----

@pytest.fixture
def busx_log(caplog):
    """The text of every busx log line at INFO and above."""
    caplog.set_level(logging.INFO, logger="busx")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("busx")]


@pytest.mark.timeout(60)
def test_a_frozen_broker_is_noticed_and_the_client_reconnects_after_it_thaws(start_broker,
                                                                            busx_log):
    heartbeat = 0.3
    broker = start_broker("--heartbeat", str(heartbeat))
    with busx.connect(broker.url, heartbeat=heartbeat, timeout=1.0) as bus, \
            busx.connect(broker.url, heartbeat=heartbeat, reconnect=False) as once:
        sub = bus.subscribe("frozen.>")
        once_sub = once.subscribe("frozen.>")
        bus.publish("frozen.before", 1)
        assert sub.recv(timeout=5).data == 1 and once_sub.recv(timeout=5).data == 1
        generation = bus.generation
        frozen_at = time.monotonic()
        stop_process(broker.pid)
        try:
            noticed = wait_for(
                lambda: next((line for line in busx_log() if "reconnecting" in line), None),
                timeout=3 * heartbeat + 2,
                message="the client did not notice that the broker sends nothing")
            noticed_after = time.monotonic() - frozen_at
            assert "sent nothing for" in noticed, noticed
            assert noticed_after <= 3 * heartbeat + SCHEDULING, \
                f"noticed {noticed_after:.2f}s after the broker froze (heartbeat {heartbeat}s)"
            # Without reconnect, recv says why the connection is gone.
            with pytest.raises(busx.Disconnected, match="sent nothing for"):
                once_sub.recv(timeout=2)
            assert "sent nothing for" in once._lost_reason
            assert bus.generation == generation, "a frozen broker cannot complete a handshake"
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        wait_for(lambda: bus.generation > generation, timeout=10,
                 message="the client did not reconnect to the thawed broker")
        bus.publish("frozen.after", 2)              # on the subscription it renewed
        assert sub.recv(timeout=5).data == 2
        fresh = bus.subscribe("thawed.>")           # and a new round trip
        bus.publish("thawed.x", 3)
        assert fresh.recv(timeout=5).data == 3
        bus.flush(timeout=5)


@pytest.mark.timeout(60)
def test_what_a_lost_connection_had_not_delivered_is_counted(start_broker, busx_log):
    # Published into a frozen broker's socket before the client noticed:
    # written, never taken. At most once - but never silently.
    heartbeat = 0.3
    broker = start_broker("--heartbeat", str(heartbeat))
    with busx.connect(broker.url, heartbeat=heartbeat) as bus:
        bus.flush()
        stop_process(broker.pid)
        try:
            for i in range(50):
                bus.publish("frozen.unseen", i)
            wait_for(lambda: any("reconnecting" in line for line in busx_log()),
                     timeout=3 * heartbeat + 2, message="the client did not notice the freeze")
            lost = bus.counters["bytes_lost_in_flight"]
            assert 50 * len(b"frozen.unseen") < lost < 50 * 200, lost
            noticed = next(line for line in busx_log() if "reconnecting" in line)
            assert f"{lost} bytes written before it had not reached the broker" in noticed
        finally:
            os.kill(broker.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_a_broker_stopped_for_a_while_keeps_its_quiet_clients(start_broker):
    # A client with heartbeats off says nothing unless asked. A broker that
    # was itself stopped for longer than 3 heartbeats asked nothing, so the
    # silence it slept through must not count against the client.
    heartbeat = 0.3
    broker = start_broker("--heartbeat", str(heartbeat))
    with busx.connect(broker.url, heartbeat=0, reconnect=False, name="quiet") as quiet, \
            busx.connect(broker.url, heartbeat=0, name="observer") as observer:
        sub = quiet.subscribe("quiet.>")
        quiet.flush()
        stop_process(broker.pid)
        try:
            stopped_until = time.monotonic() + 6 * heartbeat     # the stimulus: a long stop
            while time.monotonic() < stopped_until:
                time.sleep(heartbeat / 4)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        judged_until = time.monotonic() + 4 * heartbeat          # sweeps after waking
        while time.monotonic() < judged_until:
            stats = observer.stats()
            assert stats["heartbeat_timeouts"] == 0, "the woken broker cut a quiet client"
            assert "quiet" in [c["name"] for c in stats["connections"]]
        quiet.publish("quiet.still", 1)
        assert sub.recv(timeout=5).data == 1


# ---- healthy connections stay up ----

def connection_of(broker: busx.Broker, name: str) -> dict:
    [conn] = [c for c in broker.stats()["connections"] if c["name"] == name]
    return conn


def stays_up(broker: busx.Broker, bus: busx.Bus, name: str, seconds: float) -> dict:
    """Watch for `seconds`: the broker times nothing out and the client never
    reconnects. Returns the bytes that crossed each way meanwhile."""
    generation = bus.generation
    before = connection_of(broker, name)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert broker.stats()["heartbeat_timeouts"] == 0, "the broker gave up a live client"
        assert bus.generation == generation, "the client gave up a live broker and reconnected"
        time.sleep(0.02)        # pacing the watch; the assertions are the point
    after = connection_of(broker, name)
    assert after["id"] == before["id"]
    return {way: after[way] - before[way] for way in ("bytes_in", "bytes_out")}


# (broker heartbeat, client heartbeat, transport): an idle connection must
# survive either end having heartbeats off, or a heartbeat far longer than
# the other's: the shorter one's PINGs are answered. Which transport carries
# them matters only once.
CASES = [(0.2, 0.2, "unix"), (0.2, 0.2, "tcp"), (0.2, 0, "unix"), (0.2, 5.0, "unix"),
         (0, 0.2, "unix"), (5.0, 0.2, "unix")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("broker_heartbeat, client_heartbeat, transport", CASES,
                         ids=[f"broker{b}-client{c}-{t}" for b, c, t in CASES])
def test_an_idle_healthy_connection_stays_up(socket_path, broker_heartbeat, client_heartbeat,
                                             transport):
    heartbeat = min(h for h in (broker_heartbeat, client_heartbeat) if h)
    with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0),
                     heartbeat=broker_heartbeat) as broker:
        host, port = broker.tcp_address
        url = broker.url if transport == "unix" else f"tcp://{host}:{port}"
        with busx.connect(url, name="idle", heartbeat=client_heartbeat) as bus:
            sub = bus.subscribe("idle.>")
            assert bus.transport == transport
            crossed = stays_up(broker, bus, "idle", 10 * heartbeat)
            # Heartbeats did flow both ways (a PING each heartbeat, answered):
            # the connection was kept up, not merely left alone.
            assert crossed["bytes_in"] >= 5 * FRAME and crossed["bytes_out"] >= 5 * FRAME, crossed
            bus.publish("idle.x", "still here")
            assert sub.recv(timeout=5).data == "still here"
            assert broker.stats()["heartbeat_timeouts"] == 0


@pytest.mark.timeout(30)
def test_a_client_that_pauses_reading_does_not_judge_the_broker_dead(socket_path):
    # The subscriber's buffer fills and it stops reading its socket: what the
    # broker sends it waits, unread, for ten heartbeats. That silence is its
    # own doing, not the broker's.
    heartbeat, count, payload = 0.2, 3000, b"x" * 1000
    with busx.Broker(unix_path=socket_path, heartbeat=heartbeat) as broker, \
            busx.connect(broker.url, name="paused", heartbeat=heartbeat,
                         max_buffer=64 << 10) as bus, \
            busx.connect(broker.url, name="publisher", heartbeat=heartbeat) as publisher:
        sub = bus.subscribe("bp.>")
        for i in range(count):
            publisher.publish("bp.n", [i, payload])
        publisher.flush(timeout=10)
        wait_for(lambda: connection_of(broker, "paused")["pending_bytes"] > 1 << 20,
                 message="the broker holds nothing for the paused subscriber")
        stays_up(broker, bus, "paused", 10 * heartbeat)
        got = []
        while len(got) < count:
            batch = sub.recv_many(timeout=10)
            assert batch, f"only {len(got)} of {count} messages arrived"
            got += [m.data[0] for m in batch]
        assert got == list(range(count))
        assert sub.dropped == 0


@pytest.mark.timeout(30)
def test_a_subscriber_over_max_pending_that_stops_reading_is_not_cut_by_heartbeats(socket_path):
    # slow_consumer="drop" keeps a subscriber that does not keep up, dropping
    # (and counting) what does not fit max_pending. Its heartbeat PINGs keep
    # arriving while it does not read; a heartbeat judges whether the peer is
    # there, not whether it reads.
    heartbeat, payload = 0.2, b"x" * 1000
    with busx.Broker(unix_path=socket_path, heartbeat=heartbeat, max_pending=256 << 10,
                     slow_consumer="drop") as broker, \
            busx.connect(broker.url, name="slow", heartbeat=heartbeat,
                         max_buffer=64 << 10) as bus, \
            busx.connect(broker.url, name="publisher", heartbeat=heartbeat) as publisher:
        sub = bus.subscribe("slow.>")
        sent = 0
        while broker.stats()["dropped"] == 0:
            publisher.publish_many(("slow.n", [sent + i, payload]) for i in range(100))
            sent += 100
            publisher.flush(timeout=10)
        stays_up(broker, bus, "slow", 10 * heartbeat)
        got = []
        while batch := sub.recv_many(timeout=1):
            got += [m.data[0] for m in batch]
        assert got == sorted(got) and len(got) + sub.dropped == sent
        publisher.publish("slow.n", ["after", b""])
        assert sub.recv(timeout=5).data[0] == "after"
        assert broker.stats()["heartbeat_timeouts"] == 0


# ---- busy connections: traffic one way is no answer from the other ----

def one_way_stream(publisher: busx.Bus, sub: busx.Subscription, seconds: float) -> list:
    """Publish numbered messages every few milliseconds for `seconds`, so
    the publisher is never idle, reading them back at sub as they come."""
    got: list = []
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        publisher.publish("busy.n", sent)
        sent += 1
        got += [m.data for m in sub.recv_many(timeout=0)]
        time.sleep(0.005)       # pacing the stream
    while len(got) < sent and (batch := sub.recv_many(timeout=5)):
        got += [m.data for m in batch]
    assert got == list(range(sent)), f"{sent - len(got)} of {sent} messages lost"
    return got


@pytest.mark.timeout(30)
@pytest.mark.parametrize("client_heartbeat", [0.2, 0, 5.0])
def test_a_busy_subscriber_is_not_cut_whatever_its_heartbeat(socket_path, client_heartbeat):
    # The broker sends to it all the time and so never PINGs it; the
    # subscriber publishes nothing. It is there all the same.
    heartbeat = 0.2
    with busx.Broker(unix_path=socket_path, heartbeat=heartbeat) as broker, \
            busx.connect(broker.url, name="busy", heartbeat=client_heartbeat) as bus, \
            busx.connect(broker.url, name="publisher", heartbeat=heartbeat) as publisher:
        sub = bus.subscribe("busy.>")
        generation = bus.generation
        one_way_stream(publisher, sub, 10 * heartbeat)
        assert broker.stats()["heartbeat_timeouts"] == 0, "the broker cut a busy subscriber"
        assert bus.generation == generation


@pytest.mark.timeout(30)
@pytest.mark.parametrize("broker_heartbeat", [0.2, 0, 5.0])
def test_a_busy_publisher_does_not_judge_a_quiet_broker_dead(socket_path, broker_heartbeat):
    # The publisher sends all the time and so never PINGs; the broker has
    # nothing to send it. The broker is there all the same. (The subscriber
    # shares the broker's heartbeat, so nothing else is at stake.)
    heartbeat = 0.2
    with busx.Broker(unix_path=socket_path, heartbeat=broker_heartbeat) as broker, \
            busx.connect(broker.url, name="publisher", heartbeat=heartbeat) as publisher, \
            busx.connect(broker.url, name="subscriber", heartbeat=broker_heartbeat) as bus:
        sub = bus.subscribe("busy.>")
        generation = publisher.generation
        one_way_stream(publisher, sub, 10 * heartbeat)
        assert publisher.generation == generation, "the publisher gave up a live broker"
        assert broker.stats()["heartbeat_timeouts"] == 0


# ---- raw peers: what the broker sends a silent connection ----

def handshaken(broker) -> RawPeer:
    peer = RawPeer(broker, "unix")
    peer.handshake()
    return peer


def connection_count(broker) -> int:
    return len(broker.stats()["connections"])


@pytest.mark.timeout(30)
def test_the_broker_pings_a_silent_peer_then_closes_it(socket_path):
    heartbeat = 0.2
    with busx.Broker(unix_path=socket_path, heartbeat=heartbeat) as broker:
        peer = handshaken(broker)
        heard_at = time.monotonic()     # the peer's last words (CONNECT) are behind it
        assert connection_count(broker) == 1
        first = peer.next_frame()
        assert first.kind == protocol.PING, first
        assert time.monotonic() - heard_at <= 1.25 * heartbeat + SCHEDULING
        rest = peer.frames_until_closed()
        closed_after = time.monotonic() - heard_at
        assert 3 * heartbeat - 0.1 <= closed_after <= 3.25 * heartbeat + SCHEDULING, \
            f"closed {closed_after:.2f}s after the peer fell silent (heartbeat {heartbeat}s)"
        assert {f.kind for f in rest} <= {protocol.PING}, rest
        assert len(rest) >= 1, "one PING a heartbeat: at least two in three heartbeats"
        wait_for(lambda: connection_count(broker) == 0, message="the peer is still in stats")
        stats = broker.stats()
        assert stats["heartbeat_timeouts"] == 1 and stats["subscriptions"] == 0


@pytest.mark.timeout(30)
def test_a_raw_peer_that_answers_pings_stays(socket_path):
    heartbeat = 0.2
    with busx.Broker(unix_path=socket_path, heartbeat=heartbeat) as broker:
        peer = handshaken(broker)
        peer.send(protocol.encode_frame(protocol.SUB, b"raw.>", id=1))
        assert peer.next_frame().kind == protocol.OK
        peer.sock.settimeout(0.05)
        answered = 0
        deadline = time.monotonic() + 10 * heartbeat
        while time.monotonic() < deadline:
            try:
                chunk = peer.sock.recv(65536)
            except TimeoutError:
                continue
            assert chunk, "the broker closed a peer that answers every PING"
            for frame in peer.decoder.feed(chunk):
                assert frame.kind == protocol.PING, frame
                peer.send(protocol.encode_frame(protocol.PONG))
                answered += 1
        assert answered >= 5, f"{answered} PINGs in ten heartbeats"
        stats = broker.stats()
        assert stats["heartbeat_timeouts"] == 0 and stats["subscriptions"] == 1
        assert connection_count(broker) == 1


# ---- heartbeat=0 turns heartbeats off ----

def watch_raw_peer(peer: RawPeer, seconds: float) -> tuple[list, float | None]:
    """What the broker sends peer within seconds, and when (seconds from
    now) it closed the connection, or None if it did not."""
    frames: list = []
    started = time.monotonic()
    while (left := seconds - (time.monotonic() - started)) > 0:
        peer.sock.settimeout(left)
        try:
            chunk = peer.recv()
        except TimeoutError:
            break
        if not chunk:
            return frames, time.monotonic() - started
        frames += peer.decoder.feed(chunk)
    return frames, None


@pytest.mark.timeout(30)
def test_heartbeats_from_a_client_that_stopped_reading_never_stop_its_input(socket_path):
    # A subscriber that stopped reading holds nearly max_pending queued at
    # the broker; its heartbeat PINGs keep coming. They must neither pile
    # PONGs onto that queue nor pause its input: what it sends after them
    # is still routed.
    max_pending = 64 << 10
    with busx.Broker(unix_path=socket_path, max_pending=max_pending, heartbeat=5) as broker, \
            busx.connect(broker.url) as publisher, busx.connect(broker.url) as watcher:
        watched = watcher.subscribe("after.>")
        watcher.flush()
        stalled = RawPeer(broker, "unix")
        stalled.handshake()
        stalled.send(protocol.encode_frame(protocol.SUB, b"fill.>", id=1))
        wait_for(lambda: broker.stats()["subscriptions"] == 2)

        def queue_is_full():
            publisher.publish_many(("fill.x", b"y" * 200) for _ in range(200))
            publisher.flush()
            return any(c["pending_bytes"] > max_pending - 1024
                       for c in broker.stats()["connections"])

        wait_for(queue_is_full, timeout=20, message="the stalled subscriber's queue never filled")
        heartbeat = protocol.encode_frame(protocol.PING)        # id 0: a heartbeat
        stalled.send(heartbeat * 200 + protocol.encode_frame(protocol.PUB, b"after.ping",
                                                              payload=b"\xa2ok"))
        assert watched.recv(timeout=5).data == "ok"
        assert broker.stats()["heartbeat_timeouts"] == 0


@pytest.mark.timeout(30)
def test_a_client_that_does_not_answer_pings_is_never_judged(socket_path):
    # An older client says nothing about heartbeats in CONNECT and would not
    # answer a PING: the broker neither PINGs it nor takes its silence for
    # death, so a rolling upgrade cuts no one.
    heartbeat = 0.1
    with busx.Broker(unix_path=socket_path, heartbeat=heartbeat) as broker:
        older = RawPeer(broker, "unix")
        older.handshake({})
        frames, closed_after = watch_raw_peer(older, 10 * heartbeat)
        assert closed_after is None, f"closed after {closed_after:.2f}s"
        assert frames == [], frames
        assert connection_count(broker) == 1
        assert broker.stats()["heartbeat_timeouts"] == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how, heartbeat", [("Broker", 0), ("busx serve", 0), ("Broker", 0.1)],
                         ids=["Broker(heartbeat=0)", "serve--heartbeat-0", "Broker(heartbeat=0.1)"])
def test_heartbeat_zero_leaves_a_silent_peer_alone(socket_path, start_broker, how, heartbeat):
    # Contrast: with heartbeat 0.1 the same second brings PINGs and a close.
    watch = 1.0
    with contextlib.ExitStack() as running:
        if how == "busx serve":
            broker = start_broker("--heartbeat", str(heartbeat))
            stats = running.enter_context(busx.connect(broker.url, name="observer",
                                                       heartbeat=0)).stats
        else:
            broker = running.enter_context(busx.Broker(unix_path=socket_path,
                                                       heartbeat=heartbeat))
            stats = broker.stats
        peer = handshaken(broker)
        frames, closed_after = watch_raw_peer(peer, watch)
        if heartbeat:
            assert frames and {f.kind for f in frames} == {protocol.PING}, frames
            assert closed_after is not None, f"a silent peer outlived {watch / heartbeat:g} heartbeats"
            wait_for(lambda: stats()["heartbeat_timeouts"] == 1,
                     message="the closed peer is not counted")
        else:
            assert frames == [] and closed_after is None, (frames, closed_after)
            found = stats()
            assert found["heartbeat_timeouts"] == 0
            assert [c["name"] for c in found["connections"]].count(None) == 1, found


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["connect(heartbeat=0)", "connect(heartbeat=None)",
                                 "Bus(heartbeat=0)", "connect(heartbeat=0.1)",
                                 "Bus(heartbeat=0.1)", "aio.connect(heartbeat=0.1)"])
def test_a_client_sends_pings_only_with_heartbeats_on(socket_path, how):
    # The broker's heartbeats are off, so whatever the client's connection
    # delivers while idle is its own PINGs.
    heartbeat = None if "None" in how else float(how.split("=")[1].rstrip(")"))
    watch = 1.0
    with busx.Broker(unix_path=socket_path, heartbeat=0) as broker:
        if how.startswith("aio"):
            crossed = asyncio.run(aio_idle(broker, heartbeat, watch))
        else:
            make = busx.Bus if how.startswith("Bus") else busx.connect
            with make(broker.url, name="client", heartbeat=heartbeat) as bus:
                bus.flush(timeout=5)
                crossed = stays_up(broker, bus, "client", watch)
        if heartbeat:
            # A PING each 0.1 s: about ten in the second (each answered).
            assert crossed["bytes_in"] >= 5 * FRAME, crossed
            # each PING gets its PONG (the last may still be on its way)
            assert abs(crossed["bytes_out"] - crossed["bytes_in"]) <= FRAME, crossed
        else:
            assert crossed == {"bytes_in": 0, "bytes_out": 0}, crossed


async def aio_idle(broker, heartbeat, seconds) -> dict:
    bus = await busx.aio.connect(broker.url, name="client", heartbeat=heartbeat)
    try:
        before = connection_of(broker, "client")
        await asyncio.sleep(seconds)        # the idle time measured
        after = connection_of(broker, "client")
        assert broker.stats()["heartbeat_timeouts"] == 0
        return {way: after[way] - before[way] for way in ("bytes_in", "bytes_out")}
    finally:
        await bus.close()

