"""busx.pytest_plugin, as a user's test suite meets it: pytester runs inner
test files that use the fixtures against real brokers, and these tests check
the outcomes and that nothing (socket files, directories, fds, threads) is
left behind."""

from __future__ import annotations

import json
import os
import threading
from importlib.metadata import entry_points

import pytest
from conftest import open_fds

pytest_plugins = ["pytester"]


def plugin_args() -> list[str]:
    """Load the plugin by hand until its pytest11 entry point is installed;
    once it is, loading it twice would make pytest refuse the second."""
    if entry_points(group="pytest11", name="busx"):
        return []
    return ["-p", "busx.pytest_plugin"]


def recorded(pytester: pytest.Pytester) -> list[dict]:
    """Facts the inner tests wrote to record.jsonl, in order."""
    lines = (pytester.path / "record.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def busx_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("busx-")]


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
    fds_before = open_fds()

    result = pytester.runpytest_inprocess(*plugin_args())

    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*deliberate failure*"])
    sockets = [fact["socket"] for fact in recorded(pytester)]
    assert len(sockets) == 4 and len(set(sockets)) == 4, "one fresh broker per test"
    for socket_path in sockets:
        assert not os.path.exists(socket_path)
        assert not os.path.exists(os.path.dirname(socket_path)), "temporary directory removed"
        assert len(socket_path) < 108, "fits a UNIX socket address"
    assert busx_threads() == [], "brokers stopped and clients closed"
    assert open_fds() == fds_before


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

    result = pytester.runpytest_inprocess(*plugin_args())

    result.assert_outcomes(passed=2)
    first, second = recorded(pytester)
    assert first["socket"] == second["socket"], "both tests used one broker"
    assert not os.path.exists(first["socket"])
    assert busx_threads() == []


def test_plugin_works_from_the_command_line(pytester):
    """A separate pytest process, as `pytest -p busx.pytest_plugin` runs it."""
    pytester.makepyfile(test_cli=RECORDING + """

def test_round_trip(busx_broker, busx_client):
    record(busx_broker, "cli")
    sub = busx_client.subscribe("cli")
    busx_client.publish("cli", [1, 2])
    assert sub.recv(timeout=5).data == [1, 2]
""")
    result = pytester.runpytest_subprocess(*plugin_args())

    result.assert_outcomes(passed=1)
    (fact,) = recorded(pytester)
    assert not os.path.exists(os.path.dirname(fact["socket"]))
