"""Shared fixtures: real brokers on temporary sockets, real clients, and
helpers to run code in other processes. No mocks: every test talks through
real sockets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import busx

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


def spawn_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
