"""Running under systemd: the listening sockets systemd made for us (socket
activation) and the readiness messages it waits for (sd_notify). The
protocols are systemd's documented ones (sd_listen_fds(3), sd_notify(3));
no libsystemd is needed for either.

busx serve uses both: `Broker(sockets=listen_fds())`, then `notify("READY=1")`
once it accepts clients and `notify("STOPPING=1")` when it begins to stop.
Outside systemd both do nothing."""

from __future__ import annotations

import os
import socket

# sd_listen_fds(3): passed sockets start at this fd.
LISTEN_FDS_START = 3


def listen_fds() -> list[socket.socket]:
    """The listening sockets systemd passed to this process, in order; [] when
    there are none or they were meant for another process (LISTEN_PID). The
    variables are removed, so a child process does not take the sockets for
    its own, and the fds are made close-on-exec, as sd_listen_fds(1) does."""
    count = os.environ.pop("LISTEN_FDS", None)
    pid = os.environ.pop("LISTEN_PID", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if count is None or pid is None or not pid.isdigit() or int(pid) != os.getpid():
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def notify(state: str) -> bool:
    """Tell the service manager `state` ("READY=1", "STOPPING=1", ...) over
    NOTIFY_SOCKET; whether there was one to tell. A name starting with "@"
    is in the abstract namespace."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True
