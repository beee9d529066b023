"""TLS settings checked and turned into the core's TlsContext (SPEC.md, TLS
on TCP). The core drives OpenSSL on the sockets; this module only reads
the files, once, and says clearly what is wrong with them."""

from __future__ import annotations

import os
import ssl

from ._core import TlsContext, TlsStream
from .errors import BusError

__all__ = ["TlsContext", "TlsStream", "client_tls_context", "tls_context"]


def tls_context(cert: str | os.PathLike | None, key: str | os.PathLike | None,
                client_ca: str | os.PathLike | None) -> TlsContext | None:
    """The broker's TLS context, None without tls_cert."""
    if cert is None and key is None and client_ca is None:
        return None
    if cert is None or key is None:
        raise BusError("TLS needs both tls_cert and tls_key (PEM files)")
    try:
        return TlsContext.for_broker(os.fspath(cert), os.fspath(key),
                                     None if client_ca is None else os.fspath(client_ca))
    except ValueError as exc:
        raise BusError(f"TLS: {exc}") from None


def client_tls_context(ca: str | os.PathLike | None, cert: str | os.PathLike | None,
                       key: str | os.PathLike | None,
                       ssl_context: ssl.SSLContext | None = None) -> TlsContext:
    """A client's TLS context: trust ca (None: the system's store), and
    present cert/key to brokers that ask for a client certificate; or the
    caller's own ssl.SSLContext, as it is."""
    if key is not None and cert is None:
        raise BusError("tls_key needs tls_cert")
    if ssl_context is not None:
        if ca is not None or cert is not None:
            raise BusError("give either ssl_context or tls_ca/tls_cert/tls_key, not both")
        try:
            return TlsContext.of_python(ssl_context)
        except ValueError as exc:
            raise BusError(f"TLS: {exc}") from None
    try:
        return TlsContext.for_client(None if ca is None else os.fspath(ca),
                                     None if cert is None else os.fspath(cert),
                                     None if key is None else os.fspath(key))
    except ValueError as exc:
        raise BusError(f"TLS: {exc}") from None
