"""A stateful protocol fuzzer: hypothesis drives one `busx serve` process per
run through a sequence of steps. Hostile raw peers (UNIX and TCP) handshake
or break the handshake, send frames of every client kind with valid or
hostile fields, cut streams, flood the broker without reading, attach stray
fds and memfds, and close abruptly or half-close. Meanwhile well-behaved
clients keep using the same broker.

After every step the invariants must hold:

- the broker process is alive;
- every good pair (a busx publisher and subscriber on "good.<n>", a
  namespace no hostile peer can publish to) receives everything published,
  in order, nothing dropped, and every well-behaved client flushes within
  FLUSH_TIMEOUT;
- two victims (busx subscribers, UNIX and TCP, on "v.>", where hostile peers
  do publish) are never wedged or disconnected: after any hostile message a
  later good message on that namespace still arrives, and no message they
  get has a reply_to outside "_INBOX.";
- the broker's peak RSS stays under its baseline + 64 MiB + 2 MiB per
  hostile peer, and its fd count under its baseline + one per connection +
  max_pending_fds per hostile subscriber + fds of frames it has not seen the
  end of + 16 (a peer never READY counts nothing once the handshake timeout
  has passed).

At teardown every peer closes, the broker's fd count returns to its starting
value and `busx serve` exits 0 on SIGTERM.

test_hostile_fuzz.py throws one hostile connection at a time at a broker;
this file lets attacks pile up on one broker, which is how resource bounds
(max_pending, max_pending_fds, max_subscriptions, handshake_timeout) break.
It runs against busx from before those limits too (the flags it passes are
the ones `busx serve --help` lists), and then it fails.

Size: BUSX_FUZZ_EXAMPLES runs of at most BUSX_FUZZ_STEPS steps, stopping
after BUSX_FUZZ_SECONDS of wall clock (checked between batches of BATCH
runs; shrinking a failure may take hypothesis up to 5 more minutes). The
defaults take about half a minute. A long session stops by itself and
prints a summary (the short run prints one too):

    BUSX_FUZZ_EXAMPLES=100000 BUSX_FUZZ_SECONDS=1800 pytest tests/test_protocol_fuzz.py

BUSX_FUZZ_VERBOSITY=debug prints every step as it runs (with `pytest -s`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import HealthCheck, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import BrokerProcess, open_fds

import busx
from busx import protocol
from busx.handshake import pack

# ---- size of the run ----

EXAMPLES = int(os.environ.get("BUSX_FUZZ_EXAMPLES", "40"))
STEPS = int(os.environ.get("BUSX_FUZZ_STEPS", "25"))
SECONDS = float(os.environ.get("BUSX_FUZZ_SECONDS", "40"))
BATCH = 5       # runs per hypothesis call; the wall clock is checked between calls

FUZZ_SETTINGS = settings(max_examples=BATCH, stateful_step_count=STEPS, deadline=None,
                         database=None, derandomize=False,
                         verbosity=Verbosity[os.environ.get("BUSX_FUZZ_VERBOSITY", "normal")],
                         suppress_health_check=[HealthCheck.too_slow])

# ---- the broker's limits: small, so that bounds are quick to reach ----

MAX_PENDING = 256 << 10
MAX_FRAME = 1 << 20
MAX_PENDING_FDS = 64
MAX_SUBSCRIPTIONS = 1000
HANDSHAKE_TIMEOUT = 1

# ---- bounds the invariants hold the broker to ----

RSS_ALLOWANCE = 64 << 20        # over the broker's RSS with only the good clients
RSS_PER_PEER = 2 << 20          # max_pending of answers + a max_frame being read, rounded up
FD_MARGIN = 16                  # over the fds accounted for one by one

# ---- patience ----

FLUSH_TIMEOUT = 3.0             # "every well-behaved client flushes within a couple of seconds"
DELIVERY_TIMEOUT = 5.0          # for a subscriber to receive what was flushed
SETTLE_TIMEOUT = 3.0            # for the broker to drop what a hostile peer made it hold
READ_TIMEOUT = 5.0              # for the broker to answer a raw peer or close it
SEND_STALL = 0.5                # a raw send making no progress this long has stalled
PROBE_EVERY = 1.0               # a victim that has not seen a probe by then gets another
MAX_PEERS = 32                  # open hostile peers at once
MAX_PAIRS = 3

PUB, SUB, UNSUB, PING, STATS, RECEIVED, CONNECT = (
    protocol.PUB, protocol.SUB, protocol.UNSUB, protocol.PING, protocol.STATS,
    protocol.RECEIVED, protocol.CONNECT)
KIND_NAMES = {PUB: "PUB", SUB: "SUB", UNSUB: "UNSUB", PING: "PING", STATS: "STATS",
              RECEIVED: "RECEIVED", CONNECT: "CONNECT"}
PONG_ID = 0xB05B05
VICTIM_PATTERN = "v.>"
PROBE_TOPIC = "v.probe"


# ---- the broker ----

@functools.cache
def limit_options() -> tuple[str, ...]:
    """The limit flags this busx has: the hardening adds some, and this file
    runs against the code from before it too."""
    help_text = subprocess.run(
        [sys.executable, "-P", "-m", "busx.cli", "serve", "--help"],
        capture_output=True, text=True, check=True).stdout
    options = ["--tcp", "127.0.0.1:0", "--max-pending", str(MAX_PENDING),
               "--max-frame", str(MAX_FRAME)]
    for flag, value in [("--handshake-timeout", HANDSHAKE_TIMEOUT),
                        ("--max-subscriptions", MAX_SUBSCRIPTIONS),
                        ("--max-pending-fds", MAX_PENDING_FDS)]:
        if flag in help_text:
            options += [flag, str(value)]
    return tuple(options)


def handshake_timeout() -> float:
    """The broker's: ours when it takes the flag, else the contract's default."""
    return HANDSHAKE_TIMEOUT if "--handshake-timeout" in limit_options() else 5.0


class FuzzBroker(BrokerProcess):
    """`busx serve` with small limits, on UNIX and on a free loopback port."""

    def __init__(self, directory):
        super().__init__(directory, *limit_options())
        host, port = re.search(r"tcp://([\d.]+):(\d+)", self.log()).groups()
        self.tcp_address = (host, int(port))
        self.tcp_url = f"tcp://{host}:{port}"

    def fds(self) -> int:
        return open_fds(self.pid)

    def peak_rss_bytes(self) -> int:
        """VmHWM: the most RSS the broker ever had, so a spike between two
        checks counts too."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM line")

    def kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


# ---- hostile frames ----

class Frame:
    """One frame a hostile peer sends, true to the wire format or not:
    `attach` fds really travel with it (UNIX only) whatever `nfds` claims,
    `pad` zero bytes follow the payload (frames near max_frame), and the
    size field lies by `size_delta`. Its repr shows only what differs from
    an empty frame of its kind, so that minimal examples read like the
    attack."""

    DEFAULTS = dict(topic=b"", reply=b"", payload=b"", pad=0, id=0, flags=0, nfds=0,
                    attach=0, stamp=b"", fds_lost=0, reserved=0, size_delta=0)

    def __init__(self, kind, **fields):
        self.kind = kind
        for name, default in self.DEFAULTS.items():
            setattr(self, name, fields.pop(name, default))
        assert not fields, fields

    def encode(self) -> bytes:
        payload = self.payload + bytes(self.pad)
        size = (protocol.HEADER_SIZE - 4 + len(self.topic) + len(self.reply) + len(self.stamp)
                + len(payload) + self.size_delta)
        size = min(max(size, 0), 2**32 - 1)
        return protocol.HEADER.pack(
            size, self.kind, self.flags, len(self.topic), len(self.reply), len(self.stamp),
            self.nfds, self.fds_lost, self.reserved, self.id) + self.topic + self.reply \
            + self.stamp + payload

    def __repr__(self):
        shown = [KIND_NAMES.get(self.kind, str(self.kind))]
        shown += [f"{name}={getattr(self, name)!r}" for name, default in self.DEFAULTS.items()
                  if getattr(self, name) != default]
        return f"Frame({', '.join(shown)})"


# Hostile topics never start with "good": the good pairs' namespace is out of
# their reach. Many are under "v.", where the victims listen.
victim_topics = st.sampled_from([b"v.x", b"v.fd", b"v.a.b", b"v." + b"z" * 253])
topics = st.one_of(
    victim_topics,
    st.sampled_from([b"h.x", b"v.\xff", b"v.*", b"v.>", b"v..x", b"v.x ", b"v.\xc2\xa0", b"",
                     b">", b"*", b"_SYS.stats", b"_INBOX.x", b"_INBOX.", b"_x", b"\xff", b"a.b*"]),
    st.binary(max_size=12).filter(lambda topic: not topic.startswith(b"good")))
# Spec: a reply is empty or a valid topic under _INBOX.; anything else is malformed.
replies = st.one_of(
    st.just(b""),
    st.sampled_from([b"_INBOX.r", b"_INBOX.a.b", b"\xff", b"_INBOX.\xff", b"v.x", b"_INBOX.*",
                     b"_INBOX.>", b"_INBOX..x", b"_INBOX", b"_SYS.x", b" ", b"_INBOX.a b",
                     b"_INBOX." + b"r" * 248]),
    st.binary(max_size=8))
patterns = st.one_of(
    st.sampled_from([b"v.>", b"h.>", b">", b"*", b"v.*", b"good.>", b"_INBOX.>", b"_SYS.>",
                     b"a.b*", b"\xff", b"", b"v..>", b"*.>"]),
    st.binary(max_size=8))
queues = st.sampled_from([b"", b"", b"q", b"\xff", b"q" * 255])
ids = st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1).filter(lambda i: i != PONG_ID))
payloads = st.one_of(st.just(b""), st.binary(max_size=64),
                     st.sampled_from([msgpack.packb([1]), b"\xc1"]))
# Near max_frame: -300 fits with any stamp; -24 fits the broker but not the
# MSG once the sender's stamp is added; -16 is over max_frame outright.
pads = st.one_of(st.just(0), st.sampled_from([MAX_FRAME - 300, MAX_FRAME - 24, MAX_FRAME - 16]))
declared_fds = st.one_of(st.just(0), st.integers(0, 4), st.sampled_from([251, 252, 255]))
attached_fds = st.one_of(st.just(0), st.integers(1, 4), st.just(200))
received_counts = st.sampled_from([struct.pack("<Q", n) for n in (0, 1, 2**20, 2**63, 2**64 - 1)]
                                  + [b"", b"\x01", bytes(9)])


def frames_of(kind, **fields):
    common = dict(id=ids, nfds=declared_fds, attach=attached_fds)
    return st.builds(Frame, st.just(kind), **{**common, **fields})


well_formed_frames = st.one_of(
    frames_of(PUB, topic=topics, reply=replies, payload=payloads, pad=pads,
              flags=st.sampled_from([0, 0, 0, 1, 2, 255]), stamp=st.sampled_from([b"", b"\x90"]),
              fds_lost=st.sampled_from([0, 0, 1, 255])),
    frames_of(SUB, topic=patterns, reply=queues),
    frames_of(UNSUB),
    frames_of(PING),
    frames_of(STATS),
    frames_of(RECEIVED, payload=received_counts))
# Frames whose header lies: unknown kinds, reserved bits, sizes.
mangled_frames = st.builds(
    Frame, st.integers(0, 255), topic=topics, payload=payloads, nfds=declared_fds,
    attach=attached_fds, reserved=st.sampled_from([0, 1, 255]),
    size_delta=st.sampled_from([0, -13, -1, 1, 1000, MAX_FRAME, 2**31]))
client_frames = st.one_of(well_formed_frames, mangled_frames)


def open_files(count: int) -> list[int]:
    """count fresh fds to pass: pipe ends."""
    fds: list[int] = []
    while len(fds) < count:
        fds += os.pipe()
    for extra in fds[count:]:
        os.close(extra)
    return fds[:count]


def sealed_memfd(size: int, seal: bool) -> int:
    fd = os.memfd_create("busx-fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def close_all(fds):
    for fd in fds:
        os.close(fd)


# ---- hostile peers ----

def tcp_key(host: str, port: int) -> str:
    """An IPv4 address as /proc/net/tcp writes it."""
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


class Peer:
    """A raw connection that speaks or breaks the protocol by hand. It never
    reads unless a rule says so: answers pile up at the broker."""

    def __init__(self, broker: FuzzBroker, transport: str):
        self.transport = transport
        self.opened = time.monotonic()
        if transport == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(broker.unix_path)
        else:
            self.sock = socket.create_connection(broker.tcp_address)
        self.broker_address = broker.tcp_address
        self.fresh = True       # nothing sent yet
        self.ready = False      # a proper handshake got READY
        self.aligned = False    # ready, and every byte sent since was a whole, true frame
        self.subscribed = False
        self.held_fds = 0       # fds the broker may rightly hold: in frames not yet complete
        self.owed = b""         # the rest of a frame a stalled send left unsent
        self.gone = False       # the broker closed it (EPIPE, reset, EOF)
        self.decoder = protocol.FrameDecoder(max_frame=2**32)
        self.frames: list[protocol.Frame] = []

    @property
    def fd_allowance(self) -> int:
        """fds the broker may hold for this peer: its socket, what is queued
        for it as a subscriber, and fds of frames still incomplete; nothing
        once a peer that never got READY is past the handshake timeout."""
        if not self.ready and time.monotonic() - self.opened > handshake_timeout() + 1:
            return 0
        return 1 + (MAX_PENDING_FDS if self.subscribed else 0) + self.held_fds

    def unread_by_broker(self) -> int:
        """Bytes we sent that the broker has not read yet: our send queue
        (UNIX), or the broker's receive queue in /proc/net/tcp (TCP)."""
        try:
            if self.transport == "unix":
                queued = fcntl.ioctl(self.sock, termios.TIOCOUTQ, bytes(4))
                return struct.unpack("i", queued)[0]
            ours, theirs = tcp_key(*self.sock.getsockname()), tcp_key(*self.broker_address)
        except OSError:
            return 0
        with open("/proc/net/tcp") as table:
            for line in table:
                fields = line.split()
                if fields[1] == theirs and fields[2] == ours:
                    return int(fields[4].split(":")[1], 16)
        return 0

    # -- sending without reading --

    def _push(self, data: bytes, fds=()) -> int:
        """Send data until done or stalled; fds travel with its first byte."""
        sent = 0
        self.sock.settimeout(SEND_STALL)
        try:
            if fds and self.transport == "unix":
                sent = socket.send_fds(self.sock, [data[:1 << 16]], fds)
            while sent < len(data):
                sent += self.sock.send(data[sent:sent + (1 << 20)])
        except TimeoutError:
            pass        # the broker stopped reading us: the bound at work
        except OSError:
            self.gone = True
        return sent

    def send(self, data: bytes, fds=(), unit: int | None = None, whole: bool = True):
        """Send data (whole frames of `unit` bytes, or one message when unit is
        None). A stall keeps the rest of the frame in progress as owed, sent
        before anything else, so the stream stays at frame boundaries; what
        comes after it is dropped. whole=False: data is not whole frames."""
        self.fresh = False
        if not whole:
            self.aligned = False
        if self.gone:
            return
        if self.owed:
            self.owed = self.owed[self._push(self.owed):]
            if self.owed or self.gone:
                return
        # fds sent where the broker cannot see a whole frame may rightly wait.
        may_wait = not self.aligned
        sent = self._push(data, fds)
        if sent < len(data) and not self.gone:
            end = len(data) if unit is None else sent + (-sent % unit)
            self.owed = data[sent:end]
            may_wait = may_wait or sent > 0
        if may_wait and self.transport == "unix":
            self.held_fds += len(fds)

    # -- reading --

    def _read_frame(self, deadline: float):
        """The next frame, or None when the broker closed the connection."""
        while not self.frames:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"the broker neither answered {self} nor closed it "
                                     f"within {READ_TIMEOUT}s") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.gone = True
                return None
            self.frames += self.decoder.feed(chunk)
        return self.frames.pop(0)

    def handshake(self, payload_fds: bool):
        """The proper handshake: read the preamble and HELLO, send CONNECT,
        read READY. A broker may have closed us (handshake timeout)."""
        self.fresh = False
        deadline = time.monotonic() + READ_TIMEOUT
        preamble = b""
        self.sock.settimeout(READ_TIMEOUT)
        while len(preamble) < len(protocol.PREAMBLE):
            try:
                chunk = self.sock.recv(len(protocol.PREAMBLE) - len(preamble))
            except (TimeoutError, ConnectionResetError):
                chunk = b""
            if not chunk:
                self.gone = True
                return
            preamble += chunk
        assert preamble == protocol.PREAMBLE, f"the broker greeted with {preamble!r}"
        hello = self._read_frame(deadline)
        if hello is None:
            return
        assert hello.kind == protocol.HELLO, hello
        connect = {"name": "hostile", "payload_fds": payload_fds}
        self.send(protocol.PREAMBLE + protocol.encode_frame(CONNECT, payload=pack(connect)))
        answer = self._read_frame(deadline)
        if answer is not None and answer.kind == protocol.READY:
            self.ready = self.aligned = True
        elif answer is not None:
            # A fatal ERROR (a handshake timeout, when the machine is slow):
            # keep it for ping_reading, which checks the broker's last word.
            self.frames.insert(0, answer)

    def ping_reading(self) -> str:
        """Read everything, send what is owed and a PING, until the PONG: a
        client that reads again recovers. "pong", "closed" (the last frame a
        fatal ERROR) or "reset" (the broker had unread input when it closed,
        so what it said last may be lost)."""
        out = self.owed + protocol.encode_frame(PING, id=PONG_ID)
        self.owed = b""
        self.sock.setblocking(False)
        deadline = time.monotonic() + READ_TIMEOUT * 2
        last = self.frames[-1] if self.frames else None
        if any(f.kind == protocol.PONG and f.id == PONG_ID for f in self.frames):
            return "pong"
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if out:
                    try:
                        out = out[self.sock.send(out):]
                    except BlockingIOError:
                        pass
                    except OSError:
                        out = b""       # closed: what it said is still there to read
                selector.select(0.05)
                try:
                    chunk = self.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    self.gone = True
                    return "reset"
                if not chunk:
                    self.gone = True
                    assert last is not None and last.kind == protocol.ERROR \
                        and last.flags & protocol.FATAL, \
                        f"the broker closed {self} without a fatal ERROR; last frame {last}"
                    return "closed"
                frames = self.decoder.feed(chunk)
                if frames:
                    last = frames[-1]
                if any(f.kind == protocol.PONG and f.id == PONG_ID for f in frames):
                    self.frames = []
                    return "pong"
        raise AssertionError(f"{self} read everything and sent a PING: no PONG and no close "
                             f"within {READ_TIMEOUT * 2}s")

    def closed_by_broker(self, budget: int = 32 << 20) -> bool:
        """Whether the broker has closed us: read (and discard) up to budget
        bytes of unread answers to find out."""
        if self.gone:
            return True
        self.sock.setblocking(False)
        try:
            while budget > 0:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    return True
                budget -= len(chunk)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return False

    def end(self, how: str):
        if how == "reset":
            # SO_LINGER 0: close sends a RST (TCP) / drops the queue (UNIX).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "shut_wr":
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self._read_until_closed()
        self.sock.close()

    def _read_until_closed(self):
        """After our half-close the broker must close its side too: read
        (and discard) until it does."""
        deadline = time.monotonic() + READ_TIMEOUT * 2
        self.sock.setblocking(True)
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                if not self.sock.recv(1 << 20):
                    return
            except TimeoutError:
                raise AssertionError(f"the broker kept half-closed {self} open "
                                     f"{READ_TIMEOUT * 2}s after its EOF") from None
            except OSError:
                return

    def __repr__(self):
        state = "ready" if self.ready else "fresh" if self.fresh else "unready"
        return f"<{self.transport} peer, {state}{', gone' if self.gone else ''}>"


# ---- well-behaved clients ----

class GoodPair:
    """A busx publisher and subscriber on "good.<n>": every message arrives."""

    def __init__(self, broker: FuzzBroker, number: int, pub_transport: str, sub_transport: str):
        self.name = f"good pair {number} ({pub_transport}->{sub_transport})"
        self.topic = f"good.{number}"
        urls = {"unix": broker.url, "tcp": broker.tcp_url}
        self.subscriber = busx.connect(urls[sub_transport], name=f"good-sub-{number}",
                                       reconnect=False)
        self.sub = self.subscriber.subscribe(self.topic)
        self.publisher = busx.connect(urls[pub_transport], name=f"good-pub-{number}",
                                      reconnect=False)
        self.sent = self.received = 0

    def publish(self, count: int):
        self.publisher.publish_many((self.topic, n) for n in range(self.sent, self.sent + count))
        self.sent += count

    def expect_everything(self):
        """Flush, then receive up to what was sent: all of it, in order."""
        flush_within(self.publisher, f"{self.name}'s publisher")
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while self.received < self.sent:
            batch = self.sub.recv_many(timeout=max(deadline - time.monotonic(), 0))
            assert batch, (f"{self.name}: the subscriber got {self.received} of {self.sent} "
                           f"messages, nothing more within {DELIVERY_TIMEOUT}s")
            numbers = [msg.data for msg in batch]
            expected = list(range(self.received, self.received + len(numbers)))
            assert numbers == expected, f"{self.name}: lost or reordered: {numbers[:10]}..."
            self.received += len(numbers)
        assert self.sub.dropped == 0, f"{self.name}: the broker dropped {self.sub.dropped}"
        flush_within(self.subscriber, f"{self.name}'s subscriber")

    def close(self):
        self.publisher.close()
        self.subscriber.close()


def flush_within(bus, what: str):
    try:
        bus.flush(timeout=FLUSH_TIMEOUT)
    except busx.Timeout:
        raise AssertionError(f"{what} could not flush within {FLUSH_TIMEOUT}s") from None


class Victim:
    """A busx subscriber on "v.>", where hostile peers publish whatever they
    like. It must never wedge or be cut off: a later good message arrives."""

    def __init__(self, broker: FuzzBroker, transport: str):
        self.name = f"victim-{transport}"
        url = broker.url if transport == "unix" else broker.tcp_url
        self.bus = busx.connect(url, name=self.name, reconnect=False)
        self.sub = self.bus.subscribe(VICTIM_PATTERN)

    def saw_probe(self, secret: bytes, first: int, timeout: float) -> bool:
        """Drain what arrived (closing received fds) until a probe numbered
        first or later."""
        try:
            batch = self.sub.recv_many(timeout=timeout)
        except Exception as exc:
            raise AssertionError(f"{self.name}: recv raised {exc!r} after hostile input: "
                                 "one bad frame wedged a subscriber") from exc
        seen = False
        for msg in batch:
            close_all(msg.fds)
            # Spec: a PUB's reply is empty or under _INBOX.; anything else is
            # malformed, and closes its sender instead of reaching anyone.
            assert msg.reply_to is None or msg.reply_to.startswith("_INBOX."), \
                f"{self.name} received a message with reply_to {msg.reply_to!r}"
            if msg.topic == PROBE_TOPIC:
                seen = seen or is_probe(msg.raw, secret, first)
        return seen


def is_probe(raw: bytes, secret: bytes, first: int) -> bool:
    """Whether raw is our probe numbered first or later (hostile peers may
    publish anything to the probe's topic too)."""
    try:
        probe = msgpack.unpackb(raw)
    except Exception:
        return False
    return (isinstance(probe, list) and len(probe) == 2 and probe[0] == secret
            and isinstance(probe[1], int) and probe[1] >= first)


# ---- what the whole run measured ----

@dataclass
class Totals:
    examples: int = 0
    checks: int = 0
    peers: int = 0
    closed_by_broker: int = 0
    peak_rss: int = 0
    peak_rss_growth: int = 0
    peak_fds: int = 0
    peak_fds_growth: int = 0

    def summary(self, seconds: float) -> str:
        return (f"protocol fuzz: {self.examples} examples, {self.checks - self.examples} steps "
                f"in {seconds:.0f}s; {self.peers} hostile peers, {self.closed_by_broker} of them "
                f"closed by the broker; peak broker RSS {self.peak_rss >> 20} MiB "
                f"(+{self.peak_rss_growth >> 20} MiB over its baseline), peak broker fds "
                f"{self.peak_fds} (+{self.peak_fds_growth}); broker options "
                f"{' '.join(limit_options())}")


TOTALS = Totals()


# ---- the state machine ----

class ProtocolMachine(RuleBasedStateMachine):
    ready = Bundle("ready")
    unready = Bundle("unready")
    garbled = Bundle("garbled")

    def __init__(self):
        super().__init__()
        TOTALS.examples += 1
        self.healthy = True     # no check has failed: teardown may add its own
        self.directory = tempfile.mkdtemp(prefix="busx-fuzz-")
        self.broker = FuzzBroker(self.directory)
        self.start_fds = self.broker.fds()
        self.open_peers: list[Peer] = []
        self.peak_open_peers = 0
        self.pairs: list[GoodPair] = []
        self.victims: list[Victim] = []
        self.prober = None
        try:
            self.victims = [Victim(self.broker, "unix"), Victim(self.broker, "tcp")]
            self.prober = busx.connect(self.broker.url, name="prober", reconnect=False)
            self.victim_ids = self.connection_ids()
        except BaseException:
            self.healthy = False
            self.teardown()     # hypothesis calls it only for a machine that exists
            raise
        self.secret = secrets.token_bytes(8)
        self.probes = 0
        self.rss_baseline = self.broker.peak_rss_bytes()

    def good_clients(self) -> list:
        """Everything with a close(): good pairs, victims' buses, the prober."""
        return (self.pairs + [victim.bus for victim in self.victims]
                + ([self.prober] if self.prober else []))

    def good_connections(self) -> int:
        return 2 * len(self.pairs) + len(self.victims) + 1

    def connection_ids(self) -> dict:
        stats = self.prober.stats(timeout=FLUSH_TIMEOUT)
        return {c["name"]: c["id"] for c in stats["connections"]
                if c["name"] and c["name"].startswith("victim")}

    @contextlib.contextmanager
    def checking(self):
        """Around assertions: a failure leaves the machine unhealthy, and
        teardown then cleans up without checks of its own on top."""
        self.healthy = False
        yield
        self.healthy = True

    # -- good clients --

    @initialize(pub=st.sampled_from(["unix", "tcp"]), sub=st.sampled_from(["unix", "tcp"]))
    def first_good_pair(self, pub, sub):
        self.pairs.append(GoodPair(self.broker, 0, pub, sub))

    @precondition(lambda self: len(self.pairs) < MAX_PAIRS)
    @rule(pub=st.sampled_from(["unix", "tcp"]), sub=st.sampled_from(["unix", "tcp"]))
    def another_good_pair(self, pub, sub):
        self.pairs.append(GoodPair(self.broker, len(self.pairs), pub, sub))

    @rule(pair=st.integers(0, MAX_PAIRS - 1), count=st.sampled_from([1, 10, 2000]))
    def publish_good(self, pair, count):
        self.pairs[pair % len(self.pairs)].publish(count)

    # -- hostile peers --
    #
    # Three bundles, so that hypothesis aims each attack where it means
    # something: `ready` peers completed the handshake and every byte they
    # sent since was a whole frame (the broker reads their frames as we
    # wrote them); `unready` peers never sent anything; `garbled` peers broke
    # their stream on purpose (a cut frame, a lying header, a bad handshake).

    def _open(self, transport):
        peer = Peer(self.broker, transport)
        self.open_peers.append(peer)
        self.peak_open_peers = max(self.peak_open_peers, len(self.open_peers))
        TOTALS.peers += 1
        return peer

    @precondition(lambda self: len(self.open_peers) < MAX_PEERS)
    @rule(target=ready, transport=st.sampled_from(["unix", "tcp"]), payload_fds=st.booleans())
    def open_ready_peer(self, transport, payload_fds):
        peer = self._open(transport)
        with self.checking():
            peer.handshake(payload_fds)
        return peer

    @precondition(lambda self: len(self.open_peers) < MAX_PEERS)
    @rule(target=unready, transport=st.sampled_from(["unix", "tcp"]))
    def open_raw_peer(self, transport):
        """Connected, nothing sent: the broker must not wait for it forever."""
        return self._open(transport)

    @rule(target=ready, peer=consumes(unready), payload_fds=st.booleans())
    def late_handshake(self, peer, payload_fds):
        """The handshake, some steps after connecting (maybe past the
        broker's handshake timeout: then the broker has closed it)."""
        with self.checking():
            peer.handshake(payload_fds)
        return peer

    @rule(target=garbled, peer=consumes(unready),
          how=st.sampled_from(["wrong_magic", "wrong_version", "garbage_connect",
                               "oversized_connect", "array_bomb", "frame_first", "half",
                               "preamble_only"]),
          junk=st.binary(max_size=64))
    def broken_handshake(self, peer, how, junk):
        connect = protocol.encode_frame(CONNECT, payload=pack({"name": "hostile"}))
        data = {
            "wrong_magic": b"GET / HTTP/1.1\r\n\r\n" + junk,
            "wrong_version": protocol.MAGIC + bytes([2, 0, 0, 0]) + connect,
            "garbage_connect": protocol.PREAMBLE + protocol.encode_frame(CONNECT, payload=junk),
            # Spec: frames before READY are at most 64 KiB.
            "oversized_connect": protocol.PREAMBLE + protocol.encode_frame(
                CONNECT, payload=pack({"name": "x" * (100 << 10)})),
            # A msgpack array of a million empty arrays: a million Python
            # lists if decoded without limits.
            "array_bomb": protocol.PREAMBLE + protocol.encode_frame(
                CONNECT, payload=b"\xdd" + struct.pack(">I", MAX_FRAME - 64)
                + b"\x90" * (MAX_FRAME - 64)),
            "frame_first": protocol.PREAMBLE + protocol.encode_frame(PING, id=1) + connect,
            "half": protocol.PREAMBLE + connect[:len(connect) // 2],
            "preamble_only": protocol.PREAMBLE,
        }[how]
        peer.send(data, whole=False)
        return peer

    @rule(peer=ready, frame=well_formed_frames)
    def send_frame(self, peer, frame):
        """A whole frame of a client kind, its fields valid or hostile, with
        as many fds attached as `attach` says, whatever nfds claims."""
        self._send(peer, frame, frame.encode())

    @rule(peer=ready, topic=victim_topics, reply=replies, payload=payloads, pad=pads,
          fds=st.sampled_from([0, 0, 1, 3]))
    def publish_to_victims(self, peer, topic, reply, payload, pad, fds):
        """A PUB with a valid topic under "v.", so it reaches the victims:
        its reply field anything, its size near max_frame, and (over UNIX)
        the fds it declares."""
        fds = fds if peer.transport == "unix" else 0
        frame = Frame(PUB, topic=topic, reply=reply, payload=payload, pad=pad, nfds=fds,
                      attach=fds)
        self._send(peer, frame, frame.encode())

    @rule(target=garbled, peer=consumes(ready), frame=mangled_frames)
    def send_mangled_frame(self, peer, frame):
        """A frame whose header lies: unknown kind, reserved bits, size."""
        self._send(peer, frame, frame.encode(), whole=False)
        return peer

    @rule(target=garbled, peer=consumes(ready), frame=well_formed_frames,
          cut=st.integers(0, 2**20))
    def send_cut_frame(self, peer, frame, cut):
        """A frame cut at a random point; the rest never comes."""
        data = frame.encode()
        self._send(peer, frame, data[:cut % (len(data) + 1)], whole=False)
        return peer

    @rule(peer=garbled, frame=client_frames)
    def send_more_garbage(self, peer, frame):
        self._send(peer, frame, frame.encode(), whole=False)

    @rule(peer=consumes(ready), frame=client_frames, cut=st.integers(0, 2**20),
          ending=st.sampled_from(["close", "reset", "shut_wr"]))
    def send_cut_then_end(self, peer, frame, cut, ending):
        """A frame cut at a random point, then the end of the connection."""
        data = frame.encode()
        self._send(peer, frame, data[:cut % (len(data) + 1)], whole=False)
        self._end(peer, ending)

    def _send(self, peer, frame, data, whole=True):
        if frame.kind == SUB:
            peer.subscribed = True
        fds = open_files(frame.attach) if peer.transport == "unix" else []
        try:
            peer.send(data, fds, whole=whole)
        finally:
            close_all(fds)      # the kernel holds its own references in flight

    @rule(peer=ready, kind=st.sampled_from(["PING", "STATS", "SUB", "SUB+UNSUB"]),
          count=st.sampled_from([10, 1000, 50_000, 1_000_000, 5_000_000]))
    def flood(self, peer, kind, count):
        """Many requests, never reading the answers."""
        if kind == "PING":
            data, unit = protocol.encode_frame(PING, id=1) * count, 16
        elif kind == "STATS":
            count = min(count, 60_000)      # each costs the broker a stats snapshot
            data, unit = protocol.encode_frame(STATS, id=1) * count, 16
        else:
            # One SUB must cost the broker O(log n) at most: 50,000 of them at
            # O(n) each hold up every other client for seconds.
            peer.subscribed = True
            count = min(count, 50_000)
            sub_frames = [protocol.encode_frame(SUB, b"h.%06d" % i, id=i) for i in range(count)]
            if kind == "SUB+UNSUB":
                sub_frames = [frame + protocol.encode_frame(UNSUB, id=i)
                              for i, frame in enumerate(sub_frames)]
            data, unit = b"".join(sub_frames), len(sub_frames[0])
        peer.send(data, unit=unit)

    @rule(peer=ready, topic=st.sampled_from([b"v.fd", b"h.fd"]),
          count=st.sampled_from([1, 50, 1000]), per_frame=st.sampled_from([1, 3]))
    def flood_fds(self, peer, topic, count, per_frame):
        """PUBs that each carry real fds, as fast as the socket takes them:
        the broker must queue at most max_pending_fds for a subscriber that
        never reads. 1 KiB payloads: once the subscriber's socket buffer is
        full, the fds stay with the broker."""
        if peer.transport != "unix":
            return
        frame = protocol.encode_frame(PUB, topic, msgpack.packb(bytes(1020)), nfds=per_frame)
        per_call = 253 // per_frame         # SCM_MAX_FD fds in one sendmsg
        for start in range(0, count, per_call):
            frames = min(per_call, count - start)
            fds = open_files(frames * per_frame)
            try:
                peer.send(frame * frames, fds, unit=len(frame))
            finally:
                close_all(fds)
            if peer.owed or peer.gone:
                break

    @rule(peer=ready, variant=st.sampled_from(["sealed", "unsealed", "wrong_size", "too_large",
                                               "no_fd", "pipe"]),
          topic=st.sampled_from([b"v.big", b"h.big"]), size=st.sampled_from([1, 4096, 300_000]))
    def send_payload_fd(self, peer, variant, topic, size):
        """A PUB whose payload is in a memfd (flag PAYLOAD_FD), proper or not."""
        if peer.transport != "unix":
            return
        claimed = {"wrong_size": size + 1, "too_large": MAX_FRAME + 1}.get(variant, size)
        if variant == "pipe":
            fds = open_files(1)
        elif variant == "no_fd":
            fds = []
        else:
            fds = [sealed_memfd(size, seal=variant != "unsealed")]
        data = protocol.encode_frame(PUB, topic, struct.pack("<Q", claimed),
                                     flags=protocol.PAYLOAD_FD, nfds=1)
        try:
            peer.send(data, fds)
        finally:
            close_all(fds)

    @rule(peer=ready)
    def read_and_ping(self, peer):
        """A peer that stopped reading reads again: it gets its PONG, or was
        closed with a fatal ERROR saying why."""
        if not peer.gone:
            with self.checking():
                peer.ping_reading()

    # -- hostile peers: ending --

    @rule(peer=consumes(ready), how=st.sampled_from(["close", "reset", "shut_wr"]))
    def end_ready(self, peer, how):
        self._end(peer, how)

    @rule(peer=consumes(garbled), how=st.sampled_from(["close", "reset", "shut_wr"]))
    def end_garbled(self, peer, how):
        self._end(peer, how)

    @rule(peer=consumes(unready), how=st.sampled_from(["close", "reset", "shut_wr"]))
    def end_unready(self, peer, how):
        self._end(peer, how)

    def _end(self, peer, how):
        if how != "shut_wr" and peer.closed_by_broker():
            TOTALS.closed_by_broker += 1
        self.open_peers.remove(peer)
        with self.checking():
            peer.end(how)

    # -- invariants --

    def settle(self):
        """Wait until the broker has read what the hostile peers sent, or has
        stopped reading them (its bounds at work): their unread bytes reach
        0 or stay put. Without this, a check could measure the broker before
        it even received the step's fds."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        previous, steady = None, 0
        while time.monotonic() < deadline:
            unread = [peer.unread_by_broker() for peer in self.open_peers]
            steady = steady + 1 if unread == previous else 0
            if not any(unread) or steady >= 5:
                return
            previous = unread
            time.sleep(0.02)    # polling the kernel's queues

    @invariant()
    def broker_is_alive(self):
        TOTALS.checks += 1
        self.settle()
        with self.checking():
            code = self.broker.process.poll()
            assert code is None, f"the broker exited with {code}: {self.broker.log()[-3000:]}"

    @invariant()
    def good_pairs_lose_nothing(self):
        with self.checking():
            for pair in self.pairs:
                pair.publish(1)         # every step has something new to check
                pair.expect_everything()
            flush_within(self.prober, "the prober")

    @invariant()
    def victims_are_never_wedged(self):
        """A probe published now reaches every victim, whatever hostile
        messages came first. A probe may be dropped (slow consumer) behind a
        hostile burst, so a fresh one follows every PROBE_EVERY seconds; the
        victims' connections must be the ones they started with."""
        with self.checking():
            first = self.probes
            waiting = list(self.victims)
            deadline = time.monotonic() + DELIVERY_TIMEOUT
            next_probe = 0.0
            while waiting:
                now = time.monotonic()
                assert now < deadline, (f"{[v.name for v in waiting]} got no probe within "
                                        f"{DELIVERY_TIMEOUT}s: wedged by hostile input")
                if now >= next_probe:
                    self.prober.publish(PROBE_TOPIC, [self.secret, self.probes])
                    self.probes += 1
                    flush_within(self.prober, "the prober")
                    next_probe = now + PROBE_EVERY
                waiting = [v for v in waiting if not v.saw_probe(self.secret, first, 0.05)]
            for victim in self.victims:
                flush_within(victim.bus, victim.name)
            ids = self.connection_ids()
            assert ids == self.victim_ids, \
                f"a victim was disconnected by someone else's messages: {self.victim_ids} -> {ids}"

    @invariant()
    def memory_is_bounded(self):
        with self.checking():
            rss = self.broker.peak_rss_bytes()
            TOTALS.peak_rss = max(TOTALS.peak_rss, rss)
            TOTALS.peak_rss_growth = max(TOTALS.peak_rss_growth, rss - self.rss_baseline)
            limit = self.rss_baseline + RSS_ALLOWANCE + RSS_PER_PEER * self.peak_open_peers
            assert rss <= limit, (f"broker peak RSS {rss >> 20} MiB over its bound of "
                                  f"{limit >> 20} MiB (baseline {self.rss_baseline >> 20} MiB, "
                                  f"{self.peak_open_peers} peers)")

    @invariant()
    def fds_are_bounded(self):
        """The broker holds an fd per connection, at most max_pending_fds
        queued per subscriber, and fds of frames it has not seen the end of;
        anything else (stray fds, fds beyond a frame's nfds) it closes."""
        with self.checking():
            limit = (self.start_fds + self.good_connections() + FD_MARGIN
                     + sum(peer.fd_allowance for peer in self.open_peers))
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while (fds := self.broker.fds()) > limit and time.monotonic() < deadline:
                time.sleep(0.01)    # polling the broker's /proc entry
            TOTALS.peak_fds = max(TOTALS.peak_fds, fds)
            TOTALS.peak_fds_growth = max(TOTALS.peak_fds_growth, fds - self.start_fds)
            assert fds <= limit, (f"the broker holds {fds} fds, over its bound of {limit} "
                                  f"({len(self.open_peers)} hostile peers open)")

    # -- the end --

    def teardown(self):
        try:
            for peer in self.open_peers:
                if peer.closed_by_broker():
                    TOTALS.closed_by_broker += 1
                peer.sock.close()
            if self.healthy:
                for client in self.good_clients():
                    client.close()
                deadline = time.monotonic() + SETTLE_TIMEOUT
                while (fds := self.broker.fds()) != self.start_fds \
                        and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert fds == self.start_fds, \
                    f"with every client gone the broker holds {fds} fds, not {self.start_fds}"
                self.broker.stop()      # asserts exit status 0
        finally:
            self.broker.kill()
            for client in self.good_clients():
                with contextlib.suppress(Exception):
                    client.close()
            shutil.rmtree(self.directory, ignore_errors=True)


# The run keeps its own clock; this only catches a hang (shrinking takes <= 5 min).
@pytest.mark.timeout(SECONDS + 600)
def test_protocol_state_machine(pytestconfig):
    started = time.monotonic()
    try:
        while TOTALS.examples < EXAMPLES and time.monotonic() - started < SECONDS:
            batch = min(BATCH, EXAMPLES - TOTALS.examples)
            run_state_machine_as_test(ProtocolMachine,
                                      settings=settings(FUZZ_SETTINGS, max_examples=batch))
    finally:
        # The summary goes to the terminal even when pytest captures output.
        capture = pytestconfig.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print("\n" + TOTALS.summary(time.monotonic() - started), flush=True)
