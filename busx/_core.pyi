"""Type stubs for busx._core, the compiled core (built from _core.pyx and its
.pxi pieces). Only what Python code can reach is declared here; cdef
attributes and methods are invisible to Python and so are absent."""

from collections.abc import Iterable
from enum import IntEnum
from typing import Any, Protocol, final

from _typeshed import FileDescriptorLike, ReadableBuffer

from busx.credentials import Credentials
from busx.protocol import Frame

# Message for busx.Closed when a bus connected before fork() is used in the child.
FORKED_MESSAGE: str

def error_frame(code: str, message: str, fatal: bool = True, ref: int = 0) -> bytes:
    """An ERROR frame ({"code", "message"}), built as the broker's loop builds them."""

def encode_frame(
    kind: int,
    topic: bytes = b"",
    payload: bytes = b"",
    *,
    id: int = 0,
    flags: int = 0,
    reply: bytes = b"",
    stamp: bytes = b"",
    nfds: int = 0,
    fds_lost: int = 0,
) -> bytes:
    """Encode one frame (the same API as busx.protocol.encode_frame)."""

PAYLOAD_FD_THRESHOLD: int
WIRE: dict[str, Any]

def debug_counters() -> dict[str, int]:
    """What the C level holds now, by kind; {} unless built with BUSX_DEBUG=1."""

TRACE_STAGES: tuple[str, ...]

def trace(on: bool) -> None:
    """Turn the round-trip tracer on (emptied) or off."""

def trace_mark() -> None:
    """Stamp a "mark" of the caller's own."""

def trace_events() -> list[tuple[int, int, str]]:
    """The tracer's stamps, oldest first: (nanoseconds, thread id, stage)."""

class RunResult(IntEnum):
    RUN_CLOSED = 0
    RUN_EOF = 1
    RUN_ERROR = 2
    RUN_PROTOCOL = 3
    RUN_FDS_LOST = 4
    RUN_SILENT = 5

class LoopStatus(IntEnum):
    LOOP_STOP = 0
    LOOP_SIGNAL = 1

class FrameKind(IntEnum):
    K_HELLO = 1
    K_CONNECT = 2
    K_READY = 3
    K_PUB = 4
    K_MSG = 5
    K_SUB = 6
    K_UNSUB = 7
    K_PING = 8
    K_PONG = 9
    K_OK = 10
    K_ERROR = 11
    K_DROPPED = 12
    K_STATS = 13
    K_RECEIVED = 14
    KIND_LIMIT = 15

class FrameFlag(IntEnum):
    F_FATAL = 1
    F_PAYLOAD_FD = 2

def decode(raw: bytes) -> Any:
    """What msg.data returns: msgpack.unpackb(raw, strict_map_key=False)."""

def encode(value: Any) -> bytes:
    """What Bus.publish sends for value: msgpack.packb(value)."""

@final
class FrameDecoder:
    """Incremental frame decoder; raises ProtocolError on a malformed or
    oversize frame, after which it is unusable."""

    def __new__(cls, max_frame: int = ...) -> FrameDecoder: ...
    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
    def feed(self, data: ReadableBuffer) -> list[Frame]:
        """Append a chunk; return the whole frames it completes."""

@final
class Message:
    """A received message. Made only by the client's I/O; not for users to construct."""

    @property
    def topic(self) -> str: ...
    @property
    def raw(self) -> bytes:
        """The payload exactly as published (msgpack bytes)."""
    @property
    def data(self) -> Any:
        """raw decoded with msgpack, on first access."""
    @property
    def reply_to(self) -> str | None:
        """The requester's inbox topic, or None when not sent with request()."""
    @property
    def fds(self) -> tuple[int, ...]:
        """File descriptors received with the message; the receiver closes them."""
    @property
    def fds_lost(self) -> int:
        """fds the publisher attached that could not reach this (TCP) subscriber."""
    # Not Optional: the broker stamps every message it delivers (SPEC.md);
    # only a Message built by hand, which no API hands out, has None here.
    @property
    def sender(self) -> Credentials:
        """Who published it, as stamped by the broker."""
    # Returns whatever the receiving bus's publish() returns: None for a
    # busx.Bus, an awaitable for an asyncio bus (`await msg.respond(...)`).
    def respond(self, data: Any) -> Any:
        """Publish data to this request's reply_to inbox."""

@final
class ClientIO:
    """One client connection's buffers and I/O loop (owned by busx.client.Bus)."""

    bus: Any
    last_errno: int
    frames_out: int
    write_calls: int
    direct_sends: int
    direct_reads: int
    fd_payloads_out: int
    fd_payloads_in: int
    discarded: int
    malformed: int
    unread_dropped: int
    bytes_lost_in_flight: int
    frames_in: int
    read_calls: int
    def __init__(self, max_buffer: int, max_frame: int, heartbeat: float = ...) -> None: ...
    def release(self) -> None: ...
    def attach(self, fd: int, is_unix: bool, prologue: bytes, max_frame: int,
               payload_fds: bool = False, tls: TlsStream | None = None) -> None: ...
    def detach(self) -> None: ...
    def forget_in_child(self) -> None: ...
    def fail(self) -> None: ...
    def request_close(self) -> None: ...
    @property
    def attached(self) -> bool: ...
    @property
    def held_bytes(self) -> int: ...
    @property
    def unsent_bytes(self) -> int: ...
    @property
    def events_seq(self) -> int: ...
    def notify_fd_open(self) -> int: ...
    def run(self) -> int:
        """The I/O loop; returns a RunResult (busx.client.RUN_*)."""
    def publish_data(
        self,
        topic: str,
        data: Any,
        fds: Iterable[FileDescriptorLike] = (),
        timeout: float | None = None,
        reply: str | None = None,
    ) -> None:
        """Validate topic, pack data with msgpack and queue it (Bus.publish)."""
    def publish_many_data(self, items: Iterable[tuple[str, Any]]) -> None:
        """Pack every (topic, data), then queue them in order (Bus.publish_many)."""
    def publish(
        self,
        topic: bytes,
        payload: bytes,
        reply: bytes | None = None,
        fds: Iterable[FileDescriptorLike] | None = None,
        timeout: float = -1.0,
    ) -> None: ...
    def publish_batch(self, frames: list[tuple[bytes, bytes]], timeout: float = -1.0) -> None: ...
    def send_control(
        self, kind: int, id: int, topic: bytes = b"", reply: bytes = b"", payload: bytes = b""
    ) -> None: ...
    def begin_round_trip(self) -> None:
        """An answer is awaited: keep reading past max_buffer until end_round_trip()."""
    def end_round_trip(self) -> None: ...
    def wait(self, seen: int, timeout: float) -> bool: ...
    def take(self, queues: dict[int, MessageQueue], control: list[Frame]) -> int: ...

@final
class MessageQueue:
    """FIFO of Messages for one subscription."""

    dropped: int
    apart: bool
    def __new__(cls, owner: ClientIO) -> MessageQueue: ...
    def __len__(self) -> int: ...
    def pop(self) -> Message | None: ...
    def pop_many(self, max_count: int) -> list[Message]: ...
    def discard(self) -> None: ...

class _BrokerHandler(Protocol):
    """What BrokerLoop calls back into (busx.broker.Broker); stub-only."""

    def on_accept(self, conn_id: int, fd: int, is_unix: bool, is_tls: bool) -> bytes: ...
    def on_connect(
        self, conn_id: int, payload: bytes, certificate_name: bytes | None
    ) -> tuple[bool, bytes, bytes, bool, bool]: ...
    def on_subscribe(
        self, conn_id: int, sid: int, pattern: bytes, queue: bytes
    ) -> int | tuple[str, str]: ...
    def may_publish(self, conn_id: int, topic: bytes) -> bool: ...
    def topic_is_valid(self, topic: bytes) -> bool: ...
    def on_close(self, conn_id: int) -> None: ...
    def on_stats_request(self, conn_id: int, snapshot: dict[str, Any]) -> bytes | None: ...
    def on_internal_error(self, exc: BaseException) -> None: ...

@final
class TlsContext:
    """Certificates and verification rules (an OpenSSL SSL_CTX)."""

    @staticmethod
    def for_broker(cert: str, key: str, client_ca: str | None = None) -> TlsContext: ...
    @staticmethod
    def for_client(ca: str | None = None, cert: str | None = None,
                   key: str | None = None) -> TlsContext: ...
    @staticmethod
    def of_python(context: Any) -> TlsContext: ...
    @property
    def check_hostname(self) -> bool: ...

@final
class TlsStream:
    """A client's TLS connection during busx's handshake (blocking, with a timeout)."""

    def __init__(self, context: TlsContext, fd: int, server_name: str) -> None: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def setblocking(self, flag: bool) -> None: ...
    def handshake(self) -> None: ...
    def recv(self, size: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def detach(self) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...

@final
class BrokerLoop:
    """The broker's connections, router and epoll loop (owned by busx.Broker)."""

    msgs_in: int              # messages routed (a property: readable once stopped)
    read_calls: int
    write_calls: int
    payload_fd_budget: int    # memfd payload bytes in flight to clients at once
    busy_polls: int
    busy_poll_hits: int
    busy_poll_ms: float       # the longest poll; the broker adapts below it
    refused: int              # connections refused past max_connections
    limits_hit: int           # SUBs refused past max_subscriptions
    handshake_timeouts: int   # connections closed by handshake_timeout
    heartbeat_timeouts: int   # connections closed: silent for 3 heartbeats
    tls_failures: int         # connections closed: their TLS failed
    def __init__(
        self,
        handler: _BrokerHandler,
        max_pending: int,
        max_frame: int,
        disconnect_slow: bool,
        check_publish: bool,
        max_connections: int = ...,
        max_subscriptions: int = ...,
        max_pending_fds: int = ...,
        handshake_timeout: float = ...,
        heartbeat: float = ...,
    ) -> None: ...
    def add_listener(self, fd: int, is_unix: bool, tls: TlsContext | None = None) -> None: ...
    def watch_signal_fd(self, fd: int) -> None: ...
    def request_stop(self) -> None: ...
    def run(self) -> int:
        """Serve until request_stop() or a signal; returns LOOP_STOP or LOOP_SIGNAL."""
    def drain(self, timeout: float) -> bool: ...
    def close_all(self) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...
    # The NATS link (busx.backbone): enable before run(); attach from the
    # connector thread; the rest from the loop thread's callbacks only.
    def enable_link(self, backbone: Any, buffer_max: int, origin: bytes,
                    instance: bytes) -> None: ...
    def attach_link(self, fd: int, max_payload: int, tls: TlsStream | None = None) -> None: ...
    def drop_link(self, why: str) -> None: ...
    def remote_add(self, sid: int, pattern: bytes, queue: bytes) -> None: ...
    def remote_remove(self, sid: int) -> None: ...
