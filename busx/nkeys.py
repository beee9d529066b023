"""NATS credentials for the backbone link: nkey seeds and creds files.

A NATS server may require a leaf to prove an nkey (an ed25519 key pair)
by signing the nonce of its INFO: `leafnodes { authorization { nkey:
"U..." } }` names the public key; the leaf holds the seed. A creds file
(made by NATS's `nsc`) holds a user JWT and the seed that signs for it.
`busx serve --nats-creds FILE` takes either: a creds file, or a file with
the seed alone.

Needs the optional extra `busx[nats]` (cryptography, for ed25519).

The nkey encoding (NATS's): base32 without padding of a prefix, the raw
key, and a CRC-16/XMODEM of both, little-endian. A seed's prefix is two
bytes: 'S' and the key's type ('U' for users) packed as 5-bit values.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .errors import BusError

PREFIX_SEED = 18 << 3       # 'S'
PREFIX_USER = 20 << 3       # 'U'
MISSING = ("NATS credentials need the cryptography library (ed25519): "
           "pip install 'busx[nats]'")
_JWT = re.compile(r"-{3,}BEGIN NATS USER JWT-{3,}\s*(\S+)\s*-{3,}END NATS USER JWT-{3,}")
_SEED = re.compile(r"-{3,}BEGIN USER NKEY SEED-{3,}\s*(\S+)\s*-{3,}END USER NKEY SEED-{3,}")


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial 0), as nkeys check."""
    return binascii.crc_hqx(data, 0)


def _b32decode(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def decode_seed(seed: str) -> bytes:
    """The 32 raw bytes of a user nkey seed ("SU..."); BusError if it is not one."""
    try:
        data = _b32decode(seed.strip())
    except (binascii.Error, ValueError):
        raise BusError("not an nkey seed: it is not base32") from None
    if len(data) != 36 or crc16(data[:-2]) != int.from_bytes(data[-2:], "little"):
        raise BusError("not an nkey seed: wrong length or checksum")
    prefix = data[0] & 0xF8
    kind = ((data[0] & 0x07) << 5) | ((data[1] & 0xF8) >> 3)
    if prefix != PREFIX_SEED or kind != PREFIX_USER:
        raise BusError("not a user nkey seed (it should start with SU)")
    return data[2:34]


def encode_seed(raw: bytes) -> str:
    """A user nkey seed ("SU...") from 32 random bytes."""
    body = bytes([PREFIX_SEED | PREFIX_USER >> 5, (PREFIX_USER & 31) << 3]) + raw
    return _b32encode(body + crc16(body).to_bytes(2, "little"))


def encode_public(raw: bytes) -> str:
    """A user's public nkey ("U...") from its 32 raw bytes."""
    body = bytes([PREFIX_USER]) + raw
    return _b32encode(body + crc16(body).to_bytes(2, "little"))


@dataclass(frozen=True)
class Credentials:
    """What a leaf proves itself with: a seed, and the JWT it signs for."""

    seed: str
    jwt: str | None = None

    def _key(self):
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        except ImportError:
            raise BusError(MISSING) from None
        return Ed25519PrivateKey.from_private_bytes(decode_seed(self.seed))

    @property
    def public_key(self) -> str:
        from cryptography.hazmat.primitives import serialization
        raw = self._key().public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
        return encode_public(raw)

    def connect_fields(self, nonce: str) -> dict[str, str]:
        """CONNECT's proof for a server's nonce: the JWT (or the public key)
        and the signature of the nonce, base64url without padding."""
        signature = self._key().sign(nonce.encode("ascii"))
        proof = {"sig": base64.urlsafe_b64encode(signature).decode("ascii").rstrip("=")}
        if self.jwt is not None:
            proof["jwt"] = self.jwt
        else:
            proof["nkey"] = self.public_key
        return proof


def read_credentials(path: str) -> Credentials:
    """A creds file (JWT and seed), or a file holding a seed alone."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise BusError(f"cannot read the NATS credentials {path}: "
                       f"{getattr(exc, 'strerror', None) or exc}") from None
    seed_block, jwt_block = _SEED.search(text), _JWT.search(text)
    seed = seed_block.group(1) if seed_block else text.strip()
    try:
        decode_seed(seed)
    except BusError as exc:
        raise BusError(f"NATS credentials {path}: {exc}") from None
    return Credentials(seed, jwt_block.group(1) if jwt_block else None)
