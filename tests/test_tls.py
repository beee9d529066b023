"""TLS on the TCP listener: pub/sub and request/reply over tls://, the
broker's certificate verified against the client's CA and the host name,
client certificates whose common name is the client's identity (for
msg.sender and policy rules), tokens over TLS, the UNIX socket untouched, a
foreign TLS stack (Python's ssl, openssl s_client) speaking busx, and the
peers that get it wrong: plain TCP at a TLS listener and TLS at a plain
one, stalled handshakes, garbage instead of a ClientHello. Every failure
affects only its own connection, and leaves no file descriptor behind.

Certificates are made per test by tests/certs.py (trustme)."""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings

import msgpack
import pytest
from certs import PKI
from support import open_fds, wait_for

import busx
from busx import protocol
from busx.handshake import client_handshake

CLI = [sys.executable, "-m", "busx.cli"]
TOKENS = {"edge-1": "s3cret"}


# ---- fixtures and helpers ----

@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path / "pki")


@pytest.fixture
def foreign_pki(tmp_path):
    """Another authority: its certificates mean nothing to brokers and
    clients that trust only pki."""
    return PKI(tmp_path / "foreign")


def tls_broker_with(socket_path, files, **options) -> busx.Broker:
    return busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0), tls_cert=files.cert,
                       tls_key=files.key, **options)


@pytest.fixture
def tls_broker(socket_path, pki):
    with tls_broker_with(socket_path, pki.server) as running:
        yield running


@pytest.fixture
def mtls_broker(socket_path, pki):
    with tls_broker_with(socket_path, pki.server, tls_client_ca=pki.ca_file) as running:
        yield running


def tls_url(broker, host: str = "127.0.0.1", scheme: str = "tls://") -> str:
    return f"{scheme}{host}:{broker.tcp_address[1]}"


def round_trip(publisher, subscriber, topic: str = "tls.check", data="hello") -> busx.Message:
    """Publish one message; return it as the subscriber received it."""
    sub = subscriber.subscribe(topic)
    publisher.publish(topic, data)
    msg = sub.recv(timeout=5)
    assert msg.data == data
    sub.unsubscribe()
    return msg


def serves_tls_clients(broker, pki) -> None:
    """The broker still serves: a fresh TLS client and a UNIX client
    exchange a message each way."""
    with busx.connect(tls_url(broker), tls_ca=pki.ca_file, reconnect=False) as remote, \
            busx.connect(broker.url, reconnect=False) as local:
        assert remote.transport == "tls"
        round_trip(remote, local)
        round_trip(local, remote)


def no_tcp_connections_left(broker) -> None:
    """What a refused TCP peer left at the broker is gone (only UNIX
    connections may remain)."""
    wait_for(lambda: all(conn["transport"] == "unix" for conn in broker.stats()["connections"]),
             message=f"TCP connections left: {broker.stats()['connections']}")


def connect_error(url, timeout: float = 5.0, **options) -> tuple[str, float]:
    """The ConnectError connect(url) raises, as text, and how long it took."""
    started = time.monotonic()
    with pytest.raises(busx.ConnectError) as caught:
        busx.connect(url, timeout=timeout, reconnect=False, **options)
    assert isinstance(caught.value, ConnectionError)
    return str(caught.value), time.monotonic() - started


def client_hello(pki) -> bytes:
    """The bytes of a real TLS ClientHello, made by Python's ssl over memory."""
    context = ssl.create_default_context(cafile=pki.ca_file)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and len(hello) > 100     # a handshake record
    return hello


class RawTCP:
    """A plain TCP socket to the broker's listener, for peers that do not
    (or do not yet) speak TLS. Every one opened is closed after its test."""

    opened: list[RawTCP] = []

    def __init__(self, broker) -> None:
        RawTCP.opened.append(self)
        self.sock = socket.create_connection(broker.tcp_address, timeout=10)
        self.opened_at = time.monotonic()

    def read_until_closed(self, timeout: float) -> tuple[bytes, float]:
        """Everything the broker sends until it closes the connection (a
        reset counts as closed), and the seconds since connecting; fails
        the test if it is still open after timeout."""
        received = b""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the broker kept the connection open for {timeout}s; "
                            f"it sent {received[:64]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                continue
            if not chunk:
                return received, time.monotonic() - self.opened_at
            received += chunk

    def still_open(self) -> bool:
        """True while the broker has neither closed nor reset it (never
        waits: nothing to read means open)."""
        if not select.select([self.sock], [], [], 0)[0]:
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""     # readable: returns at once
        except ConnectionResetError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def close_raw_tcp():
    yield
    while RawTCP.opened:
        RawTCP.opened.pop().close()


class ForeignClient:
    """A busx client made of Python's ssl module and busx's plain handshake
    code: the TLS is not busx's own, as with a client in another language."""

    def __init__(self, broker, context: ssl.SSLContext, server_hostname: str | None = "127.0.0.1",
                 token=None) -> None:
        raw = socket.create_connection(broker.tcp_address, timeout=10)
        try:
            self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
        except BaseException:
            raw.close()
            raise
        try:
            self.hello = client_handshake(self.sock, "broker", time.monotonic() + 10, "foreign",
                                          token, "tcp")
        except BaseException:
            self.sock.close()
            raise

    def publish(self, topic: str, data) -> None:
        """PUB, then PING: returns once the broker answered the PONG, so it
        has routed the PUB; fails on any ERROR."""
        self.sock.sendall(protocol.encode_frame(protocol.PUB, topic.encode(), msgpack.packb(data))
                          + protocol.encode_frame(protocol.PING, id=7))
        decoder, frames = protocol.FrameDecoder(), []
        while not any(frame.kind == protocol.PONG for frame in frames):
            chunk = self.sock.recv(65536)
            assert chunk, "the broker closed the connection"
            frames += decoder.feed(chunk)
        assert not [frame for frame in frames if frame.kind == protocol.ERROR], frames

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ForeignClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unverified_context() -> ssl.SSLContext:
    """A TLS client that accepts any certificate: for checking a listener
    still works when its own certificate is the thing under test."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def serves_any_tls_client(broker) -> None:
    """The broker still serves: its UNIX socket, and its TLS listener to a
    client that does not judge the certificate."""
    with busx.connect(broker.url, reconnect=False) as local:
        sub = local.subscribe("still.serving")
        with ForeignClient(broker, unverified_context()) as foreign:
            foreign.publish("still.serving", "yes")
        msg = sub.recv(timeout=5)
        assert msg.data == "yes" and msg.sender.address[0] == "127.0.0.1"


# ---- pub/sub, request/reply ----

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_pub_sub_over_tls_both_ways(tls_broker, pki, host):
    url = tls_url(tls_broker, host)
    with busx.connect(url, tls_ca=pki.ca_file, name="tls-a") as a, \
            busx.connect(url, tls_ca=pki.ca_file, name="tls-b") as b, \
            busx.connect(tls_broker.url, name="local") as local:
        assert (a.transport, b.transport, local.transport) == ("tls", "tls", "unix")
        sender = round_trip(a, b).sender           # TLS to TLS
        assert sender.address[0] == "127.0.0.1" and sender.address[1] > 0
        assert (sender.pid, sender.uid, sender.gid, sender.identity) == (None, None, None, None)
        other = round_trip(b, a, data={"n": 2}).sender              # and back
        assert other.address[0] == "127.0.0.1" and other.address != sender.address
        assert round_trip(a, local).sender.address == sender.address   # TLS to UNIX
        assert round_trip(local, a).sender.pid == os.getpid()           # UNIX to TLS
        names = {conn["name"] for conn in tls_broker.stats()["connections"]}
        assert {"tls-a", "tls-b", "local"} <= names


def test_request_reply_over_tls(tls_broker, pki):
    url = tls_url(tls_broker)
    with busx.connect(url, tls_ca=pki.ca_file) as server, \
            busx.connect(url, tls_ca=pki.ca_file) as client:
        requests = server.subscribe("tls.echo")

        def serve(count):
            for _ in range(count):
                msg = requests.recv(timeout=10)
                msg.respond({"echo": msg.data})

        thread = threading.Thread(target=serve, args=(20,))
        thread.start()
        try:
            for i in range(20):
                assert client.request("tls.echo", i, timeout=10).data == {"echo": i}
        finally:
            thread.join(15)
        assert not thread.is_alive()


def test_a_burst_and_large_payloads_cross_tls_complete_and_in_order(tls_broker, pki):
    """Many TLS records each way, partial writes and reads: a burst of small
    messages and payloads of several MiB arrive whole, in order, at a TLS
    subscriber and a UNIX one."""
    url = tls_url(tls_broker)
    big = [os.urandom(3 << 20) for _ in range(3)]
    with busx.connect(url, tls_ca=pki.ca_file) as publisher, \
            busx.connect(url, tls_ca=pki.ca_file) as remote, \
            busx.connect(tls_broker.url) as local:
        remote_sub, local_sub = remote.subscribe("burst.>"), local.subscribe("burst.>")
        for i in range(20_000):
            publisher.publish("burst.small", i)
        for payload in big:
            publisher.publish("burst.big", payload)
        publisher.publish("burst.small", "end")
        publisher.flush(timeout=30)
        for sub in (remote_sub, local_sub):
            received = []
            while not received or received[-1] != "end":
                batch = sub.recv_many(timeout=30)
                assert batch, f"delivery stalled after {len(received)} messages"
                received += [msg.data for msg in batch]
            assert received[:20_000] == list(range(20_000))
            assert received[20_000:] == [*big, "end"]


# ---- the broker's certificate, verified ----

VERIFY_FAILED = "certificate verify failed"
MISMATCH = re.compile(r"(hostname|ip address) mismatch", re.IGNORECASE)


def assert_says(message: str, *fragments: str | re.Pattern) -> None:
    for fragment in fragments:
        if isinstance(fragment, re.Pattern):
            assert fragment.search(message), f"{fragment.pattern!r} not in {message!r}"
        else:
            assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"


def test_a_broker_signed_by_another_ca_is_refused(tls_broker, pki, foreign_pki):
    url = tls_url(tls_broker)
    message, elapsed = connect_error(url, tls_ca=foreign_pki.ca_file)
    assert_says(message, VERIFY_FAILED, "unable to get local issuer certificate")
    assert f"127.0.0.1:{tls_broker.tcp_address[1]}" in message
    assert elapsed < 2, "a failed verification must not wait for the timeout"
    no_tcp_connections_left(tls_broker)
    serves_tls_clients(tls_broker, pki)


def test_without_tls_ca_the_system_store_is_used(tls_broker, pki):
    """tls_ca=None trusts the system's CAs, which never signed a test CA."""
    message, _ = connect_error(tls_url(tls_broker))
    assert_says(message, VERIFY_FAILED)
    serves_tls_clients(tls_broker, pki)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_certificate_for_another_host_is_refused(socket_path, pki, host):
    with tls_broker_with(socket_path, pki.other_host) as broker:
        message, elapsed = connect_error(tls_url(broker, host), tls_ca=pki.ca_file)
        assert_says(message, VERIFY_FAILED, MISMATCH)
        assert elapsed < 2
        no_tcp_connections_left(broker)
        serves_any_tls_client(broker)


def test_a_certificate_for_the_name_only_is_refused_at_the_address(socket_path, pki):
    """Names and addresses are checked apart: a certificate for
    "localhost" is good at localhost and no good at 127.0.0.1."""
    files = pki._write("localhost-only", pki.authority.issue_cert("localhost"))
    with tls_broker_with(socket_path, files) as broker:
        message, _ = connect_error(tls_url(broker, "127.0.0.1"), tls_ca=pki.ca_file)
        assert_says(message, VERIFY_FAILED, MISMATCH)
        with busx.connect(tls_url(broker, "localhost"), tls_ca=pki.ca_file) as bus:
            round_trip(bus, bus)


@pytest.mark.parametrize("which, reason", [
    ("expired", "certificate has expired"),
    ("not_yet_valid", "certificate is not yet valid"),
])
def test_a_certificate_out_of_its_validity_is_refused(socket_path, pki, which, reason):
    with tls_broker_with(socket_path, getattr(pki, which)) as broker:
        message, elapsed = connect_error(tls_url(broker), tls_ca=pki.ca_file)
        assert_says(message, VERIFY_FAILED, reason)
        assert elapsed < 2
        no_tcp_connections_left(broker)
        serves_any_tls_client(broker)


# ---- client certificates (mTLS) ----

@pytest.mark.parametrize("layout", ["separate", "combined"])
def test_client_certificate_common_name_is_the_identity(mtls_broker, pki, layout):
    files = pki.client("alice")
    cert, key = (files.cert, files.key) if layout == "separate" else (pki.combined(files),) * 2
    with busx.connect(tls_url(mtls_broker), tls_ca=pki.ca_file, tls_cert=cert, tls_key=key,
                      name="alice-conn") as alice, \
            busx.connect(mtls_broker.url) as watcher:
        assert alice.transport == "tls"
        sender = round_trip(alice, watcher).sender
        assert sender.identity == "alice"
        assert sender.address[0] == "127.0.0.1"
        assert (sender.pid, sender.uid, sender.gid) == (None, None, None)
        conn = next(c for c in mtls_broker.stats()["connections"] if c["name"] == "alice-conn")
        assert conn["identity"] == "alice"
        assert (conn["pid"], conn["uid"]) == (None, None)


def test_each_client_gets_its_own_certificates_identity(mtls_broker, pki):
    alice, bob = pki.client("alice"), pki.client("bob")
    url = tls_url(mtls_broker)
    with busx.connect(url, tls_ca=pki.ca_file, tls_cert=alice.cert, tls_key=alice.key) as a, \
            busx.connect(url, tls_ca=pki.ca_file, tls_cert=bob.cert, tls_key=bob.key) as b:
        assert round_trip(a, b).sender.identity == "alice"
        assert round_trip(b, a).sender.identity == "bob"


@pytest.mark.parametrize("who, reason", [
    ("no-certificate", "certificate required"),
    ("another-ca", "unknown ca"),
    ("expired", "expired"),
])
def test_mtls_refuses_clients_without_a_good_certificate(mtls_broker, pki, foreign_pki, who,
                                                         reason):
    """The broker's TLS alert reaches the client's error: it says why."""
    options = {
        "no-certificate": {},
        "another-ca": dict(zip(("tls_cert", "tls_key"), foreign_pki.client("mallory"))),
        "expired": dict(zip(("tls_cert", "tls_key"), pki.expired_client("alice"))),
    }[who]
    message, elapsed = connect_error(tls_url(mtls_broker), tls_ca=pki.ca_file, **options)
    assert_says(message, reason)
    assert elapsed < 2
    no_tcp_connections_left(mtls_broker)
    alice = pki.client("alice")
    with busx.connect(tls_url(mtls_broker), tls_ca=pki.ca_file, tls_cert=alice.cert,
                      tls_key=alice.key) as good, \
            busx.connect(mtls_broker.url) as local:
        assert round_trip(good, local).sender.identity == "alice"
        round_trip(local, good)


def test_a_client_certificate_is_no_identity_where_the_broker_asks_for_none(tls_broker, pki):
    """Without tls_client_ca the broker does not ask for a certificate, so a
    client cannot name itself by offering one."""
    alice = pki.client("alice")
    with busx.connect(tls_url(tls_broker), tls_ca=pki.ca_file, tls_cert=alice.cert,
                      tls_key=alice.key) as bus:
        assert round_trip(bus, bus).sender.identity is None


def test_policy_rules_match_the_certificate_identity(socket_path, pki):
    policy = {"rule": [
        {"identity": "alice", "publish": ["alice.>"], "subscribe": ["alice.>", "shared.>"]},
        {"uid": os.getuid(), "publish": ["shared.>"], "subscribe": ["alice.>", "bob.>"]},
    ]}
    alice_files, bob_files = pki.client("alice"), pki.client("bob")
    with tls_broker_with(socket_path, pki.server, tls_client_ca=pki.ca_file,
                         policy=policy) as broker:
        url = tls_url(broker)
        with busx.connect(url, tls_ca=pki.ca_file, tls_cert=alice_files.cert,
                          tls_key=alice_files.key) as alice, \
                busx.connect(url, tls_ca=pki.ca_file, tls_cert=bob_files.cert,
                             tls_key=bob_files.key) as bob, \
                busx.connect(broker.url) as watcher:
            watched = watcher.subscribe("alice.>")
            watched_bob = watcher.subscribe("bob.>")

            # What the rule for alice allows...
            alice.publish("alice.hello", 1)
            alice.flush(timeout=5)
            msg = watched.recv(timeout=5)
            assert (msg.data, msg.sender.identity) == (1, "alice")
            shared = alice.subscribe("shared.>")
            watcher.publish("shared.news", "for alice")
            assert shared.recv(timeout=5).data == "for alice"

            # ...and nothing beyond it.
            alice.publish("bob.hello", 2)
            with pytest.raises(busx.PermissionDenied, match="bob.hello"):
                alice.flush(timeout=5)
            with pytest.raises(busx.PermissionDenied):
                alice.subscribe("bob.>")

            # bob's certificate is good, but no rule names him.
            with pytest.raises(busx.PermissionDenied):
                bob.subscribe("shared.>")
            bob.publish("bob.hello", 3)
            bob.publish("alice.fake", 4)
            with pytest.raises(busx.PermissionDenied):
                bob.flush(timeout=5)

            # Nothing denied was delivered: the broker had judged every denied
            # publish before this marker, which is the next thing to arrive on
            # the watcher's connection (one socket: bob.hello would be queued
            # for watched_bob by then).
            alice.publish("alice.marker", "after")
            assert watched.recv(timeout=5).data == "after"
            assert watched_bob.recv_many(timeout=0) == []


# ---- tokens over TLS ----

def test_tokens_still_work_over_tls(socket_path, pki):
    with tls_broker_with(socket_path, pki.server, tokens=TOKENS) as broker, \
            busx.connect(broker.url) as local:
        url = tls_url(broker)
        with busx.connect(url, tls_ca=pki.ca_file, token=("edge-1", "s3cret")) as remote:
            assert remote.transport == "tls"
            assert round_trip(remote, local).sender.identity == "edge-1"
        with pytest.raises(busx.AuthenticationFailed, match="token rejected"):
            busx.connect(url, tls_ca=pki.ca_file, token=("edge-1", "wrong"), timeout=5)
        with pytest.raises(busx.AuthenticationFailed, match="requires a token"):
            busx.connect(url, tls_ca=pki.ca_file, timeout=5)
        no_tcp_connections_left(broker)


# ---- transport selection ----

def test_host_port_with_tls_options_moves_to_the_unix_socket(tls_broker, pki):
    url = tls_url(tls_broker, scheme="")
    with busx.connect(url, tls_ca=pki.ca_file, name="auto") as bus:
        assert bus.transport == "unix"
        assert round_trip(bus, bus).sender.pid == os.getpid()
        # Only the UNIX connection remains: the TLS one was for the handshake.
        wait_for(lambda: [c["transport"] for c in tls_broker.stats()["connections"]
                          if c["name"] == "auto"] == ["unix"],
                 message="the TLS connection the client moved from to close")


def test_host_port_with_tls_options_stays_on_tls_when_the_unix_path_is_gone(tls_broker, pki):
    os.unlink(tls_broker.unix_path)
    with busx.connect(tls_url(tls_broker, scheme=""), tls_ca=pki.ca_file) as bus:
        assert bus.transport == "tls"
        assert round_trip(bus, bus).sender.address[0] == "127.0.0.1"


def test_host_port_with_a_client_certificate_alone_is_tls(mtls_broker, pki):
    """tls_cert without tls_ca means TLS against the system's CAs, which do
    not know the test CA: the refusal shows TLS was spoken."""
    os.unlink(mtls_broker.unix_path)
    alice = pki.client("alice")
    message, _ = connect_error(tls_url(mtls_broker, scheme=""), tls_cert=alice.cert,
                               tls_key=alice.key)
    assert_says(message, VERIFY_FAILED)


def test_tls_urls_never_move_to_the_unix_socket(tls_broker, pki):
    with busx.connect(tls_url(tls_broker), tls_ca=pki.ca_file, name="pinned") as bus:
        assert bus.transport == "tls"
        conns = [c for c in tls_broker.stats()["connections"] if c["name"] == "pinned"]
        assert len(conns) == 1 and conns[0]["transport"] != "unix"


def test_unix_clients_are_unaffected_by_tls(tls_broker):
    with busx.connect(tls_broker.url) as bus, busx.connect(tls_broker.unix_path) as other:
        assert (bus.transport, other.transport) == ("unix", "unix")
        sender = round_trip(bus, other).sender
        assert (sender.pid, sender.uid, sender.identity, sender.address) == (
            os.getpid(), os.getuid(), None, None)
        # fds still pass over UNIX alongside a TLS listener.
        read_end, write_end = os.pipe()
        try:
            sub = other.subscribe("tls.fds")
            bus.publish("tls.fds", "pipe", fds=[write_end])
            msg = sub.recv(timeout=5)
            assert len(msg.fds) == 1
            os.write(msg.fds[0], b"x")
            os.close(msg.fds[0])
            assert os.read(read_end, 1) == b"x"
        finally:
            os.close(read_end)
            os.close(write_end)


def test_a_tls_client_reconnects_over_tls(socket_path, pki):
    broker = tls_broker_with(socket_path, pki.server)
    broker.start()
    port = broker.tcp_address[1]
    try:
        with busx.connect(f"tls://127.0.0.1:{port}", tls_ca=pki.ca_file, reconnect=True,
                          name="survivor") as bus:
            sub = bus.subscribe("again.>")
            broker.stop()
            broker = busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", port),
                                 tls_cert=pki.server.cert, tls_key=pki.server.key)
            broker.start()
            wait_for(lambda: any(c["name"] == "survivor" and c["subscriptions"] >= 1
                                 for c in broker.stats()["connections"]),
                     timeout=20, message="the client never re-subscribed")
            assert bus.transport == "tls"
            with busx.connect(broker.url) as local:
                local.publish("again.hello", "back")
                assert sub.recv(timeout=10).data == "back"
    finally:
        broker.stop()


# ---- the wrong protocol on either side ----

@pytest.mark.parametrize("scheme", ["tcp://", ""])
def test_a_plain_tcp_client_at_a_tls_listener_gets_a_clear_connect_error(tls_broker, pki, scheme):
    """Both sides wait for the other to speak first (busx's broker, TLS's
    client): the client gives up at its timeout, and says TLS may be why."""
    url = tls_url(tls_broker, scheme=scheme)
    message, elapsed = connect_error(url, timeout=1.0)
    assert elapsed < 3, f"took {elapsed:.1f}s with timeout=1.0"
    assert url in message
    assert re.search(r"\btls\b", message.replace(url, ""), re.IGNORECASE), \
        f"the message gives no hint that the listener speaks TLS: {message!r}"
    no_tcp_connections_left(tls_broker)
    serves_tls_clients(tls_broker, pki)


def test_a_tls_client_at_a_plain_listener_gets_a_clear_connect_error(broker, pki):
    """A plain broker sends its busx preamble where TLS expects a ServerHello."""
    url = tls_url(broker)
    message, elapsed = connect_error(url, tls_ca=pki.ca_file)
    assert elapsed < 2, f"took {elapsed:.1f}s: a plain broker answers at once"
    assert f"127.0.0.1:{broker.tcp_address[1]}" in message
    beyond_url = message.replace(url, "")
    assert re.search(r"\b(tls|ssl)\b", beyond_url, re.IGNORECASE), \
        f"the message does not say TLS failed: {message!r}"
    no_tcp_connections_left(broker)
    with busx.connect(f"tcp://127.0.0.1:{broker.tcp_address[1]}") as tcp, \
            busx.connect(broker.url) as local:
        round_trip(tcp, local)
        round_trip(local, tcp)


def test_the_tls_listener_speaks_no_plaintext(socket_path, pki):
    """A peer that connects and says nothing hears nothing in the clear (no
    busx preamble before TLS), then is closed at the handshake timeout."""
    with tls_broker_with(socket_path, pki.server, handshake_timeout=0.5) as broker:
        received, _ = RawTCP(broker).read_until_closed(timeout=5)
        assert received == b""


# ---- a foreign TLS stack ----

@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_python_ssl_client_speaks_busx_over_the_tls_listener(tls_broker, pki, version):
    context = ssl.create_default_context(cafile=pki.ca_file)
    context.minimum_version = context.maximum_version = getattr(ssl.TLSVersion, version)
    with busx.connect(tls_broker.url) as local:
        sub = local.subscribe("foreign.>")
        with ForeignClient(tls_broker, context) as foreign:
            assert foreign.sock.version() == version.replace("_", ".")
            assert foreign.hello["max_frame"] > 0
            foreign.publish("foreign.hello", {"from": "python ssl"})
            port = foreign.sock.getsockname()[1]
        msg = sub.recv(timeout=5)
        assert msg.data == {"from": "python ssl"}
        assert msg.sender.address == ("127.0.0.1", port)


def test_python_ssl_client_with_a_certificate_gets_its_identity(mtls_broker, pki):
    context = ssl.create_default_context(cafile=pki.ca_file)
    alice = pki.client("alice")
    context.load_cert_chain(alice.cert, alice.key)
    with busx.connect(mtls_broker.url) as local:
        sub = local.subscribe("foreign.>")
        with ForeignClient(mtls_broker, context) as foreign:
            foreign.publish("foreign.hello", 1)
        assert sub.recv(timeout=5).sender.identity == "alice"


def test_protocols_older_than_tls_1_2_are_refused(tls_broker, pki):
    """A TLS 1.1 client is turned away. Checked first against a Python
    server that accepts TLS 1.1, so the refusal is the broker's, not this
    machine's OpenSSL refusing to speak 1.1 at all."""
    def old_client() -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=pki.ca_file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server.cert, pki.server.key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1_1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def accept_one():
            peer, _ = listener.accept()
            try:
                server.wrap_socket(peer, server_side=True).close()
            except (ssl.SSLError, OSError):
                peer.close()
        thread = threading.Thread(target=accept_one)
        thread.start()
        try:
            with old_client().wrap_socket(socket.create_connection(listener.getsockname(),
                                                                   timeout=10),
                                          server_hostname="127.0.0.1") as probe:
                speaks_1_1 = probe.version() == "TLSv1.1"
        except (ssl.SSLError, OSError):
            speaks_1_1 = False
        thread.join(10)
    if not speaks_1_1:
        pytest.skip("this machine's OpenSSL cannot speak TLS 1.1 at all")

    with pytest.raises((ssl.SSLError, ConnectionError)):
        ForeignClient(tls_broker, old_client())
    serves_tls_clients(tls_broker, pki)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_verifies_the_broker_and_reads_the_preamble(tls_broker, pki, version):
    process = subprocess.Popen(
        ["openssl", "s_client", version, "-connect", f"127.0.0.1:{tls_broker.tcp_address[1]}",
         "-CAfile", pki.ca_file, "-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        received = b""
        deadline = time.monotonic() + 10
        while len(received) < len(protocol.PREAMBLE) + protocol.HEADER_SIZE:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([process.stdout], [], [], remaining)[0]:
                pytest.fail(f"s_client printed {received!r}")
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail(f"s_client ended: {process.stderr.read().decode(errors='replace')}")
            received += chunk
        assert received.startswith(protocol.PREAMBLE)
        hello = protocol.FrameDecoder().feed(received[len(protocol.PREAMBLE):])
        assert not hello or hello[0].kind == protocol.HELLO
        assert received[len(protocol.PREAMBLE) + 4] == protocol.HELLO   # the first frame's kind
    finally:
        process.kill()
        process.wait(10)
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()


# ---- stalled handshakes ----

STALLS = {
    "silent": lambda pki: b"",
    "half-a-client-hello": lambda pki: client_hello(pki)[:40],
    "client-hello-only": client_hello,      # the broker answers, then waits for the client
}


@pytest.mark.parametrize("stall", list(STALLS))
def test_a_stalled_tls_handshake_is_closed_at_the_handshake_timeout(socket_path, pki, stall):
    with tls_broker_with(socket_path, pki.server, handshake_timeout=0.5) as broker:
        peer = RawTCP(broker)
        if STALLS[stall](pki):
            peer.sock.sendall(STALLS[stall](pki))
        received, elapsed = peer.read_until_closed(timeout=5)
        assert elapsed >= 0.4, f"closed after {elapsed:.2f}s, before the handshake timeout"
        assert elapsed < 3, f"closed only after {elapsed:.2f}s with handshake_timeout=0.5"
        assert protocol.MAGIC not in received, "busx spoke in the clear before TLS was up"
        serves_tls_clients(broker, pki)


def test_stalled_handshakes_hold_up_no_one(socket_path, pki):
    """While handshakes stall (timeout 10 s), other clients connect and
    exchange messages at once: one connection's TLS never blocks the loop."""
    with tls_broker_with(socket_path, pki.server, handshake_timeout=10) as broker:
        hello = client_hello(pki)
        stalled = [RawTCP(broker) for _ in range(3)]
        stalled[1].sock.sendall(hello[:40])
        stalled[2].sock.sendall(hello)
        started = time.monotonic()
        serves_tls_clients(broker, pki)
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"good clients took {elapsed:.1f}s beside stalled handshakes"
        assert all(peer.still_open() for peer in stalled), \
            "a stalled handshake was closed long before its timeout"


# ---- garbage instead of a ClientHello ----

def random_garbage() -> bytes:
    data = bytearray(random.Random(1234).randbytes(1024))
    # Not a TLS record type (0x14-0x17) nor an SSLv2 header (high bit):
    # a byte OpenSSL rejects at once rather than waiting for a record.
    data[0] = 0x42
    return bytes(data)


GARBAGE = {
    "random-1KiB": random_garbage(),
    "http-request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "busx-in-the-clear": (protocol.PREAMBLE + protocol.encode_frame(
        protocol.CONNECT, payload=msgpack.packb({"name": "plain"}))),
}


def settled_fds(broker, pki) -> int:
    """This process's fd count with the broker idle, after one good TLS
    client came and went (so anything TLS opens once is already open)."""
    serves_tls_clients(broker, pki)
    no_tcp_connections_left(broker)
    wait_for(lambda: broker.stats()["connections"] == [])
    return open_fds()


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_garbage_instead_of_a_client_hello_is_closed_promptly(socket_path, pki, garbage):
    # A handshake timeout far beyond the test's bound: the close must come
    # from reading the garbage, not from the timer.
    with tls_broker_with(socket_path, pki.server, handshake_timeout=60) as broker:
        baseline = settled_fds(broker, pki)
        peer = RawTCP(broker)
        peer.sock.sendall(GARBAGE[garbage])
        received, elapsed = peer.read_until_closed(timeout=5)
        assert elapsed < 5
        assert protocol.MAGIC not in received, "busx spoke in the clear to a non-TLS peer"
        peer.close()
        serves_tls_clients(broker, pki)
        wait_for(lambda: open_fds() == baseline,
                 message=f"fds: {open_fds()} now, {baseline} before the garbage")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sent", ["nothing", "half-a-client-hello", "a-client-hello"])
def test_peers_that_hang_up_during_the_tls_handshake_are_let_go(socket_path, pki, sent):
    """Connect, send some or none of a ClientHello, close: whenever the
    peer's FIN reaches the broker (before its first read or write, or
    after), the broker frees the connection and goes on serving."""
    with tls_broker_with(socket_path, pki.server, handshake_timeout=60) as broker:
        baseline = settled_fds(broker, pki)
        data = {"nothing": b"", "half-a-client-hello": client_hello(pki)[:40],
                "a-client-hello": client_hello(pki)}[sent]
        for _ in range(20):
            with socket.create_connection(broker.tcp_address) as peer:
                if data:
                    peer.sendall(data)
        serves_tls_clients(broker, pki)
        wait_for(lambda: open_fds() == baseline,
                 message=f"fds: {open_fds()} now, {baseline} before the hang-ups")


@pytest.mark.timeout(60)
def test_refused_handshakes_leave_no_fds_behind(socket_path, pki, foreign_pki):
    """Many peers that fail the TLS handshake in every way a peer can: the
    broker's fd count comes back to where it was, and it still serves."""
    with tls_broker_with(socket_path, pki.server, tls_client_ca=pki.ca_file,
                         handshake_timeout=60) as broker:
        alice = pki.client("alice")
        url = tls_url(broker)

        def good_client_round_trip():
            with busx.connect(url, tls_ca=pki.ca_file, tls_cert=alice.cert, tls_key=alice.key,
                              reconnect=False) as remote, busx.connect(broker.url) as local:
                round_trip(remote, local)

        good_client_round_trip()
        wait_for(lambda: broker.stats()["connections"] == [])
        baseline = open_fds()
        hello = client_hello(pki)
        for _ in range(20):
            for garbage in GARBAGE.values():
                peer = RawTCP(broker)
                peer.sock.sendall(garbage)
                peer.read_until_closed(timeout=5)
                peer.close()
            for partial in (b"", hello[:40], hello):     # hang up mid-handshake
                peer = RawTCP(broker)
                if partial:
                    peer.sock.sendall(partial)
                peer.close()
            connect_error(url, tls_ca=foreign_pki.ca_file)            # client refuses broker
            connect_error(url, tls_ca=pki.ca_file)                    # broker refuses client
        RawTCP.opened.clear()       # all closed above
        good_client_round_trip()
        wait_for(lambda: broker.stats()["connections"] == [] and open_fds() == baseline,
                 message=f"fds: {open_fds()} now, {baseline} before")


# ---- configuration errors ----

def test_a_broker_with_unusable_certificate_files_does_not_start(tmp_path, pki, foreign_pki):
    socket_path = str(tmp_path / "bus.sock")
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(busx.BusError, match=re.escape(missing)):
        with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0), tls_cert=missing,
                         tls_key=pki.server.key):
            pass
    mismatched_key = foreign_pki.client("other").key
    with pytest.raises(busx.BusError):
        with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0), tls_cert=pki.server.cert,
                         tls_key=mismatched_key):
            pass
    assert not os.path.exists(socket_path)


# ---- command line ----

def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=input, capture_output=True, text=True, timeout=60)


def assert_clean_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"busx {command}: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment.lower() in result.stderr.lower(), result.stderr


@pytest.fixture
def cli_processes():
    """Children a test spawns: killed if still running, pipes closed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def spawn_cli(started: list, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    started.append(process)
    return process


def wait_subscribed(broker, name: str) -> None:
    wait_for(lambda: any(conn["name"] == name and conn["subscriptions"] >= 1
                         for conn in broker.stats()["connections"]),
             message=f"{name!r} never subscribed")


def test_cli_pub_and_sub_over_tls(tls_broker, pki, cli_processes):
    url = tls_url(tls_broker)
    sub = spawn_cli(cli_processes, "sub", "cli.>", "--url", url, "--tls-ca", pki.ca_file,
                    "--count", "1", "--json")
    wait_subscribed(tls_broker, "busx sub")
    assert next(c for c in tls_broker.stats()["connections"]
                if c["name"] == "busx sub")["transport"] != "unix"
    pub = run_cli("pub", "cli.hello", '{"over": "tls"}', "--url", url, "--tls-ca", pki.ca_file)
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    line = json.loads(out)
    assert (line["topic"], line["data"]) == ("cli.hello", {"over": "tls"})
    assert line["sender"]["address"][0] == "127.0.0.1"
    assert (line["sender"]["pid"], line["sender"]["identity"]) == (None, None)


def test_cli_with_a_client_certificate(mtls_broker, pki, cli_processes):
    url = tls_url(mtls_broker)
    bob, alice = pki.client("bob"), pki.client("alice")
    sub = spawn_cli(cli_processes, "sub", "cli.>", "--url", url, "--tls-ca", pki.ca_file,
                    "--tls-cert", bob.cert, "--tls-key", bob.key, "--count", "1", "--json")
    wait_subscribed(mtls_broker, "busx sub")
    assert next(c for c in mtls_broker.stats()["connections"]
                if c["name"] == "busx sub")["identity"] == "bob"
    pub = run_cli("pub", "cli.hello", "1", "--url", url, "--tls-ca", pki.ca_file,
                  "--tls-cert", alice.cert, "--tls-key", alice.key)
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert json.loads(out)["sender"]["identity"] == "alice"
    refused = run_cli("pub", "cli.hello", "1", "--url", url, "--tls-ca", pki.ca_file)
    assert_clean_error(refused, "pub")


def test_cli_stat_over_tls(tls_broker, pki):
    with busx.connect(tls_broker.url, name="inventory") as inventory:
        inventory.subscribe("stock.>")
        result = run_cli("stat", "--json", "--url", tls_url(tls_broker), "--tls-ca", pki.ca_file)
    assert result.returncode == 0, result.stderr
    by_name = {conn["name"]: conn for conn in json.loads(result.stdout)["connections"]}
    assert by_name["inventory"]["subscriptions"] == 1
    assert by_name["busx stat"]["address"][0] == "127.0.0.1"


def test_cli_refuses_a_broker_it_cannot_verify(tls_broker, foreign_pki):
    result = run_cli("pub", "cli.hello", "1", "--url", tls_url(tls_broker),
                     "--tls-ca", foreign_pki.ca_file)
    assert_clean_error(result, "pub", VERIFY_FAILED)


def test_serve_with_tls_flags(start_broker, pki):
    alice = pki.client("alice")
    process = start_broker("--tcp", "127.0.0.1:0", "--tls-cert", pki.server.cert,
                           "--tls-key", pki.server.key, "--tls-client-ca", pki.ca_file)
    port = int(re.search(r"(?:tcp|tls)://127\.0\.0\.1:(\d+)", process.log())[1])
    url = f"tls://127.0.0.1:{port}"
    with busx.connect(url, tls_ca=pki.ca_file, tls_cert=alice.cert, tls_key=alice.key) as remote, \
            busx.connect(process.url) as local:
        assert remote.transport == "tls"
        assert round_trip(remote, local).sender.identity == "alice"
    connect_error(url, tls_ca=pki.ca_file)                 # no client certificate
    connect_error(f"tcp://127.0.0.1:{port}", timeout=1.0)  # no TLS at all


def test_serve_refuses_a_missing_certificate(tmp_path, pki):
    missing = str(tmp_path / "missing.crt")
    result = run_cli("serve", "--unix", str(tmp_path / "bus.sock"), "--tcp", "127.0.0.1:0",
                     "--tls-cert", missing, "--tls-key", pki.server.key)
    assert_clean_error(result, "serve", missing)
    assert not os.path.exists(tmp_path / "bus.sock")
