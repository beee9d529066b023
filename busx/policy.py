"""Per-topic policy: which peers may publish and subscribe to what.

    [[rule]]
    user = "billing"            # or uid, group, gid, identity, any = true
    publish = ["payments.>"]
    subscribe = ["orders.*.created"]

A rule's selectors must all match a peer; a peer's rights are the union of
the rules that match it. A peer no rule matches may connect but do nothing.

Messages from other hosts (the NATS backbone) are judged by the rules that
name remote senders: `origin = "host"` (the host whose broker stamped it;
"nats" for native NATS clients) or `remote = true` (any other host). Only
their `publish` matters: which topics such messages may reach here. Rules
without either selector are about this host's peers only: a uid or a token
name from another host means nothing here.
Replies are always allowed: publishing to an _INBOX. topic (its name is an
unguessable capability), and subscribing under the connection's own inbox
prefix, which the broker gives it at the handshake. Another connection's
inbox is readable only through a rule that names _INBOX patterns itself
(a monitoring tool granted "_INBOX.>"): a first-token wildcard never covers
reserved topics.
"""

from __future__ import annotations

import grp
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BusError, InvalidTopic
from .topics import INBOX_PREFIX, matches, pattern_bytes

SELECTORS = ("user", "uid", "group", "gid", "identity", "any", "origin", "remote")


def pattern_contains(outer: str, inner: str) -> bool:
    """Whether every topic matching `inner` also matches `outer`."""
    outer_tokens, inner_tokens = outer.split("."), inner.split(".")
    if outer_tokens[0] in ("*", ">") and inner_tokens[0].startswith("_"):
        return False        # first-token wildcards never match reserved topics
    for index, token in enumerate(outer_tokens):
        if token == ">":
            return index < len(inner_tokens)
        if index >= len(inner_tokens) or inner_tokens[index] == ">":
            return False
        if token != "*" and token != inner_tokens[index]:
            return False
    return len(outer_tokens) == len(inner_tokens)


def is_under(pattern: str, prefix: str | None) -> bool:
    """Whether pattern stays within prefix (a connection's inbox): the
    prefix itself or topics below it."""
    return prefix is not None and (pattern == prefix or pattern.startswith(prefix + "."))


@dataclass(frozen=True)
class Rights:
    """What one connection may do, fixed at its handshake."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return topic.startswith(INBOX_PREFIX) or any(matches(p, topic) for p in self.publish)

    def may_subscribe(self, pattern: str, inbox: str | None = None) -> bool:
        """inbox: the connection's own inbox prefix, always allowed."""
        return is_under(pattern, inbox) or any(pattern_contains(p, pattern) for p in self.subscribe)


@dataclass(frozen=True)
class Rule:
    uid: int | None
    gid: int | None
    identity: str | None
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    origin: str | None = None       # messages from that host (NATS backbone)
    remote: bool = False            # messages from any other host

    def applies_to(self, uid: int | None, gids: frozenset[int], identity: str | None) -> bool:
        if self.remote or self.origin is not None:
            return False        # about senders on other hosts only
        return ((self.uid is None or self.uid == uid)
                and (self.gid is None or self.gid in gids)
                and (self.identity is None or self.identity == identity))


class Policy:
    """Loaded rules; rights_for() turns a verified peer into its Rights."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def rights_for(self, uid: int | None, gid: int | None,
                   identity: str | None) -> Rights:
        gids = _groups_of(uid, gid)
        publish: list[str] = []
        subscribe: list[str] = []
        for rule in self.rules:
            if rule.applies_to(uid, gids, identity):
                publish += rule.publish
                subscribe += rule.subscribe
        return Rights(tuple(publish), tuple(subscribe))

    def remote_may_publish(self, origin: str, topic: str) -> bool:
        """Whether a message from host `origin` may reach subscribers here."""
        return any((rule.remote or rule.origin == origin)
                   and any(matches(p, topic) for p in rule.publish) for rule in self.rules)


def _groups_of(uid: int | None, gid: int | None) -> frozenset[int]:
    """The peer's primary gid (from SO_PEERCRED) and its user's supplementary groups."""
    if uid is None:
        return frozenset()
    groups = {gid} if gid is not None else set()
    try:
        entry = pwd.getpwuid(uid)
        groups.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except KeyError:
        pass
    return frozenset(groups)


def load_policy(source: str | os.PathLike | Mapping[str, Any]) -> Policy:
    """Read a policy from a TOML file path or a dict of the same shape."""
    if isinstance(source, Mapping):
        document, where = source, "policy"
    else:
        where = os.fspath(source)
        try:
            with open(where, "rb") as f:
                document = tomllib.load(f)
        except OSError as exc:
            raise BusError(f"cannot read policy file {where}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise BusError(f"policy file {where} is not valid TOML: {exc}") from None
    unknown = set(document) - {"rule"}
    if unknown:
        raise BusError(f"{where}: unknown top-level keys {sorted(unknown)}; expected [[rule]] tables")
    rules = document.get("rule", [])
    if not isinstance(rules, list):
        raise BusError(f"{where}: 'rule' must be an array of tables ([[rule]])")
    return Policy([_parse_rule(rule, f"{where} rule {n}") for n, rule in enumerate(rules, 1)])


def _parse_rule(rule: Any, where: str) -> Rule:
    if not isinstance(rule, Mapping):
        raise BusError(f"{where}: a rule must be a table")
    unknown = set(rule) - set(SELECTORS) - {"publish", "subscribe"}
    if unknown:
        raise BusError(f"{where}: unknown keys {sorted(unknown)}")
    selectors = [key for key in SELECTORS if key in rule]
    if not selectors:
        raise BusError(f"{where}: name who it applies to: one of {', '.join(SELECTORS)}")
    for flag in ("any", "remote"):
        if rule.get(flag) is not None and rule.get(flag) is not True:
            raise BusError(f"{where}: {flag} must be true when given")
    origin = rule.get("origin")
    if origin is not None and not isinstance(origin, str):
        raise BusError(f"{where}: origin must be a host name")
    local_selectors = sorted(set(selectors) - {"origin", "remote"})
    if (origin is not None or rule.get("remote")) and local_selectors:
        raise BusError(f"{where}: origin and remote select senders on other hosts; "
                       f"they cannot be combined with {', '.join(local_selectors)}")
    uid = _resolve(rule, "uid", "user", lambda name: pwd.getpwnam(name).pw_uid, where)
    gid = _resolve(rule, "gid", "group", lambda name: grp.getgrnam(name).gr_gid, where)
    identity = rule.get("identity")
    if identity is not None and not isinstance(identity, str):
        raise BusError(f"{where}: identity must be a string")
    return Rule(uid, gid, identity, _patterns(rule, "publish", where),
                _patterns(rule, "subscribe", where), origin, bool(rule.get("remote")))


def _resolve(rule: Mapping, number_key: str, name_key: str, lookup, where: str) -> int | None:
    if number_key in rule and name_key in rule:
        raise BusError(f"{where}: give {number_key} or {name_key}, not both")
    if number_key in rule:
        if not isinstance(rule[number_key], int) or isinstance(rule[number_key], bool):
            raise BusError(f"{where}: {number_key} must be an integer")
        return rule[number_key]
    if name_key in rule:
        try:
            return lookup(rule[name_key])
        except (KeyError, TypeError):
            raise BusError(f"{where}: no {name_key} named {rule[name_key]!r} on this host") from None
    return None


def _patterns(rule: Mapping, key: str, where: str) -> tuple[str, ...]:
    patterns = rule.get(key, [])
    if isinstance(patterns, str) or not isinstance(patterns, list):
        raise BusError(f"{where}: {key} must be a list of patterns")
    for pattern in patterns:
        try:
            pattern_bytes(pattern)
        except InvalidTopic as exc:
            raise BusError(f"{where}: {exc}") from None
    return tuple(patterns)
