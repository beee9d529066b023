"""Security-relevant events of a broker, one log line each (SPEC.md,
Operations): authentication failures, denials, malformed input,
slow-consumer cuts and limits hit, each with the peer's credentials.

Lines go to the logger `busx.broker` at WARNING, with the event's fields
attached to the record (`record.busx_event`, `record.peer`) for
JsonFormatter (`busx serve --log-format json`). A peer that floods cannot
flood the log: each kind of event logs at most BURST lines per WINDOW
seconds; the rest are counted and summed up in one "suppressed" line when
the window has passed and the kind occurs again, or when the broker stops.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("busx.broker")

BURST = 20          # lines per kind of event per window
WINDOW = 10.0       # seconds

AUTH_FAILURE = "auth_failure"
DENIED = "denied"
MALFORMED = "malformed"
SLOW_CONSUMER = "slow_consumer_cut"
LIMIT = "limit"
INTERNAL = "internal"

# The broker loop's ERROR codes for a connection it closes, by event.
KIND_OF_CODE = {"slow-consumer": SLOW_CONSUMER, "timeout": LIMIT, "limit": LIMIT,
                "internal": INTERNAL, "tls": AUTH_FAILURE}


def kind_of_code(code: str) -> str:
    """The event a fatal ERROR code stands for: a broken protocol unless
    said otherwise (protocol, too-large, invalid-topic, fds-*)."""
    return KIND_OF_CODE.get(code, MALFORMED)


class SecurityLog:
    """Rate-limited security event lines. The broker's loop thread calls
    event(); flush() (at stop) from the thread that stops it, after the loop
    has ended."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        self.burst, self.window = burst, window
        self._windows: dict[str, list] = {}     # kind -> [start, lines logged, suppressed]

    def event(self, kind: str, peer: dict[str, Any], message: str) -> None:
        now = time.monotonic()
        state = self._windows.get(kind)
        if state is None or now - state[0] >= self.window:
            if state is not None:
                self._summarize(kind, state)
            state = self._windows[kind] = [now, 0, 0]
        if state[1] >= self.burst:
            state[2] += 1
            return
        state[1] += 1
        log.warning("%s: %s: %s", kind, describe(peer), message,
                    extra={"busx_event": kind, "peer": peer})

    def flush(self) -> None:
        """Log what is still suppressed."""
        for kind, state in self._windows.items():
            self._summarize(kind, state)
        self._windows.clear()

    def _summarize(self, kind: str, state: list) -> None:
        if state[2]:
            log.warning("%s: suppressed %d similar events in %.0f s", kind, state[2],
                        self.window, extra={"busx_event": kind, "suppressed": state[2]})
            state[2] = 0


def describe(peer: dict[str, Any]) -> str:
    """The peer's credentials in a few words: what a log reader needs."""
    parts = [f"connection {peer['id']}"] if peer.get("id") else []
    for key in ("pid", "uid", "gid", "identity", "name"):
        if peer.get(key) is not None:
            parts.append(f"{key}={peer[key]}")
    if peer.get("address"):
        host, port = peer["address"][:2]
        parts.append(f"from {host}:{port}")
    return " ".join(parts) or "unknown peer"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: time, level, logger,
    message, and a security event's fields (event, peer, suppressed)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for key in ("busx_event", "peer", "suppressed"):
            if hasattr(record, key):
                document["event" if key == "busx_event" else key] = getattr(record, key)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)
