"""Who sent a message, as the broker saw it (never as the sender claimed)."""

from __future__ import annotations

from typing import NamedTuple


class Credentials(NamedTuple):
    """pid/uid/gid come from SO_PEERCRED for UNIX publishers; identity (the
    token's name) and address (host, port) describe TCP publishers. origin
    names the host whose broker stamped a message that came over the NATS
    backbone ("nats" for a native NATS client); None for local messages."""

    pid: int | None
    uid: int | None
    gid: int | None
    identity: str | None
    address: tuple[str, int] | None
    origin: str | None = None
