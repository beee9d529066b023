"""busx serve under systemd (SPEC.md, Operations): it serves on the listening
sockets socket activation passes it (LISTEN_FDS), leaves their files and
modes alone, and reports READY=1 and STOPPING=1 on NOTIFY_SOCKET.

The sockets are passed the way systemd passes them: by systemd's own
`systemd-socket-activate` where the machine has it, and by a launcher that
puts listening sockets at fds 3, 4, ... and sets LISTEN_FDS/LISTEN_PID
before exec'ing `busx serve` (the pid survives exec, as under systemd)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from support import wait_for

import busx
from busx import systemd

# Put each inherited socket (an fd number in argv) at 3, 4, ..., say so in
# LISTEN_FDS/LISTEN_PID, and exec `python -m busx serve` with the rest of argv.
LAUNCHER = """
import fcntl, os, sys
count = int(sys.argv[1])
fds = [int(fd) for fd in sys.argv[2:2 + count]]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3 + count) for fd in fds]     # out of the way
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(count)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-P", "-m", "busx", "serve", *sys.argv[2 + count:]])
"""


class Notifications:
    """A NOTIFY_SOCKET datagram socket, as systemd listens on one."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.address = path

    def expect(self, state: str, timeout: float = 20.0) -> None:
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        assert state in message.split("\n"), message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notifications(tmp_path):
    listener = Notifications(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


def listening_unix(path: str, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


def serve_with(sockets: list[socket.socket], notify: str, *args: str) -> subprocess.Popen:
    fds = [sock.fileno() for sock in sockets]
    env = dict(os.environ, NOTIFY_SOCKET=notify)
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(len(fds)), *map(str, fds), *args],
                            pass_fds=fds, env=env, stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    return stderr


def round_trip(url: str) -> None:
    with busx.connect(url, reconnect=False) as bus:
        sub = bus.subscribe("activated")
        bus.publish("activated", {"n": 1})
        assert sub.recv(timeout=10).data == {"n": 1}


def test_serves_on_inherited_unix_and_tcp_sockets_and_leaves_the_file_alone(
        tmp_path, notifications):
    path = str(tmp_path / "bus.sock")
    unix = listening_unix(path, 0o660)
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    process = serve_with([unix, tcp], notifications.address)
    try:
        notifications.expect("READY=1")
        round_trip(f"unix://{path}")
        round_trip(f"tcp://127.0.0.1:{port}")
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660      # systemd's SocketMode, kept
    finally:
        stderr = stop(process)
    notifications.expect("STOPPING=1")
    assert f"listening on unix://{path} and tcp://127.0.0.1:{port}" in stderr
    assert os.path.exists(path), "busx serve removed a socket file it did not create"
    unix.close()
    tcp.close()


def test_sockets_meant_for_another_process_are_not_taken(tmp_path, notifications):
    """LISTEN_PID names another process (a parent that forgot to unset it):
    busx serve binds its own socket and leaves fd 3 alone."""
    own = str(tmp_path / "own.sock")
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1", NOTIFY_SOCKET=notifications.address)
    process = subprocess.Popen([sys.executable, "-P", "-m", "busx", "serve", "--unix", own],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        notifications.expect("READY=1")
        round_trip(f"unix://{own}")
    finally:
        stop(process)
    assert not os.path.exists(own), "its own socket file is removed at stop"


def test_a_passed_fd_that_is_not_a_listening_socket_is_refused(tmp_path):
    left, right = socket.socketpair()
    process = serve_with([left], "")
    _, stderr = process.communicate(timeout=30)
    left.close()
    right.close()
    assert process.returncode != 0
    assert "is not a listening stream socket" in stderr


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_systemd_socket_activate_starts_the_broker_on_the_first_connection(
        tmp_path, notifications):
    """systemd's own tool listens, and execs busx serve with the socket when
    the first client connects; that client is served."""
    path = str(tmp_path / "bus.sock")
    process = subprocess.Popen(
        ["systemd-socket-activate", "--listen", path,
         f"--setenv=NOTIFY_SOCKET={notifications.address}",
         sys.executable, "-P", "-m", "busx", "serve"],
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(path), timeout=20, message="systemd-socket-activate")
        mode = stat.S_IMODE(os.stat(path).st_mode)
        round_trip(f"unix://{path}")        # connecting starts busx serve
        notifications.expect("READY=1")
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
    finally:
        stderr = stop(process)
    assert f"listening on unix://{path}" in stderr


def test_notify_speaks_to_abstract_sockets_and_is_quiet_without_one(monkeypatch):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"busx-test-{os.getpid()}-{time.monotonic_ns()}"
    listener.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1")
        listener.settimeout(5)
        assert listener.recv(64) == b"READY=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not systemd.notify("READY=1")
    finally:
        listener.close()


def test_an_inherited_tcp_socket_on_a_public_address_needs_tokens(tmp_path):
    """The anonymous-TCP rule holds for sockets systemd made too."""
    public = socket.create_server(("0.0.0.0", 0))
    try:
        with pytest.raises(busx.BusError, match="refusing to accept anonymous TCP clients"):
            busx.Broker(unix_path=str(tmp_path / "bus.sock"), sockets=[public])
        broker = busx.Broker(unix_path=str(tmp_path / "bus.sock"), sockets=[public],
                             tokens={"svc": "secret"})
        with broker:
            assert broker.tcp_address == public.getsockname()
    finally:
        public.close()
