"""Security events (SPEC.md, Operations): each kind is provoked through real
sockets and seen as one log line on `busx.broker`, with the peer's
credentials; a flood of 100,000 logs a bounded number of lines and a
"suppressed" summary; `busx serve --log-format json` writes one JSON object
per line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest
from support import RawPeer, cut_off_slow_consumer, provoke_refusals, wait_for

import busx
from busx import events, protocol


@pytest.fixture
def security_lines(caplog):
    """The security event records of busx.broker, as a function."""
    caplog.set_level(logging.WARNING, logger="busx.broker")

    def lines(kind: str | None = None) -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.name == "busx.broker"
                and hasattr(record, "busx_event") and kind in (None, record.busx_event)]
    return lines


@pytest.fixture
def guarded(tmp_path):
    policy = {"rule": [{"uid": os.getuid(), "publish": ["open.>"], "subscribe": ["open.>"]}]}
    with busx.Broker(unix_path=str(tmp_path / "bus.sock"), tcp=("127.0.0.1", 0),
                     tokens={"svc": "secret"}, policy=policy, slow_consumer="disconnect",
                     max_pending=64 << 10, max_subscriptions=1, max_connections=8,
                     handshake_timeout=0.5) as broker:
        yield broker


def test_each_kind_of_event_is_one_line_with_the_peers_credentials(guarded, security_lines):
    provoke_refusals(guarded, name="nosy")
    [failure] = security_lines(events.AUTH_FAILURE)
    assert failure.peer["address"][0] == "127.0.0.1" and "from 127.0.0.1:" in failure.message
    denied = security_lines(events.DENIED)
    assert [record.peer["name"] for record in denied] == ["nosy", "nosy"]
    assert {record.peer["pid"] for record in denied} == {os.getpid()}
    assert {record.peer["uid"] for record in denied} == {os.getuid()}
    assert "'closed.x'" in denied[0].message and "'closed.y'" in denied[1].message
    assert "max_subscriptions" in security_lines(events.LIMIT)[0].message

    peer = RawPeer(guarded, "unix")
    peer.handshake()
    peer.send(b"\xff\xff\xff\x7f" + b"\0" * 12)        # an absurd length
    peer.frames_until_closed()
    [malformed] = security_lines(events.MALFORMED)
    assert malformed.peer["pid"] == os.getpid() and "too-large" in malformed.message

    RawPeer(guarded, "unix")            # never completes its handshake (closed at teardown)
    wait_for(lambda: any("timeout" in r.message for r in security_lines(events.LIMIT)),
             message="a handshake timeout logged")


def test_a_slow_consumer_cut_is_logged(guarded, security_lines):
    cut_off_slow_consumer(guarded)
    [cut] = security_lines(events.SLOW_CONSUMER)
    assert cut.peer["pid"] == os.getpid() and "slow-consumer" in cut.message


def test_connections_refused_at_the_limit_are_logged_with_their_credentials(
        guarded, security_lines):
    clients = [busx.connect(guarded.url) for _ in range(8)]
    try:
        with pytest.raises(busx.ConnectError, match="too many connections"):
            busx.connect(guarded.url, reconnect=False)
        [refused] = security_lines(events.LIMIT)
        assert refused.peer["pid"] == os.getpid() and refused.peer["uid"] == os.getuid()
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("kind, frame", [
    # bad frames: SUBs whose patterns break the topic rules (each answered, none fatal)
    (events.MALFORMED, lambda i: protocol.encode_frame(protocol.SUB, f"a..{i}".encode(), id=i + 1)),
    # PUBs to distinct forbidden topics: each a new denial (the policy is asked per topic)
    (events.DENIED, lambda i: protocol.encode_frame(protocol.PUB, f"closed.{i}".encode(), b"\xc0")),
])
def test_a_flood_of_100000_logs_a_bounded_number_of_lines(guarded, security_lines, kind, frame):
    peer = RawPeer(guarded, "unix")
    peer.handshake()
    flood = b"".join(frame(i) for i in range(100_000))
    # Sent from a thread while this one reads the answers: a peer that does
    # not read is paused by the broker, and would never finish sending.
    sender = threading.Thread(target=peer.send,
                              args=(flood + protocol.encode_frame(protocol.PING, id=1_000_000),))
    sender.start()
    while peer.next_frame().kind != protocol.PONG:
        pass
    sender.join()
    assert len(security_lines(kind)) == events.BURST
    guarded.stop()      # the summary of what was held back
    [summary] = [record for record in security_lines(kind) if getattr(record, "suppressed", 0)]
    assert summary.suppressed == 100_000 - events.BURST
    assert f"suppressed {100_000 - events.BURST} similar" in summary.getMessage()


def test_busx_serve_writes_json_lines(tmp_path):
    path = str(tmp_path / "bus.sock")
    process = subprocess.Popen([sys.executable, "-P", "-m", "busx", "serve", "--unix", path,
                                "--log-format", "json", "--max-subscriptions", "1"],
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(path), message="busx serve listening")
        with busx.connect(f"unix://{path}", name="json-test") as bus:
            bus.subscribe("a")
            with pytest.raises(busx.BusError):
                bus.subscribe("b")
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    [limit] = [line for line in lines if line.get("event") == events.LIMIT]
    assert limit["level"] == "WARNING" and limit["logger"] == "busx.broker"
    assert limit["peer"]["name"] == "json-test" and limit["peer"]["pid"] == os.getpid()
