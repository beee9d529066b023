"""File descriptors passed with messages (SCM_RIGHTS): what arrives is the
right open file, in the right message, owned by each receiver; the limits and
the TCP rules; and no fd leaks in the broker (a separate process whose
/proc/<pid>/fd we count) or the clients, whatever happens to the messages."""

import os
import random
import signal
import subprocess
import time

import pytest
from support import BrokerProcess, json_result, open_fds, spawn_python, wait_for

import busx


def client_baseline(broker) -> int:
    """This process's fd count once a client has come and gone (lazily
    created fds exist by then); tests assert it returns to it."""
    with busx.connect(broker.url) as probe:
        probe.flush(timeout=5)
    if isinstance(broker, busx.Broker):
        # An embedded broker's fds are ours: wait until it closed the probe's.
        wait_for(lambda: not broker.stats()["connections"])
    return open_fds()


def memfd(content: bytes = b"") -> int:
    fd = os.memfd_create("busx-test", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def close_all(messages) -> None:
    for msg in messages:
        for fd in msg.fds:
            os.close(fd)


def wait_settled(count_fds, baseline: int, what: str) -> None:
    wait_for(lambda: count_fds() <= baseline, timeout=20,
             message=f"{what} holds {count_fds() - baseline} fds more than its baseline")
    assert count_fds() == baseline


def start_subscriber(code: str, url: str, *args: str) -> subprocess.Popen:
    """A subscriber process; it prints "ready" once subscribed."""
    process = spawn_python(code, url, *args)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process


# ---- what arrives ----

READ_PIPE = """
import json, os, sys, busx
with busx.connect(sys.argv[1]) as bus:
    sub = bus.subscribe("files.pipe")
    print("ready", flush=True)
    msg = sub.recv(timeout=30)
    (fd,) = msg.fds
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    print(json.dumps({"data": msg.data, "content": b"".join(chunks).decode()}))
"""


def test_pipe_reaches_a_subscriber_process(broker):
    client_fds = client_baseline(broker)
    subscriber = start_subscriber(READ_PIPE, broker.url)
    content = "through the pipe " * 1000     # more than one read, less than a pipe buffer
    with busx.connect(broker.url) as bus:
        read_end, write_end = os.pipe()
        os.write(write_end, content.encode())
        bus.publish("files.pipe", {"kind": "pipe"}, fds=[read_end])
        # publish duplicated them: closing ours at once is allowed, and
        # closing the write end is what lets the subscriber see EOF.
        os.close(read_end)
        os.close(write_end)
        assert json_result(subscriber) == {"data": {"kind": "pipe"}, "content": content}
    wait_settled(open_fds, client_fds, "the publisher")


MAP_MEMFD = """
import json, mmap, os, sys, busx
with busx.connect(sys.argv[1]) as bus:
    sub = bus.subscribe("files.memfd")
    print("ready", flush=True)
    msg = sub.recv(timeout=30)
    (fd,) = msg.fds
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as mapped:
        content = mapped[:]
    os.close(fd)
    print(json.dumps({"size": msg.data, "content": content.decode()}))
"""


def test_memfd_reaches_a_subscriber_process_which_maps_it(broker):
    subscriber = start_subscriber(MAP_MEMFD, broker.url)
    content = "shared memory " * 10_000
    with busx.connect(broker.url) as bus:
        fd = memfd(content.encode())
        bus.publish("files.memfd", len(content), fds=[fd])
        os.close(fd)
        assert json_result(subscriber) == {"size": len(content), "content": content}


def test_each_subscriber_owns_its_duplicates(broker):
    with busx.connect(broker.url) as publisher, busx.connect(broker.url) as first, \
            busx.connect(broker.url) as second:
        subs = [first.subscribe("files.both"), second.subscribe("files.both")]
        read_end, write_end = os.pipe()
        shared = memfd(b"for both")
        expected = (inode(write_end), inode(shared))
        publisher.publish("files.both", None, fds=[write_end, shared])
        os.close(write_end)
        os.close(shared)
        one, two = (sub.recv(timeout=5) for sub in subs)
        assert tuple(map(inode, one.fds)) == tuple(map(inode, two.fds)) == expected
        assert set(one.fds).isdisjoint(two.fds)
        assert one.fds_lost == two.fds_lost == 0
        # Closing one subscriber's copies leaves the other's working.
        os.write(one.fds[0], b"one,")
        close_all([one])
        os.write(two.fds[0], b"two")
        assert os.pread(two.fds[1], 100, 0) == b"for both"
        close_all([two])
        assert os.read(read_end, 100) == b"one,two"
        assert os.read(read_end, 100) == b"", "a copy of the write end is still open somewhere"
        os.close(read_end)


@pytest.fixture
def roomy_broker(socket_path):
    """A broker with room for a burst of thousands of fds for one subscriber
    (the max_pending_fds bound is test_hardening.py's subject)."""
    with busx.Broker(unix_path=socket_path, max_pending_fds=1 << 16) as running:
        yield running


@pytest.mark.timeout(60)
def test_fds_of_many_batched_frames_keep_their_frame(roomy_broker):
    broker = roomy_broker
    client_fds = client_baseline(broker)
    pool = [memfd() for _ in range(16)]
    inodes = [inode(fd) for fd in pool]
    choose = random.Random(7)
    plan = [choose.sample(range(len(pool)), 1 + i % 3) for i in range(3000)]
    with busx.connect(broker.url) as publisher, busx.connect(broker.url) as subscriber:
        sub = subscriber.subscribe("files.many")
        for i, picks in enumerate(plan):
            publisher.publish("files.many", [i, [inodes[k] for k in picks]],
                              fds=[pool[k] for k in picks])
        got = []
        while len(got) < len(plan):
            batch = sub.recv_many(timeout=10)
            assert batch, f"only {len(got)} of {len(plan)} messages arrived"
            got += [(msg.data, [inode(fd) for fd in msg.fds], msg.fds_lost) for msg in batch]
            close_all(batch)
    for fd in pool:
        os.close(fd)
    assert [data[0] for data, _, _ in got] == list(range(len(plan)))
    mismatched = [data[0] for data, received, _ in got if received != data[1]]
    assert not mismatched, f"messages {mismatched[:10]} carry another message's fds"
    assert all(lost == 0 for _, _, lost in got)
    wait_settled(open_fds, client_fds, "the clients")


def test_250_fds_in_one_message(bus):
    pool = [memfd() for _ in range(250)]
    sub = bus.subscribe("files.max")
    bus.publish("files.max", [inode(fd) for fd in pool], fds=pool)
    for fd in pool:
        os.close(fd)
    msg = sub.recv(timeout=5)
    assert len(msg.fds) == 250
    assert [inode(fd) for fd in msg.fds] == msg.data
    close_all([msg])


def test_251_fds_raise_value_error_and_send_nothing(bus):
    fd = memfd(b"kept")
    sub = bus.subscribe("files.over")
    before = open_fds()
    with pytest.raises(busx.FdError, match="250") as caught:
        bus.publish("files.over", "too many", fds=[fd] * 251)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, busx.BusError)
    assert open_fds() == before, "a failed publish leaked duplicates"
    assert os.pread(fd, 4, 0) == b"kept", "publish closed the caller's fd"
    bus.publish("files.over", "next")
    assert sub.recv(timeout=5).data == "next"
    os.close(fd)


# ---- TCP ----

def test_publishing_fds_over_tcp_raises(tcp_url):
    with busx.connect(tcp_url) as bus:
        sub = bus.subscribe("files.tcp")
        fd = memfd()
        with pytest.raises(busx.BusError, match="UNIX"):
            bus.publish("files.tcp", "no", fds=[fd])
        os.close(fd)
        bus.publish("files.tcp", "still usable")
        assert sub.recv(timeout=5).data == "still usable"


def test_tcp_subscriber_gets_the_message_with_fds_lost(broker, tcp_url):
    with busx.connect(tcp_url) as remote, busx.connect(broker.url) as local:
        remote_sub, local_sub = remote.subscribe("files.mixed"), local.subscribe("files.mixed")
        pool = [memfd() for _ in range(3)]
        local.publish("files.mixed", "three files", fds=pool)
        for fd in pool:
            os.close(fd)
        far = remote_sub.recv(timeout=5)
        assert (far.data, far.fds, far.fds_lost) == ("three files", (), 3)
        near = local_sub.recv(timeout=5)
        assert (len(near.fds), near.fds_lost) == (3, 0)
        close_all([near])


# ---- no leaks, with the broker in its own process ----

def connected_baseline(broker: BrokerProcess, *buses) -> int:
    """The broker's fd count with these clients connected and idle."""
    for bus in buses:
        bus.flush(timeout=5)
    return broker.fds()


NEVER_READS = """
import signal, sys, busx
bus = busx.connect(sys.argv[1])
bus.subscribe("leak.>")
print("ready", flush=True)
signal.pause()
"""


@pytest.mark.timeout(90)
def test_no_broker_fd_leak_when_a_subscriber_dies_with_fds_queued(start_broker):
    broker = start_broker()
    with busx.connect(broker.url) as publisher:
        baseline = connected_baseline(broker, publisher)
        subscriber = start_subscriber(NEVER_READS, broker.url)
        try:
            # Stopped, it reads nothing: its socket fills (the 2 KiB payloads
            # make sure of that), then the broker's queue holds the rest.
            os.kill(subscriber.pid, signal.SIGSTOP)
            fd, filler = memfd(), b"x" * 2048
            for i in range(3000):
                publisher.publish("leak.queued", [i, filler], fds=[fd, fd])
            os.close(fd)
            publisher.flush(timeout=30)
            wait_for(lambda: broker.fds() > baseline + 1000, timeout=20,
                     message="the broker never queued fds for the stopped subscriber")
        finally:
            os.kill(subscriber.pid, signal.SIGKILL)
            subscriber.communicate(timeout=20)
        wait_settled(broker.fds, baseline, "the broker")


@pytest.mark.timeout(90)
def test_no_fd_leak_when_a_slow_subscriber_has_messages_dropped(start_broker):
    broker = start_broker("--max-pending", str(64 << 10))
    client_fds = client_baseline(broker)
    count, filler = 2000, b"x" * (10 << 10)
    pool = [memfd() for _ in range(8)]
    with busx.connect(broker.url) as publisher, \
            busx.connect(broker.url, max_buffer=64 << 10) as subscriber:
        sub = subscriber.subscribe("leak.slow")
        baseline = connected_baseline(broker, publisher, subscriber)
        for i in range(count):
            fd = pool[i % len(pool)]
            publisher.publish("leak.slow", [i, inode(fd), filler], fds=[fd])
        publisher.flush(timeout=60)
        received = []

        def drained():
            batch = sub.recv_many(timeout=0.5)
            received.extend((msg.data[:2], [inode(fd) for fd in msg.fds]) for msg in batch)
            close_all(batch)
            return len(received) + sub.dropped == count

        wait_for(drained, timeout=60, message="received + dropped never added up")
        assert sub.dropped > 0, "no message was dropped: the test did not make a slow consumer"
        order = [data[0] for data, _ in received]
        assert order == sorted(order)
        assert all(fds == [data[1]] for data, fds in received)
        wait_settled(broker.fds, baseline, "the broker")
    for fd in pool:
        os.close(fd)
    wait_settled(open_fds, client_fds, "the clients")


def test_no_broker_fd_leak_for_messages_nobody_subscribes_to(start_broker):
    broker = start_broker()
    with busx.connect(broker.url) as publisher:
        baseline = connected_baseline(broker, publisher)
        pool = [memfd() for _ in range(3)]
        for i in range(3000):
            publisher.publish("leak.nobody", i, fds=pool[: 1 + i % 3])
        publisher.flush(timeout=30)
        for fd in pool:
            os.close(fd)
        wait_settled(broker.fds, baseline, "the broker")


@pytest.mark.timeout(90)
def test_no_fd_leak_in_broker_or_clients_after_thousands_of_fd_messages(start_broker):
    # The burst queues up to 12,000 fds for the subscriber before it reads:
    # room for all of them, since this test counts leaks, not drops (the
    # max_pending_fds bound is test_hardening.py's).
    broker = start_broker("--max-pending-fds", str(1 << 16))
    client_fds = client_baseline(broker)
    with busx.connect(broker.url) as publisher, busx.connect(broker.url) as subscriber:
        subs = [subscriber.subscribe("leak.many"), subscriber.subscribe("leak.>")]
        baseline = connected_baseline(broker, publisher, subscriber)
        read_end, write_end = os.pipe()
        for i in range(3000):
            publisher.publish("leak.many", i, fds=[read_end, write_end])
        os.close(read_end)
        os.close(write_end)
        # Both subscriptions read in turn: unread messages of one, holding
        # fds, stop the connection reading for the other (docs/guarantees.md).
        got = [0, 0]
        deadline = time.monotonic() + 30
        while min(got) < 3000:
            assert time.monotonic() < deadline, f"only {got} of 3000 messages arrived"
            for k, sub in enumerate(subs):
                batch = sub.recv_many(timeout=0.05)
                assert all(len(msg.fds) == 2 for msg in batch)
                close_all(batch)
                got[k] += len(batch)
        wait_settled(broker.fds, baseline, "the broker")
    wait_settled(open_fds, client_fds, "the clients")


# ---- a receiver that runs out of fds ----

# The subscriber lowers its own RLIMIT_NOFILE just above what it has open, so
# the kernel cannot install the fds of the next messages (MSG_CTRUNC).
OUT_OF_FDS = """
import ctypes, json, os, resource, sys, busx
# glibc loads libgcc_s when a thread first exits (pthread_exit unwinds) and
# aborts if it cannot: load it now, while an fd is still free for dlopen.
ctypes.CDLL("libgcc_s.so.1")
bus = busx.connect(sys.argv[1], reconnect=sys.argv[2] == "reconnect")
sub = bus.subscribe("starved.>")
bus.flush(timeout=5)
in_use = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 8, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
received, wrong = 0, 0
try:
    while True:
        msg = sub.recv(timeout=5)
        received += 1
        wrong += [os.fstat(fd).st_ino for fd in msg.fds] != msg.data
        for fd in msg.fds:
            os.close(fd)
except busx.BusError as exc:
    outcome = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(dict(outcome, received=received, wrong=wrong)))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["reconnect", "no-reconnect"])
def test_subscriber_out_of_fds_gets_a_clear_error(start_broker, mode):
    broker = start_broker()
    with busx.connect(broker.url) as publisher:
        baseline = connected_baseline(broker, publisher)
        subscriber = start_subscriber(OUT_OF_FDS, broker.url, mode)
        fd = memfd()
        for _ in range(5):
            publisher.publish("starved.x", [inode(fd)] * 20, fds=[fd] * 20)
        os.close(fd)
        publisher.flush(timeout=10)
        outcome = json_result(subscriber)
        assert outcome["wrong"] == 0, f"the subscriber got wrong fds: {outcome}"
        # Losing messages silently (recv just times out) breaks "nothing is
        # dropped silently": the subscriber must be told that fds were lost.
        assert outcome["error"] in ("Disconnected", "ProtocolError"), outcome
        assert "fd" in outcome["message"].lower(), outcome
        wait_settled(broker.fds, baseline, "the broker")
