"""TCP authentication by token (challenge-response over a fresh nonce), the
refusal to serve anonymous TCP on a public address, and sender credentials
that come from the broker, never from the client's own claims."""

import json
import os
import socket
import threading
import time

import msgpack
import pytest
from support import run_python

import busx
from busx import protocol
from busx.handshake import FrameReader

SECRET = "s3cret"
TOKENS = {"edge-1": SECRET}


@pytest.fixture
def auth_broker(socket_path):
    with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0), tokens=TOKENS) as running:
        yield running


@pytest.fixture
def auth_url(auth_broker):
    host, port = auth_broker.tcp_address
    return f"tcp://{host}:{port}"


def round_trip(publisher, subscriber, topic="auth.check"):
    """Publish one message; return it as the subscriber received it."""
    sub = subscriber.subscribe(topic)
    publisher.publish(topic, "hello")
    msg = sub.recv(timeout=5)
    sub.unsubscribe()
    return msg


# ---- tokens ----

def test_right_token_connects_and_is_the_senders_identity(auth_broker, auth_url):
    with busx.connect(auth_url, token=("edge-1", SECRET)) as remote, \
            busx.connect(auth_broker.url) as local:
        assert remote.transport == "tcp"
        sender = round_trip(remote, local).sender
        assert sender.identity == "edge-1"
        assert sender.address[0] == "127.0.0.1" and sender.address[1] > 0
        assert (sender.pid, sender.uid, sender.gid) == (None, None, None)


@pytest.mark.parametrize("token, reason", [
    (("edge-1", "wrong"), "token rejected"),
    (("edge-9", SECRET), "token rejected"),
    (None, "requires a token"),
], ids=["wrong-secret", "unknown-identity", "missing-token"])
def test_bad_or_missing_token_is_refused_on_loopback_too(auth_broker, auth_url, token, reason):
    with pytest.raises(busx.AuthenticationFailed, match=reason) as caught:
        busx.connect(auth_url, token=token, timeout=5)
    assert auth_url in str(caught.value)
    assert not any(conn["transport"] == "tcp" for conn in auth_broker.stats()["connections"])
    with busx.connect(auth_url, token=("edge-1", SECRET)) as good:
        good.flush(timeout=5)


def test_unix_clients_need_no_token(auth_broker):
    with busx.connect(auth_broker.url) as bus:
        assert bus.transport == "unix"
        sender = round_trip(bus, bus).sender
        assert (sender.pid, sender.uid, sender.identity) == (os.getpid(), os.getuid(), None)


def test_a_token_is_no_identity_where_the_broker_has_no_tokens(broker, tcp_url):
    """A client cannot name itself: without tokens configured, a token it
    offers proves nothing and gives it no identity."""
    with busx.connect(tcp_url, token=("admin", "anything")) as remote:
        assert round_trip(remote, remote).sender.identity is None


# ---- what crosses the wire ----

class RecordingProxy:
    """Forwards TCP connections to target, recording the bytes each way."""

    def __init__(self, target: tuple) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        host, port = self.listener.getsockname()
        self.url = f"tcp://{host}:{port}"
        self.to_broker = bytearray()
        self.to_client = bytearray()
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self.target)
        self.sockets += [client, upstream]
        for source, sink, record in ((client, upstream, self.to_broker),
                                     (upstream, client, self.to_client)):
            threading.Thread(target=self._pump, args=(source, sink, record), daemon=True).start()

    @staticmethod
    def _pump(source, sink, record) -> None:
        try:
            while data := source.recv(65536):
                record += data
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_secret_never_crosses_the_wire_and_a_recorded_handshake_cannot_be_replayed(
        auth_broker, auth_url):
    proxy = RecordingProxy(auth_broker.tcp_address)
    try:
        with busx.connect(auth_broker.url) as watcher:
            watched = watcher.subscribe("replay.>")
            with busx.connect(proxy.url, token=("edge-1", SECRET)) as remote:
                assert remote.transport == "tcp"
                remote.publish("replay.original", "once")
                remote.flush(timeout=5)
            assert watched.recv(timeout=5).sender.identity == "edge-1"
            recorded = bytes(proxy.to_broker)
            assert b"edge-1" in recorded, "the proxy did not see the handshake"
            assert SECRET.encode() not in recorded
            assert SECRET.encode() not in bytes(proxy.to_client)

            # Replay the client's bytes verbatim on a new connection: the broker
            # sends a fresh nonce, so the recorded proof no longer fits.
            with socket.create_connection(auth_broker.tcp_address) as raw:
                reader = FrameReader(raw, time.monotonic() + 10, "broker")
                assert reader.read_exact(len(protocol.PREAMBLE)) == protocol.PREAMBLE
                assert reader.read_frame().kind == protocol.HELLO
                raw.sendall(recorded)
                refusal = reader.read_frame()
                assert refusal.kind == protocol.ERROR and refusal.flags & protocol.FATAL
                error = msgpack.unpackb(refusal.payload)
                assert error["code"] == "auth", error
            # Nothing the replay carried was routed: the next message the
            # watcher sees is its own marker.
            watcher.publish("replay.marker", "after")
            assert watched.recv(timeout=5).data == "after"
    finally:
        proxy.close()


# ---- anonymous TCP ----

def test_anonymous_tcp_on_a_public_address_is_refused(socket_path):
    with pytest.raises(busx.BusError, match="allow_anonymous_tcp"):
        busx.Broker(unix_path=socket_path, tcp=("0.0.0.0", 0))


def test_anonymous_tcp_on_a_public_address_when_allowed(socket_path):
    with busx.Broker(unix_path=socket_path, tcp=("0.0.0.0", 0), allow_anonymous_tcp=True) as broker, \
            busx.connect(f"tcp://127.0.0.1:{broker.tcp_address[1]}") as bus:
        assert bus.transport == "tcp"
        assert round_trip(bus, bus).sender.identity is None


def test_public_address_with_tokens_needs_no_permission(socket_path):
    with busx.Broker(unix_path=socket_path, tcp=("0.0.0.0", 0), tokens=TOKENS) as broker:
        url = f"tcp://127.0.0.1:{broker.tcp_address[1]}"
        with busx.connect(url, token=("edge-1", SECRET)) as bus:
            assert round_trip(bus, bus).sender.identity == "edge-1"
        with pytest.raises(busx.AuthenticationFailed):
            busx.connect(url, timeout=5)


# ---- forged credentials ----

# A raw client that completes the handshake, then publishes a PUB frame whose
# stamp section claims to be pid 1, uid/gid 4242, identity "root", then waits
# for the PONG to its PING so the broker has routed the PUB before it exits.
FORGER = """
import json, os, socket, sys, time
import msgpack
from busx import protocol
from busx.handshake import FrameReader
from busx.handshake import client_handshake
target, token = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if isinstance(target, str):
    sock, transport = socket.socket(socket.AF_UNIX), "unix"
    sock.connect(target)
else:
    sock, transport = socket.create_connection(tuple(target)), "tcp"
client_handshake(sock, "broker", time.monotonic() + 10, "forger", token and tuple(token), transport)
lie = msgpack.packb([1, 4242, 4242, "root", "10.9.8.7", 1])
sock.sendall(protocol.encode_frame(protocol.PUB, b"forged.claim", msgpack.packb("trust me"), stamp=lie)
             + protocol.encode_frame(protocol.PING, id=7))
decoder, frames = protocol.FrameDecoder(), []
while not any(f.kind == protocol.PONG for f in frames):
    frames += decoder.feed(sock.recv(65536) or sys.exit("broker closed the connection"))
print(json.dumps({"pid": os.getpid(), "errors": [f.kind for f in frames if f.kind == protocol.ERROR]}))
"""


def run_forger(target, token=None) -> dict:
    result = run_python(FORGER, json.dumps(target), json.dumps(token), timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_forged_stamp_over_unix_is_replaced_by_kernel_credentials(auth_broker):
    with busx.connect(auth_broker.url) as watcher:
        sub = watcher.subscribe("forged.>")
        forger = run_forger(auth_broker.unix_path)
        msg = sub.recv(timeout=5)
        assert msg.data == "trust me"
        assert msg.sender == busx.Credentials(forger["pid"], os.getuid(), os.getgid(), None, None)


def test_forged_stamp_over_tcp_is_replaced_by_the_token_identity(auth_broker):
    with busx.connect(auth_broker.url) as watcher:
        sub = watcher.subscribe("forged.>")
        run_forger(list(auth_broker.tcp_address), ["edge-1", SECRET])
        sender = sub.recv(timeout=5).sender
        assert (sender.pid, sender.uid, sender.gid, sender.identity) == (None, None, None, "edge-1")
        assert sender.address[0] == "127.0.0.1"
