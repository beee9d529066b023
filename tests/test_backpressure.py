"""Back-pressure: a publisher outrunning the broker is slowed, never buffered
without bound, and never stalls for good."""

import threading

import pytest
from support import COUNTING, run_python

import busx
from busx._core import PAYLOAD_FD_THRESHOLD


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_buffer", [16 << 10, 64 << 10, 1 << 20])
def test_full_buffer_publisher_keeps_going(tmp_path, max_buffer):
    # A small buffer with 10 KB messages keeps the publisher waiting for room
    # while the socket is full: the I/O thread must hand it room again after
    # draining (a regression: it once parked forever in that state). The
    # consumer thread shares the GIL with the publisher and may fall far
    # behind: the broker queues up to everything sent, so nothing is dropped.
    count, payload = 20_000, b"p" * 10_000
    broker = busx.Broker(unix_path=str(tmp_path / "bus.sock"), max_pending=1 << 30).start()
    with busx.connect(broker.url, max_buffer=max_buffer) as pub, busx.connect(broker.url) as sub_bus:
        sub = sub_bus.subscribe("bp")
        received = []

        def consume():
            while len(received) < count:
                received.extend(m.raw for m in sub.recv_many(timeout=30))

        consumer = threading.Thread(target=consume)
        consumer.start()
        for _ in range(count):
            pub.publish("bp", payload)
        pub.flush(timeout=30)
        consumer.join(30)
        assert len(received) == count and sub.dropped == 0
    broker.stop()


@pytest.mark.timeout(60)
def test_threads_publishing_into_a_full_buffer_keep_their_payloads_intact(broker):
    # A publisher waiting for room still holds the connection's packing
    # buffer; the other threads must pack elsewhere, not over its payload.
    threads, count = 4, 3_000
    with busx.connect(broker.url, max_buffer=16 << 10) as pub, busx.connect(broker.url) as sub_bus:
        sub = sub_bus.subscribe("mt.*")
        pub.flush()

        def publish(n):
            for i in range(count):
                pub.publish(f"mt.{n}", {"n": n, "i": i, "fill": str(n) * (i % 3000)})

        workers = [threading.Thread(target=publish, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        next_i = [0] * threads
        while sum(next_i) < threads * count:
            for msg in sub.recv_many(timeout=30):
                data = msg.data
                n = data["n"]
                assert msg.topic == f"mt.{n}"
                assert data == {"n": n, "i": next_i[n], "fill": str(n) * (next_i[n] % 3000)}
                next_i[n] += 1
        for worker in workers:
            worker.join(30)
        assert sub.dropped == 0


@pytest.mark.parametrize("size", [1000, 1 << 20], ids=["inline", "memfd"])
def test_publish_timeout_raises_when_the_broker_stops_reading(tmp_path, size):
    import socket

    # A fake broker that completes the handshake and then never reads: the
    # publisher's buffer fills, and publish(timeout=) raises Timeout. Payload
    # memfds count against the buffer until the broker says it took them,
    # so they cannot pile up in the socket instead.
    from busx import protocol
    from busx.handshake import pack

    path = str(tmp_path / "deaf.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def deaf_broker():
        conn, _ = listener.accept()
        hello = {"version": 1, "max_frame": 4 << 20, "host": "x", "instance": "i",
                 "unix_path": path, "nonce": b"n" * 32, "auth": False, "transport": "unix",
                 "payload_fds": True}
        conn.sendall(protocol.PREAMBLE + protocol.encode_frame(protocol.HELLO, payload=pack(hello)))
        conn.recv(4096)
        conn.sendall(protocol.encode_frame(protocol.READY, payload=pack({"id": 1})))
        done.wait(30)
        conn.close()

    done = threading.Event()
    server = threading.Thread(target=deaf_broker)
    server.start()
    try:
        max_buffer = 4 << 20
        with busx.connect(f"unix://{path}", max_buffer=max_buffer, reconnect=False) as bus:
            with pytest.raises(busx.Timeout):
                for _ in range(100_000):
                    bus.publish("t", b"x" * size, timeout=0.2)
            if size < PAYLOAD_FD_THRESHOLD:
                assert bus.counters["fd_payloads_out"] == 0
                assert bus._io.unsent_bytes < max_buffer + 2 * size + (8 << 20)
            else:
                assert bus.counters["fd_payloads_out"] <= max_buffer // size + 1
                assert bus._io.unsent_bytes <= max_buffer + size
            done.set()
    finally:
        done.set()
        server.join()
        listener.close()


@pytest.mark.skipif(COUNTING, reason="batching ratios depend on speed: measured on the -O2 build")
def test_lone_messages_go_direct_and_bursts_are_batched(broker):
    with busx.connect(broker.url) as pub, busx.connect(broker.url) as sub_bus:
        sub = sub_bus.subscribe("d")
        for i in range(20):                 # request/reply pace: each waits for its echo
            pub.publish("d", i)
            assert sub.recv(timeout=5).data == i
        assert pub.counters["direct_sends"] >= 15
        before = pub.counters
        for i in range(50_000):             # a burst: the I/O thread batches it
            pub.publish("d", i)
        pub.flush(timeout=30)
        after = pub.counters
        # Only where the publisher was preempted mid-burst (a gap > 5 µs).
        assert after["direct_sends"] - before["direct_sends"] < 50_000 / 20
        assert after["write_calls"] - before["write_calls"] < 50_000 / 10
        got = 0
        while got < 50_000:
            got += len(sub.recv_many(max_count=50_000, timeout=5))


# Broker, I/O thread and caller on one core: after each send the I/O thread
# used to yield the core with nothing queued, so the caller, answered in
# that moment, found it still busy and queued its next lone frame: once
# that started, no frame went direct again.
ONE_CORE_ROUND_TRIPS = """
import os, sys, busx
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
with busx.Broker(unix_path=sys.argv[1]) as broker, busx.connect(broker.url) as pub, \\
        busx.connect(broker.url) as sub_bus:
    sub = sub_bus.subscribe("d")
    for i in range(200):
        pub.publish("d", i)
        assert sub.recv(timeout=5).data == i
    print(pub.counters["direct_sends"])
"""


@pytest.mark.skipif(COUNTING, reason="batching ratios depend on speed: measured on the -O2 build")
def test_lone_messages_go_direct_on_a_single_core(tmp_path):
    result = run_python(ONE_CORE_ROUND_TRIPS, str(tmp_path / "bus.sock"))
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 150


@pytest.mark.timeout(60)
def test_round_trips_past_a_full_receive_buffer_drop_and_count(tmp_path):
    # A round trip reads on past max_buffer, since its answer sits behind
    # messages nobody reads. What the unread subscription cannot hold beyond
    # max_buffer + one frame + one read is dropped and counted, never held
    # without bound; the reply inbox is bounded apart, so requests still work.
    max_buffer, max_frame, size, count = 1 << 20, 1 << 20, 16 << 10, 512
    limit = max_buffer + max_frame + (256 << 10)
    broker = busx.Broker(unix_path=str(tmp_path / "bus.sock"), max_frame=max_frame,
                         max_pending=1 << 30).start()
    with busx.connect(broker.url, max_buffer=max_buffer) as reader, \
            busx.connect(broker.url) as pub, busx.connect(broker.url) as responder:
        unread = reader.subscribe("flood")
        service = responder.subscribe("svc")
        for seq in range(count):
            pub.publish("flood", {"seq": seq, "pad": b"x" * size})
        pub.flush(timeout=30)   # all of it is queued for reader before its PING
        reader.flush(timeout=30)
        kept = len(unread._queue)
        assert 0 < kept * size <= limit
        assert unread.dropped == count - kept
        assert reader.counters["unread_dropped"] == count - kept

        def respond():
            for msg in service:
                msg.respond(msg.data * 2)

        threading.Thread(target=respond, daemon=True).start()
        assert reader.request("svc", 21, timeout=10).data == 42
        assert [m.data["seq"] for m in unread.recv_many(count, timeout=5)] == list(range(kept))
    broker.stop()
