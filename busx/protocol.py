"""The wire protocol in plain Python: constants, and a reference codec with the
same API as the compiled one in busx._core. The tests use it as the oracle the
Cython codec must agree with; production code frames with busx._core (the
constants are shared, held equal by tests/test_frames.py); docs/protocol.md
describes the same bytes."""

from __future__ import annotations

import struct
from typing import NamedTuple, NoReturn

from .errors import ProtocolError

MAGIC = b"BUSX"
VERSION = 1
PREAMBLE = MAGIC + bytes([VERSION, 0, 0, 0])
HEADER = struct.Struct("<IBBBBBBBBI")
HEADER_SIZE = HEADER.size  # 16
DEFAULT_MAX_FRAME = 64 << 20
MAX_NAME = 255
MAX_FDS_PER_FRAME = 250
MAX_FDS_ON_WIRE = MAX_FDS_PER_FRAME + 1     # a payload memfd may come on top
PAYLOAD_FD_SIZE = struct.Struct("<Q")       # the inline payload of a PAYLOAD_FD frame

(HELLO, CONNECT, READY, PUB, MSG, SUB, UNSUB, PING, PONG, OK, ERROR, DROPPED, STATS,
 RECEIVED) = range(1, 15)
KIND_LIMIT = 15
FATAL = 1           # on ERROR: the broker closes the connection after it
PAYLOAD_FD = 2      # on PUB and MSG: the payload is in a sealed memfd, the frame's last fd
# The topic of a PING that asks for a backbone flush: answered once the
# broker's NATS server has answered a PING sent after it (docs/protocol.md).
BACKBONE_FLUSH = b"nats"


class Frame(NamedTuple):
    kind: int
    flags: int
    id: int
    topic: bytes
    reply: bytes
    stamp: bytes
    payload: bytes
    nfds: int
    fds_lost: int


def encode_frame(kind: int, topic: bytes = b"", payload: bytes = b"", *, id: int = 0,
                 flags: int = 0, reply: bytes = b"", stamp: bytes = b"", nfds: int = 0,
                 fds_lost: int = 0) -> bytes:
    """Encode one frame."""
    if len(topic) > MAX_NAME or len(reply) > MAX_NAME or len(stamp) > MAX_NAME:
        raise ValueError("topic, reply and stamp are at most 255 bytes each")
    size = HEADER_SIZE - 4 + len(topic) + len(reply) + len(stamp) + len(payload)
    header = HEADER.pack(size, kind, flags, len(topic), len(reply), len(stamp),
                         nfds, fds_lost, 0, id)
    return header + topic + reply + stamp + payload


class FrameDecoder:
    """Feed chunks split anywhere; get back the frames they complete."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._pending = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        if self._failed:
            raise ProtocolError("decoder already failed")
        self._pending += data
        frames: list[Frame] = []
        while True:
            frame = self._take_frame()
            if frame is None:
                return frames
            frames.append(frame)

    def _take_frame(self) -> Frame | None:
        pending = self._pending
        if len(pending) < 4:
            return None
        size = int.from_bytes(pending[:4], "little") + 4
        if size > self.max_frame:
            return self._fail(f"frame of {size} bytes exceeds the limit of "
                              f"{self.max_frame} bytes (max_frame)")
        if size < HEADER_SIZE:
            return self._fail("malformed frame header")
        if len(pending) < HEADER_SIZE:
            return None
        (_, kind, flags, topic_len, reply_len, stamp_len, nfds, fds_lost, reserved,
         frame_id) = HEADER.unpack_from(pending)
        sections = topic_len + reply_len + stamp_len
        if (reserved or not 0 < kind < KIND_LIMIT or HEADER_SIZE + sections > size
                or nfds > MAX_FDS_ON_WIRE):
            return self._fail("malformed frame header")
        if len(pending) < size:
            return None
        body = bytes(pending[HEADER_SIZE:size])
        del pending[:size]
        reply_at = topic_len
        stamp_at = reply_at + reply_len
        payload_at = stamp_at + stamp_len
        return Frame(kind, flags, frame_id, body[:reply_at], body[reply_at:stamp_at],
                     body[stamp_at:payload_at], body[payload_at:], nfds, fds_lost)

    def _fail(self, reason: str) -> NoReturn:
        self._failed = True
        raise ProtocolError(reason)
