"""fork(): a child must never touch its parent's connection."""

import os

import pytest

import busx


def test_child_gets_a_clear_error_and_parent_keeps_working(broker):
    with busx.connect(broker.url) as bus:
        sub = bus.subscribe("fork.>")
        bus.publish("fork.before", 1)
        assert sub.recv(timeout=5).data == 1
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the child
            os.close(read_end)
            outcome = []
            for attempt in (lambda: bus.publish("fork.child", 666),
                            lambda: bus.subscribe("x"), lambda: bus.flush(),
                            lambda: sub.recv(timeout=0.1),
                            lambda: bus.watch_events(sub)):   # what AsyncBus(bus) calls
                try:
                    attempt()
                    outcome.append("no error")
                except busx.Closed as exc:
                    outcome.append("fork" if "fork" in str(exc) else str(exc))
                except BaseException as exc:          # anything else is a failure
                    outcome.append(repr(exc))
            bus.close()
            with busx.connect(broker.url) as fresh:   # a new connection works
                fresh.publish("fork.child-fresh", 2)
                fresh.flush(timeout=5)
            os.write(write_end, ",".join(outcome).encode())
            os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        report = os.read(read_end, 4096).decode()
        os.close(read_end)
        assert os.waitstatus_to_exitcode(status) == 0
        assert report == "fork,fork,fork,fork,fork"
        # The parent's stream is intact: no bytes from the child slipped in.
        assert sub.recv(timeout=5).data == 2           # from the child's fresh connection
        bus.publish("fork.after", 3)
        assert sub.recv(timeout=5).data == 3
        assert sub.recv_many(timeout=0.1) == []        # nothing from the old connection's child


@pytest.mark.timeout(60)
def test_receive_side_is_bounded_when_the_client_stops_reading(broker):
    # A subscription nobody reads: the client keeps at most about max_buffer
    # bytes, then stops reading its socket; the broker's slow-consumer policy
    # takes over and counts the drops, which the client learns later.
    limit = 1 << 20
    with busx.connect(broker.url) as pub, busx.connect(broker.url, max_buffer=limit) as slow:
        sub = slow.subscribe("bulk")
        payload = b"x" * 10_000
        for _ in range(2_000):                         # 20 MB
            pub.publish("bulk", payload)
        pub.flush(timeout=30)
        # Pump what has arrived, as a reader of another subscription would.
        slow._wait(lambda: True, None, "")
        held = slow._io.held_bytes
        assert 0 < held <= limit + 2 * len(payload) + (256 << 10)
        received = 0
        while sub.recv_many(timeout=2):
            received += 1
        assert received > 0
