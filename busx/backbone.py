"""The broker's link to NATS, control half (SPEC.md, Across hosts).

The broker joins a NATS deployment as a leaf node (docs/nats-leafnode.md).
The data half lives in the broker's loop (busx/_link.pxi): it reads and
writes the link's socket, routes messages both ways and answers PINGs.
This half does what happens rarely:

- the connector thread connects to a server's leafnode listener, reads its
  INFO, sends CONNECT and hands the socket to the loop; after a loss it
  reconnects with jittered backoff across every server it knows (the ones
  configured, and those the cluster advertises in `leafnode_urls`);
- the interest tables, called by the loop for control lines: which local
  patterns the hub has been told of (LS+/LS-, within nats_import, counted
  per pattern and queue group) and which remote interest the loop's
  remote router holds (within nats_export).

Threads: the connector thread owns the socket until attach_link(); the
broker's loop thread calls the on_* methods, holding the loop's state_lock
(never take it from here). Fields say whose they are; `_lock` guards the
few both read. Lock order: state_lock, then the GIL, then `_lock`; the
connector never holds `_lock` across attach_link() (which takes
state_lock), a connect or a read (docs/development.md, Threads and locks).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import __version__
from ._core import BrokerLoop
from .errors import BusError, InvalidTopic
from .nkeys import Credentials
from .policy import pattern_contains
from .tls import TlsContext, TlsStream, client_tls_context
from .topics import INBOX_PREFIX, pattern_bytes

log = logging.getLogger("busx.broker")

CONNECT_TIMEOUT = 2.0       # TCP connect plus the server's INFO
BACKOFF_FIRST = 0.05        # seconds before the second round of attempts
BACKOFF_MAX = 5.0
MAX_INFO = 65536            # the longest INFO line read before CONNECT
DEFAULT_MAX_PAYLOAD = 1 << 20   # nats-server's, when its INFO does not say
# Subjects of NATS's own machinery: never busx topics, never announced.
NATS_INTERNAL = (b"$LDS.", b"$SYS.", b"$JS.", b"$JSC.", b"$KV.", b"$O.", b"$G")
SCHEMES = ("nats://", "nats-leaf://", "tls://")


@dataclass(frozen=True)
class Server:
    """A leafnodes listener: TLS is required when its URL said tls://
    (else used when the server asks for it)."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"


def parse_server(url: str, tls: bool = False) -> Server:
    """nats://host:port, nats-leaf://host:port or tls://host:port (a
    leafnodes listener); tls: for a bare host:port (advertised ones)."""
    for scheme in SCHEMES:
        if url.startswith(scheme):
            rest, tls = url[len(scheme):], scheme == "tls://"
            break
    else:
        rest = url
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BusError(f"bad NATS URL {url!r}: use nats://host:port or tls://host:port "
                       f"(the server's leafnodes listener)")
    return Server(host.strip("[]"), int(port), tls)


def intersect(a: bytes, b: bytes) -> bytes | None:
    """The pattern matching exactly the topics both a and b match (NATS
    wildcards: `*` one token, `>` one or more), or None when none can."""
    left, right = a.split(b"."), b.split(b".")
    out: list[bytes] = []
    for i in range(max(len(left), len(right))):
        x = left[i] if i < len(left) else None
        y = right[i] if i < len(right) else None
        if x == b">" and y is not None:
            return b".".join(out + right[i:])
        if y == b">" and x is not None:
            return b".".join(out + left[i:])
        if x is None or y is None:
            return None
        if x == b"*":
            out.append(y)
        elif y == b"*" or x == y:
            out.append(x)
        else:
            return None
    return b".".join(out)


def covers(outer: bytes, inner: bytes) -> bool:
    """Whether every topic matching inner also matches outer, by busx's
    rules: a first-token wildcard covers no reserved topic (`_INBOX.`), so
    a local `>` never hides an inbox from the hub; the broker sending a
    reply matches it against what the hub announced by the same rules."""
    return pattern_contains(outer.decode(), inner.decode())


class PatternTrie:
    """A set of patterns as a trie of their tokens. It answers whether a
    pattern in it covers a given one, and which patterns in it a given one
    covers, by walking only the branches that can match: the cost follows
    the pattern's tokens and the answer's size, not the set's size."""

    __slots__ = ("children", "here")

    def __init__(self) -> None:
        self.children: dict[bytes, PatternTrie] = {}
        self.here = False

    def add(self, pattern: bytes) -> None:
        node = self
        for token in pattern.split(b"."):
            node = node.children.setdefault(token, PatternTrie())
        node.here = True

    def discard(self, pattern: bytes) -> None:
        path = [self]
        tokens = pattern.split(b".")
        for token in tokens:
            child = path[-1].children.get(token)
            if child is None:
                return
            path.append(child)
        path[-1].here = False
        for depth in range(len(tokens), 0, -1):     # prune the branch it leaves empty
            if path[depth].here or path[depth].children:
                break
            del path[depth - 1].children[tokens[depth - 1]]

    def __contains__(self, pattern: bytes) -> bool:
        node: PatternTrie | None = self
        for token in pattern.split(b"."):
            node = node.children.get(token) if node is not None else None
        return node is not None and node.here

    def covers(self, pattern: bytes) -> bool:
        """Whether a pattern in the set covers `pattern` (see covers())."""
        return self._covers(pattern.split(b"."), 0)

    def _covers(self, tokens: list[bytes], i: int) -> bool:
        wild = i > 0 or not tokens[0].startswith(b"_")      # reserved: see covers()
        rest = self.children.get(b">")
        if wild and rest is not None and rest.here and i < len(tokens):
            return True
        if i == len(tokens):
            return self.here
        token = tokens[i]
        if token == b">":
            return False        # only a ">" where it stands covers it
        star = self.children.get(b"*")
        if wild and star is not None and star._covers(tokens, i + 1):
            return True
        literal = self.children.get(token) if token != b"*" else None
        return literal is not None and literal._covers(tokens, i + 1)

    def covered_by(self, pattern: bytes) -> list[bytes]:
        """The patterns in the set that `pattern` covers."""
        found: list[bytes] = []
        self._covered(pattern.split(b"."), 0, [], found)
        return found

    def _covered(self, outer: list[bytes], i: int, prefix: list[bytes],
                 found: list[bytes]) -> None:
        if i == len(outer):
            if self.here:
                found.append(b".".join(prefix))
            return
        token = outer[i]
        if token == b">":
            for name, child in self.children.items():
                if i > 0 or not name.startswith(b"_"):      # reserved: see covers()
                    child._all(prefix + [name], found)
        elif token == b"*":
            for name, child in self.children.items():
                if name != b">" and (i > 0 or not name.startswith(b"_")):
                    child._covered(outer, i + 1, prefix + [name], found)
        elif token in self.children:
            self.children[token]._covered(outer, i + 1, prefix + [token], found)

    def _all(self, prefix: list[bytes], found: list[bytes]) -> None:
        if self.here:
            found.append(b".".join(prefix))
        for name, child in self.children.items():
            child._all(prefix + [name], found)


def within(pattern: bytes, allowed: Sequence[bytes]) -> list[bytes]:
    """The parts of pattern that `allowed` (nats_import or nats_export)
    lets cross: inbox patterns always (replies travel on them); other
    reserved topics never; else pattern's intersection with each allowed
    pattern that is a valid busx pattern."""
    if pattern.startswith(INBOX_PREFIX.encode()):
        return [pattern] if _valid_pattern(pattern) else []
    if pattern.startswith(b"_") or pattern.startswith(NATS_INTERNAL):
        return []
    parts = []
    for limit in allowed:
        part = intersect(pattern, limit)
        if part is not None and part not in parts and _valid_pattern(part):
            parts.append(part)
    return parts


def _valid_pattern(pattern: bytes) -> bool:
    try:
        pattern_bytes(pattern.decode())
    except (InvalidTopic, UnicodeDecodeError):
        return False
    return True


@dataclass
class LinkStatus:
    """What `stats()["nats"]` shows beside the loop's counters; _lock."""

    state: str = "down"
    server: str | None = None
    reconnects: int = 0
    last_error: str | None = None
    servers: list[Server] = field(default_factory=list)


class Backbone:
    def __init__(self, urls: Sequence[str], export: Sequence[str], import_: Sequence[str],
                 user: str | None, password: str | None, token: str | None,
                 origin: str, name: str, tls: TlsContext | None = None,
                 creds: Credentials | None = None, max_interest: int = 1_000_000) -> None:
        """tls: trust and identity for TLS to the servers (None: the
        system's CAs, no client certificate). creds: an nkey (and JWT) that
        signs the server's nonce. max_interest: the most subjects (with
        queue groups) of remote interest kept; past it a server's LS+ is
        refused and counted (the broker's max_subscriptions)."""
        if not urls:
            raise BusError("nats= needs at least one NATS server URL")
        configured = [parse_server(url) for url in urls]
        self._tls = tls
        self._creds = creds
        self._export = [_checked(p, "nats_export") for p in export]
        self._import = [_checked(p, "nats_import") for p in import_]
        self._auth = {k: v for k, v in (("user", user), ("pass", password),
                                        ("auth_token", token)) if v is not None}
        self.origin = origin
        self.name = name
        self._loop: BrokerLoop = None     # type: ignore[assignment]   # set by start()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # _lock: shared by the connector and the loop's callbacks.
        self._status = LinkStatus(servers=list(configured))
        self._attached = False          # the loop owns a connection (or is being given one)
        self._was_up = False            # ... and it got up: relink without waiting
        self._connecting: socket.socket | None = None   # the connector's socket until attached
        self._stopping = False
        # The loop thread's: local interest, (pattern, queue) -> local
        # members; the plain patterns the hub was told of, a minimal
        # covering set of the local ones (queue keys are always told, with
        # their weight); remote interest, (subject, queue) -> (the remote
        # router's sids, the generation that announced it).
        self._local: dict[tuple[bytes, bytes], int] = {}
        self._local_plain = PatternTrie()       # the plain patterns of _local
        self._announced = PatternTrie()
        self._announced_list: set[bytes] = set()     # the same, to list them
        self._remote: dict[tuple[bytes, bytes], tuple[list[int], int]] = {}
        self._generation = 0
        self._next_sid = 1
        self._max_interest = max_interest
        self._interest_refused = 0      # read by status() from any thread: one int
        self._server_said: str | None = None    # the last -ERR on this connection

    # ---- lifecycle (the broker's thread) ----

    def start(self, loop: BrokerLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._connect_forever, name="busx-nats",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            connecting = self._connecting
        if connecting is not None:
            try:        # wakes the connector from connect(), recv() or the TLS handshake
                connecting.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join()

    def status(self) -> dict:
        with self._lock:
            s = self._status
            return {"server": s.server, "reconnects": s.reconnects,
                    "last_error": s.last_error, "origin": self.origin,
                    "local_interest": len(self._local),
                    "remote_interest_refused": self._interest_refused}

    # ---- the connector thread ----

    def _connect_forever(self) -> None:
        """Link, and relink whenever the loop reports the link lost: at once
        after a link that was up, else after a jittered backoff (50 ms
        doubling to 5 s) between rounds over every known server, so a
        server that refuses us (credentials, loop detection) is not
        hammered."""
        attempt = 0
        while True:
            with self._lock:
                while self._attached and not self._stopping:
                    self._wake.wait()
                if self._was_up:
                    attempt, self._was_up = 0, False
                if attempt and not self._stopping:
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** attempt)
                    self._wake.wait(delay * random.uniform(0.5, 1.0))
                if self._stopping:
                    return
                servers = list(self._status.servers)
            attempt += 1
            for server in servers:
                if self._join(server):
                    break

    def _join(self, server: Server) -> bool:
        """Connect to one server and hand the socket to the loop: True when
        it got that far (the loop reports what happens next)."""
        try:
            sock = self._connect(server)
        except OSError as exc:
            self._failed(server, f"cannot connect: {exc.strerror or exc}")
            return False
        stream: socket.socket | TlsStream = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            info = self._read_info(sock)
            self._learn(info, server.tls)
            if not info.get("headers", False):
                raise BusError("the server does not support headers (nats-server >= 2.2)")
            if server.tls or info.get("tls_required"):
                if not info.get("tls_required") and not info.get("tls_available"):
                    raise BusError("TLS asked for (tls://), but this leafnodes listener "
                                   "does not speak it")
                stream = self._start_tls(sock, server)
            connect = {"name": self.name, "headers": True, "protocol": 1,
                       "version": __version__, **self._auth}
            if self._creds is not None:
                if not info.get("nonce"):
                    raise BusError("credentials given, but the server sent no nonce to sign "
                                   "(it does not ask for an nkey)")
                connect.update(self._creds.connect_fields(info["nonce"]))
            stream.sendall(b'INFO {"compression":"off"}\r\nCONNECT '
                           + json.dumps(connect).encode() + b"\r\n")
            stream.setblocking(False)
        except (OSError, BusError, ValueError) as exc:
            self._forget_connecting()
            stream.close()
            self._failed(server, _reason(exc))
            return False
        with self._lock:
            self._connecting = None
            if self._stopping:
                stream.close()
                return True
            self._attached = True
            self._status.server = str(server)
            self._status.state = "joining"
        self._loop.attach_link(stream.detach(), info.get("max_payload", DEFAULT_MAX_PAYLOAD),
                               stream if isinstance(stream, TlsStream) else None)
        return True

    def _connect(self, server: Server) -> socket.socket:
        """A TCP connection to server, made where stop() can reach it."""
        family, kind, proto, _, address = socket.getaddrinfo(
            server.host, server.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        with self._lock:
            if self._stopping:
                sock.close()
                raise OSError("stopping")
            self._connecting = sock
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(address)
        except BaseException:
            self._forget_connecting()
            sock.close()
            raise
        return sock

    def _forget_connecting(self) -> None:
        with self._lock:
            self._connecting = None

    def _start_tls(self, sock: socket.socket, server: Server) -> TlsStream:
        """TLS inside the leaf connection, after the server's INFO; the
        server's certificate must name server.host."""
        if self._tls is None:
            self._tls = client_tls_context(None, None, None)
        sock.setblocking(False)
        self._forget_connecting()       # the handshake's own deadline bounds it from here
        stream = TlsStream(self._tls, sock.detach(), server.host)
        stream.settimeout(CONNECT_TIMEOUT)
        try:
            stream.handshake()
        except TimeoutError:
            stream.close()
            raise BusError("the TLS handshake timed out") from None
        except OSError as exc:
            stream.close()
            raise BusError(f"TLS handshake failed: {exc.strerror or exc}") from None
        return stream

    def _read_info(self, sock: socket.socket) -> dict:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        data = b""
        while b"\n" not in data:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                raise BusError("the server closed the connection before its INFO")
            data += chunk
            if len(data) > MAX_INFO:
                raise BusError("no INFO line from the server (is this a leafnodes port?)")
        line = data.split(b"\n", 1)[0].rstrip(b"\r")
        if not line.startswith(b"INFO "):
            raise BusError(f"expected INFO from the NATS server, got {line[:60]!r}")
        info = json.loads(line[5:])
        if not isinstance(info, dict):
            raise BusError(f"the server's INFO is not a JSON object: {line[:60]!r}")
        max_payload = info.get("max_payload", DEFAULT_MAX_PAYLOAD)
        if type(max_payload) is not int or not 0 < max_payload < 1 << 40:
            raise BusError(f"the server's INFO has no sensible max_payload: {max_payload!r}")
        return info

    def _learn(self, info: dict, tls: bool) -> None:
        """Remember the cluster's other leafnode listeners, for failover
        (with TLS when the one that told us had it)."""
        urls = info.get("leafnode_urls")
        if not isinstance(urls, list):
            return
        with self._lock:
            for url in urls:
                if not isinstance(url, str):
                    continue        # not a URL: nothing to learn from it
                try:
                    server = parse_server(url, tls)
                except BusError:
                    continue
                if server not in self._status.servers:
                    self._status.servers.append(server)

    def _failed(self, server: Server, why: str) -> None:
        with self._lock:
            self._status.last_error = f"{server}: {why}"
        log.warning("NATS link: %s: %s", server, why)

    # ---- the loop thread's callbacks ----

    def on_attached(self) -> bytes:
        """The loop took a new connection: all our interest, for the hub. A
        new generation begins: remote interest not in the hub's coming
        snapshot is forgotten when it ends (on_event("up"))."""
        self._generation += 1
        return b"".join([_announce(pattern, b"", 1) for pattern in self._announced_list]
                        + [_announce(pattern, queue, count)
                           for (pattern, queue), count in self._local.items() if queue])

    def on_local_interest(self, pattern: bytes, queue: bytes, delta: int) -> bytes:
        """A local subscription came or went: the LS+/LS- lines it calls for."""
        lines: list[bytes] = []
        for part in within(pattern, self._import):
            key = (part, queue)
            count = self._local.get(key, 0) + delta
            if count > 0:
                self._local[key] = count
            else:
                self._local.pop(key, None)
            if queue:       # a group's weight is its local members: told on each change
                lines.append(_announce(part, queue, count) if count > 0
                             else b"LS- %s %s\r\n" % (part, queue))
            elif count == 1 and delta > 0:
                self._local_plain.add(part)
                lines += self._cover(part)
            elif count <= 0:
                self._local_plain.discard(part)
                lines += self._uncover(part)
        return b"".join(lines)

    def _cover(self, pattern: bytes) -> list[bytes]:
        """A new local plain pattern: told unless an announced one covers
        it; announced, it replaces those it covers (LS+ before the LS-, so
        the hub's interest has no gap)."""
        if self._announced.covers(pattern):
            return []
        covered = self._announced.covered_by(pattern)
        for other in covered:
            self._unannounce(other)
        self._announce(pattern)
        return [_announce(pattern, b"", 1)] + [b"LS- " + other + b"\r\n" for other in covered]

    def _announce(self, pattern: bytes) -> None:
        self._announced.add(pattern)
        self._announced_list.add(pattern)

    def _unannounce(self, pattern: bytes) -> None:
        self._announced.discard(pattern)
        self._announced_list.discard(pattern)

    def _uncover(self, pattern: bytes) -> list[bytes]:
        """The last local subscriber of pattern left: if it was announced,
        the local patterns it covered are told (broadest first, so the set
        stays minimal), then it is withdrawn."""
        if pattern not in self._announced_list:
            return []
        self._unannounce(pattern)
        lines = []
        for orphan in sorted(self._local_plain.covered_by(pattern), key=_breadth):
            if not self._announced.covers(orphan):
                self._announce(orphan)
                lines.append(_announce(orphan, b"", 1))
        return lines + [b"LS- " + pattern + b"\r\n"]

    def on_line(self, line: bytes) -> None:
        """A control line from the hub other than PING/PONG/LMSG/HMSG."""
        op, _, rest = line.partition(b" ")
        op = op.upper()
        if op == b"LS+":
            self._remote_plus(rest.split())
        elif op == b"LS-":
            self._remote_minus(rest.split())
        elif op == b"INFO":
            try:
                info = json.loads(rest)
                if not isinstance(info, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._loop.drop_link(f"malformed INFO from the NATS server: {line[:60]!r}")
                return
            with self._lock:
                tls = self._status.server is not None and self._status.server.startswith("tls:")
            self._learn(info, tls)
        elif op == b"-ERR":
            # The server closes after most errors: the close reports this.
            self._server_said = rest.decode(errors="replace").strip("' ")
            with self._lock:
                self._status.last_error = f"the NATS server said: {self._server_said}"
            log.warning("NATS link: the server said: %s", self._server_said)
        elif op != b"+OK":
            self._loop.drop_link(f"unexpected line from the NATS server: {line[:60]!r}")

    def _remote_plus(self, args: list[bytes]) -> None:
        if not args or len(args) == 2 or len(args) > 3:
            self._loop.drop_link(f"malformed LS+ from the NATS server: {args!r}")
            return
        key = (args[0], args[1] if len(args) == 3 else b"")
        known = self._remote.get(key)
        if known is not None:
            self._remote[key] = (known[0], self._generation)    # a weight change, or a resend
            return
        parts = within(args[0], self._export) if len(key[1]) <= 255 else []
        if not parts:
            return          # nothing here can match it: not kept (an LS- for it is ignored)
        if len(self._remote) >= self._max_interest:
            if not self._interest_refused:
                log.warning("NATS link: the server announced more than %d subjects of "
                            "interest (max_subscriptions); messages for the rest stay here",
                            self._max_interest)
            self._interest_refused += 1
            return
        sids = []
        for part in parts:
            sid, self._next_sid = self._next_sid, self._next_sid % 0xFFFFFFFF + 1
            self._loop.remote_add(sid, part, key[1])
            sids.append(sid)
        self._remote[key] = (sids, self._generation)

    def _remote_minus(self, args: list[bytes]) -> None:
        if not 1 <= len(args) <= 2:
            self._loop.drop_link(f"malformed LS- from the NATS server: {args!r}")
            return
        known = self._remote.pop((args[0], args[1] if len(args) == 2 else b""), None)
        for sid in known[0] if known else ():
            self._loop.remote_remove(sid)

    def on_event(self, event: str) -> None:
        if event != "up":
            return
        for key, (sids, generation) in list(self._remote.items()):
            if generation != self._generation:      # gone while we were away
                del self._remote[key]
                for sid in sids:
                    self._loop.remote_remove(sid)
        with self._lock:
            self._status.state = "up"
            self._was_up = True
            server = self._status.server
        log.info("NATS link: joined %s as leaf %s", server, self.name)

    def on_down(self, why: str) -> None:
        if self._server_said is not None:
            why, self._server_said = f"the NATS server said: {self._server_said}", None
        with self._lock:
            self._attached = False
            was = self._status.server
            self._status.state = "down"
            self._status.server = None
            self._status.last_error = why
            if not self._stopping:
                self._status.reconnects += 1
            self._wake.notify_all()
            stopping = self._stopping
        if not stopping:
            log.warning("NATS link to %s lost: %s; reconnecting", was, why)


def _breadth(pattern: bytes) -> tuple[int, int, int]:
    """Sort key putting a pattern before every pattern it covers: `>`
    endings first, then fewer literal tokens, then fewer tokens."""
    tokens = pattern.split(b".")
    return (0 if tokens[-1] == b">" else 1, len(tokens) - tokens.count(b"*"), len(tokens))


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or repr(exc)


def _announce(pattern: bytes, queue: bytes, count: int) -> bytes:
    if queue:
        return b"LS+ %s %s %d\r\n" % (pattern, queue, count)
    return b"LS+ " + pattern + b"\r\n"


def _checked(pattern: str, what: str) -> bytes:
    try:
        return pattern_bytes(pattern)
    except InvalidTopic as exc:
        raise BusError(f"{what}: {exc}") from None
