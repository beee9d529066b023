"""The round-trip tracer (includes/trace.h, benchmarks/trace_round_trip.py):
off, it records nothing; on, one request through an embedded broker stamps
every stage in order, on one clock."""

from __future__ import annotations

import threading

import pytest

from busx import _core


@pytest.fixture
def tracer():
    _core.trace(True)
    yield
    _core.trace(False)


def test_the_tracer_records_nothing_while_off(bus):
    _core.trace(True)       # empties it
    _core.trace(False)
    sub = bus.subscribe("trace.off")
    bus.publish("trace.off", 1)
    assert sub.recv(timeout=5).data == 1
    assert _core.trace_events() == []


def test_one_request_stamps_every_stage_in_order(bus, broker, tracer):
    service = bus.subscribe("trace.echo")

    def answer():
        msg = service.recv(timeout=5)
        msg.respond(msg.data)

    responder = threading.Thread(target=answer)
    responder.start()
    _core.trace(True)       # after the SUB's own stamps
    _core.trace_mark()
    assert bus.request("trace.echo", "ping", timeout=5).data == "ping"
    _core.trace_mark()
    responder.join(timeout=5)
    events = _core.trace_events()
    stages = [stage for _, _, stage in events]
    assert stages[0] == "mark" and stages[-1] == "mark", stages
    times = [ns for ns, _, _ in events]
    assert times == sorted(times)
    # The request, then the answer, each through the broker: every stage
    # twice at least, the request's publish before the broker first reads.
    for stage in ("publish", "client send", "broker read", "broker send", "client read",
                  "taken"):
        assert stages.count(stage) >= 2, (stage, stages)
    assert stages.index("publish") < stages.index("broker read") < stages.index("broker send")
    assert len({thread for _, thread, _ in events}) >= 2     # the broker's loop thread, at least
