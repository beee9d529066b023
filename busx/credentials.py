"""Who sent a message, as the broker saw it (never as the sender claimed)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple


class Credentials(NamedTuple):
    """pid/uid/gid come from SO_PEERCRED for UNIX publishers; identity (the
    token's name) and address (host, port) describe TCP publishers."""

    pid: Optional[int]
    uid: Optional[int]
    gid: Optional[int]
    identity: Optional[str]
    address: Optional[Tuple[str, int]]
