"""Shared fixtures: real brokers on temporary sockets, real clients, and
helpers to run code in other processes. No mocks: every test talks through
real sockets."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import busx
from busx import _core, protocol
from busx.handshake import pack, unpack

# Subprocesses must import the installed busx, never the uncompiled source
# tree that sits in the working directory when pytest runs from the repo root.
os.environ["PYTHONSAFEPATH"] = "1"


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.005, message: str = ""):
    """Poll predicate() until truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(message or f"condition not met within {timeout}s")
        time.sleep(interval)


# ---- the debug build's live counters (BUSX_DEBUG=1, docs/development.md) ----

COUNTING = bool(_core.debug_counters())


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


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


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


def run_python(code: str, *args: str, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (a real separate process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def json_result(process: subprocess.Popen) -> dict:
    """Wait for a child that prints one JSON document; fail on its error."""
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return json.loads(out)


def spawn_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ---- peers shared by several test files ----

class BrokerProcess:
    """`busx serve` in its own process, so that its memory, fds and CPU time
    are its own to measure. Its log goes to a file: a pipe nobody reads
    could fill up and stall it."""

    def __init__(self, directory, *options: str) -> None:
        self.unix_path = path = os.path.join(directory, "bus.sock")
        self.url = f"unix://{path}"
        self.log_path = os.path.join(directory, "broker.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "busx.cli", "serve", "--unix", path, *options],
                stdout=subprocess.DEVNULL, stderr=log)
        self.pid = self.process.pid
        wait_for(lambda: self.process.poll() is not None or "listening" in self.log(),
                 message="the broker never listened")
        assert self.process.poll() is None, self.log()

    def log(self) -> str:
        with open(self.log_path) as log:
            return log.read()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0, self.log()




def stop_process(pid: int) -> None:
    """SIGSTOP pid and wait until every one of its threads has stopped."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped():
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] != "T":
                    return False
        return True

    wait_for(all_stopped, message=f"process {pid} did not stop")




class RawPeer:
    """A client that speaks (or breaks) the wire protocol by hand."""

    def __init__(self, broker, transport):
        if transport == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(broker.unix_path)
        else:
            self.sock = socket.create_connection(broker.tcp_address)
        self.sock.settimeout(10)
        self.pending = b""
        self.decoder = protocol.FrameDecoder()
        self.frames = []

    def recv(self):
        """A chunk, or b"" once the broker closed (a reset counts as closed)."""
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def read_hello(self):
        while len(self.pending) < len(protocol.PREAMBLE):
            chunk = self.recv()
            assert chunk, "broker closed before its preamble"
            self.pending += chunk
        assert self.pending[:8] == protocol.PREAMBLE
        self.frames += self.decoder.feed(self.pending[8:])
        hello = self.next_frame()
        assert hello.kind == protocol.HELLO
        return unpack(hello.payload)

    def handshake(self):
        self.read_hello()
        self.send(protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT, payload=pack({})))
        assert self.next_frame().kind == protocol.READY

    def next_frame(self):
        while not self.frames:
            chunk = self.recv()
            assert chunk, "broker closed the connection"
            self.frames += self.decoder.feed(chunk)
        return self.frames.pop(0)

    def send(self, data):
        self.sock.sendall(data)

    def send_fds(self, data, fds):
        """data in one sendmsg, with fds attached (UNIX only)."""
        assert socket.send_fds(self.sock, [data], fds) == len(data)

    def frames_until_closed(self):
        """Everything the broker sends until it closes the connection."""
        while chunk := self.recv():
            self.frames += self.decoder.feed(chunk)
        frames, self.frames = self.frames, []
        return frames

    def close(self):
        self.sock.close()
