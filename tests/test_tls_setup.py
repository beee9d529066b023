"""TLS as users set it up: the private CA that docs/security.md walks
through, made by its own openssl commands, and a client's own
ssl.SSLContext passed as it is (ssl_context=)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from certs import PKI

import busx

ROOT = Path(__file__).resolve().parent.parent


def documented_ca_commands() -> str:
    """The openssl lines of docs/security.md's worked example, for the host
    name "localhost" instead of bus1.example.net."""
    text = (ROOT / "docs" / "security.md").read_text()
    section = text.split("### A private CA, worked through", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    setup = block.split("\nbusx serve", 1)[0]
    assert "openssl" in setup
    return setup.replace("bus1.example.net", "localhost")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_the_documented_private_ca_works(tmp_path, socket_path):
    subprocess.run(["bash", "-euc", documented_ca_commands()], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    policy = {"rule": [{"identity": "orders", "publish": ["orders.>"],
                        "subscribe": ["orders.>"]},
                       {"any": True, "subscribe": ["orders.>"]}]}
    with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0),
                     tls_cert=str(tmp_path / "broker.pem"), tls_key=str(tmp_path / "broker.key"),
                     tls_client_ca=str(tmp_path / "ca.pem"), policy=policy) as broker, \
            busx.connect(f"tls://localhost:{broker.tcp_address[1]}", tls_ca=str(tmp_path / "ca.pem"),
                         tls_cert=str(tmp_path / "orders.pem"),
                         tls_key=str(tmp_path / "orders.key")) as orders, \
            busx.connect(broker.url) as watcher:
        assert orders.transport == "tls"
        watched = watcher.subscribe("orders.>")
        orders.publish("orders.created", {"id": 1})
        orders.flush(timeout=5)
        msg = watched.recv(timeout=5)
        assert msg.data == {"id": 1} and msg.sender.identity == "orders"
        orders.publish("payroll.leak", 1)          # no rule lets "orders" publish there
        with pytest.raises(busx.PermissionDenied, match="payroll.leak"):
            orders.flush(timeout=5)


@pytest.fixture
def pki(tmp_path) -> PKI:
    return PKI(tmp_path / "pki")


@pytest.fixture
def tls_broker(socket_path, pki):
    with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0), tls_cert=pki.server.cert,
                     tls_key=pki.server.key) as broker:
        yield broker


def test_a_clients_own_ssl_context_is_used_as_it_is(tls_broker, pki):
    url = f"tls://127.0.0.1:{tls_broker.tcp_address[1]}"
    trusting = ssl.create_default_context(cafile=pki.ca_file)
    with busx.connect(url, ssl_context=trusting) as bus:
        assert bus.transport == "tls"
        sub = bus.subscribe("ctx.>")
        bus.publish("ctx.one", 1)
        assert sub.recv(timeout=5).data == 1
    # Its own trust: the system's store does not know this CA...
    with pytest.raises(busx.ConnectError, match="certificate verify failed"):
        busx.connect(url, ssl_context=ssl.create_default_context(), reconnect=False)
    # ...and its own rules: a context that checks nothing connects.
    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with busx.connect(url, ssl_context=lax) as bus:
        bus.flush(timeout=5)


def test_a_clients_ssl_context_checks_the_host_name_when_it_says_so(tls_broker, pki, tmp_path):
    other = PKI(tmp_path / "other")
    wrong_name = other.authority.issue_cert("elsewhere.example")
    wrong_name.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "wrong.pem"))
    with busx.Broker(unix_path=str(tmp_path / "b.sock"), tcp=("127.0.0.1", 0),
                     tls_cert=str(tmp_path / "wrong.pem"),
                     tls_key=str(tmp_path / "wrong.pem")) as broker:
        context = ssl.create_default_context(cafile=other.ca_file)
        with pytest.raises(busx.ConnectError, match="[Hh]ostname mismatch|IP address mismatch"):
            busx.connect(f"tls://127.0.0.1:{broker.tcp_address[1]}", ssl_context=context)


def test_ssl_context_and_certificate_files_do_not_mix(pki):
    with pytest.raises(busx.BusError, match="either ssl_context or"):
        busx.connect("tls://127.0.0.1:1", ssl_context=ssl.create_default_context(),
                     tls_ca=pki.ca_file)
    with pytest.raises(TypeError, match="ssl.SSLContext"):
        busx.connect("tls://127.0.0.1:1", ssl_context="not a context")


@pytest.mark.timeout(30)
def test_a_tls_handshake_that_trickles_ends_at_the_connect_timeout(pki):
    # A server that sends a byte of its "ServerHello" every 0.1 s: each byte
    # wakes the client, and none completes the handshake. connect's timeout
    # bounds the whole handshake, not each wait.
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"\x16\x03\x03\x40\x00")      # a handshake record of 16 KiB...
            while not done.wait(0.1):
                try:
                    conn.sendall(b"\x02")               # ...that never ends
                except OSError:
                    return

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    began = time.monotonic()
    try:
        with pytest.raises(busx.ConnectError, match="timed out"):
            busx.connect(f"tls://127.0.0.1:{listener.getsockname()[1]}", tls_ca=pki.ca_file,
                         timeout=1.0)
        assert time.monotonic() - began < 2.5
    finally:
        done.set()
        server.join(5)
        listener.close()


@pytest.mark.timeout(60)
def test_one_tls_connection_shared_by_many_threads(tls_broker, pki):
    # Every thread that may call OpenSSL on one client's session at once:
    # publishers sending directly, the I/O thread batching, and a thread
    # reading directly while they publish. tls_lock keeps them apart; each
    # publisher's messages arrive whole and in order.
    url = f"tls://127.0.0.1:{tls_broker.tcp_address[1]}"
    publishers, count = 4, 5000
    with busx.connect(url, tls_ca=pki.ca_file) as bus:
        sub = bus.subscribe("many.>")
        bus.flush(timeout=5)
        got: dict[int, list[int]] = {n: [] for n in range(publishers)}

        def publish(n: int) -> None:
            for i in range(count):
                bus.publish(f"many.{n}", [n, i, b"x" * (i % 300)])

        threads = [threading.Thread(target=publish, args=(n,)) for n in range(publishers)]
        for thread in threads:
            thread.start()
        received = 0
        deadline = time.monotonic() + 45
        while received < publishers * count and time.monotonic() < deadline:
            for msg in sub.recv_many(timeout=5):
                n, i, padding = msg.data
                assert len(padding) == i % 300
                got[n].append(i)
                received += 1
        for thread in threads:
            thread.join(10)
        assert {n: len(seen) for n, seen in got.items()} == {n: count for n in got}
        assert all(seen == list(range(count)) for seen in got.values())
        assert sub.dropped == 0
