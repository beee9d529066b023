"""Per-topic policy through real brokers and real peers with other uids."""

import os
import textwrap

import pytest
from support import run_python

import busx
from busx.policy import load_policy, pattern_contains

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run peers as other uids")
NOBODY = 65534


@pytest.mark.parametrize("outer, inner, expected", [
    ("orders.>", "orders.eu.*", True),
    ("orders.>", "orders.eu.created", True),
    ("orders.>", "orders", False),
    ("orders.>", ">", False),
    ("orders.*.created", "orders.eu.created", True),
    ("orders.*.created", "orders.*.created", True),
    ("orders.*.created", "orders.>", False),
    ("orders.eu.created", "orders.*.created", False),
    ("*.x", "a.x", True),
    ("*.x", "_INBOX.x", False),
    (">", "_SYS.stats", False),
    (">", "a.b.c", True),
    ("a.*", "a.>", False),
    ("a.>", "a.>", True),
])
def test_pattern_containment(outer, inner, expected):
    assert pattern_contains(outer, inner) is expected


@pytest.mark.parametrize("document, complaint", [
    ({"rule": [{"publish": ["a"]}]}, "name who it applies to"),
    ({"rule": [{"uid": "zero"}]}, "uid must be an integer"),
    ({"rule": [{"user": "no-such-user-busx"}]}, "no user named"),
    ({"rule": [{"any": True, "publish": ["a..b"]}]}, "empty token"),
    ({"rule": [{"any": True, "publish": "a"}]}, "must be a list"),
    ({"rule": [{"any": True, "colour": "red"}]}, "unknown keys"),
    ({"rules": []}, "unknown top-level"),
])
def test_bad_policies_are_refused_with_a_reason(document, complaint):
    with pytest.raises(busx.BusError, match=complaint):
        load_policy(document)


def test_policy_from_toml_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent("""
        [[rule]]
        uid = 0
        publish = ["payments.>"]
        subscribe = ["orders.*.created"]
    """))
    rights = load_policy(str(path)).rights_for(0, 0, None)
    assert rights.may_publish("payments.x") and not rights.may_publish("orders.x")
    assert rights.may_subscribe("orders.eu.created") and not rights.may_subscribe("orders.>")
    path.write_text("[[rule]\n")
    with pytest.raises(busx.BusError, match="not valid TOML"):
        load_policy(str(path))
    with pytest.raises(busx.BusError, match="cannot read"):
        load_policy(str(tmp_path / "missing.toml"))


@pytest.fixture
def policed(public_dir):
    policy = {"rule": [
        {"uid": os.getuid(), "publish": ["orders.>", "metrics.>"],
         "subscribe": ["orders.>", "_SYS.stats"]},
        {"uid": NOBODY, "subscribe": ["orders.*.created"], "publish": ["orders.nobody.created"]},
    ]}
    with busx.Broker(unix_path=os.path.join(public_dir, "bus.sock"), socket_mode=0o666,
                     policy=policy) as broker:
        yield broker


def test_denied_subscribe_raises_and_connection_stays_usable(policed):
    with busx.connect(policed.url) as bus:
        with pytest.raises(busx.PermissionDenied, match="payments"):
            bus.subscribe("payments.>")
        with pytest.raises(PermissionError):
            bus.subscribe(">")
        sub = bus.subscribe("orders.eu.*")       # inside orders.>
        bus.publish("orders.eu.created", 1)
        assert sub.recv(timeout=5).data == 1


def test_denied_publish_is_not_delivered_and_flush_names_it(policed):
    with busx.connect(policed.url) as bus:
        sub = bus.subscribe("orders.>")
        bus.publish("orders.a", "allowed")
        bus.publish("payments.a", "denied")       # no rule allows it
        bus.publish("payments.a", "denied again")
        bus.publish("orders.b", "allowed too")
        with pytest.raises(busx.PermissionDenied, match="payments.a"):
            bus.flush(timeout=5)
        bus.flush(timeout=5)                      # reported once, then clean
        assert [m.data for m in sub.recv_many(timeout=5)] == ["allowed", "allowed too"]
        bus.publish("payments.a", "denied after flush")
        with pytest.raises(busx.PermissionDenied):
            bus.flush(timeout=5)


def test_inbox_replies_are_allowed_whatever_the_policy(policed):
    with busx.connect(policed.url) as bus:
        sub = bus.subscribe("orders.requests")
        import threading
        thread = threading.Thread(target=lambda: sub.recv(timeout=10).respond("pong"))
        thread.start()
        assert bus.request("orders.requests", "ping", timeout=10).data == "pong"
        thread.join()
        with pytest.raises(busx.PermissionDenied):
            bus.subscribe("_INBOX.>")             # everyone's replies: not a reply inbox


def test_stats_need_a_rule(policed):
    with busx.connect(policed.url) as bus:
        assert "connections" in bus.stats()


@needs_root
def test_rules_follow_the_kernel_verified_uid(policed):
    with busx.connect(policed.url) as bus:
        sub = bus.subscribe("orders.>")
        result = run_python(
            """
            import os, sys, busx
            os.setgid(65534); os.setuid(65534)
            with busx.connect(sys.argv[1]) as bus:
                bus.subscribe("orders.eu.created")
                try:
                    bus.subscribe("orders.>")
                except busx.PermissionDenied:
                    print("subscribe denied")
                bus.publish("orders.nobody.created", "mine")
                bus.publish("orders.root.created", "forged")
                try:
                    bus.flush(timeout=5)
                except busx.PermissionDenied as exc:
                    print("publish denied", exc)
                try:
                    bus.stats()
                except busx.PermissionDenied:
                    print("stats denied")
            """, policed.url)
        assert result.returncode == 0, result.stderr
        assert "subscribe denied" in result.stdout
        assert "publish denied" in result.stdout and "orders.root.created" in result.stdout
        assert "stats denied" in result.stdout
        msg = sub.recv(timeout=5)
        assert msg.data == "mine" and msg.sender.uid == NOBODY
        assert sub.recv_many(timeout=0.2) == []


def test_no_rule_means_connect_but_nothing_else(tmp_path):
    with busx.Broker(unix_path=str(tmp_path / "bus.sock"),
                     policy={"rule": [{"uid": 12345, "publish": [">"]}]}) as broker:
        with busx.connect(broker.url) as bus:
            with pytest.raises(busx.PermissionDenied):
                bus.subscribe("a")
            bus.publish("a", 1)
            with pytest.raises(busx.PermissionDenied):
                bus.flush(timeout=5)


# ---- senders on other hosts (the NATS backbone): origin= and remote= ----

REMOTE_RULES = {"rule": [
    {"any": True, "publish": ["local.>"]},
    {"origin": "billing", "publish": ["invoices.>"]},
    {"remote": True, "publish": ["metrics.>"]},
]}


@pytest.mark.parametrize("origin, topic, expected", [
    ("billing", "invoices.eu", True),       # its origin's rule
    ("billing", "metrics.cpu", True),       # remote = true covers every origin
    ("shop", "invoices.eu", False),         # another host's broker
    ("nats", "metrics.cpu", True),          # native NATS clients are remote too
    ("billing", "local.x", False),          # `any` is about this host's peers only
])
def test_remote_senders_are_judged_by_origin_and_remote_rules(origin, topic, expected):
    assert load_policy(REMOTE_RULES).remote_may_publish(origin, topic) is expected


def test_origin_and_remote_rules_never_grant_local_peers():
    rights = load_policy(REMOTE_RULES).rights_for(os.getuid(), os.getgid(), None)
    assert rights.publish == ("local.>",)


@pytest.mark.parametrize("rule, complaint", [
    ({"origin": "a", "uid": 0, "publish": [">"]}, "cannot be combined with uid"),
    ({"remote": False, "publish": [">"]}, "remote must be true"),
    ({"origin": 7, "publish": [">"]}, "origin must be a host name"),
])
def test_bad_remote_rules_are_refused(rule, complaint):
    with pytest.raises(busx.BusError, match=complaint):
        load_policy({"rule": [rule]})
