"""The connection handshake, shared by broker and client: preamble, HELLO
(broker facts and a nonce), CONNECT (name and token proof), READY or ERROR.
See docs/protocol.md."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from typing import Any

import msgpack

from . import protocol
from ._core import TlsStream, encode_frame
from .errors import AuthenticationFailed, ConnectError, ProtocolError

AUTH_CONTEXT = b"busx-auth-v1"

# What a handshake runs on: a plain socket, or a TLS session on one.
Stream = socket.socket | TlsStream


def token_proof(secret: str, nonce: bytes, identity: str) -> bytes:
    """HMAC-SHA256 of the broker's fresh nonce: proves the secret without
    sending it, and is useless against any other nonce."""
    return hmac.new(secret.encode(), AUTH_CONTEXT + nonce + identity.encode(),
                    hashlib.sha256).digest()


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


# What a handshake map may hold: a few short fields. An unauthenticated peer
# cannot make the decoder build large objects (SPEC.md, Limits).
HANDSHAKE_LIMITS = {"max_str_len": 4096, "max_bin_len": 4096, "max_array_len": 64,
                    "max_map_len": 64, "max_ext_len": 0}


def unpack_limited(raw: bytes) -> Any:
    """Decode a handshake map within HANDSHAKE_LIMITS; ValueError past them."""
    return msgpack.unpackb(raw, raw=False, strict_map_key=False, **HANDSHAKE_LIMITS)




class FrameReader:
    """Blocking reads of whole frames from a socket, for the handshake only."""

    def __init__(self, sock: Stream, deadline: float, where: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.where = where
        self.decoder = protocol.FrameDecoder()
        self.frames: list[protocol.Frame] = []
        self.pending = b""

    def read_exact(self, n: int) -> bytes:
        while len(self.pending) < n:
            self.pending += self._recv()
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def read_frame(self) -> protocol.Frame:
        try:
            if self.pending:
                self.frames += self.decoder.feed(self.pending)
                self.pending = b""
            while not self.frames:
                self.frames += self.decoder.feed(self._recv())
        except ProtocolError as exc:
            raise ConnectError(f"{self.where} broke the busx protocol during the handshake: "
                               f"{exc}") from None
        return self.frames.pop(0)

    def _timed_out(self) -> ConnectError:
        return ConnectError(f"handshake with {self.where} timed out: is it a busx broker? "
                            f"(a TLS listener waits for the client to speak first: use tls://)")

    def _recv(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError as exc:
            raise ConnectError(f"connection to {self.where} failed during the handshake: "
                               f"{exc.strerror or exc}") from None
        if not chunk:
            raise ConnectError(f"{self.where} closed the connection during the handshake")
        return chunk


def client_handshake(sock: Stream, where: str, deadline: float, name: str | None,
                     token: tuple[str, str] | None, transport: str) -> dict:
    """Run the client side; returns the broker's HELLO facts. Leftover bytes
    cannot exist: the broker sends nothing after READY until asked."""
    reader = FrameReader(sock, deadline, where)
    preamble = reader.read_exact(len(protocol.PREAMBLE))
    if preamble[:4] != protocol.MAGIC:
        raise ConnectError(f"{where} is not a busx broker (it did not send the busx preamble)")
    if preamble != protocol.PREAMBLE:
        raise ConnectError(f"{where} speaks busx protocol version {preamble[4]}, this client "
                           f"speaks {protocol.VERSION}: upgrade one of them")
    hello_frame = reader.read_frame()
    if hello_frame.kind == protocol.ERROR:      # e.g. too many connections
        error = unpack_limited(hello_frame.payload)
        raise ConnectError(f"{where} refused the connection: {error.get('message')}")
    if hello_frame.kind != protocol.HELLO:
        raise ProtocolError(f"{where} sent frame kind {hello_frame.kind} instead of HELLO")
    hello = unpack(hello_frame.payload)
    request: dict[str, Any] = {"name": name, "heartbeats": True}    # we answer PINGs
    if transport == "unix":
        request["payload_fds"] = True       # large payloads may come as memfds
    if token is not None and transport != "unix":
        identity, secret = token
        request["identity"] = identity
        request["proof"] = token_proof(secret, hello["nonce"], identity)
    sock.sendall(protocol.PREAMBLE + encode_frame(protocol.CONNECT, payload=pack(request)))
    reply = reader.read_frame()
    if reply.kind == protocol.ERROR:
        error = unpack(reply.payload)
        if error.get("code") == "auth":
            raise AuthenticationFailed(f"{where}: {error.get('message')}")
        raise ConnectError(f"{where} refused the connection: {error.get('message')}")
    if reply.kind != protocol.READY:
        raise ProtocolError(f"{where} sent frame kind {reply.kind} instead of READY")
    hello.update(unpack(reply.payload))
    return hello
