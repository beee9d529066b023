"""The synchronous client: connect(), Bus, Subscription. The I/O runs in
busx._core.ClientIO on one daemon thread without the GIL; this module keeps
the Python-side bookkeeping (subscriptions, acks, reconnects)."""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from functools import partial
from typing import (
    Any,
    NamedTuple,
)

from . import protocol
from ._core import FORKED_MESSAGE, ClientIO, Message, MessageQueue, RunResult, encode_frame
from .errors import (
    BusError,
    Closed,
    ConnectError,
    Disconnected,
    InvalidTopic,
    LimitExceeded,
    PermissionDenied,
    Timeout,
)
from .handshake import Stream, client_handshake, unpack
from .paths import Target, host_identity, resolve_targets
from .tls import TlsStream, client_tls_context
from .topics import INBOX_PREFIX, pattern_bytes

log = logging.getLogger("busx.client")

RUN_CLOSED, RUN_EOF, RUN_ERROR = RunResult.RUN_CLOSED, RunResult.RUN_EOF, RunResult.RUN_ERROR
RUN_PROTOCOL, RUN_FDS_LOST = RunResult.RUN_PROTOCOL, RunResult.RUN_FDS_LOST
RUN_SILENT = RunResult.RUN_SILENT
DEFAULT_HEARTBEAT = 5.0
RECONNECT_BACKOFF = (0.02, 2.0)     # first and longest pause between reconnect attempts
CLOSE_FLUSH_SECONDS = 5.0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _remaining(deadline: float | None) -> float:
    """Seconds left, -1 for no deadline (ClientIO's convention)."""
    return -1.0 if deadline is None else max(0.0, deadline - time.monotonic())


class Step(NamedTuple):
    """What a round trip waits for: ready() returns non-None when done."""

    ready: Callable[[], Any]
    deadline: float | None
    timeout_message: str


def _refusal(error: dict) -> BusError:
    """The exception for a broker's non-fatal ERROR answer."""
    message = error.get("message", "refused by the broker")
    code = error.get("code")
    if code == "denied":
        return PermissionDenied(message)
    if code == "invalid":
        return InvalidTopic(message)
    if code == "limit":
        return LimitExceeded(message)
    return BusError(message)


class Subscription:
    """Messages matching one pattern. Iterate it, or call recv()/recv_many()."""

    def __init__(self, bus: Bus, sid: int, pattern: str, queue: str | None) -> None:
        self.bus = bus
        self.sid = sid
        self.pattern = pattern
        self.queue_group = queue
        self._queue = MessageQueue(bus._io)
        self._error: BaseException | None = None
        self.closed = False

    @property
    def dropped(self) -> int:
        """Messages dropped for this subscription because it was not read:
        by the broker (slow consumer), or by this client when a round trip
        (flush, subscribe, request) had to read on past a full max_buffer."""
        return self._queue.dropped

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; raises Timeout when timeout seconds pass first."""
        msg = self._queue.pop()
        if msg is not None:
            return msg
        return self.bus._wait(self.next_message, _deadline(timeout),
                              "no message arrived within the timeout")

    def recv_many(self, max_count: int = 1024, timeout: float | None = None) -> list[Message]:
        """Up to max_count queued messages; waits for at least one; [] on timeout."""
        if len(self._queue):
            return self._queue.pop_many(max_count)
        try:
            first = self.bus._wait(self.next_message, _deadline(timeout), "")
        except Timeout:
            return []
        return [first] + self._queue.pop_many(max_count - 1)

    # ---- for drivers (Bus here, busx.aio.AsyncSubscription) ----

    def queued(self, max_count: int) -> list[Message]:
        """Up to max_count messages already here, oldest first; never waits."""
        return self._queue.pop_many(max_count) if len(self._queue) else []

    def next_queued(self) -> Message | None:
        """The oldest message already here, or None; never waits."""
        return self._queue.pop()

    def next_message(self) -> Message | None:
        """A Step's test: the next message, None to wait on, or the error
        that ended the subscription."""
        msg = self._queue.pop()
        if msg is not None:
            return msg
        if self.closed:
            raise Closed(f"subscription to {self.pattern!r} is closed")
        if self._error is not None:
            error, self._error = self._error, None
            if not self.bus._reconnect:
                self.bus._loss_reported = True
            raise error
        return None

    def __iter__(self) -> Iterator[Message]:
        pop = self._queue.pop           # queued messages cost one C call each
        while True:
            msg = pop()
            if msg is None:
                try:
                    msg = self.recv()
                except Closed:
                    return
            yield msg

    def unsubscribe(self) -> None:
        """Stop receiving; queued messages are discarded; recv then raises Closed."""
        if self.closed:
            return
        self.bus._unsubscribe(self)

    def _close(self) -> None:
        self.closed = True
        self._queue.discard()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info) -> None:
        if not self.bus.closed:
            self.unsubscribe()

    def __repr__(self) -> str:
        return f"<Subscription {self.pattern!r} sid={self.sid}{' closed' if self.closed else ''}>"


class Bus:
    """A connection to a broker. Use busx.connect() to make one."""

    def __init__(self, url: None | str | Sequence[str] = None,
                 token: tuple[str, str] | None = None, name: str | None = None,
                 timeout: float = 5.0, reconnect: bool = True,
                 max_buffer: int = 16 << 20, heartbeat: float | None = DEFAULT_HEARTBEAT,
                 tls_ca: str | os.PathLike | None = None, tls_cert: str | os.PathLike | None = None,
                 tls_key: str | os.PathLike | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if heartbeat is not None and not 0 <= heartbeat <= 3600:
            raise BusError(f"heartbeat must be between 0 (off) and 3600 seconds, not {heartbeat}")
        self.heartbeat = heartbeat or 0.0
        self._targets = resolve_targets(url)
        wants_tls = tls_ca is not None or tls_cert is not None or ssl_context is not None
        if wants_tls and any(target.transport == "tcp" for target in self._targets):
            raise BusError("tcp:// is plain TCP: with TLS settings use tls://host:port "
                           "or host:port")
        self._tls = (client_tls_context(tls_ca, tls_cert, tls_key, ssl_context)
                     if wants_tls or any(t.transport == "tls" for t in self._targets) else None)
        self._token = (token[0], token[1]) if token is not None else None
        self.name = name
        self.timeout = timeout
        self._reconnect = reconnect
        self._ids = itertools.count(1)
        self._pump_lock = threading.RLock()
        self._subs: dict[int, Subscription] = {}
        self._queues: dict[int, MessageQueue] = {}
        self._awaited: set[int] = set()       # ids of control frames awaiting an answer
        self._replies: dict[int, protocol.Frame] = {}
        self._denied: list[str] = []
        self._inbox: Subscription | None = None
        # For a broker too old to assign inboxes.
        self._own_inbox = f"{INBOX_PREFIX}{os.urandom(16).hex()}"
        self._inbox_pending: Subscription | None = None
        self._requests: dict[str, Message | None] = {}
        self._lost_reason: str | None = None
        self._loss_reported = False
        self.closed = False
        self._closing = False
        self._closing_event = threading.Event()     # interrupts reconnect backoff
        self._forked = False
        self.generation = 0
        sock, self.transport, self.server = self._dial_any(_deadline(timeout))
        self._io = ClientIO(max_buffer, self.server["max_frame"], self.heartbeat)
        self._io.bus = self
        self._attach(sock, b"")
        self._thread = threading.Thread(target=self._io_main, name="busx-io", daemon=True)
        self._thread.start()
        _live_buses.add(self)

    # ---- connecting ----

    def _dial_any(self, deadline: float | None) -> tuple[Stream, str, dict]:
        errors = []
        for target in self._targets:
            try:
                return self._dial(target, deadline)
            except (ConnectError, PermissionDenied) as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConnectError("no broker reachable: " + "; ".join(str(e) for e in errors))

    def _dial(self, target: Target, deadline: float | None) -> tuple[Stream, str, dict]:
        if target.transport == "unix":
            assert target.path is not None
            unix = self._open_unix(target.path, deadline)
            return unix, "unix", self._handshake(unix, target, "unix", deadline)
        plain = self._open_tcp(target, deadline)
        transport = "tls" if self._tls is not None else "tcp"
        sock: Stream = self._start_tls(plain, target, deadline) if transport == "tls" else plain
        hello = self._handshake(sock, target, transport, deadline)
        if target.transport == "auto" and hello.get("host") == host_identity() and hello.get("unix_path"):
            moved = self._try_unix(hello, deadline)
            if moved is not None:
                sock.close()
                return moved
        return sock, transport, hello

    def _try_unix(self, tcp_hello: dict, deadline: float | None):
        """Move to the broker's UNIX socket when this host can reach it and it
        is the same broker (same instance) as over TCP."""
        path = tcp_hello["unix_path"]
        try:
            sock = self._open_unix(path, deadline)
        except (ConnectError, PermissionDenied, OSError) as exc:
            log.debug("staying on TCP: %s", exc)
            return None
        try:
            hello = self._handshake(sock, Target("unix", path=path), "unix", deadline)
        except BusError as exc:
            sock.close()
            log.debug("staying on TCP: %s", exc)
            return None
        if hello.get("instance") != tcp_hello.get("instance"):
            sock.close()
            return None
        return sock, "unix", hello

    def _open_unix(self, path: str, deadline: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(_remaining(deadline) if deadline is not None else None)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ConnectError(f"no broker at unix://{path}: start one with `busx serve`") from None
        except PermissionError:
            sock.close()
            raise PermissionDenied(
                f"unix://{path} does not admit uid {os.getuid()}: the socket's permissions "
                f"(socket_mode/socket_group) keep this user out") from None
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot connect to unix://{path}: {exc.strerror or exc}") from None
        return sock

    def _open_tcp(self, target: Target, deadline: float | None) -> socket.socket:
        try:
            sock = socket.create_connection((target.host, target.port),
                                            timeout=_remaining(deadline) if deadline else None)
        except OSError as exc:
            raise ConnectError(f"no broker at {target.url}: {exc.strerror or exc} "
                               f"(is `busx serve --tcp` running there?)") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _start_tls(self, sock: socket.socket, target: Target,
                   deadline: float | None) -> TlsStream:
        """The TLS handshake, checking the broker's certificate against the
        trusted CAs and target's host name."""
        assert self._tls is not None and target.host is not None
        sock.setblocking(False)
        try:
            stream = TlsStream(self._tls, sock.detach(), target.host)
        except ValueError as exc:           # the stream has closed the socket
            raise ConnectError(f"TLS to {target.url}: {exc}") from None
        stream.settimeout(_remaining(deadline) if deadline is not None else None)
        try:
            stream.handshake()
        except TimeoutError:
            stream.close()
            raise ConnectError(f"TLS handshake with {target.url} timed out: is it a busx "
                               f"broker's TLS listener?") from None
        except OSError as exc:
            stream.close()
            why = exc.strerror or str(exc)
            if "wrong version number" in why or "packet length too long" in why:
                why += " (the broker's TCP listener does not speak TLS: use tcp://)"
            raise ConnectError(f"TLS handshake with {target.url} failed: {why}") from None
        return stream

    def _handshake(self, sock: Stream, target: Target, transport: str,
                   deadline: float | None) -> dict:
        try:
            return client_handshake(sock, target.url, deadline or time.monotonic() + 3600,
                                    self.name, self._token, transport)
        except BaseException:
            sock.close()
            raise

    def _attach(self, sock: Stream, prologue: bytes) -> None:
        sock.setblocking(False)
        self._io.attach(sock.detach(), self.transport == "unix", prologue,
                        self.server["max_frame"], self.server.get("payload_fds") is True,
                        sock if isinstance(sock, TlsStream) else None)
        self.generation += 1

    # ---- the I/O thread ----

    def _io_main(self) -> None:
        while True:
            result = self._io.run()
            if result == RUN_CLOSED:
                return
            lost_before = self._io.bytes_lost_in_flight
            self._io.detach()
            reason = self._describe_loss(result)
            in_flight = self._io.bytes_lost_in_flight - lost_before
            if in_flight:
                reason += (f" ({in_flight} bytes written before it had not reached the broker: "
                           f"messages among them may be lost, see bus.counters)")
            if self._closing:
                return
            if not self._reconnect:
                self._lost_reason = self._lost_reason or reason    # a fatal ERROR says more
                self._io.fail()
                return
            log.info("busx: %s; reconnecting", reason)
            if result == RUN_FDS_LOST:
                # Messages were lost with the connection: say so, once, to
                # every subscription rather than resume silently.
                for sub in list(self._subs.values()):
                    sub._error = Disconnected(reason)
            if not self._reconnect_loop():
                return

    def _describe_loss(self, result: int) -> str:
        if result == RUN_EOF:
            return "the broker closed the connection"
        if result == RUN_PROTOCOL:
            return "the broker sent data this client cannot parse"
        if result == RUN_SILENT:
            return (f"the broker sent nothing for {3 * self.heartbeat:g} s (3 × heartbeat): "
                    f"it or the network path to it is gone")
        if result == RUN_FDS_LOST:
            return ("file descriptors sent with a message were lost: this process reached its "
                    "open-file limit (RLIMIT_NOFILE); close msg.fds when done or raise the limit")
        return f"connection error: {os.strerror(self._io.last_errno)}"

    def _reconnect_loop(self) -> bool:
        pause = RECONNECT_BACKOFF[0]
        while not self._closing:
            try:
                sock, transport, server = self._dial_any(_deadline(self.timeout))
            except BusError as exc:
                log.debug("reconnect failed: %s", exc)
                self._closing_event.wait(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, RECONNECT_BACKOFF[1])
                continue
            with self._pump_lock:
                self.transport, self.server = transport, server
                self._drop_inbox()      # the new connection has an inbox of its own
                prologue = self._resubscribe_frames()
            self._attach(sock, prologue)
            return True
        return False

    def _resubscribe_frames(self) -> bytes:
        return b"".join(
            encode_frame(protocol.SUB, pattern_bytes(sub.pattern), id=sid,
                                  reply=(sub.queue_group or "").encode())
            for sid, sub in list(self._subs.items()))

    # ---- waiting for what the broker sends ----

    def _pump(self) -> None:
        """Move received frames into subscriptions and reply tables."""
        control: list = []
        self._io.take(self._queues, control)
        for frame in control:
            self._on_control(frame)

    def _on_control(self, frame: protocol.Frame) -> None:
        kind = frame.kind
        if kind in (protocol.OK, protocol.PONG, protocol.STATS):
            if frame.id in self._awaited:   # else a repeat answer, after a reconnect
                self._replies[frame.id] = frame
            pending = self._inbox_pending
            if kind == protocol.OK and pending is not None and pending.sid == frame.id:
                self._inbox = pending
        elif kind == protocol.DROPPED:
            sub = self._subs.get(frame.id)
            if sub is not None:
                sub._queue.dropped += unpack(frame.payload)
        elif kind == protocol.ERROR:
            error = unpack(frame.payload)
            if frame.flags & protocol.FATAL:
                reason = error.get("message", "the broker closed the connection")
                self._lost_reason = reason
                for sub in self._subs.values():
                    sub._error = Disconnected(reason)
            elif frame.id and frame.id in self._awaited:
                self._replies[frame.id] = frame
            elif error.get("code") == "denied":
                topic = frame.topic.decode("utf-8", "replace")
                self._denied.append(f"{error.get('message', 'publish denied')}: {topic!r}")
            else:
                log.warning("busx broker error: %s", error.get("message"))

    def _wait(self, ready, deadline: float | None, timeout_message: str):
        """Pump and test ready() until it returns non-None; Timeout at the deadline."""
        self._check_open()
        while True:
            with self._pump_lock:
                seen = self._io.events_seq
                self._pump()
                result = ready()
                if result is not None:
                    return result
                self._check_usable()
            remaining = _remaining(deadline)
            if remaining == 0.0:
                raise Timeout(timeout_message or "timed out")
            self._io.wait(seen, remaining)

    # ---- for an event-loop driver (busx.aio), which waits its own way ----

    def poll(self, ready: Callable[[], Any]) -> Any:
        """Take what has arrived and test ready() once: its result, or None
        to wait for the next event. Raises if the bus is closed or lost for
        good."""
        self._check_open()
        with self._pump_lock:
            self._pump()
            result = ready()
            if result is None:
                self._check_usable()
            return result

    def watch_events(self, responder: Any) -> int:
        """An eventfd that becomes readable whenever something arrives or the
        connection changes; msg.respond() on this bus's messages then goes
        through responder (the AsyncBus)."""
        self._check_open()
        self._io.bus = responder
        return self._io.notify_fd_open()

    def _check_open(self) -> None:
        """Raise before taking any lock: in a fork()ed child the parent's
        threads may have held them."""
        if self.closed:
            raise Closed(FORKED_MESSAGE if self._forked else "the bus is closed")

    def _check_usable(self) -> None:
        if self.closed:
            raise Closed("the bus is closed")
        if not self._reconnect and self._lost_reason is not None and not self._io.attached:
            reason, reported = self._lost_reason, self._loss_reported
            self.close_now()
            if reported:        # said once already (as Disconnected): now it is closed
                raise Closed(f"the bus closed after losing its broker: {reason}")
            self._loss_reported = True
            raise Disconnected(f"connection to the broker lost: {reason}")

    def _drive(self, steps: Generator[Step, Any, Any]) -> Any:
        """Run a round-trip generator, blocking for each Step it yields
        (busx.aio drives the same generators with await)."""
        try:
            step = next(steps)
            while True:
                step = steps.send(self._wait(step.ready, step.deadline, step.timeout_message))
        except StopIteration as done:
            return done.value
        finally:
            steps.close()

    def _answer(self, id: int, generation: int) -> protocol.Frame | bool | None:
        """The broker's answer to id; False once a reconnect asks to send again."""
        return self._replies.pop(id, None) or (False if self.generation != generation else None)

    def _round_trip_steps(self, kind: int, id: int, topic: bytes = b"", reply: bytes = b"",
                          deadline: float | None = None) -> Generator[Step, Any, protocol.Frame]:
        """Send a control frame and wait for the broker's answer to id. A
        reconnect in between sends it again on the new connection."""
        self._awaited.add(id)
        self._io.begin_round_trip()
        try:
            while True:
                generation = self.generation
                self._io.send_control(kind, id, topic, reply)
                frame = yield Step(partial(self._answer, id, generation),
                                   deadline, "the broker did not answer within the timeout")
                if frame is not False:
                    break
        finally:
            self._io.end_round_trip()
            self._awaited.discard(id)
            self._replies.pop(id, None)
        if frame.kind == protocol.ERROR:
            raise _refusal(unpack(frame.payload))
        return frame

    # ---- public API ----

    def publish(self, topic: str, data: Any, *, fds: Iterable[int] = (),
                timeout: float | None = None) -> None:
        """Publish data (any msgpack-able object) to topic. Returns at once
        while buffer room remains; blocks (up to timeout) when it is full.
        fds (UNIX only): open files passed to each subscriber."""
        self._io.publish_data(topic, data, fds, timeout)

    def publish_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Publish (topic, data) pairs in order, as one batch."""
        self._io.publish_many_data(items)

    def flush(self, timeout: float | None = None, *, backbone: bool = False) -> None:
        """Return once the broker has routed everything published before;
        raises PermissionDenied for publishes denied since the last flush.
        backbone=True: also once the broker's NATS server holds everything
        it sent before, this connection's subscriptions included (so other
        hosts see them within one more hop); at once without a NATS link."""
        self._drive(self.flush_steps(timeout, backbone))

    # The round trips as generators of Steps, without waiting (sans-IO): flush()
    # and friends drive them blocking (_drive), busx.aio with await. Each
    # checks the bus is open before it sends anything.

    def flush_steps(self, timeout: float | None,
                    backbone: bool = False) -> Generator[Step, Any, None]:
        self._check_open()
        yield from self._round_trip_steps(protocol.PING, next(self._ids),
                                          protocol.BACKBONE_FLUSH if backbone else b"",
                                          deadline=_deadline(timeout))
        if self._denied:
            denied, self._denied = self._denied, []
            raise PermissionDenied("; ".join(denied))

    def subscribe(self, pattern: str, *, queue: str | None = None) -> Subscription:
        """Subscribe; active when it returns. queue: a load-balanced group name."""
        return self._drive(self.subscribe_steps(pattern, queue))

    def subscribe_steps(self, pattern: str, queue: str | None,
                         registered: Callable[[Subscription], None] | None = None,
                         ) -> Generator[Step, Any, Subscription]:
        self._check_open()
        encoded = pattern_bytes(pattern)
        queue_b = b""
        if queue is not None:
            if not isinstance(queue, str) or not 0 < len(queue.encode()) <= 255:
                raise BusError("queue group name must be 1-255 bytes of text")
            queue_b = queue.encode()
        sid = next(self._ids)
        sub = Subscription(self, sid, pattern, queue)
        with self._pump_lock:
            self._subs[sid] = sub
            self._queues[sid] = sub._queue
            if registered is not None:
                registered(sub)
        try:
            yield from self._round_trip_steps(protocol.SUB, sid, encoded, queue_b,
                                              _deadline(self.timeout))
        except BaseException:
            self._forget(sub)
            raise
        return sub

    def _forget(self, sub: Subscription) -> None:
        with self._pump_lock:
            self._subs.pop(sub.sid, None)
            self._queues.pop(sub.sid, None)
            sub._close()

    def _unsubscribe(self, sub: Subscription) -> None:
        self._drive(self.unsubscribe_steps(sub))

    def unsubscribe_steps(self, sub: Subscription) -> Generator[Step, Any, None]:
        self._forget(sub)
        if not self.closed:
            yield from self._round_trip_steps(protocol.UNSUB, sub.sid,
                                              deadline=_deadline(self.timeout))

    def request(self, topic: str, data: Any, timeout: float = 5.0) -> Message:
        """Publish data with a private reply inbox and wait for one reply."""
        return self._drive(self.request_steps(topic, data, timeout))

    def request_steps(self, topic: str, data: Any, timeout: float) -> Generator[Step, Any, Message]:
        self._check_open()
        deadline = _deadline(timeout)
        inbox = yield from self._inbox_steps(deadline)
        # Unguessable, never a counter: whoever sees one reply_to learns
        # nothing of the next (SPEC.md, Inboxes).
        token = f"{inbox.pattern[:-1]}{os.urandom(8).hex()}"
        self._requests[token] = None
        try:
            self._io.publish_data(topic, data, reply=token)
            return (yield Step(lambda: self._take_reply(inbox, token), deadline,
                               f"no reply to the request on {topic!r} within {timeout}s"))
        finally:
            self._requests.pop(token, None)

    def _inbox_steps(self, deadline: float | None) -> Generator[Step, Any, Subscription]:
        """The one reply inbox every request shares, subscribed on first use.
        Concurrent first requests wait for the one being made: _on_control
        installs it the moment its OK arrives."""
        while self._inbox is None:
            if self._inbox_pending is None:
                pattern = f"{self.inbox}.>"
                try:
                    yield from self.subscribe_steps(pattern, None, registered=self._await_inbox)
                finally:
                    self._inbox_pending = None
            else:
                yield Step(lambda: self._inbox or (False if self._inbox_pending is None else None),
                           deadline, "no reply inbox within the timeout")
        return self._inbox

    def _await_inbox(self, sub: Subscription) -> None:
        sub._queue.apart = True     # replies never wait behind unread subscriptions
        self._inbox_pending = sub

    @property
    def inbox(self) -> str:
        """This connection's private reply prefix (_INBOX.<name>), given by
        the broker at the handshake; only this connection may read it."""
        return self.server.get("inbox") or self._own_inbox

    def _drop_inbox(self) -> None:
        """After a reconnect: the old inbox prefix is gone with the old
        connection; the next request subscribes to the new one. Requests
        still waiting for a reply on the old one time out."""
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            self._subs.pop(inbox.sid, None)
            self._queues.pop(inbox.sid, None)
            inbox._close()

    def stats(self, timeout: float | None = None) -> dict:
        """The broker's stats (what `busx stat` shows)."""
        return self._drive(self.stats_steps(timeout))

    def stats_steps(self, timeout: float | None) -> Generator[Step, Any, dict]:
        self._check_open()
        frame = yield from self._round_trip_steps(
            protocol.STATS, next(self._ids),
            deadline=_deadline(self.timeout if timeout is None else timeout))
        return unpack(frame.payload)

    def _take_reply(self, inbox: Subscription, token: str) -> Message | None:
        while True:
            msg = inbox._queue.pop()
            if msg is None:
                break
            if msg.topic in self._requests:
                self._requests[msg.topic] = msg
        return self._requests.get(token)

    @property
    def counters(self) -> dict:
        """Frames and syscalls of this connection (frames_out/write_calls shows
        batching; direct_sends and direct_reads count the sends and reads done
        by the calling thread instead of the I/O thread), payloads sent and
        received as memfds, and messages
        discarded because their subscription had ended (queued at
        unsubscribe, or routed to it before the broker saw it), and frames
        dropped because their fields did not decode (malformed), and
        messages dropped because their subscription was full while a round
        trip read on (unread_dropped; also in each sub.dropped), and bytes
        written to connections that were then lost before the broker's side
        took them (bytes_lost_in_flight: messages among them may be lost)."""
        io = self._io
        return {"frames_out": io.frames_out, "write_calls": io.write_calls,
                "direct_sends": io.direct_sends, "frames_in": io.frames_in,
                "read_calls": io.read_calls, "direct_reads": io.direct_reads,
                "fd_payloads_out": io.fd_payloads_out,
                "fd_payloads_in": io.fd_payloads_in, "discarded": io.discarded,
                "malformed": io.malformed, "unread_dropped": io.unread_dropped,
                "bytes_lost_in_flight": io.bytes_lost_in_flight}

    def close(self) -> None:
        """Flush, then close. Idempotent; later calls raise Closed."""
        if self.closed or self._closing or self._forked:
            return
        self._closing = True
        self._closing_event.set()
        if self._io.attached:
            try:
                self.flush(timeout=CLOSE_FLUSH_SECONDS)
            except BusError:
                pass
        self.close_now()

    def close_now(self) -> None:
        """Close without flushing (close() flushes first; so does busx.aio)."""
        if self.closed:
            return
        self._closing = True
        self._closing_event.set()
        self.closed = True
        self._io.request_close()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._pump_lock:       # a recv() on another thread may be inside take()
            for sub in list(self._subs.values()):
                sub._close()
            self._subs.clear()
            self._queues.clear()
            self._io.release()

    def _forget_in_child(self) -> None:
        """fork() copied this Bus into a child: the connection is the
        parent's. Close the child's copies of its fds and refuse further use;
        never write to the shared socket."""
        self._forked = True
        self.closed = True
        self._io.forget_in_child()
        for sub in list(self._subs.values()):
            sub.closed = True
            sub._queue.discard()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and hasattr(self, "_io") and not self._forked:
            self._closing = True
            self._io.request_close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.transport
        return f"<busx.Bus {self._targets[0].url} {state}>"


_live_buses: weakref.WeakSet[Bus] = weakref.WeakSet()


def _forget_buses_in_child() -> None:
    for bus in list(_live_buses):
        bus._forget_in_child()


os.register_at_fork(after_in_child=_forget_buses_in_child)


def connect(url: None | str | Sequence[str] = None, *, token: tuple[str, str] | None = None,
            name: str | None = None, timeout: float = 5.0, reconnect: bool = True,
            max_buffer: int = 16 << 20, heartbeat: float | None = DEFAULT_HEARTBEAT,
            tls_ca: str | os.PathLike | None = None, tls_cert: str | os.PathLike | None = None,
            tls_key: str | os.PathLike | None = None,
            ssl_context: ssl.SSLContext | None = None) -> Bus:
    """Connect to a broker.

    url: None ($BUSX_URL, else $BUSX_SOCKET, else the default UNIX path),
      "unix:///path", "tcp://host:port", "host:port" (TCP, moving to the UNIX
      socket when the broker is on this host), or a list tried in order.
    token: (identity, secret) for TCP brokers that require one.
    name: shown in broker stats.  timeout: connect + handshake, in seconds.
    reconnect: after the first connect succeeded, survive broker restarts.
    max_buffer: bytes buffered each way.
    heartbeat: PING the broker after this many idle seconds; a broker silent
      for three times as long counts as gone (then reconnect applies).
      0 or None turns heartbeats off.
    tls_ca: the CA certificates (PEM) that vouch for the broker over TLS;
      None: the system's. With tls_ca or tls_cert, host:port URLs use TLS;
      tls:// always does (docs/security.md).
    tls_cert, tls_key: this client's certificate and key (PEM), for brokers
      that require client certificates; tls_key defaults to tls_cert's file.
    ssl_context: an ssl.SSLContext to use instead of those three, as it is
      (its CAs, certificate, verify_mode and check_hostname).
    """
    return Bus(url, token=token, name=name, timeout=timeout, reconnect=reconnect,
               max_buffer=max_buffer, heartbeat=heartbeat, tls_ca=tls_ca, tls_cert=tls_cert,
               tls_key=tls_key, ssl_context=ssl_context)
