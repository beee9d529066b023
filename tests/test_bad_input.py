"""Hostile and broken peers over raw sockets. Each gets a clear fatal ERROR
(when it is still there to read one) and loses only its own connection, while
a well-behaved publisher and subscriber keep working and lose nothing."""

import json
import os
import signal
import socket
import struct

import msgpack
import pytest
from support import RawPeer, open_fds, spawn_python, wait_for

import busx
from busx import protocol
from busx.handshake import pack, unpack

ROUNDS = 1000       # messages the good pair exchanges before and after each attack


def assert_fatal_error(frames, code):
    """The broker's last words: one fatal ERROR saying what went wrong."""
    assert [f.kind for f in frames] == [protocol.ERROR], frames
    error = frames[0]
    assert error.flags & protocol.FATAL
    body = msgpack.unpackb(error.payload)
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]


@pytest.fixture
def good_pair(broker, tcp_url):
    """A TCP publisher and a UNIX subscriber that must not notice any attack.
    Yields a function that runs an attack between two bursts of messages and
    checks that every message arrived, in order."""
    with busx.connect(tcp_url, name="good-pub") as publisher, \
            busx.connect(broker.url, name="good-sub") as subscriber:
        sub = subscriber.subscribe("good.>")
        publisher.flush(timeout=5)

        def around(attack):
            baseline = open_fds()
            connections = connection_ids(broker)
            publisher.publish_many(("good.before", i) for i in range(ROUNDS))
            attack()
            publisher.publish_many(("good.after", ROUNDS + i) for i in range(ROUNDS))
            got = []
            while len(got) < 2 * ROUNDS:
                batch = sub.recv_many(timeout=10)
                assert batch, f"only {len(got)} messages arrived"
                got += [m.data for m in batch]
            assert got == list(range(2 * ROUNDS))
            assert sub.dropped == 0
            # The attacker's connection is gone on the broker's side too
            # (the broker runs in this process, so its fds are ours).
            wait_for(lambda: open_fds() <= baseline, message="broker kept the attacker's fd")
            assert open_fds() == baseline
            assert connection_ids(broker) == connections

        yield around


def connection_ids(broker):
    return sorted(c["id"] for c in broker.stats()["connections"])


def header(size=12, kind=protocol.PUB, topic_len=0, nfds=0, reserved=0):
    return protocol.HEADER.pack(size, kind, 0, topic_len, 0, 0, nfds, 0, reserved, 0)


def pub(topic, data=1, **fields):
    return protocol.encode_frame(protocol.PUB, topic, msgpack.packb(data), **fields)


# (name, complete the handshake first?, bytes sent, expected error code)
ATTACKS = [
    ("wrong-magic", False, b"BUSY\x01\x00\x00\x00", "protocol"),
    ("wrong-version", False, b"BUSX\x02\x00\x00\x00", "protocol"),
    ("garbage", False, b"\x00\xff garbage \x13\x37" * 100, "protocol"),
    ("http", False, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol"),
    ("pub-before-connect", False, protocol.PREAMBLE + pub(b"good.sneaky"), "protocol"),
    ("ping-before-connect", False,
     protocol.PREAMBLE + protocol.encode_frame(protocol.PING, id=1), "protocol"),
    ("connect-not-msgpack", False,
     protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT, payload=b"\xc1"), "protocol"),
    ("connect-not-a-map", False,
     protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT, payload=pack([1])), "protocol"),
    ("absurd-length-in-handshake", False, protocol.PREAMBLE + b"\xff\xff\xff\xff", "too-large"),
    ("absurd-length", True, b"\xff\xff\xff\xff", "too-large"),
    ("just-over-max-frame", True, struct.pack("<I", protocol.DEFAULT_MAX_FRAME - 3), "too-large"),
    ("size-below-header", True, struct.pack("<I", 3) + b"\0" * 12, "protocol"),
    ("reserved-byte-set", True, header(reserved=1), "protocol"),
    ("sections-longer-than-frame", True, header(topic_len=5), "protocol"),
    ("nfds-over-251", True, header(nfds=protocol.MAX_FDS_ON_WIRE + 1), "protocol"),
    ("received-without-its-count", True, protocol.encode_frame(protocol.RECEIVED), "protocol"),
    ("unknown-kind", True, header(kind=protocol.KIND_LIMIT), "protocol"),
    ("kind-zero", True, header(kind=0), "protocol"),
    ("client-sends-msg", True, protocol.encode_frame(protocol.MSG, b"good.x"), "protocol"),
    ("client-sends-hello", True, protocol.encode_frame(protocol.HELLO), "protocol"),
    ("second-connect", True, protocol.encode_frame(protocol.CONNECT, payload=pack({})),
     "protocol"),
    ("nfds-without-fds", True, pub(b"good.no-fds", nfds=1), "protocol"),
] + [
    (f"pub-topic-{topic!r}", True, pub(topic), "invalid-topic")
    for topic in [b"a..b", b"*", b">", b"good.*", b"good.>", b"_SYS.x", b"_x", b"", b".a",
                  b"a.", b"a b", b"a\tb", b"a\x7fb", b"\xff", b"good.\xc2\xa0", b"a\xe2\x80\xa8b",
                  b"\xed\xa0\x80", b"_INBOX."]
]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("name, handshake, data, code", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_bad_input_closes_only_that_connection(broker, good_pair, transport, name, handshake,
                                               data, code):
    def attack():
        peer = RawPeer(broker, transport)
        if handshake:
            peer.handshake()
        else:
            peer.read_hello()
        peer.send(data)
        assert_fatal_error(peer.frames_until_closed(), code)
        peer.close()

    good_pair(attack)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("pattern", [b"a..b", b"ord*", b"a.>.b", b"", b"a b", b"\xff"])
def test_sub_with_invalid_pattern_is_refused_and_the_connection_stays(broker, transport,
                                                                      pattern):
    peer = RawPeer(broker, transport)
    peer.handshake()
    peer.send(protocol.encode_frame(protocol.SUB, pattern, id=7))
    refusal = peer.next_frame()
    assert (refusal.kind, refusal.id, refusal.flags & protocol.FATAL) == (protocol.ERROR, 7, 0)
    assert unpack(refusal.payload)["code"] == "invalid"
    peer.send(protocol.encode_frame(protocol.SUB, b"ok.*", id=8) + pub(b"ok.1", "fine"))
    assert (peer.next_frame().kind, peer.next_frame().payload) == (
        protocol.OK, msgpack.packb("fine"))
    peer.close()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("handshake", [False, True], ids=["in-handshake", "ready"])
def test_truncated_frame_then_close(broker, good_pair, transport, handshake):
    def attack():
        peer = RawPeer(broker, transport)
        if handshake:
            peer.handshake()
            frame = pub(b"good.truncated", "x" * 1000)
        else:
            peer.read_hello()
            frame = protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT, payload=pack({}))
        peer.send(frame[:len(frame) // 2])
        peer.close()

    good_pair(attack)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_peer_killed_while_writing_a_frame(broker, good_pair, transport):
    """A separate process writes half of a large frame, then dies by SIGKILL."""
    target = broker.unix_path if transport == "unix" else list(broker.tcp_address)

    def attack():
        child = spawn_python(
            """
            import json, signal, socket, sys, time
            from busx import protocol
            from busx.handshake import client_handshake
            target = json.loads(sys.argv[1])
            if isinstance(target, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(target)
            else:
                sock = socket.create_connection(tuple(target))
            client_handshake(sock, "broker", time.monotonic() + 10, "doomed", None, "raw")
            frame = protocol.encode_frame(protocol.PUB, b"good.doomed", b"\\xc4" * 200_000)
            sock.sendall(frame[:100_000])
            print("half sent", flush=True)
            signal.pause()
            """, json.dumps(target))
        try:
            assert child.stdout.readline() == "half sent\n", child.stderr.read()
            wait_for(lambda: any(c["name"] == "doomed" and c["bytes_in"] > 50_000
                                 for c in broker.stats()["connections"]))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
            child.stdout.close()
            child.stderr.close()

    good_pair(attack)


def test_busx_publisher_killed_mid_stream(broker, good_pair):
    """A real busx publisher streaming large messages dies by SIGKILL: what
    reached its subscriber is whole and in order, and nobody else notices."""
    with busx.connect(broker.url) as watcher:
        doomed = watcher.subscribe("doomed.>")

        def attack():
            child = spawn_python(
                """
                import sys, busx, itertools
                bus = busx.connect(sys.argv[1])
                for i in itertools.count():
                    bus.publish("doomed.big", [i, "x" * 65536])
                """, broker.url)
            try:
                first = doomed.recv(timeout=10)
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=10)
                child.stdout.close()
                child.stderr.close()
            received = [first] + drain(doomed)
            assert [m.data[0] for m in received] == list(range(len(received)))
            assert all(m.data[1] == "x" * 65536 for m in received)

        good_pair(attack)


def drain(sub):
    got = []
    while batch := sub.recv_many(timeout=0.2):
        got += batch
    return got


# ---- peers that stall or half-close ----

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_silent_clients_do_not_block_others(broker, good_pair, transport):
    silent = []

    def attack():
        # Connected, never reading or writing: the broker's HELLO sits in
        # their buffers while everyone else carries on.
        silent.extend(RawPeer(broker, transport) for _ in range(20))
        with busx.connect(broker.url, timeout=5) as late:
            late.flush(timeout=5)
        for peer in silent:
            peer.close()

    good_pair(attack)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("stage", ["preamble", "ready", "subscribed"])
def test_half_open_connection_is_cleaned_up(broker, good_pair, transport, stage):
    def attack():
        subscriptions = broker.stats()["subscriptions"]
        peer = RawPeer(broker, transport)
        if stage == "preamble":
            peer.read_hello()
            peer.send(protocol.PREAMBLE)
        else:
            peer.handshake()
        if stage == "subscribed":
            peer.send(protocol.encode_frame(protocol.SUB, b"good.>", id=1))
            assert peer.next_frame().kind == protocol.OK
            assert broker.stats()["subscriptions"] == subscriptions + 1
        peer.sock.shutdown(socket.SHUT_WR)
        # The broker sees end-of-stream and closes its side.
        peer.frames_until_closed()
        peer.close()
        wait_for(lambda: broker.stats()["subscriptions"] == subscriptions)

    good_pair(attack)


# ---- resources ----

@pytest.mark.timeout(180)
def test_no_fd_leak_over_many_connect_cycles(broker, tcp_url):
    """1,000 connections that complete or abandon the handshake; the broker
    (in this process) and the clients give back every fd."""
    def busx_cycle(url):
        busx.connect(url).close()

    def raw_cycle(transport, step):
        peer = RawPeer(broker, transport)
        if step >= 1:
            peer.read_hello()
        if step == 2:
            peer.send(protocol.PREAMBLE + b"\x10\x00")     # half a length prefix
        if step == 3:
            peer.send(protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT, payload=pack({})))
        peer.close()

    with busx.connect(broker.url) as probe:     # warm up lazily created fds
        probe.flush(timeout=5)
    wait_for(lambda: broker.stats()["connections"] == [])   # the broker closed its side
    baseline = open_fds()
    for i in range(1000):
        transport = "unix" if i % 2 else "tcp"
        if i % 3 == 0:
            busx_cycle(broker.url if transport == "unix" else tcp_url)
        else:
            raw_cycle(transport, i % 4)
    wait_for(lambda: open_fds() <= baseline, timeout=20,
             message=f"fds did not return to {baseline}")
    assert open_fds() == baseline
    wait_for(lambda: broker.stats()["connections"] == [])


@pytest.mark.timeout(120)
def test_writes_and_reads_are_batched(tmp_path):
    # Broker, publisher and subscriber each in their own process, as deployed:
    # the ratios below are what a loaded service sees.
    count, url = 100_000, f"unix://{tmp_path}/bus.sock"
    broker = spawn_python(
        """
        import sys, busx
        busx.Broker(unix_path=sys.argv[1]).serve_forever()
        """, url[len("unix://"):])
    try:
        wait_for(lambda: os.path.exists(url[len("unix://"):]), message="broker did not start")
        with busx.connect(url) as subscriber:
            sub = subscriber.subscribe("batch.>")
            before = subscriber.stats()
            publisher = spawn_python(
                """
                import json, sys, busx
                with busx.connect(sys.argv[1]) as bus:
                    for i in range(int(sys.argv[2])):
                        bus.publish("batch.n", i)
                    bus.flush(timeout=30)
                    print(json.dumps(bus.counters))
                """, url, str(count))
            got = 0
            while got < count:
                batch = sub.recv_many(max_count=10_000, timeout=10)
                assert batch, f"only {got} of {count} arrived"
                assert batch[0].data == got
                got += len(batch)
            out, err = publisher.communicate(timeout=60)
            assert publisher.returncode == 0, err
            counters = json.loads(out)
            after = subscriber.stats()
            received = subscriber.counters
    finally:
        broker.terminate()
        broker.communicate(timeout=30)
    assert counters["frames_out"] >= count
    assert counters["write_calls"] < counters["frames_out"] / 10, counters
    msgs_in = after["msgs_in"] - before["msgs_in"]
    assert msgs_in == count
    assert after["write_calls"] - before["write_calls"] < msgs_in / 10, after
    assert after["read_calls"] - before["read_calls"] < msgs_in / 10, after
    assert received["read_calls"] < count / 10, received
