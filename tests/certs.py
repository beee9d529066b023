"""Certificates for the TLS tests, made on the spot with trustme: a CA and
the server, client, expired and misnamed certificates it signs, written as
PEM files that brokers, clients and the CLI load by path. Each certificate
is made the first time a test asks for it, so a test pays only for what it
uses."""

from __future__ import annotations

import datetime
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import trustme

# Every name the tests reach the broker by: the broker listens on 127.0.0.1,
# and "localhost" may resolve to ::1 first.
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def validity(starts_in_days: int, ends_in_days: int) -> dict:
    """not_before/not_after for issue_cert, in days from now (negative: past)."""
    now = datetime.datetime.now(datetime.UTC)
    return {"not_before": now + datetime.timedelta(days=starts_in_days),
            "not_after": now + datetime.timedelta(days=ends_in_days)}


class CertFiles(NamedTuple):
    """A certificate chain and its private key, as file paths."""

    cert: str
    key: str


class PKI:
    """One certificate authority and the certificates it signs, under
    directory. `ca_file` is what a client passes as tls_ca (or a broker as
    tls_client_ca) to trust this authority."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.authority = trustme.CA()

    def _write(self, name: str, leaf: trustme.LeafCert) -> CertFiles:
        cert = self.directory / f"{name}.crt"
        key = self.directory / f"{name}.key"
        # The chain alone in one file and the key alone in the other: the
        # usual layout of a deployment (key files readable by fewer users).
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return CertFiles(str(cert), str(key))

    @cached_property
    def ca_file(self) -> str:
        path = self.directory / "ca.crt"
        self.authority.cert_pem.write_to_path(str(path))
        return str(path)

    @cached_property
    def server(self) -> CertFiles:
        """Valid for localhost, 127.0.0.1 and ::1."""
        return self._write("server", self.authority.issue_cert(*SERVER_NAMES))

    @cached_property
    def other_host(self) -> CertFiles:
        """Valid, signed by this CA, but for another host only."""
        return self._write("otherhost", self.authority.issue_cert("otherhost.example"))

    @cached_property
    def expired(self) -> CertFiles:
        """For the right names, signed by this CA, expired yesterday."""
        return self._write("expired", self.authority.issue_cert(*SERVER_NAMES,
                                                                **validity(-30, -1)))

    @cached_property
    def not_yet_valid(self) -> CertFiles:
        """For the right names, signed by this CA, valid from tomorrow."""
        return self._write("future", self.authority.issue_cert(*SERVER_NAMES,
                                                               **validity(1, 30)))

    def client(self, common_name: str) -> CertFiles:
        """A client certificate whose subject common name is common_name
        (what an mTLS broker takes as the client's identity)."""
        return self._write(f"client-{common_name}", self.authority.issue_cert(
            f"{common_name}@example", common_name=common_name))

    def expired_client(self, common_name: str) -> CertFiles:
        return self._write(f"expired-client-{common_name}", self.authority.issue_cert(
            f"{common_name}@example", common_name=common_name, **validity(-30, -1)))

    def combined(self, files: CertFiles) -> str:
        """One file holding the key and then the chain, for callers that pass
        the same path as certificate and key."""
        path = Path(files.cert).with_suffix(".pem")
        path.write_text(Path(files.key).read_text() + Path(files.cert).read_text())
        return str(path)
