"""The NATS backbone: busx brokers joined to real nats-server processes as
leaf nodes (busx/backbone.py, busx/_link.pxi, docs/backbone.md,
docs/nats-leafnode.md).

Brokers run in this process and play different hosts ($BUSX_HOST_ID set
before each is built); every test talks through real sockets. Covered:

1. pub/sub across two brokers with `*` and `>` patterns, sender origin,
   unicode and 255-byte topics, per-publisher order, and local traffic
   never reaching NATS (/varz);
2. overlapping patterns on three brokers: one copy per subscription; the
   announced interest a minimal cover of the local patterns (random
   subscribes/unsubscribes against the server's view); export/import
   filters; a 3000-pattern snapshot; many subscriptions leaving at once;
3. no loops: `>` subscribers on two brokers (one server, or a cluster)
   see each message exactly once;
4. interest withdrawn (unsubscribe, client gone): the publisher stops;
5. request/reply and queue groups across hosts: one member per message,
   local members preferred, weights, nats-py members;
6. nats-py: publishing, subscribing, requesting and answering;
7. fds (fds_lost), max_payload drops at the exact boundary, memfd-sized
   payloads, a message from NATS larger than the broker's max_frame;
8. failover in a 3-node cluster (kill -9), one URL or all of them;
9. outages: the outage buffer and its bound, local traffic flowing,
   interest resynchronised after the relink, a slow hub's back-pressure,
   a stopped (SIGSTOP) server given up after three heartbeats;
10. a hub played by hand: malformed input, bad INFOs, -ERR, forged
    stamps, a hub that stalls, credentials;
11. no fds left behind once the brokers stop.

Every test also checks that no callback of the broker failed (an ERROR
logged by busx).

Interest travels asynchronously. `settle()` uses backbone flushes: once the
subscriber's broker's server holds its interest, a backbone flush on the
publisher's side returns after its broker has read everything the server
sent before, that interest included. Across cluster routes a probe is
published until it arrives. A sentinel message, after the ones that must
not arrive, proves that nothing more comes. Nothing is slept for.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import random
import signal
import socket
import threading
import time

import msgpack
import pytest
from nats_servers import start_cluster, start_server, subject_matches
from support import RawPeer, open_fds, stop_process, wait_for

import busx
from busx import protocol

nats = pytest.importorskip("nats", reason="nats-py is not installed: pip install '.[test]'")

pytestmark = pytest.mark.timeout(60)


# ---- fixtures ----

class Hosts:
    """Brokers playing different hosts, each linked to NATS, and their
    clients; all closed and stopped at the end of the test."""

    def __init__(self, tmp_path, monkeypatch):
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.brokers: list[busx.Broker] = []
        self.clients: list = []

    def broker(self, host: str, nats_urls, *, up: bool = True, **options) -> busx.Broker:
        """A broker whose origin is host; up: wait until its link is up."""
        self.monkeypatch.setenv("BUSX_HOST_ID", host)
        broker = busx.Broker(unix_path=str(self.tmp_path / f"{host}.sock"), nats=nats_urls,
                             **options)
        broker.start()
        self.brokers.append(broker)
        if up:
            wait_for(lambda: link(broker)["state"] == "up", message=f"{host}: {link(broker)}")
        return broker

    def client(self, broker: busx.Broker, **options):
        bus = busx.connect(broker.url, **options)
        self.clients.append(bus)
        return bus

    def close(self) -> None:
        while self.clients:
            self.clients.pop().close()
        while self.brokers:
            self.brokers.pop().stop()


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    made = Hosts(tmp_path, monkeypatch)
    yield made
    made.close()


def internal_errors(caplog, phases=("setup", "call")) -> list[str]:
    """What busx logged at ERROR: a callback of the broker that failed."""
    return [record.getMessage() for phase in phases for record in caplog.get_records(phase)
            if record.name.startswith("busx") and record.levelno >= logging.ERROR]


@pytest.fixture(autouse=True)
def no_internal_errors(caplog):
    """Whatever the backbone is sent, the broker handles it: no callback
    of its fails ("broker callback failed")."""
    yield
    assert not internal_errors(caplog)


@pytest.fixture
def nats_server(tmp_path):
    with start_server(tmp_path / "nats") as server:
        yield server


# ---- helpers ----

def link(broker: busx.Broker) -> dict:
    return broker.stats()["nats"]


def settle(*buses) -> None:
    """Backbone flushes, in order: pass the subscribers' buses first, the
    publisher's last. When the last returns, its broker has read all the
    interest the others' brokers gave the (single) server before."""
    for bus in buses:
        bus.flush(timeout=10, backbone=True)


def until_sentinel(sub, sentinel: str, timeout: float = 10.0) -> list:
    """Messages received before the first one on topic sentinel."""
    got = []
    while (msg := sub.recv(timeout=timeout)).topic != sentinel:
        got.append(msg)
    return got


def until_sentinels(sub, sentinel: str, count: int, timeout: float = 10.0) -> list:
    """Messages received until count of them on topic sentinel (one per
    publisher: each publisher's earlier messages are in by its own)."""
    got, seen = [], 0
    while seen < count:
        msg = sub.recv(timeout=timeout)
        if msg.topic == sentinel:
            seen += 1
        else:
            got.append(msg)
    return got


def recv_n(sub, count: int, timeout: float = 10.0) -> list:
    return [sub.recv(timeout=timeout) for _ in range(count)]


def probe_until_received(pub, topic: str, sub, timeout: float = 10.0) -> None:
    """Publish to topic until sub gets one (skipping other messages):
    interest has travelled, across cluster routes too."""
    deadline = time.monotonic() + timeout
    while True:
        pub.publish(topic, "probe")
        try:
            while sub.recv(timeout=0.05).topic != topic:
                pass
            return
        except busx.Timeout:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing published to {topic} arrived within {timeout}s")


def leaf_subs(server) -> list[list[str]]:
    """Each leaf connection's interest as the server holds it."""
    return [leaf.get("subscriptions_list") or [] for leaf in server.leafz(subs=True)["leafs"]]


def two_hosts(hosts, server, here: str, there: str):
    """Brokers A and B on server; a publisher and a subscriber on A (to
    `here`), a subscriber on B (to `there`), B's interest known on A:
    (a, b, pub, local, remote)."""
    a = hosts.broker("hostA", server.leaf_url)
    b = hosts.broker("hostB", server.leaf_url)
    pub, remote_bus = hosts.client(a), hosts.client(b)
    local = hosts.client(a).subscribe(here)
    remote = remote_bus.subscribe(there)
    settle(remote_bus, pub)
    return a, b, pub, local, remote


def assert_local_pub_sub_works(hosts, broker) -> None:
    bus = hosts.client(broker)
    sub = bus.subscribe("local.check")
    bus.publish("local.check", "still here")
    assert sub.recv(timeout=5).data == "still here"
    bus.close()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def nats_connect(server):
    return await nats.connect(servers=[server.client_url], reconnect_time_wait=0.05,
                              connect_timeout=2)


# ---- 1. two brokers on one server ----

def test_pub_sub_across_two_brokers_with_wildcards(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, sub_bus = hosts.client(a), hosts.client(b)
    one, many = sub_bus.subscribe("foo.*"), sub_bus.subscribe("foo.>")
    settle(sub_bus, pub)

    for topic in ("foo.x", "foo.x.y", "bar.x", "foo", "foo.z"):
        pub.publish(topic, {"t": topic})
    pub.publish("foo.end", None)
    assert [m.topic for m in until_sentinel(one, "foo.end")] == ["foo.x", "foo.z"]
    got = until_sentinel(many, "foo.end")
    assert [m.topic for m in got] == ["foo.x", "foo.x.y", "foo.z"]
    assert [m.data for m in got] == [{"t": "foo.x"}, {"t": "foo.x.y"}, {"t": "foo.z"}]
    sender = got[0].sender
    assert sender.origin == "hostA"
    assert (sender.pid, sender.uid, sender.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert got[0].fds == () and got[0].fds_lost == 0
    # One copy of each crossed, however many patterns matched.
    assert link(a)["msgs_out"] == 4 and link(b)["msgs_in"] == 4
    assert link(b)["msgs_out"] == 0 and link(a)["msgs_in"] == 0


def test_unicode_and_longest_topics_cross(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, sub_bus = hosts.client(a), hosts.client(b)
    sub = sub_bus.subscribe("t.>")
    settle(sub_bus, pub)
    longest = "t." + ".".join(["x" * 9] * 25) + "." + "y" * 3     # 255 bytes
    assert len(longest) == 255
    topics = ["t.café", "t.温度.1", longest]
    for topic in topics:
        pub.publish(topic, topic)
    assert [(m.topic, m.data) for m in recv_n(sub, 3)] == [(t, t) for t in topics]


def test_per_publisher_order_across_hosts(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, sub_bus = hosts.client(a), hosts.client(b)
    sub = sub_bus.subscribe("seq.>")
    settle(sub_bus, pub)
    for i in range(1000):
        pub.publish(f"seq.{i % 7}", i)
    pub.publish("seq.end", None)
    got = until_sentinel(sub, "seq.end")
    assert [m.data for m in got] == list(range(1000))
    assert {m.sender.origin for m in got} == {"hostA"}


def test_local_traffic_never_reaches_nats(nats_server, hosts):
    # Interest elsewhere (wanted.x), none of it in local.>.
    a, b, pub, local, remote = two_hosts(hosts, nats_server, "local.>", "wanted.x")
    in_msgs = nats_server.varz()["in_msgs"]

    for i in range(1000):
        pub.publish(f"local.{i % 10}", i)
    assert [m.data for m in recv_n(local, 1000)] == list(range(1000))
    # The sentinel crosses after them: had any of them gone to NATS, it
    # would have been counted by the time the sentinel arrives.
    pub.publish("wanted.x", "sentinel")
    assert remote.recv(timeout=5).data == "sentinel"
    assert link(a)["msgs_out"] == 1
    assert link(a)["bytes_out"] == len(msgpack.packb("sentinel"))
    assert nats_server.varz()["in_msgs"] == in_msgs + 1


# ---- 2. overlapping patterns, the announced cover, filters, scale ----

def test_overlapping_patterns_one_copy_per_subscription(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    c = hosts.broker("hostC", nats_server.leaf_url)
    pub_a, pub_c, bus_b, bus_c = (hosts.client(x) for x in (a, c, b, c))
    deep, flat = bus_b.subscribe("foo.>"), bus_b.subscribe("foo.*")
    on_c = bus_c.subscribe("foo.*")
    settle(bus_b, bus_c, pub_a, pub_c)

    for i in range(50):
        pub_a.publish(f"foo.a{i}", ["A", i])
        pub_c.publish(f"foo.c{i}", ["C", i])
    pub_a.publish("foo.end", "A")
    pub_c.publish("foo.end", "C")

    def data(sub):
        return [tuple(m.data) for m in until_sentinels(sub, "foo.end", 2)]

    from_a = [("A", i) for i in range(50)]
    from_c = [("C", i) for i in range(50)]
    for sub in (deep, flat, on_c):      # on_c: its local publisher's copy and A's
        got = data(sub)
        assert sorted(got) == sorted(from_a + from_c)         # each exactly once
        assert [x for x in got if x[0] == "A"] == from_a      # in order
        assert [x for x in got if x[0] == "C"] == from_c
    assert link(b)["msgs_in"] == 102 and link(b)["msgs_out"] == 0
    assert link(a)["msgs_out"] == 51 and link(c)["msgs_out"] == 51


def test_withdrawing_a_broader_pattern_gives_the_narrower_back(nats_server, hosts):
    """B announces one pattern covering the others; when it goes, the ones
    it covered must be told again, without a gap and without surplus."""
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, bus_b = hosts.client(a), hosts.client(b)
    narrow, end = bus_b.subscribe("foo.*"), bus_b.subscribe("ctl.end")
    broad = bus_b.subscribe("foo.>")
    settle(bus_b, pub)
    pub.publish("foo.x.y", 1)
    assert broad.recv(timeout=5).data == 1

    broad.unsubscribe()
    settle(bus_b, pub)
    for topic in ("foo.x.y", "foo.x", "bar.x"):
        pub.publish(topic, topic)
    pub.publish("ctl.end", None)
    end.recv(timeout=5)
    assert [m.data for m in until_sentinel_queued(narrow)] == ["foo.x"]
    assert link(a)["msgs_out"] == 3         # the first foo.x.y, foo.x, ctl.end
    assert sorted(sum(leaf_subs(nats_server), [])) == ["ctl.end", "foo.*"]

    narrow.unsubscribe()
    settle(bus_b, pub)
    assert sorted(sum(leaf_subs(nats_server), [])) == ["ctl.end"]
    assert link(a)["remote_interest"] == 1


def until_sentinel_queued(sub) -> list:
    """What sub holds already (its sentinel came on another subscription)."""
    got = []
    while (msg := sub.next_queued()) is not None:
        got.append(msg)
    return got


def covers(outer: str, inner: str) -> bool:
    """Whether every subject inner matches, outer matches too (NATS rules)."""
    outer_tokens, inner_tokens = outer.split("."), inner.split(".")
    for i, token in enumerate(outer_tokens):
        if token == ">":
            return i < len(inner_tokens)
        if i >= len(inner_tokens) or inner_tokens[i] == ">":
            return False
        if token != "*" and token != inner_tokens[i]:
            return False
    return len(outer_tokens) == len(inner_tokens)


def test_announced_interest_is_a_minimal_cover_of_local_patterns(nats_server, hosts):
    """Random subscribes and unsubscribes of overlapping patterns on B: what
    the server holds for B matches exactly the subjects B's subscribers
    match, is made of B's own patterns, none covering another; A knows as
    many patterns as the server holds for B."""
    rng = random.Random(1234)
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, bus_b = hosts.client(a), hosts.client(b)
    subjects = ["p." + ".".join(t) for n in range(1, 5)
                for t in itertools.product("abc", repeat=n)]
    subs: list = []

    def random_pattern() -> str:
        tokens = [rng.choice("ab*") for _ in range(rng.randint(1, 3))]
        return "p." + ".".join(tokens + ([">"] if rng.random() < 0.3 else []))

    def check() -> None:
        settle(bus_b, pub)
        held = [entry for leaf in nats_server.leafz(subs=True)["leafs"]
                if leaf["name"].startswith("busx-hostB")
                for entry in leaf.get("subscriptions_list") or ()]
        local = {sub.pattern for sub in subs}
        assert set(held) <= local, (held, local)
        assert len(held) == len(set(held))
        for subject in subjects:
            wanted = any(subject_matches(p, subject) for p in local)
            assert wanted == any(subject_matches(p, subject) for p in held), subject
        assert not [(x, y) for x in held for y in held if x != y and covers(x, y)], held
        assert link(a)["remote_interest"] == len(held)

    for step in range(1, 241):
        if subs and rng.random() < 0.45:
            subs.pop(rng.randrange(len(subs))).unsubscribe()
        else:
            subs.append(bus_b.subscribe(random_pattern()))
        if step % 20 == 0:
            check()
    while subs:
        subs.pop().unsubscribe()
    check()


def test_export_and_import_filters(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url, nats_export=("pub.>", "in.>"))
    b = hosts.broker("hostB", nats_server.leaf_url, nats_import=("in.>", "pub.>"))
    pub, bus_b = hosts.client(a), hosts.client(b)
    everything = bus_b.subscribe(">")
    settle(bus_b, pub)
    assert sorted(sum(leaf_subs(nats_server), [])) == ["in.>", "pub.>"]    # B's import
    for topic in ("pub.x", "priv.x", "in.x", "other.x"):
        pub.publish(topic, topic)
    pub.publish("pub.end", None)
    assert [m.topic for m in until_sentinel(everything, "pub.end")] == ["pub.x", "in.x"]
    assert link(a)["msgs_out"] == 3

    # Replies cross whatever the filters say.
    service = hosts.client(b)
    thread = serve(service, "pub.svc", lambda x: -x, 3)
    settle(service, pub)
    assert [pub.request("pub.svc", i, timeout=5).data for i in (1, 2, 3)] == [-1, -2, -3]
    thread.join(5)


def test_a_late_broker_has_the_whole_snapshot_when_up(nats_server, hosts):
    """Up means the hub's PONG came, after its snapshot of interest: a
    broker joining late knows all 3000 patterns at once."""
    async def subscribe_many():
        nc = await nats_connect(nats_server)
        for i in range(3000):
            await nc.subscribe(f"many.{i}.*")
        await nc.flush()
        return nc

    async def scenario():
        nc = await subscribe_many()
        a = await asyncio.to_thread(hosts.broker, "hostA", nats_server.leaf_url)
        known = link(a)["remote_interest"]
        pub = hosts.client(a)
        await asyncio.to_thread(pub.publish, "many.2999.x", 1)
        await asyncio.to_thread(pub.flush)
        await nc.close()
        return known, link(a)["msgs_out"]

    assert run(scenario()) == (3000, 1)


def test_a_client_with_many_subscriptions_leaving_does_not_stall_the_broker(nats_server,
                                                                           hosts):
    b = hosts.broker("hostB", nats_server.leaf_url)
    many = hosts.client(b)
    for i in range(300):
        many.subscribe(f"many.{i}.*")
    settle(many)
    started = time.monotonic()
    many.close()
    assert_local_pub_sub_works(hosts, b)
    assert time.monotonic() - started < 0.5
    wait_for(lambda: link(b)["local_interest"] == 0, message=str(link(b)))


# ---- 3. loops ----

def test_no_loops_with_everything_subscribed_on_two_brokers(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub_a, pub_b = hosts.client(a), hosts.client(b)
    all_a, all_b = pub_a.subscribe(">"), pub_b.subscribe(">")
    settle(pub_a, pub_b, pub_a)
    in_msgs = nats_server.varz()["in_msgs"]
    n = 300

    def round_trip(end: str) -> None:
        for host, bus in (("A", pub_a), ("B", pub_b)):
            for i in range(n):
                bus.publish(f"loop.{host}.{i % 5}", [host, i])
            bus.publish(end, host)
        for sub, mine in ((all_a, "A"), (all_b, "B")):
            got = [(tuple(m.data), m.sender.origin) for m in until_sentinels(sub, end, 2)]
            want = [((host, i), None if host == mine else f"host{host}")
                    for host in "AB" for i in range(n)]
            assert sorted(got) == sorted(want)        # every message once, no echo

    round_trip("end.1")
    round_trip("end.2")     # an echo of the first round would come before its end
    for broker in (a, b):
        assert link(broker)["msgs_out"] == link(broker)["msgs_in"] == 2 * (n + 1)
    assert nats_server.varz()["in_msgs"] == in_msgs + 4 * (n + 1)


def test_no_loops_across_a_cluster(tmp_path, hosts):
    with start_cluster(tmp_path / "nats", size=3) as cluster:
        a = hosts.broker("hostA", cluster.leaf_urls[0])
        b = hosts.broker("hostB", cluster.leaf_urls[2])
        pub_a, pub_b = hosts.client(a), hosts.client(b)
        all_a, all_b = pub_a.subscribe(">"), pub_b.subscribe(">")
        probe_until_received(pub_a, "probe.a", all_b)
        probe_until_received(pub_b, "probe.b", all_a)
        for bus, host in ((pub_a, "A"), (pub_b, "B")):
            for i in range(200):
                bus.publish(f"loop.{host}", [host, i])
            bus.publish("loop.end", host)
        for sub in (all_a, all_b):
            got = [tuple(m.data) for m in until_sentinels(sub, "loop.end", 2)
                   if m.topic.startswith("loop.")]
            assert sorted(got) == sorted((h, i) for h in "AB" for i in range(200))


# ---- 4. interest withdrawn ----

def test_publisher_stops_when_the_last_remote_subscriber_unsubscribes(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, bus_b = hosts.client(a), hosts.client(b)
    sub = bus_b.subscribe("news.>")
    settle(bus_b, pub)
    assert link(a)["remote_interest"] == 1
    pub.publish("news.1", 1)
    assert sub.recv(timeout=5).data == 1

    sub.unsubscribe()
    settle(bus_b, pub)
    assert link(a)["remote_interest"] == 0
    for i in range(100):
        pub.publish("news.2", i)
    pub.flush()
    assert link(a)["msgs_out"] == 1
    assert link(b)["local_interest"] == 0
    assert nats_server.varz()["in_msgs"] == 1


def test_interest_stays_while_any_subscriber_remains(nats_server, hosts):
    """Two subscribers on B and one on C: A keeps sending until the last
    of the three is gone."""
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    c = hosts.broker("hostC", nats_server.leaf_url)
    pub, bus_b, twin_bus, bus_c = (hosts.client(x) for x in (a, b, b, c))
    sub_b, twin_b, sub_c = (bus.subscribe("news.>") for bus in (bus_b, twin_bus, bus_c))
    settle(bus_b, twin_bus, bus_c, pub)
    pub.publish("news.1", 1)
    for sub in (sub_b, twin_b, sub_c):
        assert sub.recv(timeout=5).data == 1

    twin_b.unsubscribe()
    sub_c.unsubscribe()
    settle(twin_bus, bus_c, pub)
    assert sum("news.>" in subs for subs in leaf_subs(nats_server)) == 1    # B's
    pub.publish("news.2", 2)
    assert sub_b.recv(timeout=5).data == 2

    sub_b.unsubscribe()
    settle(bus_b, pub)
    assert leaf_subs(nats_server) == [[], [], []]
    assert link(a)["remote_interest"] == 0, link(a)
    for i in range(100):
        pub.publish("news.3", i)
    pub.flush()
    assert link(a)["msgs_out"] == 2


def test_a_client_that_goes_withdraws_its_interest(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, bus_b = hosts.client(a), hosts.client(b)
    sub = bus_b.subscribe("news.*")
    settle(bus_b, pub)
    pub.publish("news.1", 1)
    assert sub.recv(timeout=5).data == 1
    bus_b.close()
    wait_for(lambda: link(a)["remote_interest"] == 0, message=str(link(a)))
    pub.publish("news.2", 2)
    pub.flush()
    assert link(a)["msgs_out"] == 1
    assert link(b)["local_interest"] == 0


# ---- 5. request/reply, queue groups ----

def serve(bus, topic: str, answer, count: int) -> threading.Thread:
    """A thread answering count requests on topic with answer(data)."""
    sub = bus.subscribe(topic)

    def loop():
        for _ in range(count):
            msg = sub.recv(timeout=20)
            msg.respond(answer(msg.data))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_request_reply_across_hosts(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    requester, service = hosts.client(a), hosts.client(b)
    thread = serve(service, "svc.double", lambda x: x * 2, 20)
    settle(service, requester)
    for i in range(20):
        reply = requester.request("svc.double", i, timeout=5)
        assert reply.data == 2 * i
        assert reply.sender.origin == "hostB"
    thread.join(5)
    assert not thread.is_alive()


def queue_members(hosts, brokers, pattern="job.*", group="work"):
    """A queue member on each broker, with a plain `ctl.end` subscription
    on the same client: the sentinel, after every job sent before it."""
    members = []
    for broker in brokers:
        bus = hosts.client(broker)
        members.append((bus, bus.subscribe(pattern, queue=group), bus.subscribe("ctl.end")))
    return members


def jobs_received(member) -> list:
    _, jobs, end = member
    end.recv(timeout=10)
    got = []
    while (msg := jobs.next_queued()) is not None:
        got.append(msg.data)
    return got


def test_queue_group_across_hosts_one_member_per_message(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    c = hosts.broker("hostC", nats_server.leaf_url)
    pub = hosts.client(a)
    members = queue_members(hosts, [b, c])
    settle(*(m[0] for m in members), pub)
    n = 200
    for i in range(n):
        pub.publish(f"job.{i % 3}", i)
    pub.publish("ctl.end", None)
    got_b, got_c = (jobs_received(member) for member in members)
    assert sorted(got_b + got_c) == list(range(n))      # each exactly once
    assert got_b and got_c                              # both chosen (odds 2**-199)
    assert got_b == sorted(got_b) and got_c == sorted(got_c)
    assert link(a)["msgs_out"] == n + 1


def test_queue_group_prefers_a_local_member(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    c = hosts.broker("hostC", nats_server.leaf_url)
    pub = hosts.client(a)
    remote_members = queue_members(hosts, [b, c])
    (local_member,) = queue_members(hosts, [a])
    settle(*(m[0] for m in remote_members), pub)
    n = 100
    for i in range(n):
        pub.publish(f"job.{i % 3}", i)
    pub.publish("ctl.end", None)
    assert jobs_received(local_member) == list(range(n))
    assert [jobs_received(member) for member in remote_members] == [[], []]
    assert link(a)["msgs_out"] == 1         # the sentinel only

    # Without its local member, A names the group to the hub again.
    local_member[1].unsubscribe()
    for i in range(n):
        pub.publish("job.x", i)
    pub.publish("ctl.end", None)
    got = [jobs_received(member) for member in remote_members]
    assert sorted(got[0] + got[1]) == list(range(n))
    assert jobs_received(local_member) == []


def test_queue_weights_follow_the_local_member_counts(nats_server, hosts):
    """B announces weight 2 (two members), C weight 1: the hub picks B
    about twice as often (600 draws: 400 expected, sd 11.5)."""
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    c = hosts.broker("hostC", nats_server.leaf_url)
    pub = hosts.client(a)
    members = queue_members(hosts, [b, b, c])
    settle(*(m[0] for m in members), pub)
    n = 600
    for i in range(n):
        pub.publish("job.x", i)
    pub.publish("ctl.end", None)
    got = [jobs_received(member) for member in members]
    assert sorted(got[0] + got[1] + got[2]) == list(range(n))
    assert 330 < len(got[0]) + len(got[1]) < 470, [len(g) for g in got]


def test_replies_reach_a_requester_whose_inbox_a_wildcard_covers(nats_server, hosts):
    """A `>` subscriber on the requester's broker covers its inbox; when it
    goes, the inbox must be told again before `>` is withdrawn."""
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    requester, service, watcher = hosts.client(a), hosts.client(b), hosts.client(a)
    thread = serve(service, "svc.neg", lambda x: -x, 10)
    settle(service, requester)
    assert requester.request("svc.neg", 1, timeout=5).data == -1
    for i in range(2, 11):
        everything = watcher.subscribe(">")
        settle(watcher)
        assert requester.request("svc.neg", i, timeout=2).data == -i
        everything.unsubscribe()
        settle(watcher)
    thread.join(5)


def test_queue_group_with_a_nats_py_member(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub = hosts.client(a)
    (member,) = queue_members(hosts, [b])
    n = 100

    async def scenario():
        nc = await nats_connect(nats_server)
        jobs = await nc.subscribe("job.*", queue="work")
        end = await nc.subscribe("ctl.end")
        await nc.flush()
        await asyncio.to_thread(settle, member[0], pub)
        for i in range(n):
            await asyncio.to_thread(pub.publish, "job.x", i)
        await asyncio.to_thread(pub.publish, "ctl.end", None)
        await end.next_msg(timeout=5)
        got = []
        while jobs.pending_msgs:
            got.append(msgpack.unpackb((await jobs.next_msg(timeout=1)).data))
        await nc.close()
        return got

    native = run(scenario())
    assert sorted(native + jobs_received(member)) == list(range(n))


def test_nats_py_publishes_to_a_queue_group_on_two_brokers(nats_server, hosts):
    b = hosts.broker("hostB", nats_server.leaf_url)
    c = hosts.broker("hostC", nats_server.leaf_url)
    members = queue_members(hosts, [b, c])
    settle(*(m[0] for m in members))
    n = 200

    async def scenario():
        nc = await nats_connect(nats_server)
        for i in range(n):
            await nc.publish(f"job.{i % 4}", msgpack.packb(i))
        await nc.publish("ctl.end", msgpack.packb(None))
        await nc.flush()
        await nc.close()

    run(scenario())
    got_b, got_c = (jobs_received(member) for member in members)
    assert sorted(got_b + got_c) == list(range(n))
    assert got_b and got_c


# ---- 6. nats-py ----

def test_nats_py_publishes_to_busx_subscribers_on_two_brokers(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    bus_a, bus_b = hosts.client(a), hosts.client(b)
    subs = [bus_a.subscribe("sensor.*"), bus_b.subscribe("sensor.>")]
    settle(bus_a, bus_b)            # the server holds both: nats-py can publish
    values = [{"temp": 21.5, "n": i, "raw": b"\x00\xff"} for i in range(10)]

    async def scenario():
        nc = await nats_connect(nats_server)
        for value in values:
            await nc.publish("sensor.t1", msgpack.packb(value))
        await nc.flush()
        await nc.close()

    run(scenario())
    for sub in subs:
        got = recv_n(sub, len(values))
        assert [m.data for m in got] == values
        assert [m.raw for m in got] == [msgpack.packb(v) for v in values]
        assert {m.topic for m in got} == {"sensor.t1"}
        assert got[0].sender == busx.Credentials(None, None, None, None, None, "nats")
    assert link(a)["msgs_out"] == link(b)["msgs_out"] == 0


@pytest.mark.parametrize("payload, why", [
    (b"hello world", "ExtraData"), (b"\xc1", "FormatError"), (b"", "incomplete"),
])
def test_a_payload_that_is_not_msgpack_arrives_raw_and_data_says_why(nats_server, hosts,
                                                                     payload, why):
    a = hosts.broker("hostA", nats_server.leaf_url)
    bus = hosts.client(a)
    sub = bus.subscribe("plain.text")
    settle(bus)

    async def scenario():
        nc = await nats_connect(nats_server)
        await nc.publish("plain.text", payload)
        await nc.flush()
        await nc.close()

    run(scenario())
    msg = sub.recv(timeout=5)
    assert msg.raw == payload
    with pytest.raises(ValueError, match=f"'plain.text' message is not msgpack .*{why}.*"
                                         f"msg.raw has its {len(payload)} bytes"):
        msg.data


def test_nats_py_subscribes_to_a_busx_publisher(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    pub = hosts.client(a)
    value = {"hello": ["world", 1, 2.5, None, b"\x00\xff"]}

    async def scenario():
        nc = await nats_connect(nats_server)
        sub = await nc.subscribe("out.>")
        await nc.flush()                            # the server holds it
        await asyncio.to_thread(settle, pub)        # and A has read it
        await asyncio.to_thread(pub.publish, "out.x", value)
        msg = await sub.next_msg(timeout=5)
        await nc.close()
        return msg

    msg = run(scenario())
    assert msg.subject == "out.x"
    assert msg.data == msgpack.packb(value)
    assert msg.headers["Busx-Origin"] == "hostA"


def test_nats_py_requests_a_busx_service(nats_server, hosts):
    b = hosts.broker("hostB", nats_server.leaf_url)
    service = hosts.client(b)
    thread = serve(service, "svc.upper", lambda s: s.upper(), 3)
    settle(service)

    async def scenario():
        nc = await nats_connect(nats_server)
        replies = [await nc.request("svc.upper", msgpack.packb(word), timeout=5)
                   for word in ("a", "bc", "def")]
        await nc.close()
        return replies

    assert [msgpack.unpackb(r.data) for r in run(scenario())] == ["A", "BC", "DEF"]
    thread.join(5)


def nats_py_service(server, requester_bus, subject: str, answer):
    """nats-py answering requests on subject while the busx requester runs
    answer(...) in a thread: its replies, from the requester's side."""

    async def scenario():
        nc = await nats_connect(server)

        async def handle(msg):
            await answer(nc, msg)

        await nc.subscribe(subject, cb=handle)
        await nc.flush()
        await asyncio.to_thread(settle, requester_bus)
        replies = [await asyncio.to_thread(requester_bus.request, subject, i, 5)
                   for i in range(5)]
        await nc.close()
        return replies

    return run(scenario())


def test_busx_requests_a_nats_py_service(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    requester = hosts.client(a)

    async def answer(nc, msg):
        await nc.publish(msg.reply, msgpack.packb(msgpack.unpackb(msg.data) + 1))

    replies = nats_py_service(nats_server, requester, "svc.incr", answer)
    assert [r.data for r in replies] == [1, 2, 3, 4, 5]
    assert replies[0].sender == busx.Credentials(None, None, None, None, None, "nats")


def test_busx_requests_a_nats_py_service_answering_with_respond(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url)
    requester = hosts.client(a)

    async def answer(nc, msg):
        await msg.respond(msgpack.packb(msgpack.unpackb(msg.data) * 10))

    replies = nats_py_service(nats_server, requester, "svc.times", answer)
    assert [r.data for r in replies] == [0, 10, 20, 30, 40]
    assert replies[0].sender.origin == "nats", replies[0].sender


# ---- the backbone flush, and what the server may make the broker hold ----

def test_backbone_flush_waits_for_the_server(nats_server, hosts):
    """flush(backbone=True) returns only once the NATS server has answered:
    with the server stopped it times out (a plain flush still returns),
    resumed it returns."""
    a = hosts.broker("hostA", nats_server.leaf_url)
    bus = hosts.client(a)
    bus.subscribe("flushed.>")
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        bus.flush(timeout=5)
        with pytest.raises(busx.Timeout):
            bus.flush(timeout=0.5, backbone=True)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    bus.flush(timeout=5, backbone=True)
    assert nats_server.interest("flushed.x") == {"leaf"}     # held, without waiting


def test_backbone_flushes_past_the_ping_bound_are_answered_at_once(nats_server, hosts):
    """A client flooding backbone flushes while the server is stopped makes
    the broker hold at most NATS_MAX_PINGS (4096) PINGs for it; the rest are
    answered at once. Nothing is lost: all are answered once it resumes."""
    a = hosts.broker("hostA", nats_server.leaf_url, heartbeat=60)
    peer = RawPeer(a, "unix")
    peer.handshake()
    count, held = 5000, 4096
    os.kill(nats_server.pid, signal.SIGSTOP)
    try:
        peer.send(b"".join(protocol.encode_frame(protocol.PING, id=n, topic=b"nats")
                           for n in range(1, count + 1))
                  + protocol.encode_frame(protocol.PING, id=count + 1))   # a plain one
        early = []
        while (frame := peer.next_frame()).id != count + 1:
            early.append(frame.id)
        assert early == list(range(held + 1, count + 1))   # answered in order, at once
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    late = [peer.next_frame().id for _ in range(held)]
    assert sorted(late) == list(range(1, held + 1))


def test_remote_interest_is_bounded_by_max_subscriptions(nats_server, hosts):
    """A server announcing more subjects than max_subscriptions: the broker
    keeps that many, counts the rest, and keeps serving and linking."""
    a = hosts.broker("hostA", nats_server.leaf_url, max_subscriptions=10)

    async def scenario():
        nc = await nats_connect(nats_server)
        for i in range(15):
            await nc.subscribe(f"many.{i}")
        await nc.flush()
        await asyncio.to_thread(wait_for, lambda: link(a)["remote_interest_refused"] == 5,
                                message=str(link(a)))
        state = link(a)
        await nc.close()
        return state

    state = run(scenario())
    assert (state["remote_interest"], state["state"]) == (10, "up")
    assert_local_pub_sub_works(hosts, a)


def test_interest_converges_under_churn_and_relinks(tmp_path, hosts):
    """Stress: four threads subscribe and unsubscribe on their own
    connections while the server is killed and restarted under the link
    three times. Afterwards the server holds exactly the subscriptions that
    remain, each once: no LS+/LS- lost or doubled across the relinks, and
    the loop, the connector thread and the clients never deadlock."""
    with start_server(tmp_path / "nats") as server:
        a = hosts.broker("hostA", server.leaf_url)
        stop = threading.Event()
        kept: list[set[str]] = [set() for _ in range(4)]

        def churn(n: int) -> None:
            bus = hosts.client(a)
            subs: dict[str, busx.Subscription] = {}
            rng = random.Random(n)
            while not stop.is_set() or len(subs) > 10:
                name = f"churn.{n}.{rng.randrange(30)}"
                if name in subs:
                    subs.pop(name).unsubscribe()
                else:
                    subs[name] = bus.subscribe(name)
            kept[n] = set(subs)

        threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(3):
                reconnects = link(a)["reconnects"]
                server.kill()
                wait_for(lambda before=reconnects: link(a)["reconnects"] > before)
                server.restart()
                wait_for(lambda: link(a)["state"] == "up", message=str(link(a)))
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        hosts.client(a).flush(backbone=True)
        [held] = leaf_subs(server)
        assert sorted(held) == sorted(set().union(*kept))
        assert link(a)["local_interest"] == len(held)


# ---- senders and the policy ----

REMOTE_POLICY = {"rule": [
    {"any": True, "publish": [">"], "subscribe": [">"]},      # this host's peers
    {"origin": "hostA", "publish": ["from-a.>"]},
    {"remote": True, "publish": ["shared.>"]},
]}


def test_policy_rules_for_remote_senders(nats_server, hosts):
    """On B, messages from host A may reach from-a.> and shared.>; those of
    a native NATS client only shared.>; the rest is dropped and counted."""
    a = hosts.broker("hostA", nats_server.leaf_url)
    b = hosts.broker("hostB", nats_server.leaf_url, policy=REMOTE_POLICY)
    pub, bus_b = hosts.client(a), hosts.client(b)
    sub = bus_b.subscribe("*.*")
    settle(bus_b, pub)
    for topic in ("from-a.x", "shared.x", "other.x"):
        pub.publish(topic, topic)

    async def scenario():
        nc = await nats_connect(nats_server)
        for topic in ("from-a.x", "shared.x", "other.x"):
            await nc.publish(topic, msgpack.packb(f"native {topic}"))
        await nc.publish("shared.end", msgpack.packb(None))
        await nc.flush()
        await nc.close()

    run(scenario())
    pub.publish("shared.end", None)
    # NATS keeps each publisher's order, not an order between publishers:
    # each sentinel vouches only for its own publisher's earlier messages.
    got = [(m.data, m.sender.origin) for m in until_sentinels(sub, "shared.end", 2)]
    native = [item for item in got if item[1] == "nats"]
    assert [item for item in got if item[1] == "hostA"] == [("from-a.x", "hostA"),
                                                            ("shared.x", "hostA")]
    assert native == [("native shared.x", "nats")]
    wait_for(lambda: link(b)["dropped_denied"] == 3, message=str(link(b)))


# ---- 7. fds and sizes ----

def test_fds_do_not_cross_hosts(nats_server, hosts):
    a, b, pub, local, remote = two_hosts(hosts, nats_server, "file.>", "file.>")
    r, w = os.pipe()
    try:
        pub.publish("file.x", "here", fds=[r, w])
        pub.flush()
    finally:
        os.close(r)
        os.close(w)
    msg = remote.recv(timeout=5)
    assert (msg.data, msg.fds, msg.fds_lost) == ("here", (), 2)
    mine = local.recv(timeout=5)
    assert len(mine.fds) == 2 and mine.fds_lost == 0
    for fd in mine.fds:
        os.close(fd)
    assert link(a)["fds_lost"] == 2


def test_payloads_past_max_payload_are_dropped_at_the_exact_boundary(tmp_path, hosts):
    """NATS counts headers and payload against max_payload, and kills a
    connection that sends one byte more: every size around the limit
    either crosses or is dropped and counted, and the link stays."""
    max_payload = 4096
    with start_server(tmp_path / "nats", max_payload=max_payload) as server:
        a = hosts.broker("hostA", server.leaf_url)
        b = hosts.broker("hostB", server.leaf_url)
        assert link(a)["max_payload"] == max_payload
        pub, remote_bus = hosts.client(a), hosts.client(b)
        local = hosts.client(a).subscribe("big.>")
        sub = remote_bus.subscribe("big.>")
        settle(remote_bus, pub)
        sizes = range(max_payload - 400, max_payload + 10)
        for size in sizes:
            pub.publish("big.x", b"x" * size)
        pub.publish("big.end", None)
        got = until_sentinel(sub, "big.end")
        stats = link(a)
        assert stats["reconnects"] == 0 and stats["state"] == "up", stats
        assert len(got) + stats["dropped_too_large"] == len(sizes)
        assert [len(m.data) for m in got] == list(sizes)[:len(got)]     # the smaller ones
        assert 200 < len(got) < len(sizes) - 10
        assert len(until_sentinel(local, "big.end")) == len(sizes)    # local: all of them


def test_memfd_sized_payload_crosses_intact(nats_server, hosts):
    a, b, pub, local, remote = two_hosts(hosts, nats_server, "blob", "blob")
    blob = os.urandom(300 * 1024)       # at least PAYLOAD_FD_MIN (256 KiB): a memfd locally
    pub.publish("blob", blob)
    pub.publish("blob", b"small")
    assert [m.data for m in recv_n(remote, 2)] == [blob, b"small"]
    assert [m.data for m in recv_n(local, 2)] == [blob, b"small"]
    assert link(a)["bytes_out"] == len(msgpack.packb(blob)) + len(msgpack.packb(b"small"))


def test_message_from_nats_larger_than_max_frame_is_dropped_alone(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url, max_frame=64 * 1024)
    bus = hosts.client(a)
    sub = bus.subscribe("in.>")
    settle(bus)

    async def scenario():
        nc = await nats_connect(nats_server)
        await nc.publish("in.big", msgpack.packb(b"x" * 900_000))
        await nc.publish("in.small", msgpack.packb(b"ok"))
        await nc.flush()
        await nc.close()

    run(scenario())
    assert sub.recv(timeout=2).data == b"ok"
    assert link(a)["dropped_too_large"] == 1
    assert link(a)["reconnects"] == 0


# ---- 8. cluster failover ----

@pytest.mark.parametrize("configured", ["first URL", "all URLs"])
def test_failover_to_another_cluster_node(tmp_path, hosts, configured):
    with start_cluster(tmp_path / "nats", size=3) as cluster:
        urls = cluster.leaf_urls[:1] if configured == "first URL" else cluster.leaf_urls
        a = hosts.broker("hostA", urls)
        b = hosts.broker("hostB", cluster.leaf_urls[1])
        pub_a, pub_b = hosts.client(a), hosts.client(b)
        sub_b = hosts.client(b).subscribe("fo.>")
        sub_a = hosts.client(a).subscribe("back.>")
        probe_until_received(pub_a, "fo.probe", sub_b)
        probe_until_received(pub_b, "back.probe", sub_a)
        first = link(a)["server"]
        assert first.endswith(f"127.0.0.1:{cluster[0].leaf_port}"), first

        for i in range(100):
            pub_a.publish("fo.x", i)
        assert [m.data for m in recv_n(sub_b, 100)] == list(range(100))

        killed = time.monotonic()
        cluster[0].kill()
        for i in range(100, 200):          # in flight: may be lost, never doubled
            pub_a.publish("fo.x", i)
        wait_for(lambda: link(a)["reconnects"] >= 1 and link(a)["state"] == "up",
                 timeout=5, message=f"A did not relink: {link(a)}")
        # Up means the new node answered the PING after A's LS+: it holds A's interest.
        assert time.monotonic() - killed < 2.0
        assert link(a)["server"] != first
        assert link(a)["remote_interest"] >= 1      # B's, from the new node's snapshot
        # A's interest reaches B's node one route hop later.
        probe_until_received(pub_b, "back.probe", sub_a)
        for i in range(200, 300):
            pub_a.publish("fo.x", i)
            pub_b.publish("back.x", i)
        pub_a.publish("fo.end", None)
        pub_b.publish("back.end", None)
        got = [m.data for m in until_sentinel(sub_b, "fo.end") if m.topic == "fo.x"]
        assert got == sorted(set(got))                  # in order, none twice
        assert got[-100:] == list(range(200, 300))      # all sent after the relink
        back = [m.data for m in until_sentinel(sub_a, "back.end") if m.topic == "back.x"]
        assert back == list(range(200, 300))


# ---- 9. outages ----

class Gate:
    """A TCP relay in front of a server's leafnodes listener, opened and
    shut by the test: shut, it closes every connection it accepts at once,
    as a server that is down."""

    def __init__(self):
        self.upstream: tuple[str, int] | None = None
        self.open = True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.url = f"nats://{self.address}"
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                if not self.open or self.upstream is None:
                    raise ConnectionRefusedError
                server = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                conn.close()
                continue
            self.sockets += [conn, server]
            for src, dst in ((conn, server), (server, conn)):
                thread = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                self.threads.append(thread)
                thread.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Shut, and break the connections relayed now."""
        self.open = False
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def gated_server(tmp_path):
    """(server, gate): the server advertises the gate as its leafnodes
    listener, so that a broker linked through the gate does not learn the
    way around it (leafnode_urls)."""
    gate = Gate()
    try:
        with start_server(tmp_path / "nats",
                          leafnodes_extra=f'  advertise: "{gate.address}"') as server:
            gate.upstream = server.leaf_address
            yield server, gate
    finally:
        gate.close()


def test_outage_buffers_for_the_backbone_while_local_traffic_flows(gated_server, hosts):
    """A reaches the server through the gate, kept shut after the restart
    until B's interest is back: the buffered messages then have somewhere
    to go."""
    nats_server, gate = gated_server
    nats_buffer = 64 * 1024
    a = hosts.broker("hostA", gate.url, nats_buffer=nats_buffer)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub, remote_bus = hosts.client(a), hosts.client(b)
    local = hosts.client(a).subscribe("out.>")
    remote = remote_bus.subscribe("out.>")
    settle(remote_bus, pub)

    gate.open = False
    nats_server.stop()
    wait_for(lambda: link(a)["state"] == "down" and link(b)["state"] == "down")
    n = 100
    for i in range(n):
        pub.publish(f"out.{i}", b"y" * 1000)
    assert [m.topic for m in recv_n(local, n)] == [f"out.{i}" for i in range(n)]
    stats = link(a)
    kept = n - stats["dropped_buffer_full"]
    assert 40 < kept < n, stats
    assert stats["msgs_out"] == kept
    assert nats_buffer - 1200 < stats["buffered_bytes"] <= nats_buffer, stats

    nats_server.restart()
    wait_for(lambda: link(b)["state"] == "up", message=f"B: {link(b)}")
    settle(remote_bus)
    gate.open = True
    wait_for(lambda: link(a)["state"] == "up", message=f"A: {link(a)}")
    pub.publish("out.end", None)
    got = until_sentinel(remote, "out.end")
    assert [m.topic for m in got] == [f"out.{i}" for i in range(kept)], (link(a), link(b))
    assert link(a)["buffered_bytes"] == 0
    assert link(a)["reconnects"] == 1 and link(a)["server"].endswith(gate.address)


def test_interest_changed_during_an_outage_is_resynchronised(gated_server, hosts):
    """A is cut off while B drops one pattern for another and A's own
    client subscribes: after the relink each side knows the other's
    interest as it is now, not as it was."""
    nats_server, gate = gated_server
    a = hosts.broker("hostA", gate.url)
    b = hosts.broker("hostB", nats_server.leaf_url)
    pub_a, bus_b = hosts.client(a), hosts.client(b)
    old = bus_b.subscribe("old.>")
    settle(bus_b, pub_a)

    gate.cut()
    wait_for(lambda: link(a)["state"] == "down")
    old.unsubscribe()
    new = bus_b.subscribe("new.>")
    mine = pub_a.subscribe("mine.>")
    settle(bus_b)
    gate.open = True
    wait_for(lambda: link(a)["state"] == "up", message=str(link(a)))
    assert link(a)["remote_interest"] == 1              # new.>, not old.>
    settle(pub_a, bus_b)
    for i in range(10):
        pub_a.publish("old.x", i)
        pub_a.publish("new.x", i)
        bus_b.publish("mine.x", i)
    pub_a.publish("new.end", None)
    bus_b.publish("mine.end", None)
    assert [m.data for m in until_sentinel(new, "new.end")] == list(range(10))
    assert [m.data for m in until_sentinel(mine, "mine.end")] == list(range(10))
    assert link(a)["msgs_out"] == 11


def test_a_slow_hub_holds_its_publisher_and_loses_nothing(hosts, fake_hub):
    """A hub that stops reading: the publisher whose messages it wants is
    held (back-pressure, not drops), the link's queue stays within
    nats_buffer, a publisher of local traffic is not held; once the hub
    reads again everything arrives whole and in order."""
    nats_buffer = 256 * 1024
    broker, fake = joined(hosts, fake_hub, nats_buffer=nats_buffer)
    fake.send(b"LS+ flood.>\r\nPING\r\n")
    assert fake.line() == b"PONG"           # the broker has read our LS+
    pub, calm_pub = hosts.client(broker), hosts.client(broker)
    flood = hosts.client(broker).subscribe("flood.>")
    calm = hosts.client(broker).subscribe("calm.>")
    n, payload = 3000, b"z" * 4000          # 12 MB: past socket buffers and nats_buffer
    for i in range(n):
        pub.publish(f"flood.{i}", payload)
    pub.publish("flood.end", b"")
    wait_for(lambda: link(broker)["publisher_pauses"] >= 1, message=str(link(broker)))
    for i in range(100):
        calm_pub.publish("calm.x", i)
    assert [m.data for m in recv_n(calm, 100)] == list(range(100))     # never held
    stats = link(broker)
    assert stats["msgs_out"] < n and stats["buffered_bytes"] <= nats_buffer, stats

    topics = fake.messages_until(b"flood.end")      # the hub reads again
    assert topics == [b"flood.%d" % i for i in range(n)]
    assert len(until_sentinel(flood, "flood.end")) == n
    stats = link(broker)
    assert stats["dropped_buffer_full"] == 0 and stats["bytes_lost"] == 0, stats
    assert stats["msgs_out"] == n + 1 and stats["reconnects"] == 0, stats


def test_a_stopped_server_is_given_up_after_three_heartbeats(nats_server, hosts):
    a = hosts.broker("hostA", nats_server.leaf_url, heartbeat=0.2)
    stop_process(nats_server.pid)
    try:
        started = time.monotonic()
        wait_for(lambda: link(a)["reconnects"] == 1, timeout=5, message=str(link(a)))
        assert time.monotonic() - started < 1.2
        assert "heartbeats" in link(a)["last_error"]
        assert_local_pub_sub_works(hosts, a)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    wait_for(lambda: link(a)["state"] == "up", message=str(link(a)))


def test_an_idle_link_stays_up_on_heartbeats(nats_server, hosts):
    """Ten heartbeats of idleness: PINGs answered keep the link."""
    a = hosts.broker("hostA", nats_server.leaf_url, heartbeat=0.1)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:       # watched, not slept through
        assert link(a)["state"] == "up" and link(a)["reconnects"] == 0, link(a)
        time.sleep(0.05)


def test_a_dead_first_url_is_passed_over(nats_server, hosts):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        dead = f"nats://127.0.0.1:{taken.getsockname()[1]}"
    a = hosts.broker("hostA", [dead, nats_server.leaf_url])
    assert link(a)["server"].endswith(f":{nats_server.leaf_port}")


def test_max_payload_follows_the_server_after_a_restart(tmp_path, hosts):
    with start_server(tmp_path / "nats", max_payload=4096) as server:
        a = hosts.broker("hostA", server.leaf_url)
        assert link(a)["max_payload"] == 4096
        server.stop()
        server.max_payload = 65536
        server.restart()
        wait_for(lambda: link(a)["state"] == "up" and link(a)["reconnects"] == 1)
        assert link(a)["max_payload"] == 65536


# ---- 10. a hub played by hand ----

INFO = b'INFO {"server_id":"FAKE","headers":true,"max_payload":1048576} \r\n'


class FakeHub:
    """A leafnodes listener spoken by hand."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.url = f"nats://127.0.0.1:{self.listener.getsockname()[1]}"
        self.links: list[FakeLink] = []

    def accept(self) -> FakeLink:
        conn, _ = self.listener.accept()
        self.links.append(FakeLink(conn))
        return self.links[-1]

    def close(self) -> None:
        for fake in self.links:
            fake.sock.close()
        self.listener.close()


class FakeLink:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(10)
        self.data = b""

    def raw_line(self) -> bytes:
        while b"\r\n" not in self.data:
            chunk = self.sock.recv(65536)
            assert chunk, f"the broker closed the link; it had sent {self.data!r}"
            self.data += chunk
        line, self.data = self.data.split(b"\r\n", 1)
        return line

    def line(self) -> bytes:
        """The next line but PINGs, which are answered."""
        while (line := self.raw_line()) == b"PING":
            self.sock.sendall(b"PONG\r\n")
        return line

    def handshake(self) -> list[bytes]:
        """Our INFO; the broker's INFO, CONNECT (and LS+) up to its PING; PONG."""
        self.sock.sendall(INFO)
        lines = []
        while (line := self.raw_line()) != b"PING":
            lines.append(line)
        self.sock.sendall(b"PONG\r\n")
        return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def messages_until(self, last: bytes) -> list[bytes]:
        """The subjects of the HMSGs the broker sends, up to subject last."""
        subjects = []
        while True:
            line = self.line()
            if not line.startswith(b"HMSG "):
                continue
            fields = line.split()
            size = int(fields[-1]) + 2
            while len(self.data) < size:
                chunk = self.sock.recv(1 << 20)
                assert chunk, "the broker closed the link"
                self.data += chunk
            assert self.data[size - 2:size] == b"\r\n"
            self.data = self.data[size:]
            if fields[1] == last:
                return subjects
            subjects.append(fields[1])

    def closed_within(self, timeout: float) -> bool:
        """Read (answering nothing) until the broker closes: True if it did."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return False


@pytest.fixture
def fake_hub(hosts):
    """Depends on hosts so that it closes first: a broker then never waits
    on a connection the fake will not answer while it stops."""
    hub = FakeHub()
    yield hub
    hub.close()


def joined(hosts, fake_hub, **options):
    """A broker linked to the fake hub, handshake done: (broker, link)."""
    broker = hosts.broker("hostA", fake_hub.url, up=False, **options)
    fake = fake_hub.accept()
    lines = fake.handshake()
    assert lines[0] == b'INFO {"compression":"off"}' and lines[1].startswith(b"CONNECT {")
    wait_for(lambda: link(broker)["state"] == "up")
    return broker, fake


BAD_INPUT = [
    pytest.param(b"WHAT IS THIS\r\n", "unexpected line", id="garbage line"),
    pytest.param(b"LMSG foo 99999999999\r\n", "malformed LMSG", id="size of 11 digits"),
    pytest.param(b"LMSG foo 9999999999\r\n", "max_payload", id="size past max_payload"),
    pytest.param(b"LMSG foo 3\r\nhello\r\n", "CRLF", id="size not matching"),
    pytest.param(b"HMSG foo 9 5\r\nhello\r\n", "malformed", id="header longer than message"),
    pytest.param(b"LS+ foo grp\r\n", "malformed LS+", id="LS+ without weight"),
    pytest.param(b"LS- a b c\r\n", "malformed LS-", id="LS- with three fields"),
    pytest.param(b"LS+ " + b"x" * 70000, "64 KiB", id="line past 64 KiB"),
    pytest.param(b"INFO {nope\r\n", "INFO", id="INFO not JSON"),
    pytest.param(b"INFO [1, 2]\r\n", "INFO", id="INFO not an object"),
]


@pytest.mark.parametrize("sent, reason", BAD_INPUT)
def test_bad_input_from_the_hub_drops_the_link_and_it_relinks(hosts, fake_hub, sent, reason):
    broker, fake = joined(hosts, fake_hub)
    fake.send(sent)
    assert fake.closed_within(1), f"the broker kept the link after {sent[:40]!r}"
    wait_for(lambda: link(broker)["state"] == "down" and link(broker)["reconnects"] == 1,
             message=str(link(broker)))
    assert reason in (link(broker)["last_error"] or ""), link(broker)
    assert_local_pub_sub_works(hosts, broker)
    fake_hub.accept().handshake()             # it reconnects
    wait_for(lambda: link(broker)["state"] == "up")
    assert_local_pub_sub_works(hosts, broker)


def test_err_from_the_hub_is_reported(hosts, fake_hub):
    broker, fake = joined(hosts, fake_hub)
    fake.send(b"-ERR 'Unexpected'\r\n")
    wait_for(lambda: "Unexpected" in (link(broker)["last_error"] or ""), message=str(link(broker)))
    assert_local_pub_sub_works(hosts, broker)
    fake.sock.close()
    fake_hub.accept().handshake()
    wait_for(lambda: link(broker)["state"] == "up" and link(broker)["reconnects"] == 1)
    assert_local_pub_sub_works(hosts, broker)




def test_err_then_close_keeps_the_servers_reason(hosts, fake_hub):
    broker, fake = joined(hosts, fake_hub)
    fake.send(b"-ERR 'Unexpected'\r\n")
    fake.sock.shutdown(socket.SHUT_WR)          # as nats-server closes after an -ERR
    assert fake.closed_within(2)
    wait_for(lambda: link(broker)["reconnects"] == 1)
    assert "Unexpected" in (link(broker)["last_error"] or ""), link(broker)


AUTH = "  authorization { user: leaf, password: right }"


def test_bad_credentials_are_reported(tmp_path, hosts):
    with start_server(tmp_path / "nats", leafnodes_extra=AUTH) as server:
        broker = hosts.broker("hostA", server.leaf_url, up=False,
                              nats_user="leaf", nats_password="wrong")
        # The server closes after its -ERR, which a reset may beat to us: each
        # retry is another chance to read it.
        wait_for(lambda: "Authorization Violation" in (link(broker)["last_error"] or ""),
                 message=str(link(broker)))
        assert link(broker)["state"] != "up"
        assert_local_pub_sub_works(hosts, broker)


def test_good_credentials_join(tmp_path, hosts):
    with start_server(tmp_path / "nats", leafnodes_extra=AUTH) as server:
        a = hosts.broker("hostA", server.leaf_url, nats_user="leaf", nats_password="right")
        b = hosts.broker("hostB", server.leaf_url, nats_user="leaf", nats_password="right")
        pub, bus_b = hosts.client(a), hosts.client(b)
        sub = bus_b.subscribe("auth.x")
        settle(bus_b, pub)
        pub.publish("auth.x", 1)
        assert sub.recv(timeout=5).data == 1


def test_interest_the_hub_gets_wrong_is_ignored(hosts, fake_hub):
    """LS+ for subjects that are no busx pattern (empty tokens, an inbox
    with one) is not routed on; the link stays up and the valid one counts."""
    broker, fake = joined(hosts, fake_hub)
    before = link(broker)["remote_interest"]
    fake.send(b"LS+ _INBOX.a..b\r\nLS+ foo..x\r\nLS+ ok.*\r\nPING\r\n")
    assert fake.line() == b"PONG"
    assert link(broker)["remote_interest"] == before + 1
    assert link(broker)["state"] == "up" and link(broker)["reconnects"] == 0


def test_messages_the_hub_gets_wrong_are_dropped_and_counted(hosts, fake_hub):
    broker, fake = joined(hosts, fake_hub)
    sub = hosts.client(broker).subscribe(">")
    assert fake.line() == b"LS+ >"
    fake.send(b"LMSG foo..bar 1\r\n\x01\r\n"         # not a topic
              b"LMSG foo.* 1\r\n\x02\r\n"            # a wildcard
              b"LMSG _SYS.x 1\r\n\x03\r\n"           # reserved
              b"LMSG foo.q | nobody 1\r\n\x04\r\n"   # for plain subscribers too
              b"LMSG foo.r reply.to 1\r\n\x05\r\n"
              b"LMSG foo.s reply..bad 1\r\n\x06\r\n"  # a reply that is no topic: none
              b"HMSG foo.h 12 13\r\nNATS/1.0\r\n\r\n\x07\r\n"
              b"HMSG foo.k 22 23\r\nNATS/1.0\r\nX-Any: 1\r\n\r\n\x08\r\n"
              b"LMSG foo.e 0\r\n\r\n")                # an empty payload
    got = recv_n(sub, 6)
    assert [(m.topic, m.raw, m.reply_to) for m in got] == [
        ("foo.q", b"\x04", None), ("foo.r", b"\x05", "reply.to"), ("foo.s", b"\x06", None),
        ("foo.h", b"\x07", None), ("foo.k", b"\x08", None), ("foo.e", b"", None)]
    assert {m.sender.origin for m in got} == {"nats"}
    stats = link(broker)
    assert stats["dropped_invalid"] == 3 and stats["msgs_in"] == 6, stats
    assert stats["reconnects"] == 0 and stats["state"] == "up", stats


def test_messages_from_the_hub_in_pieces(hosts, fake_hub):
    broker, fake = joined(hosts, fake_hub)
    sub = hosts.client(broker).subscribe("bits.>")
    assert fake.line() == b"LS+ bits.>"
    big = msgpack.packb(os.urandom(200_000))
    stream = b"LMSG bits.a 4\r\n\xa3abc\r\n" + b"LMSG bits.b %d\r\n%s\r\n" % (len(big), big)
    fake.send(stream[:1])
    for i in range(1, 60):          # the lines a byte at a time, then large pieces
        fake.send(stream[i:i + 1])
    for i in range(60, len(stream), 7001):
        fake.send(stream[i:i + 7001])
    assert [m.raw for m in recv_n(sub, 2)] == [b"\xa3abc", big]
    assert link(broker)["reconnects"] == 0




@pytest.mark.parametrize("stamp", [
    pytest.param(b"96c0", id="short array"),
    pytest.param(b"96" + b"c0" * 7, id="array with extra data"),
    pytest.param(b"zz" * 7, id="not hex"),
    pytest.param(b"91c0", id="not a stamp array"),
])
def test_a_forged_stamp_from_the_hub_never_breaks_msg_sender(hosts, fake_hub, stamp):
    broker, fake = joined(hosts, fake_hub)
    sub = hosts.client(broker).subscribe("forged")
    assert fake.line() == b"LS+ forged"
    header = b"NATS/1.0\r\nBusx-Origin: evil\r\nBusx-Stamp: %s\r\n\r\n" % stamp
    fake.send(b"HMSG forged %d %d\r\n%s\x01\r\n" % (len(header), len(header) + 1, header))
    msg = sub.recv(timeout=5)
    assert msg.data == 1
    assert msg.sender.origin in ("evil", "nats")


def test_a_stalled_hub_is_given_up_within_three_heartbeats(hosts, fake_hub):
    broker, fake = joined(hosts, fake_hub, heartbeat=0.2)
    started = time.monotonic()
    assert fake.closed_within(3)
    assert time.monotonic() - started < 1.2         # 3 heartbeats: 0.6 s
    wait_for(lambda: link(broker)["reconnects"] == 1)
    assert "heartbeats" in link(broker)["last_error"]
    assert_local_pub_sub_works(hosts, broker)
    fake_hub.accept().handshake()
    wait_for(lambda: link(broker)["state"] == "up")


def test_stop_is_prompt_while_a_server_says_nothing(hosts, fake_hub):
    broker = hosts.broker("hostA", fake_hub.url, up=False)
    fake_hub.accept()               # connected; no INFO comes
    started = time.monotonic()
    hosts.close()
    assert time.monotonic() - started < 1.0
    assert not broker.stats()["connections"]


def test_a_message_cut_off_by_a_lost_link_is_not_skipped_on_the_next(hosts, fake_hub):
    """The broker skips a message past max_frame as its bytes come; the
    link lost half-way, the next connection starts afresh."""
    broker, fake = joined(hosts, fake_hub, max_frame=64 * 1024)
    sub = hosts.client(broker).subscribe("cut.>")
    assert fake.line() == b"LS+ cut.>"
    fake.send(b"LMSG cut.big 200000\r\n" + b"x" * 70_000)
    wait_for(lambda: link(broker)["dropped_too_large"] == 1)
    fake.sock.close()
    again = fake_hub.accept()
    assert b"LS+ cut.>" in again.handshake()
    again.send(b"LMSG cut.small 1\r\n\x01\r\n")
    assert sub.recv(timeout=5).data == 1
    assert link(broker)["reconnects"] == 1


def test_odd_leafnode_urls_in_info_are_ignored(hosts, fake_hub, caplog):
    broker, fake = joined(hosts, fake_hub)
    fake.send(b'INFO {"leafnode_urls": [5, null, "no-port", ["a"], "127.0.0.1:1"]}'
              b"\r\nPING\r\n")
    assert fake.line() == b"PONG"
    assert link(broker)["state"] == "up" and link(broker)["reconnects"] == 0, link(broker)
    assert not internal_errors(caplog)


BAD_FIRST_INFO = [
    pytest.param(b'{"headers":true,"max_payload":null}', id="max_payload null"),
    pytest.param(b'{"headers":true,"max_payload":-1}', id="max_payload negative"),
    pytest.param(b"[1]", id="not an object"),
    pytest.param(b"{nope", id="not JSON"),
    pytest.param(b'{"headers":false}', id="no headers"),
]


@pytest.mark.parametrize("urls", [b"[5, null, \"no-port\"]", b"5"])
def test_odd_leafnode_urls_in_the_first_info_are_ignored(hosts, fake_hub, urls):
    """Not URLs: nothing to learn from them, and nothing wrong with the rest."""
    broker = hosts.broker("hostA", fake_hub.url, up=False)
    fake = fake_hub.accept()
    fake.send(b'INFO {"headers":true,"leafnode_urls":' + urls + b"} \r\n")
    lines = []
    while (line := fake.raw_line()) != b"PING":
        lines.append(line)
    fake.send(b"PONG\r\n")
    assert lines[1].startswith(b"CONNECT {")
    wait_for(lambda: link(broker)["state"] == "up")


@pytest.mark.parametrize("info", BAD_FIRST_INFO)
def test_a_bad_first_info_is_refused_and_tried_again(hosts, fake_hub, info):
    broker = hosts.broker("hostA", fake_hub.url, up=False)
    fake = fake_hub.accept()
    fake.send(b"INFO " + info + b" \r\n")
    assert fake.closed_within(0.5), "the broker neither went on nor gave this server up"
    wait_for(lambda: link(broker)["last_error"], message=str(link(broker)))
    fake_hub.accept()                       # it tries again
    assert link(broker)["state"] == "down"


# ---- 11. fds ----

def test_no_fds_left_once_the_brokers_stop(nats_server, tmp_path, monkeypatch):
    gc.collect()
    before = open_fds()
    hosts = Hosts(tmp_path, monkeypatch)
    try:
        a = hosts.broker("hostA", nats_server.leaf_url)
        b = hosts.broker("hostB", nats_server.leaf_url)
        pub, remote_bus = hosts.client(a), hosts.client(b)
        sub = remote_bus.subscribe("fd.>")
        settle(remote_bus, pub)
        r, w = os.pipe()
        pub.publish("fd.x", 1, fds=[r])
        pub.publish("fd.big", os.urandom(300 * 1024))
        os.close(r)
        os.close(w)
        assert [m.topic for m in recv_n(sub, 2)] == ["fd.x", "fd.big"]
        nats_server.kill()                  # links lost and made again
        nats_server.restart()
        wait_for(lambda: all(link(x)["state"] == "up" and link(x)["reconnects"] == 1
                             for x in (a, b)), message=f"{link(a)} {link(b)}")
    finally:
        hosts.close()
    wait_for(lambda: (gc.collect(), open_fds())[1] == before, timeout=5,
             message=f"fds: {before} before, {open_fds()} after")
