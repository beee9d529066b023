"""Large payloads over UNIX travel in a sealed memfd (docs/protocol.md): the
broker passes the fd on instead of copying the bytes, TCP subscribers and
clients that did not ask for memfds get the bytes inline, and memfds count
against the same limits as bytes. Broker and clients run in this process,
so /proc/self shows every fd and mapping any of them holds."""

import fcntl
import gc
import os
import shutil
import subprocess
import sys

import msgpack
import pytest
from support import RawPeer, open_fds, wait_for

import busx
from busx import protocol
from busx._core import PAYLOAD_FD_THRESHOLD

MiB = 1 << 20


def payload_memfds() -> int:
    """Open fds of busx payload memfds in this process."""
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:busx-payload")
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


def payload_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum("busx-payload" in line for line in maps)


def blob(size: int) -> bytes:
    """Bytes that pack to exactly `size` bytes of msgpack (bin32 header)."""
    return os.urandom(size - 5)


def settle(baseline: int) -> None:
    gc.collect()
    wait_for(lambda: open_fds() <= baseline, message="fds outlived their messages")
    assert open_fds() == baseline
    assert payload_memfds() == 0 and payload_mappings() == 0


@pytest.fixture
def pair(broker):
    with busx.connect(broker.url) as pub, busx.connect(broker.url) as sub_bus:
        yield pub, sub_bus


def test_payloads_from_the_threshold_up_go_by_memfd_and_arrive_intact(broker, pair):
    pub, sub_bus = pair
    sub = sub_bus.subscribe("big.>")
    pub.flush()
    baseline = open_fds()
    values = [blob(PAYLOAD_FD_THRESHOLD - 1), blob(PAYLOAD_FD_THRESHOLD),
              {"image": blob(3 * MiB), "name": "x", "n": [1, 2.5, None]}]
    for value in values:
        pub.publish("big.one", value)
    for value in values:
        msg = sub.recv(timeout=10)
        assert msg.data == value
        assert msg.raw == msgpack.packb(value)
    assert pub.counters["fd_payloads_out"] == 2 and sub_bus.counters["fd_payloads_in"] == 2
    del msg
    settle(baseline)
    # The subscriber told the broker it has them: nothing counts as pending.
    sub_bus.flush()
    assert all(c["pending_bytes"] == 0 for c in broker.stats()["connections"])


def test_memfd_payload_keeps_the_users_fds_apart_and_in_order(pair):
    pub, sub_bus = pair
    sub = sub_bus.subscribe("big.fds")
    pub.flush()
    baseline = open_fds()
    read_end, write_end = os.pipe()
    os.write(write_end, b"through the pipe")
    value = blob(MiB)
    pub.publish("big.fds", value, fds=[read_end, write_end])
    os.close(read_end)
    os.close(write_end)
    msg = sub.recv(timeout=10)
    assert len(msg.fds) == 2 and msg.fds_lost == 0
    assert os.read(msg.fds[0], 100) == b"through the pipe"
    assert msg.data == value
    for fd in msg.fds:
        os.close(fd)
    del msg
    settle(baseline)


def test_data_decodes_from_the_mapping_and_raw_is_still_there_after(pair):
    pub, sub_bus = pair
    sub = sub_bus.subscribe("big.ext")
    value = msgpack.ExtType(7, b"e" * MiB)        # msgpack's own decoder, from the mapping
    pub.publish("big.ext", value)
    msg = sub.recv(timeout=10)
    assert msg.data == value
    assert msg.raw == msgpack.packb(value)
    assert payload_mappings() == 1
    del msg
    gc.collect()
    assert payload_mappings() == 0


def test_tcp_subscribers_get_the_payload_inline_and_lose_only_the_users_fds(broker, tcp_url):
    with busx.connect(broker.url) as pub, busx.connect(tcp_url) as tcp_bus, \
            busx.connect(broker.url) as unix_bus:
        assert tcp_bus.transport == "tcp"
        tcp_sub, unix_sub = tcp_bus.subscribe("big.mixed"), unix_bus.subscribe("big.mixed")
        pub.flush()
        read_end, write_end = os.pipe()
        value = blob(2 * MiB)
        pub.publish("big.mixed", value, fds=[read_end])
        over_tcp, over_unix = tcp_sub.recv(timeout=10), unix_sub.recv(timeout=10)
        assert over_tcp.data == value and over_tcp.fds == () and over_tcp.fds_lost == 1
        assert over_unix.data == value and len(over_unix.fds) == 1
        assert tcp_bus.counters["fd_payloads_in"] == 0
        assert unix_bus.counters["fd_payloads_in"] == 1
        for fd in (read_end, write_end, *over_unix.fds):
            os.close(fd)


def test_a_client_that_did_not_ask_for_memfds_gets_bytes(broker, bus):
    peer = RawPeer(broker, "unix")      # its CONNECT says nothing about payload fds
    peer.handshake()
    peer.send(protocol.encode_frame(protocol.SUB, b"big.raw", id=1))
    assert peer.next_frame().kind == protocol.OK
    value = blob(MiB)
    bus.publish("big.raw", value)
    frame = peer.next_frame()
    assert frame.kind == protocol.MSG and not frame.flags & protocol.PAYLOAD_FD
    assert frame.nfds == 0 and frame.payload == msgpack.packb(value)
    peer.close()


def test_messages_queued_for_an_ended_subscription_release_their_memfds(pair):
    pub, sub_bus = pair
    sub = sub_bus.subscribe("big.gone")
    pub.flush()
    baseline = open_fds()
    for _ in range(5):
        pub.publish("big.gone", blob(MiB))
    pub.flush()
    wait_for(lambda: sub_bus._io.frames_in >= 6, message="the messages never arrived")
    sub.unsubscribe()
    sub_bus.flush()
    settle(baseline)


@pytest.mark.timeout(60)
def test_a_subscriber_that_stops_reading_holds_memfds_within_its_limits(socket_path):
    # Memfds are no free pass around the limits: the broker counts them
    # against max_pending until the client says it has them, and the client
    # counts them against max_buffer until Python takes them.
    max_pending, max_buffer, count = 8 * MiB, 4 * MiB, 60
    with busx.Broker(unix_path=socket_path, max_pending=max_pending) as broker, \
            busx.connect(broker.url) as pub, \
            busx.connect(broker.url, max_buffer=max_buffer) as sub_bus:
        sub = sub_bus.subscribe("big.stuck")
        pub.flush()
        for i in range(count):
            pub.publish("big.stuck", [i, blob(MiB)])
        pub.flush(timeout=30)
        stats = {c["id"]: c for c in broker.stats()["connections"]}
        dropped = sum(c["dropped"] for c in stats.values())
        assert dropped > 0, "nothing was dropped: the subscriber was never slow"
        assert max(c["pending_bytes"] for c in stats.values()) <= max_pending
        assert sub_bus._io.held_bytes <= max_buffer + 2 * MiB
        # Each memfd holds one message: in this process (broker and both
        # clients) there are no more than the two limits allow, plus the
        # ones in flight in the subscriber's socket.
        assert payload_memfds() <= (max_pending + max_buffer) // MiB + 4
        received = []
        while len(received) + sub.dropped < count:
            received += [msg.data[0] for msg in sub.recv_many(timeout=10)]
        assert received == sorted(received) and len(received) + sub.dropped == count
        assert sub.dropped == dropped


def payload_fd_pub(size: int, nfds: int = 1, field: bytes = None) -> bytes:
    """A PUB saying its payload is in its last fd, `size` bytes long."""
    return protocol.encode_frame(
        protocol.PUB, b"big.bad", protocol.PAYLOAD_FD_SIZE.pack(size) if field is None else field,
        flags=protocol.PAYLOAD_FD, nfds=nfds)


ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def memfd(content: bytes, seals: int = ALL_SEALS) -> int:
    fd = os.memfd_create("attack", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, content)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def pipe_read_end() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


PACKED = msgpack.packb(b"abc")
BAD_PAYLOAD_FDS = [
    ("no-fd", lambda: (payload_fd_pub(len(PACKED), nfds=0), []), "protocol"),
    ("size-field-of-4-bytes", lambda: (payload_fd_pub(0, field=b"\x05\0\0\0"), [memfd(PACKED)]),
     "protocol"),
    ("a-pipe", lambda: (payload_fd_pub(len(PACKED)), [pipe_read_end()]), "protocol"),
    ("unsealed", lambda: (payload_fd_pub(len(PACKED)), [memfd(PACKED, seals=0)]), "protocol"),
    ("no-write-seal", lambda: (payload_fd_pub(len(PACKED)),
                               [memfd(PACKED, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)]),
     "protocol"),
    ("wrong-size", lambda: (payload_fd_pub(len(PACKED) + 1), [memfd(PACKED)]), "protocol"),
    ("beyond-max-frame", lambda: (payload_fd_pub(protocol.DEFAULT_MAX_FRAME), [memfd(PACKED)]),
     "too-large"),
]


@pytest.mark.parametrize("name, make, code", BAD_PAYLOAD_FDS, ids=[c[0] for c in BAD_PAYLOAD_FDS])
def test_a_payload_fd_that_is_not_a_sealed_memfd_of_its_size_closes_only_its_sender(
        broker, bus, name, make, code):
    sub = bus.subscribe("big.bad")
    bus.flush()
    baseline = open_fds()
    attacker = RawPeer(broker, "unix")
    attacker.handshake()
    frame, fds = make()
    attacker.send_fds(frame, fds)
    for fd in fds:
        os.close(fd)
    frames = attacker.frames_until_closed()
    attacker.close()
    assert [f.kind for f in frames] == [protocol.ERROR], frames
    assert frames[0].flags & protocol.FATAL
    assert msgpack.unpackb(frames[0].payload)["code"] == code
    # A well-formed one from another raw client gets through; the attacker's
    # was refused before it, so had it been routed, it would have come first.
    sender = RawPeer(broker, "unix")
    sender.handshake()
    sender.send_fds(payload_fd_pub(len(PACKED)), [fd := memfd(PACKED)])
    os.close(fd)
    msg = sub.recv(timeout=10)
    assert msg.data == b"abc" and msg.sender.pid == os.getpid()
    sender.close()
    del msg
    settle(baseline)


def test_a_payload_beyond_max_frame_raises_and_leaves_no_memfd(socket_path):
    with busx.Broker(unix_path=socket_path, max_frame=2 * MiB) as broker, \
            busx.connect(broker.url) as bus:
        baseline = open_fds()
        for too_big in (blob(2 * MiB), {"blob": blob(2 * MiB)}):
            with pytest.raises(busx.PayloadTooLarge):
                bus.publish("big.no", too_big)
        assert open_fds() == baseline and payload_memfds() == 0
        assert bus.counters["fd_payloads_out"] == 0


@pytest.mark.timeout(60)
def test_a_publisher_that_also_subscribes_never_waits_on_acks_behind_its_unread_messages(
        socket_path):
    # The broker's RECEIVED for a memfd travels behind the messages it sends
    # this client. Once the client stops reading (its receive buffer full),
    # it cannot see them: it must not wait for them, and sends inline instead.
    count = 40
    with busx.Broker(unix_path=socket_path) as broker, \
            busx.connect(broker.url, max_buffer=4 * MiB) as bus:
        sub = bus.subscribe("big.echo")
        for i in range(count):
            bus.publish("big.echo", [i, blob(MiB)], timeout=10)
        bus.flush(timeout=10)
        received = []
        while len(received) + sub.dropped < count:
            received += [msg.data[0] for msg in sub.recv_many(timeout=10)]
        assert received == sorted(received) and len(received) + sub.dropped == count
        assert bus.counters["fd_payloads_out"] < count, "every payload went by memfd"


@pytest.mark.timeout(60)
def test_memfds_in_flight_stay_within_the_brokers_budget_and_the_rest_go_inline(socket_path):
    with busx.Broker(unix_path=socket_path) as broker, busx.connect(broker.url) as pub, \
            busx.connect(broker.url, max_buffer=MiB) as stuck_bus, \
            busx.connect(broker.url) as reader_bus:
        broker._loop.payload_fd_budget = 4 * PAYLOAD_FD_THRESHOLD
        stuck_bus.subscribe("big.budget")
        reader = reader_bus.subscribe("big.budget")
        pub.flush()
        values = [blob(PAYLOAD_FD_THRESHOLD) for _ in range(20)]
        for value in values:
            pub.publish("big.budget", value)
        assert [reader.recv(timeout=10).data for _ in values] == values
        # The stuck subscriber holds the budget; the reader got the rest inline.
        assert 0 < reader_bus.counters["fd_payloads_in"] < len(values)
        stuck_bus.flush(timeout=10)             # and stays connected


@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a broker the fd limit binds")
def test_memfds_in_flight_never_exceed_the_kernels_fd_limit(tmp_path):
    # The kernel counts fds in flight in UNIX sockets against the sender's
    # RLIMIT_NOFILE (CAP_SYS_RESOURCE exempts root, so the broker runs
    # without it). Past the limit sendmsg fails with ETOOMANYREFS: the
    # broker must stay below it rather than lose connections.
    path = str(tmp_path / "bus.sock")
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400)); "
            f"import busx; busx.Broker(unix_path={path!r}).serve_forever()")
    broker = subprocess.Popen(["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin,-sys_resource",
                               sys.executable, "-P", "-c", code], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(path) or broker.poll() is not None,
                 message="the broker never listened")
        url = f"unix://{path}"
        stuck = [busx.connect(url, max_buffer=MiB, reconnect=False) for _ in range(3)]
        for bus in stuck:
            bus.subscribe("big.many")
        with busx.connect(url, reconnect=False) as reader_bus, \
                busx.connect(url, reconnect=False) as pub:
            reader = reader_bus.subscribe("big.many")
            pub.flush()
            for i in range(600):
                pub.publish("big.many", [i, blob(300 * 1024)])
                if i % 50 == 49:        # the reader keeps up
                    assert [reader.recv(timeout=10).data[0] for _ in range(50)] == \
                        list(range(i - 49, i + 1))
            pub.flush(timeout=10)
        for bus in stuck:
            bus.flush(timeout=10)               # still connected
            bus.close()
    finally:
        broker.terminate()
        _, err = broker.communicate(timeout=30)
    assert b"Traceback" not in err, err.decode()
