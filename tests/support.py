"""What the tests share besides fixtures (those are in conftest.py): polling
with deadlines, other processes, `busx serve` as a process, raw protocol
peers. Imported by the test files as `from support import ...`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from busx import _core, protocol
from busx.handshake import pack, unpack

# The debug build (BUSX_DEBUG=1) counts what the C level holds; conftest
# checks every test gives it back.
COUNTING = bool(_core.debug_counters())


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

    def __init__(self, directory, *options: str, prefix: tuple[str, ...] = ()) -> None:
        """prefix: a command that then runs the interpreter in place (exec),
        such as `ip netns exec NS`, so that pid is still the broker's."""
        self.unix_path = path = os.path.join(directory, "bus.sock")
        self.url = f"unix://{path}"
        self.log_path = os.path.join(directory, "broker.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [*prefix, sys.executable, "-P", "-m", "busx.cli", "serve", "--unix", path, *options],
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

    def fds(self) -> int:
        return open_fds(self.pid)

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
    """A client that speaks (or breaks) the wire protocol by hand. Every one
    opened is closed after its test (conftest), also when it fails half-way."""

    opened: list[RawPeer] = []

    @classmethod
    def close_all(cls) -> None:
        while cls.opened:
            cls.opened.pop().close()

    def __init__(self, broker, transport):
        RawPeer.opened.append(self)
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

    def handshake(self, request: dict | None = None):
        """HELLO, CONNECT (by default saying it answers PINGs, as busx
        clients do), READY."""
        self.read_hello()
        request = {"heartbeats": True} if request is None else request
        self.send(protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT,
                                                            payload=pack(request)))
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


def provoke_refusals(broker, name: str = "nosy") -> None:
    """One of each refusal a client can meet, for a broker with tokens
    {"svc": "secret"} on TCP, a policy that allows this uid open.> only, and
    max_subscriptions=1: a failed token proof, a denied subscribe
    ("closed.x"), a denied publish ("closed.y"), a SUB past the limit."""
    import busx
    host, port = broker.tcp_address
    with pytest.raises(busx.AuthenticationFailed):
        busx.connect(f"tcp://{host}:{port}", token=("svc", "wrong"), reconnect=False)
    with busx.connect(broker.url, name=name, reconnect=False) as bus:
        with pytest.raises(busx.PermissionDenied):
            bus.subscribe("closed.x")
        bus.publish("closed.y", 1)
        with pytest.raises(busx.PermissionDenied):
            bus.flush(timeout=10)
        bus.subscribe("open.a")
        with pytest.raises(busx.BusError, match="max_subscriptions"):
            bus.subscribe("open.b")


def cut_off_slow_consumer(broker) -> None:
    """A raw subscriber to open.flood that never reads, fed past the
    broker's max_pending (slow_consumer="disconnect") until it is cut off."""
    import busx
    reader = RawPeer(broker, "unix")
    reader.handshake()
    reader.send(protocol.encode_frame(protocol.SUB, b"open.flood", id=1))
    assert reader.next_frame().kind == protocol.OK
    with busx.connect(broker.url) as pub:
        while broker.stats()["slow_consumer_cuts"] == 0:
            pub.publish("open.flood", b"x" * 4096)
            pub.flush(timeout=10)
