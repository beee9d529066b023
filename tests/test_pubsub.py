"""Publish/subscribe through a real broker over both transports."""

import math

import msgpack
import pytest
from support import open_fds, run_python, wait_for

import busx

VALUES = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, math.inf, "", "héllo ✓",
    b"\x00\xff" * 100, [], [1, [2, [3]]], {}, {"a": {"b": [1, 2, {"c": None}]}}, {1: "int key"},
    "x" * 100_000, list(range(1000)),
]


@pytest.fixture(params=["unix", "tcp"])
def any_bus(request, broker, tcp_url):
    url = broker.url if request.param == "unix" else tcp_url
    with busx.connect(url) as client:
        assert client.transport == request.param
        yield client


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_of_msgpack_values(any_bus, value):
    sub = any_bus.subscribe("values.>")
    any_bus.publish("values.one", value)
    msg = sub.recv(timeout=5)
    assert msg.topic == "values.one"
    assert msg.raw == msgpack.packb(value)
    assert msg.data == value


def test_publish_many_keeps_order(any_bus):
    sub = any_bus.subscribe("batch.*")
    any_bus.publish_many((f"batch.{i % 3}", i) for i in range(5000))
    got = []
    while len(got) < 5000:
        got += [m.data for m in sub.recv_many(timeout=5)]
    assert got == list(range(5000))


def test_unencodable_data_raises_type_error_and_sends_nothing(bus):
    sub = bus.subscribe("enc")
    with pytest.raises(TypeError):
        bus.publish("enc", object())
    with pytest.raises(OverflowError):
        bus.publish("enc", 2**64)
    bus.publish("enc", "after")
    assert sub.recv(timeout=5).data == "after"


def test_sender_credentials_are_stamped(any_bus):
    import os
    sub = any_bus.subscribe("who")
    any_bus.publish("who", 1)
    sender = sub.recv(timeout=5).sender
    if any_bus.transport == "unix":
        assert (sender.pid, sender.uid, sender.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert sender.identity is None and sender.address is None
    else:
        assert sender.pid is None and sender.address[0] == "127.0.0.1"


def test_message_between_processes(broker):
    with busx.connect(broker.url) as bus:
        sub = bus.subscribe("proc.>")
        result = run_python(
            """
            import sys, busx
            with busx.connect(sys.argv[1]) as bus:
                bus.publish("proc.hello", {"from": "child"})
            """, broker.url)
        assert result.returncode == 0, result.stderr
        msg = sub.recv(timeout=10)
        assert msg.data == {"from": "child"}
        assert msg.sender.pid != __import__("os").getpid()


def test_recv_timeout_and_recv_many_timeout(bus):
    sub = bus.subscribe("quiet")
    with pytest.raises(busx.Timeout):
        sub.recv(timeout=0.05)
    with pytest.raises(TimeoutError):
        sub.recv(timeout=0)
    assert sub.recv_many(timeout=0.05) == []


def test_unsubscribe_then_recv_raises_closed(bus):
    sub = bus.subscribe("gone")
    bus.publish("gone", 1)
    bus.flush()
    sub.unsubscribe()
    with pytest.raises(busx.Closed):
        sub.recv(timeout=1)
    sub.unsubscribe()  # idempotent


def test_iteration_ends_when_bus_closes(broker):
    import threading
    bus = busx.connect(broker.url)
    sub = bus.subscribe("it")
    for i in range(3):
        bus.publish("it", i)
    received = []

    def consume():
        for msg in sub:
            received.append(msg.data)
            if len(received) == 3:
                bus.close()

    thread = threading.Thread(target=consume)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert received == [0, 1, 2]


def test_closed_bus_raises_closed(broker):
    bus = busx.connect(broker.url)
    bus.close()
    bus.close()
    with pytest.raises(busx.Closed):
        bus.publish("x", 1)
    with pytest.raises(busx.Closed):
        bus.subscribe("x")


def test_own_publishes_are_received_and_flush_routes_everything(bus):
    sub = bus.subscribe("self.>")
    for i in range(100):
        bus.publish("self.t", i)
    bus.flush(timeout=5)
    assert len(sub.recv_many(max_count=1000, timeout=5)) > 0


def test_request_reply(broker):
    with busx.connect(broker.url) as server, busx.connect(broker.url) as client:
        sub = server.subscribe("svc.echo")
        import threading

        def serve():
            msg = sub.recv(timeout=10)
            msg.respond({"echo": msg.data})

        thread = threading.Thread(target=serve)
        thread.start()
        reply = client.request("svc.echo", "hi", timeout=10)
        thread.join()
        assert reply.data == {"echo": "hi"}
        with pytest.raises(busx.Timeout):
            client.request("svc.nobody", 1, timeout=0.2)


def test_queue_group_delivers_each_message_once(broker):
    with busx.connect(broker.url) as bus:
        a = bus.subscribe("jobs", queue="w")
        b = bus.subscribe("jobs", queue="w")
        everyone = bus.subscribe("jobs")
        for i in range(100):
            bus.publish("jobs", i)
        bus.flush()
        seen_all = []
        while len(seen_all) < 100:
            seen_all += [m.data for m in everyone.recv_many(timeout=5)]
        got = [m.data for m in a.recv_many(timeout=0.5)] + [m.data for m in b.recv_many(timeout=0.5)]
        assert sorted(got) == list(range(100))
        assert seen_all == list(range(100))


def test_stats_show_connections(broker, bus):
    bus.subscribe("s.>")
    bus.publish("s.x", 1)
    bus.flush()
    stats = broker.stats()
    assert stats["subscriptions"] == 1
    mine = [c for c in stats["connections"] if c["name"] == "test"]
    assert mine and mine[0]["transport"] == "unix" and mine[0]["subscriptions"] == 1
    assert bus.stats()["msgs_in"] >= 1


def test_payload_beyond_max_frame_raises_and_sends_nothing(tmp_path):
    with busx.Broker(unix_path=str(tmp_path / "bus.sock"), max_frame=4096) as small:
        with busx.connect(small.url) as bus:
            sub = bus.subscribe("big")
            with pytest.raises(busx.PayloadTooLarge, match="max_frame"):
                bus.publish("big", b"x" * 5000)
            with pytest.raises(ValueError):
                bus.publish_many([("big", 1), ("big", b"x" * 5000)])
            bus.publish("big", "fits")
            assert [m.data for m in sub.recv_many(timeout=5)] == ["fits"]


def test_each_queue_group_gets_each_message_once(broker):
    with busx.connect(broker.url) as bus:
        groups = {name: [bus.subscribe("work.>", queue=name) for _ in range(3)]
                  for name in ("resize", "resize-thumbs", "audit")}
        for i in range(300):
            bus.publish(f"work.{i % 7}", i)
        bus.flush()
        for name, members in groups.items():
            got = []
            for member in members:
                while batch := member.recv_many(timeout=0.3):
                    got += [m.data for m in batch]
            assert sorted(got) == list(range(300)), name
            assert all(len(member._queue) == 0 for member in members)


def test_queue_member_that_leaves_loses_only_what_was_routed_to_it_counted(broker):
    with busx.connect(broker.url) as pub, busx.connect(broker.url) as leaving, \
            busx.connect(broker.url) as staying:
        gone = leaving.subscribe("tasks", queue="w")
        kept = staying.subscribe("tasks", queue="w")
        for i in range(1000):
            pub.publish("tasks", i)
        pub.flush()
        # Wait until the leaving member has been routed its share, then leave
        # without reading it: those messages are discarded, and counted.
        leaving._wait(lambda: True if len(gone._queue) + leaving.counters["discarded"] else None,
                      None, "")
        gone.unsubscribe()
        for i in range(1000, 2000):
            pub.publish("tasks", i)
        pub.flush()
        got = []
        while batch := kept.recv_many(timeout=0.5):
            got += [m.data for m in batch]
        lost = leaving.counters["discarded"]
        assert lost > 0 and len(got) + lost == 2000
        assert set(got) >= set(range(1000, 2000))      # everything after leaving reached the group


def test_messages_skip_the_cyclic_gc_and_do_not_keep_their_bus_alive(broker):
    import gc
    import threading
    import weakref
    bus = busx.connect(broker.url)
    sub = bus.subscribe("weak")
    bus.flush()
    with busx.connect(broker.url) as asker:
        unanswered = threading.Thread(target=lambda: pytest.raises(
            busx.Timeout, asker.request, "weak", {"nested": [1, {"a": None}]}, timeout=1))
        unanswered.start()
        msg = sub.recv(timeout=5)
        unanswered.join()
    assert not gc.is_tracked(msg)
    assert msg.data == {"nested": [1, {"a": None}]} and msg.reply_to
    bus.close()
    gone = weakref.ref(bus)
    del bus, sub
    gc.collect()
    assert gone() is None
    with pytest.raises(busx.Closed):
        msg.respond("nobody left to send this")


def test_a_waiting_thread_reads_the_socket_itself(broker):
    # Round trips: each request waits for its reply, and the waiting thread
    # reads it from the socket, sparing a hand-off from the I/O thread.
    import threading
    with busx.connect(broker.url) as server, busx.connect(broker.url) as client:
        requests = server.subscribe("echo")
        server.flush()

        def serve():
            for _ in range(50):
                msg = requests.recv(timeout=10)
                msg.respond(msg.data)

        thread = threading.Thread(target=serve)
        thread.start()
        assert [client.request("echo", i, timeout=10).data for i in range(50)] == list(range(50))
        thread.join(10)
        assert client.counters["direct_reads"] > 0 and server.counters["direct_reads"] > 0


@pytest.mark.timeout(30)
def test_close_wakes_a_thread_blocked_in_recv(broker):
    import threading

    baseline = open_fds()
    bus = busx.connect(broker.url)
    sub = bus.subscribe("nothing.ever")
    outcome = []

    def wait_forever():
        try:
            sub.recv()
        except busx.Closed as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_forever)
    waiter.start()
    def waits_on_the_socket():
        with open(f"/proc/self/task/{waiter.native_id}/wchan") as wchan:
            return "poll" in wchan.read()

    wait_for(waits_on_the_socket, message="the thread never waited on the socket")
    bus.close()
    waiter.join(10)
    assert not waiter.is_alive() and len(outcome) == 1
    wait_for(lambda: open_fds() <= baseline, message="the bus left fds open")
