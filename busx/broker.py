"""The broker: sockets, security decisions and lifecycle in Python; the
event loop, routing and framing in busx._core (BrokerLoop)."""

from __future__ import annotations

import base64
import grp
import hmac
import ipaddress
import logging
import os
import resource
import signal
import socket
import stat
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__, events, protocol
from ._core import PAYLOAD_FD_THRESHOLD, BrokerLoop, LoopStatus, encode_frame, error_frame
from .backbone import Backbone
from .errors import BusError
from .handshake import pack, token_proof, unpack_limited
from .nkeys import read_credentials
from .paths import default_socket_path, host_identity, host_name
from .policy import Policy, Rights, load_policy
from .tls import client_tls_context, tls_context
from .topics import INBOX_PREFIX, InvalidTopic, is_valid_topic, pattern_bytes

log = logging.getLogger("busx.broker")

LOOP_STOP, LOOP_SIGNAL = LoopStatus.LOOP_STOP, LoopStatus.LOOP_SIGNAL
DRAIN_SECONDS = 5.0     # how long stop() waits to deliver what the broker holds
AF_UNIX_PATH_MAX = 108  # bytes in sockaddr_un.sun_path, with its terminating NUL
MAX_FRAME_LIMIT = 2 << 30   # SPEC.md: max_frame is at most 2 GiB
# Broker's defaults (SPEC.md, Limits); `busx serve` takes and shows the same.
DEFAULT_MAX_PENDING = 64 << 20
DEFAULT_MAX_CONNECTIONS = 65536
DEFAULT_MAX_SUBSCRIPTIONS = 1_000_000
DEFAULT_MAX_PENDING_FDS = 1024
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
DEFAULT_HEARTBEAT = 5.0
DEFAULT_BUSY_POLL_US = 200
DEFAULT_NATS_BUFFER = 8 << 20
NATS_MAX_ORIGIN = 48    # the longest origin a stamp carries (_core.pxd)
# The sender stamp (msgpack [pid, uid, gid, identity, host, port]) travels in
# a 255-byte field: an identity of up to 128 bytes always fits beside the rest.
MAX_IDENTITY = 128
MAX_STAMP = protocol.MAX_NAME


@dataclass
class Peer:
    """What the broker knows about one connection, verified by the kernel or
    the handshake, never taken from the client's word."""

    id: int
    transport: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    address: tuple[str, int] | None = None
    nonce: bytes = b""
    name: str | None = None
    identity: str | None = None
    rights: Rights | None = None     # None: no policy, everything allowed
    inbox: str | None = None         # _INBOX.<name>: its private reply prefix

    def stamp(self) -> bytes:
        host, port = self.address if self.address else (None, None)
        return pack([self.pid, self.uid, self.gid, self.identity, host, port])

    def fields(self) -> dict[str, Any]:
        """Its credentials, for a security log line."""
        return {"id": self.id, "transport": self.transport, "pid": self.pid, "uid": self.uid,
                "gid": self.gid, "identity": self.identity, "name": self.name,
                "address": list(self.address) if self.address else None}

    @property
    def remote(self) -> bool:
        """Over TCP, with or without TLS: tokens and addresses apply."""
        return self.transport != "unix"

    @classmethod
    def of_socket(cls, conn_id: int, fd: int, tls: bool = False) -> Peer:
        """The peer at the other end of fd: SO_PEERCRED over UNIX, the
        address over TCP (the kernel's word, not the client's)."""
        sock = socket.socket(fileno=fd)
        try:
            if sock.family == socket.AF_UNIX:
                pid, uid, gid = struct.unpack("3i", sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                return cls(conn_id, "unix", pid=pid, uid=uid, gid=gid)
            host, port = sock.getpeername()[:2]
            return cls(conn_id, "tls" if tls else "tcp", address=(host, port))
        finally:
            sock.detach()


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _group_id(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise BusError(f"socket_group {group!r} does not exist on this host") from None


class Broker:
    """A busx broker on a UNIX socket and, optionally, TCP.

    Parameters (all optional; see SPEC.md):
      unix_path: socket path; default $BUSX_SOCKET, else
        $XDG_RUNTIME_DIR/busx/bus.sock, else /tmp/busx-<uid>/bus.sock.
      tcp: (host, port) to accept remote peers; port 0 picks a free one.
      socket_mode: permissions of the socket file (default 0o600).
      socket_group: group name or gid for the socket (and a directory it creates).
      policy: TOML path or dict of rules (docs/security.md).
      tokens: {identity: secret} that TCP clients must prove.
      allow_anonymous_tcp: allow a non-loopback TCP address without tokens.
      max_pending: bytes queued per subscriber before the slow-consumer policy.
      slow_consumer: "drop" (newest, counted and reported) or "disconnect".
      max_frame: largest frame accepted, announced to clients (at most 2 GiB).
      max_connections: clients served at once; more are refused.
      max_subscriptions: subscriptions one connection may hold.
      max_pending_fds: fds queued per subscriber before the slow-consumer policy.
      handshake_timeout: seconds a new connection has to complete its handshake.
      tls_cert, tls_key: PEM files of the certificate chain and private key:
        the TCP listener then speaks TLS only (TLS 1.2+).
      tls_client_ca: PEM file of the CA that must have signed the client
        certificates TLS clients present; their common name becomes their
        identity, as a token's does (docs/security.md).
      heartbeat: PING a client heard nothing from, or sent nothing, for this
        many seconds; close one heard nothing from for three times as long
        (SPEC.md, Heartbeats). 0 turns heartbeats off.
      busy_poll_us: after routing a trickle of frames (request/reply
        traffic), poll up to this many microseconds for the next before
        sleeping: waking a sleeping thread costs tens of microseconds. The
        poll adapts to how soon frames have lately followed, so traffic
        sparser than this costs no polling (BENCHMARKS.md). 0 turns it off.
      sockets: listening sockets made by someone else, as systemd's socket
        activation passes them (busx.systemd.listen_fds()). The broker serves
        on them instead of binding its own of that kind: a UNIX one replaces
        unix_path's (its mode, group and file are left as they are, and the
        file is not removed at stop), TCP ones are served beside `tcp`.
      nats: join a NATS deployment as a leaf node (docs/backbone.md): the
        leafnodes listeners of its servers, nats://h:p or tls://h:p, one URL
        or a list. nats_export / nats_import: the topics that may leave this
        host / come in (patterns; default everything). nats_user,
        nats_password, nats_token: the server's leafnodes authorization.
        nats_buffer: bytes for NATS held while the link is down or slow.
        nats_tls_ca, nats_tls_cert, nats_tls_key: TLS to the servers (the
        CAs that vouch for them, default the system's; a client certificate).
        nats_creds: a NATS creds file, or an nkey seed file, whose key signs
        the server's nonce (needs busx[nats]).

    start() runs it on a background thread; serve_forever() in this one.
    """

    def __init__(self, unix_path: str | None = None, tcp: tuple[str, int] | None = None,
                 socket_mode: int = 0o600, socket_group: str | int | None = None,
                 policy: str | Mapping[str, Any] | None = None,
                 tokens: Mapping[str, str] | None = None, allow_anonymous_tcp: bool = False,
                 max_pending: int = DEFAULT_MAX_PENDING, slow_consumer: str = "drop",
                 max_frame: int = protocol.DEFAULT_MAX_FRAME,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
                 max_pending_fds: int = DEFAULT_MAX_PENDING_FDS,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 heartbeat: float = DEFAULT_HEARTBEAT,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None,
                 busy_poll_us: int = DEFAULT_BUSY_POLL_US,
                 sockets: Sequence[socket.socket] = (),
                 nats: str | Sequence[str] | None = None,
                 nats_export: Sequence[str] = (">",), nats_import: Sequence[str] = (">",),
                 nats_user: str | None = None, nats_password: str | None = None,
                 nats_token: str | None = None,
                 nats_buffer: int = DEFAULT_NATS_BUFFER,
                 nats_tls_ca: str | None = None, nats_tls_cert: str | None = None,
                 nats_tls_key: str | None = None, nats_creds: str | None = None) -> None:
        if slow_consumer not in ("drop", "disconnect"):
            raise BusError(f"slow_consumer must be 'drop' or 'disconnect', not {slow_consumer!r}")
        if not protocol.HEADER_SIZE + MAX_STAMP < max_frame <= MAX_FRAME_LIMIT:
            raise BusError(f"max_frame must be between {protocol.HEADER_SIZE + MAX_STAMP + 1} "
                           f"and 2 GiB, not {max_frame}")
        for name, value in (("max_connections", max_connections),
                            ("max_subscriptions", max_subscriptions),
                            ("max_pending_fds", max_pending_fds)):
            if not 0 < value < 1 << 32:
                raise BusError(f"{name} must be a positive count, not {value}")
        if not 0 < handshake_timeout <= 3600:
            raise BusError(f"handshake_timeout must be between 0 and 3600 seconds, "
                           f"not {handshake_timeout}")
        if not 0 <= heartbeat <= 3600:
            raise BusError(f"heartbeat must be between 0 (off) and 3600 seconds, not {heartbeat}")
        if max_pending < 1:
            raise BusError("max_pending must be positive")
        if not 0 <= busy_poll_us <= 1_000_000:
            raise BusError("busy_poll_us must be between 0 and 1,000,000")
        if not 0 <= socket_mode <= 0o777:
            raise BusError(f"socket_mode {socket_mode:o} is not a permission mode")
        self.tokens = dict(tokens or {})
        for identity in self.tokens:
            if not isinstance(identity, str) or not 0 < len(identity.encode()) <= MAX_IDENTITY:
                raise BusError(f"token identity {identity!r} must be 1-{MAX_IDENTITY} bytes of "
                               f"text (it is stamped on every message the client sends)")
        self._inherited = [_listening_socket(sock) for sock in sockets]
        tcp_hosts = [tcp[0]] if tcp is not None else []
        tcp_hosts += [sock.getsockname()[0] for sock in self._inherited
                      if sock.family != socket.AF_UNIX]
        for host in tcp_hosts:
            if (not self.tokens and tls_client_ca is None and not allow_anonymous_tcp
                    and not _is_loopback(host)):
                raise BusError(
                    f"refusing to accept anonymous TCP clients on {host}: anyone who can reach "
                    f"it could use the bus. Configure tokens, bind to 127.0.0.1, or pass "
                    f"allow_anonymous_tcp=True (busx serve --allow-anonymous-tcp)")
        inherited_unix = [sock for sock in self._inherited if sock.family == socket.AF_UNIX]
        if inherited_unix:
            unix_path = inherited_unix[0].getsockname()
        self.unix_path = os.path.abspath(unix_path or default_socket_path())
        self.tcp = tcp
        self.socket_mode = socket_mode
        self.socket_gid = None if socket_group is None else _group_id(socket_group)
        self.policy: Policy | None = load_policy(policy) if policy is not None else None
        self.max_pending = max_pending
        self.slow_consumer = slow_consumer
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_subscriptions = max_subscriptions
        self.max_pending_fds = max_pending_fds
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat
        self._tls = tls_context(tls_cert, tls_key, tls_client_ca)
        self._tls_client_ca = tls_client_ca
        self.tls = self._tls is not None       # the TCP listener speaks TLS
        self.busy_poll_us = busy_poll_us
        self._instance = os.urandom(8).hex()
        self._backbone: Backbone | None = None
        if nats is not None:
            if nats_buffer < 0:
                raise BusError("nats_buffer must not be negative")
            self.nats_buffer = nats_buffer
            origin = host_name()[:NATS_MAX_ORIGIN]
            self._backbone = Backbone(
                [nats] if isinstance(nats, str) else list(nats), nats_export, nats_import,
                nats_user, nats_password, nats_token, origin=origin,
                name=f"busx-{origin}-{self._instance}",
                tls=(client_tls_context(nats_tls_ca, nats_tls_cert, nats_tls_key)
                     if nats_tls_ca or nats_tls_cert else None),
                creds=read_credentials(nats_creds) if nats_creds else None,
                max_interest=max_subscriptions)
        self.tcp_address: tuple[str, int] | None = None
        self._peers: dict[int, Peer] = {}
        # The loop thread's: policy verdicts on messages from other hosts.
        self._remote_verdicts: dict[tuple[str, str], bool] = {}
        # The loop thread's (callbacks), read by stats() from any thread.
        self._auth_failures = 0
        self._subscribes_denied = 0
        self._security = events.SecurityLog()
        self._loop: BrokerLoop | None = None
        self._listeners: list[socket.socket] = []
        self._socket_inode: tuple[int, int] | None = None
        self._created_dir: str | None = None
        self._thread: threading.Thread | None = None
        self._stop_requested = False
        self._stopped = False
        self._lock = threading.Lock()

    # ---- lifecycle ----

    @property
    def url(self) -> str:
        return f"unix://{self.unix_path}"

    def start(self) -> Broker:
        """Listen, then serve on a background thread; returns once listening."""
        self._listen()
        self._thread = threading.Thread(target=self._serve, name="busx-broker", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Listen and serve in this thread until SIGINT/SIGTERM or stop()."""
        self._listen()
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert self._loop is not None
            self._loop.watch_signal_fd(read_fd)
            self._serve(signal_fd=read_fd)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(read_fd)
            os.close(write_fd)

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %d: stopping", signum)
        self._stop_requested = True

    def _serve(self, signal_fd: int | None = None) -> None:
        assert self._loop is not None
        try:
            while not self._stop_requested:
                if self._loop.run() == LOOP_SIGNAL and signal_fd is not None:
                    # Python ran the signal handler on returning from run();
                    # empty the wakeup pipe so epoll stops reporting it.
                    try:
                        while os.read(signal_fd, 512):
                            pass
                    except BlockingIOError:
                        pass
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Deliver what the broker holds, close the clients, remove the socket
        file. Safe to call twice, or on a broker that never started."""
        self._stop_requested = True
        if self._loop is not None:
            self._loop.request_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._backbone is not None:
            self._backbone.stop()       # no new link connection from here on
        if self._loop is not None:
            self._loop.drain(DRAIN_SECONDS)
            self._loop.close_all()
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        self._remove_socket_file()
        self._security.flush()

    def __enter__(self) -> Broker:
        if self._loop is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- sockets ----

    def _listen(self) -> None:
        if self._loop is not None:
            raise BusError("this broker was already started")
        self._loop = BrokerLoop(self, self.max_pending, self.max_frame,
                                self.slow_consumer == "disconnect", self.policy is not None,
                                max_connections=self.max_connections,
                                max_subscriptions=self.max_subscriptions,
                                max_pending_fds=self.max_pending_fds,
                                handshake_timeout=self.handshake_timeout,
                                heartbeat=self.heartbeat)
        self._loop.payload_fd_budget = payload_fd_budget()
        self._loop.busy_poll_ms = self.busy_poll_us / 1000
        try:
            if not any(sock.family == socket.AF_UNIX for sock in self._inherited):
                self._listen_unix()
            for sock in self._inherited:
                self._adopt(sock)
            if self.tcp is not None:
                self._listen_tcp()
        except BaseException:
            self._shutdown()
            raise
        if self._backbone is not None:
            self._loop.enable_link(self._backbone, self.nats_buffer,
                                   self._backbone.origin.encode(), self._instance.encode())
            self._backbone.start(self._loop)

    def _listen_unix(self) -> None:
        path = self.unix_path
        self._prepare_directory(os.path.dirname(path))
        self._clear_stale_socket(path)
        # Bind under a private name, fix mode and group, listen, then rename
        # into place: the path never shows a socket that is not yet accepting
        # (another broker probing it would take it for stale) or that has
        # looser rights. A path too long for the private name is bound
        # directly; nobody can connect before listen() either way.
        temporary = os.path.join(os.path.dirname(path), f".busx-{os.urandom(4).hex()}")
        bound = temporary if len(os.fsencode(temporary)) < AF_UNIX_PATH_MAX else path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(bound)
            os.chmod(bound, self.socket_mode)
            if self.socket_gid is not None:
                os.chown(bound, -1, self.socket_gid)
            sock.listen(1024)
            if bound != path:
                os.rename(bound, path)
        except OSError as exc:
            sock.close()
            if bound != path:
                try:
                    os.unlink(bound)
                except OSError:
                    pass
            raise BusError(f"cannot listen on unix://{path}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        info = os.stat(path)
        self._socket_inode = (info.st_dev, info.st_ino)
        self._listeners.append(sock)
        assert self._loop is not None
        self._loop.add_listener(sock.fileno(), True)

    def _prepare_directory(self, directory: str) -> None:
        """A directory we create is owned by us, writable only by us, and
        searchable by exactly those socket_mode lets in. The shared default
        (/tmp/busx-<uid>) must already be ours and not group/other-writable."""
        search = (0o010 if self.socket_mode & 0o070 else 0) | (0o001 if self.socket_mode & 0o007 else 0)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            info = os.lstat(directory)
            if not stat.S_ISDIR(info.st_mode):
                raise BusError(f"{directory} is not a directory") from None
            if directory.startswith("/tmp/") and (
                    info.st_uid != os.getuid() or info.st_mode & 0o022):
                raise BusError(
                    f"unsafe socket directory {directory}: it must be owned by uid "
                    f"{os.getuid()} and not writable by group or others (it is uid "
                    f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); remove it or "
                    f"pass unix_path") from None
            return
        except FileNotFoundError:
            # makedirs ignores its mode for parents: pin the umask so they are
            # never writable by others (who could swap our directory out).
            old_umask = os.umask(0o022)
            try:
                os.makedirs(os.path.dirname(directory), exist_ok=True)
                os.mkdir(directory, 0o700)
            except OSError as exc:
                raise BusError(f"cannot create socket directory {directory}: "
                               f"{exc.strerror or exc}") from None
            finally:
                os.umask(old_umask)
        except OSError as exc:
            raise BusError(f"cannot create socket directory {directory}: {exc.strerror or exc}") from None
        self._created_dir = directory
        os.chmod(directory, 0o700 | search)
        if self.socket_gid is not None:
            os.chown(directory, -1, self.socket_gid)

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        """Replace the socket of a crashed broker, never that of a live one."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise BusError(f"{path} exists and is not a socket: refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            log.info("replacing stale socket %s", path)
            os.unlink(path)
            return
        except OSError as exc:
            raise BusError(f"cannot tell whether a broker is running at {path}: {exc}") from None
        finally:
            probe.close()
        raise BusError(f"a broker is already running at unix://{path}: stop it first, "
                       f"or choose another unix_path")

    def _remove_socket_file(self) -> None:
        if self._socket_inode is None:
            return
        try:
            info = os.lstat(self.unix_path)
            if (info.st_dev, info.st_ino) == self._socket_inode:
                os.unlink(self.unix_path)
        except FileNotFoundError:
            pass
        self._socket_inode = None
        if self._created_dir:
            try:
                os.rmdir(self._created_dir)
            except OSError:
                pass

    def _adopt(self, sock: socket.socket) -> None:
        """Serve on a listening socket someone else made (sockets=)."""
        assert self._loop is not None
        sock.setblocking(False)
        self._listeners.append(sock)
        is_unix = sock.family == socket.AF_UNIX
        if not is_unix and self.tcp_address is None:
            self.tcp_address = sock.getsockname()[:2]
        self._loop.add_listener(sock.fileno(), is_unix, None if is_unix else self._tls)

    def _listen_tcp(self) -> None:
        assert self.tcp is not None and self._loop is not None
        host, port = self.tcp
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise BusError(f"cannot listen on tcp://{host}:{port}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self.tcp_address = sock.getsockname()[:2]
        self._listeners.append(sock)
        self._loop.add_listener(sock.fileno(), False, self._tls)

    # ---- callbacks from the event loop (GIL held, loop thread) ----

    def on_accept(self, conn_id: int, fd: int, is_unix: bool, is_tls: bool) -> bytes:
        peer = Peer.of_socket(conn_id, fd, is_tls)
        if not is_unix:
            with socket.socket(fileno=fd) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.detach()
        peer.nonce = os.urandom(32)
        self._peers[conn_id] = peer
        hello = {
            "version": protocol.VERSION, "server": f"busx/{__version__}",
            "max_frame": self.max_frame, "host": host_identity(), "instance": self._instance,
            "unix_path": self.unix_path, "nonce": peer.nonce, "transport": peer.transport,
            "auth": peer.remote and bool(self.tokens) and not self._tls_client_ca,
            "payload_fds": peer.transport == "unix",
        }
        return protocol.PREAMBLE + encode_frame(protocol.HELLO, payload=pack(hello))

    def on_connect(self, conn_id: int, payload: bytes,
                   certificate_name: bytes | None) -> tuple[bool, bytes, bytes, bool, bool]:
        """certificate_name: the common name of the client certificate TLS
        verified (tls_client_ca), else None."""
        peer = self._peers[conn_id]
        try:
            request = unpack_limited(payload)
            if not isinstance(request, dict):
                raise ValueError("CONNECT payload is not a map")
        except Exception:
            return False, error_frame("protocol", "CONNECT payload is not a msgpack map of "
                                      "the documented size"), b"", False, False
        name = request.get("name")
        peer.name = name if isinstance(name, str) else None
        if certificate_name is not None:
            refusal = self._certificate_identity(peer, certificate_name)
        elif peer.remote and self.tokens:
            refusal = self._authenticate(peer, request)
        else:
            refusal = None
        if refusal:
            self._auth_failures += 1
            self._security.event(events.AUTH_FAILURE, peer.fields(), refusal)
            return False, error_frame("auth", refusal), b"", False, False
        if self.policy is not None:
            peer.rights = self.policy.rights_for(peer.uid, peer.gid, peer.identity)
        stamp = peer.stamp()
        if len(stamp) > MAX_STAMP:      # cannot happen with MAX_IDENTITY; never truncate
            return False, error_frame("internal", "sender stamp too long"), b"", False, False
        peer.inbox = new_inbox()
        ready = encode_frame(protocol.READY,
                                      payload=pack({"id": conn_id, "inbox": peer.inbox}))
        payload_fds = peer.transport == "unix" and request.get("payload_fds") is True
        # Clients say they answer PINGs; older ones do not, and are not judged.
        return True, ready, stamp, payload_fds, request.get("heartbeats") is True

    @staticmethod
    def _certificate_identity(peer: Peer, name: bytes) -> str | None:
        """The verified client certificate's common name is the identity,
        as a token's would be (SPEC.md, TLS on TCP)."""
        try:
            identity = name.decode("utf-8")
        except UnicodeDecodeError:
            return "the client certificate's common name is not UTF-8"
        if not 0 < len(name) <= MAX_IDENTITY:
            return (f"the client certificate's common name must be 1-{MAX_IDENTITY} bytes "
                    f"(it is stamped on every message the client sends)")
        peer.identity = identity
        return None

    def _authenticate(self, peer: Peer, request: dict) -> str | None:
        identity, proof = request.get("identity"), request.get("proof")
        if not isinstance(identity, str) or not isinstance(proof, bytes):
            return "this broker requires a token: connect with token=(identity, secret)"
        if len(identity.encode()) > MAX_IDENTITY:
            return "token rejected: unknown identity or wrong secret"
        secret = self.tokens.get(identity)
        expected = token_proof(secret if secret is not None else "", peer.nonce, identity)
        if not hmac.compare_digest(expected, proof) or secret is None:
            return "token rejected: unknown identity or wrong secret"
        peer.identity = identity
        return None

    def on_subscribe(self, conn_id: int, sid: int, pattern: bytes, queue: bytes):
        peer = self._peers[conn_id]
        try:
            text = pattern.decode("utf-8")
            pattern_bytes(text)
        except (UnicodeDecodeError, InvalidTopic) as exc:
            self._security.event(events.MALFORMED, peer.fields(), f"invalid pattern: {exc}")
            return ("invalid", f"invalid pattern: {exc}")
        if peer.rights is not None and not peer.rights.may_subscribe(text, peer.inbox):
            self._subscribes_denied += 1
            reason = f"policy denies subscribing to {text!r}"
            if text.startswith(INBOX_PREFIX):
                reason += (f": a connection may read only its own inbox ({peer.inbox}) "
                           f"unless a rule grants _INBOX patterns")
            self._security.event(events.DENIED, peer.fields(), reason)
            return ("denied", reason)
        try:
            queue.decode("utf-8")
        except UnicodeDecodeError:
            return ("invalid", "queue group name is not valid UTF-8")
        return None

    def may_publish(self, conn_id: int, topic: bytes) -> bool:
        peer = self._peers[conn_id]
        if peer.rights is None or peer.rights.may_publish(topic.decode("utf-8")):
            return True
        # Asked once per (connection, topic): the loop caches the verdict.
        self._security.event(events.DENIED, peer.fields(),
                             f"policy denies publishing to {topic.decode('utf-8', 'replace')!r}")
        return False

    def remote_may_publish(self, stamp: bytes, topic: bytes) -> bool:
        """The policy's verdict on a message from the NATS backbone, by the
        origin in its stamp ([..., origin], see _nats.pxi)."""
        assert self.policy is not None
        key = (unpack_limited(stamp)[6], topic.decode("utf-8", "replace"))
        verdict = self._remote_verdicts.get(key)
        if verdict is None:
            if len(self._remote_verdicts) >= 4096:
                self._remote_verdicts.clear()
            verdict = self._remote_verdicts[key] = self.policy.remote_may_publish(*key)
        return verdict

    def topic_is_valid(self, topic: bytes) -> bool:
        try:
            return is_valid_topic(topic.decode("utf-8"))
        except UnicodeDecodeError:
            return False

    def on_security_event(self, conn_id: int, fd: int, code: str, message: str) -> None:
        """The loop refused a connection (conn_id 0: by its fd), closed one
        for a fatal error, or refused it something at a limit."""
        peer = self._peers.get(conn_id) if conn_id else None
        if peer is None and fd >= 0:
            peer = Peer.of_socket(0, fd)
        fields = peer.fields() if peer is not None else {"id": conn_id}
        self._security.event(events.kind_of_code(code), fields, f"{code}: {message}")

    def on_close(self, conn_id: int) -> None:
        self._peers.pop(conn_id, None)

    def on_stats_request(self, conn_id: int, snapshot: dict) -> bytes | None:
        rights = self._peers[conn_id].rights
        if rights is not None and not rights.may_subscribe("_SYS.stats"):
            return None
        return pack(self._merge_stats(snapshot))

    def on_internal_error(self, exc: BaseException) -> None:
        log.error("broker callback failed", exc_info=exc)

    # ---- introspection ----

    def stats(self) -> dict:
        """Counters as plain data: see SPEC.md, Stats."""
        if self._loop is None or self._stopped:
            return {"connections": [], "subscriptions": 0, "msgs_in": 0, "msgs_out": 0,
                    "bytes_in": 0, "bytes_out": 0, "dropped": 0}
        return self._merge_stats(self._loop.snapshot())

    def _merge_stats(self, snapshot: dict) -> dict:
        snapshot.update(auth_failures=self._auth_failures,
                        subscribes_denied=self._subscribes_denied)
        if self._backbone is not None and snapshot.get("nats") is not None:
            snapshot["nats"].update(self._backbone.status())
        else:
            snapshot.pop("nats", None)
        for conn in snapshot["connections"]:
            peer = self._peers.get(conn["id"])
            if peer is not None:
                conn.update(name=peer.name, transport=peer.transport, pid=peer.pid,
                            uid=peer.uid, gid=peer.gid, identity=peer.identity,
                            address=list(peer.address) if peer.address else None)
        return snapshot


def _listening_socket(sock: socket.socket) -> socket.socket:
    """sock, checked to be a listening stream socket on a UNIX path or TCP."""
    name = sock.getsockname()
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_ACCEPTCONN):
        raise BusError(f"socket {sock.fileno()} ({name!r}) is not a listening stream socket")
    if sock.family == socket.AF_UNIX and not (isinstance(name, str) and name):
        raise BusError(f"socket {sock.fileno()} is a UNIX socket without a path "
                       f"(abstract or unnamed): clients find the broker by its path")
    if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        raise BusError(f"socket {sock.fileno()} is neither a UNIX nor a TCP socket")
    return sock


def new_inbox() -> str:
    """A connection's private reply prefix: 80 random bits, unguessable, in
    16 characters (every reply topic carries it)."""
    name = base64.b32encode(os.urandom(10)).decode("ascii").lower()
    return f"{INBOX_PREFIX}{name}"


def payload_fd_budget() -> int:
    """Bytes of payload memfds the broker may have in flight to clients.

    The kernel counts fds in flight in UNIX sockets against the sending
    user's RLIMIT_NOFILE: half of the soft limit goes to memfds, the rest
    stays for connections and the users' own fds. Raise the limit (ulimit
    -n, systemd's LimitNOFILE=) for more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return (soft // 2) * PAYLOAD_FD_THRESHOLD
