"""Where the bus lives: default socket path, URL parsing, host identity."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from .errors import BusError


def default_socket_path() -> str:
    """$BUSX_SOCKET, else $XDG_RUNTIME_DIR/busx/bus.sock, else /tmp/busx-<uid>/bus.sock."""
    if os.environ.get("BUSX_SOCKET"):
        return os.environ["BUSX_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "busx", "bus.sock")
    return os.path.join("/tmp", f"busx-{os.getuid()}", "bus.sock")


class Target(NamedTuple):
    """One place to connect: transport "unix", "tcp", "tls" or "auto" (host:port)."""

    transport: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        if self.transport == "unix":
            return f"unix://{self.path}"
        prefix = f"{self.transport}://" if self.transport in ("tcp", "tls") else ""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{prefix}{host}:{self.port}"


def parse_url(url: str) -> Target:
    """unix:///path | tcp://host:port | tls://host:port | host:port
    (automatic: TCP, or TLS with TLS settings, moving to the broker's UNIX
    socket when it shares this host)."""
    if not isinstance(url, str) or not url:
        raise BusError(f"bad bus URL {url!r}: use unix:///path, tcp://host:port, "
                       f"tls://host:port or host:port")
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        if not path.startswith("/"):
            raise BusError(f"bad bus URL {url!r}: unix:// needs an absolute path (unix:///run/bus.sock)")
        return Target("unix", path=path)
    transport = "auto"
    rest = url
    scheme, sep, after = url.partition("://")
    if sep and scheme in ("tcp", "tls"):
        transport, rest = scheme, after
    elif sep:
        raise BusError(f"bad bus URL {url!r}: the scheme must be unix://, tcp:// or tls://")
    elif url.startswith("/"):
        return Target("unix", path=url)
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BusError(f"bad bus URL {url!r}: expected host:port, such as 127.0.0.1:7555")
    return Target(transport, host=host, port=int(port))


def resolve_targets(url: None | str | Sequence[str]) -> list[Target]:
    if url is None:
        url = os.environ.get("BUSX_URL") or f"unix://{default_socket_path()}"
    if isinstance(url, str):
        return [parse_url(url)]
    if not isinstance(url, (list, tuple)):
        raise BusError(f"bad bus URL {url!r}: give a URL string or a list of them")
    targets = [parse_url(item) for item in url]
    if not targets:
        raise BusError("no bus URL given: the list is empty")
    return targets


def host_identity() -> str:
    """Same value for every process on this host (and this boot): the kernel's
    boot id with the hostname. $BUSX_HOST_ID replaces it: a test-only way to
    let brokers on one machine play different hosts (docs/testing.md)."""
    return os.environ.get("BUSX_HOST_ID") or _boot_identity()


def host_name() -> str:
    """This host's name as other hosts see it on messages from here
    (msg.sender.origin): the host identity's name part."""
    return host_identity().split("/")[0]


@lru_cache(maxsize=1)
def _boot_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"
