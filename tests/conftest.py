"""The tests' fixtures: real brokers on temporary sockets (in this process,
or `busx serve` processes), real clients, and the debug build's counter
check. Helpers without fixtures are in support.py. No mocks: every test
talks through real sockets."""

from __future__ import annotations

import gc
import os
import re
import signal
import sys
import time

import pytest
from support import COUNTING, BrokerProcess, RawPeer

import busx
from busx import _core

# Subprocesses must import the installed busx, never the uncompiled source
# tree that sits in the working directory when pytest runs from the repo root.
os.environ["PYTHONSAFEPATH"] = "1"


# A shell that starts the suite in the background (`.ci/run &`) ignores
# SIGINT for it, and an ignored signal stays ignored in every child: the
# tests that press Ctrl-C on a child process need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- the debug build's live counters (BUSX_DEBUG=1, docs/development.md) ----


def counters_settled(expected: dict, timeout: float = 10.0) -> dict:
    """The C level's counters once they equal expected (collecting garbage
    meanwhile: a Message gives its mapping back when freed), or as they are
    at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        now = _core.debug_counters()
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


def _shares_fixtures_beyond_itself(request) -> bool:
    """A test using a module- or session-scoped fixture leaves that fixture's
    objects holding what they hold; only the session's end can judge them."""
    return any(defs[-1].scope != "function" and is_ours(defs[-1].func)
               for defs in request.node._fixtureinfo.name2fixturedefs.values())


def is_ours(fixture) -> bool:
    """Defined by this suite (pytest's own, such as tmp_path_factory, hold
    nothing of busx)."""
    module = fixture.__module__
    return module == "conftest" or module.startswith("test_")


@pytest.fixture(autouse=True)
def c_level_gives_back(request):
    """In the debug build: every test gives back the buffers, queued fds,
    mappings, connections, subscriptions and pollers it made the C level hold."""
    if not COUNTING or _shares_fixtures_beyond_itself(request):
        yield
        return
    gc.collect()
    before = _core.debug_counters()
    yield
    after = counters_settled(before)
    kept = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    assert not kept, f"the C level still holds what this test made it hold: {kept}"


def pytest_sessionfinish(session, exitstatus):
    if COUNTING:
        left = {name: n for name, n in counters_settled(dict.fromkeys(_core.debug_counters(), 0))
                .items() if n}
        if left:
            print(f"\nbusx debug counters not back to zero at the end: {left}", file=sys.stderr)
            session.exitstatus = 1


@pytest.fixture
def public_dir():
    """A directory other users can traverse (pytest's tmp_path is 0700), for
    tests where peers run as another uid."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="busx-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def socket_path(tmp_path):
    return str(tmp_path / "bus.sock")


@pytest.fixture
def broker(socket_path):
    with busx.Broker(unix_path=socket_path, tcp=("127.0.0.1", 0)) as running:
        yield running


@pytest.fixture
def bus(broker):
    with busx.connect(broker.url, name="test") as client:
        yield client


@pytest.fixture
def tcp_url(broker):
    host, port = broker.tcp_address
    return f"tcp://{host}:{port}"


@pytest.fixture
def start_broker(tmp_path):
    """Start `busx serve --unix ... OPTIONS` processes; each is stopped at the
    end of the test and must exit 0. A broker started with --tcp knows its
    tcp_address."""
    started: list[BrokerProcess] = []

    def start(*options: str) -> BrokerProcess:
        directory = tmp_path / f"broker{len(started)}"
        directory.mkdir()
        started.append(BrokerProcess(str(directory), *options))
        broker = started[-1]
        # The log line: "listening on unix://... and tcp://HOST:PORT" (tls://).
        found = re.search(r"t(?:cp|ls)://\[?([^\]\s]+?)\]?:(\d+)", broker.log())
        broker.tcp_address = (found.group(1), int(found.group(2))) if found else None
        return broker

    yield start
    RawPeer.close_all()         # first: a broker stops sooner with no stuck reader
    for broker in started:
        broker.stop()


@pytest.fixture(autouse=True)
def close_raw_peers():
    """Raw peers are closed after each test, also when it fails half-way."""
    yield
    RawPeer.close_all()
