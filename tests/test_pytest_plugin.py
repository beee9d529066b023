"""busx.pytest_plugin, as a user's test suite meets it: pytester runs inner
test files that use the fixtures against real brokers, in a separate pytest
process, and these tests check the outcomes and that nothing (socket files,
directories, fds, threads) is left behind."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points

import pytest

pytest_plugins = ["pytester"]


def run_inner(pytester: pytest.Pytester) -> pytest.RunResult:
    """Run the inner tests in their own pytest process, loading the plugin by
    hand until its pytest11 entry point is installed (once it is, loading it
    twice would make pytest refuse the second)."""
    pytester.makeconftest(LEAK_CHECK)
    args = [] if entry_points(group="pytest11", name="busx") else ["-p", "busx.pytest_plugin"]
    return pytester.runpytest_subprocess(*args)


def recorded(pytester: pytest.Pytester) -> list[dict]:
    """Facts the inner tests wrote to record.jsonl, in order."""
    lines = (pytester.path / "record.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_nothing_left(pytester: pytest.Pytester) -> None:
    """The inner session ended with the fds and threads it started with."""
    leftovers = json.loads((pytester.path / "leftovers.json").read_text())
    assert leftovers["after"] == leftovers["before"]


# The inner session's open fds and threads when it starts, and once every
# fixture (session-scoped ones too) has been torn down.
LEAK_CHECK = """
import json
import os
import threading


def snapshot():
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:       # the descriptor listdir itself used
            pass
    return {"fds": fds, "threads": sorted(thread.name for thread in threading.enumerate())}


BEFORE = {}


def pytest_sessionstart(session):
    BEFORE.update(snapshot())


def pytest_sessionfinish(session):
    after = snapshot()
    with open("leftovers.json", "w") as out:
        json.dump({"before": BEFORE, "after": after}, out)
"""


# Each inner test records the broker's socket path so the outer test can
# check it is gone afterwards.
RECORDING = """
import json
import time

import busx


def record(broker, test):
    with open("record.jsonl", "a") as out:
        out.write(json.dumps({"test": test, "socket": broker.unix_path}) + "\\n")


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)
"""

USES_EVERY_FIXTURE = RECORDING + """

def test_client_talks_through_the_broker(busx_broker, busx_url, busx_client):
    record(busx_broker, "client")
    assert busx_url == busx_broker.url == "unix://" + busx_broker.unix_path
    assert isinstance(busx_client, busx.Bus) and busx_client.transport == "unix"
    sub = busx_client.subscribe("plugin.>")
    busx_client.publish("plugin.hello", {"n": 1})
    assert sub.recv(timeout=5).data == {"n": 1}


def test_tcp_url_reaches_the_same_broker(busx_broker, busx_client, busx_tcp_url, busx_connect):
    record(busx_broker, "tcp")
    remote = busx_connect(busx_tcp_url)
    assert remote.transport == "tcp"
    sub = busx_client.subscribe("over.tcp")
    remote.publish("over.tcp", "hi")
    assert sub.recv(timeout=5).data == "hi"


def test_connect_opens_several_clients(busx_broker, busx_connect):
    record(busx_broker, "several")
    clients = [busx_connect(name=f"client-{i}") for i in range(3)]
    names = {conn["name"] for conn in busx_broker.stats()["connections"]}
    assert names == {"client-0", "client-1", "client-2"}
    clients[0].close()          # closing early is fine: teardown closes each once


def test_a_failing_test_is_cleaned_up_too(busx_broker, busx_connect):
    record(busx_broker, "failing")
    busx_connect().subscribe("x")
    busx_connect()
    assert False, "deliberate failure"
"""


def test_fixtures_work_and_leave_nothing_behind(pytester):
    pytester.makepyfile(test_inner=USES_EVERY_FIXTURE)

    result = run_inner(pytester)

    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*deliberate failure*"])
    sockets = [fact["socket"] for fact in recorded(pytester)]
    assert len(sockets) == 4 and len(set(sockets)) == 4, "one fresh broker per test"
    for socket_path in sockets:
        assert len(socket_path) < 108, "fits a UNIX socket address"
        assert not os.path.exists(socket_path)
        assert not os.path.exists(os.path.dirname(socket_path)), "temporary directory removed"
    assert_nothing_left(pytester)


SHARED_BROKER = RECORDING + """

def test_first(busx_broker, busx_client):
    record(busx_broker, "first")
    busx_client.subscribe("left.behind")


def test_second(busx_broker, busx_client):
    record(busx_broker, "second")
    # The first test's client was closed at its teardown; the broker notices
    # its connection end asynchronously, so wait for that.
    wait_until(lambda: len(busx_broker.stats()["connections"]) == 1)
    assert busx_broker.stats()["subscriptions"] == 0
"""


def test_broker_scope_can_be_widened_by_ini_option(pytester):
    pytester.makeini("[pytest]\nbusx_broker_scope = session\n")
    pytester.makepyfile(test_shared=SHARED_BROKER)

    result = run_inner(pytester)

    result.assert_outcomes(passed=2)
    first, second = recorded(pytester)
    assert first["socket"] == second["socket"], "both tests used one broker"
    assert not os.path.exists(os.path.dirname(first["socket"]))
    assert_nothing_left(pytester)
