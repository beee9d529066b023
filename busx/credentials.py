"""Who sent a message, as the broker saw it (never as the sender claimed)."""

from __future__ import annotations

from typing import NamedTuple


class Credentials(NamedTuple):
    """pid/uid/gid come from SO_PEERCRED for UNIX publishers; identity (the
    token's name) and address (host, port) describe TCP publishers."""

    pid: int | None
    uid: int | None
    gid: int | None
    identity: str | None
    address: tuple[str, int] | None
