"""Topic and pattern rules at the call site, and wildcard routing through a
real broker held against busx.topics.matches (the reference semantics)."""

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import RawPeer, wait_for

import busx
from busx import protocol, topics
from busx.handshake import pack

BAD_TEXT = [
    "", "a" * 256, "é" * 128,                       # 0 bytes; 256 bytes (as chars or as UTF-8)
    ".", "a..b", ".a", "a.", "a.b.",                # empty tokens
    "a b", " a", "a\tb", "a\nb", "a\rb",            # ASCII whitespace
    "a\u00a0b", "a\u2028b", "a\u2029b", "a\u3000b", "a\u200bb", "a\ufeffb",  # Unicode Z and C
    "a\x00b", "a\x1bb", "a\x7fb", "a\x85b",          # control characters
    "a\ud800b",                                      # a lone surrogate is not UTF-8
]
NOT_STR = [b"a", bytearray(b"a"), None, 1, 1.5, ["a"], ("a",), {"a": 1}]
BAD_PUBLISH = BAD_TEXT + [
    "*", ">", "a.*", "a.>", "*.a", "ord*", "a.b>", "a*b",   # wildcards never in a topic
    "_SYS.x", "_x", "_", "_INBOX", "_inbox.x", "_INBOX.",   # reserved, except _INBOX.…
]
GOOD_PUBLISH = ["a", "a" * 255, "é" * 127, "orders.eu.created", "_INBOX.x", "_INBOX.x.y",
                "a_b.-.:/#!", "日本.語", "x._y", "A.B"]
BAD_PATTERN = BAD_TEXT + ["ord*", "a.b>", "*a", "a*", "**", ">>", "a.>.b", ">.a", "*.>.*",
                          "a.b*.c", "a.>b"]
GOOD_PATTERN = ["*", ">", "a.*", "a.>", "*.*.>", "*.b", "_INBOX.abc.>", "_INBOX.*", "_SYS.x",
                "orders.*.created", "a" * 255]


def assert_usable(bus):
    """The bus still publishes and delivers after a refused call."""
    sub = bus.subscribe("still.alive")
    bus.publish("still.alive", "yes")
    assert sub.recv(timeout=5).data == "yes"
    sub.unsubscribe()


@pytest.mark.parametrize("topic", BAD_PUBLISH + NOT_STR, ids=repr)
def test_invalid_publish_topic_raises_invalid_topic(bus, topic):
    with pytest.raises(busx.InvalidTopic) as info:
        bus.publish(topic, 1)
    assert isinstance(info.value, ValueError)
    with pytest.raises(busx.InvalidTopic):
        bus.publish_many([("fine", 1), (topic, 2)])
    with pytest.raises(busx.InvalidTopic):
        bus.request(topic, 1, timeout=1)
    assert_usable(bus)


@pytest.mark.parametrize("pattern", BAD_PATTERN + NOT_STR, ids=repr)
def test_invalid_pattern_raises_invalid_topic(bus, pattern):
    with pytest.raises(busx.InvalidTopic) as info:
        bus.subscribe(pattern)
    assert isinstance(info.value, ValueError)
    assert_usable(bus)


def test_a_refused_publish_sends_nothing(bus):
    sub = bus.subscribe(">")
    with pytest.raises(busx.InvalidTopic):
        bus.publish_many([("first", 1), ("a..b", 2)])
    bus.publish("last", 3)
    bus.flush(timeout=5)
    assert [m.data for m in sub.recv_many(timeout=1)] == [3]


def test_valid_topics_and_patterns_are_accepted(bus):
    patterns = GOOD_PATTERN + GOOD_PUBLISH      # a topic is also a literal pattern
    got = deliveries(bus, patterns, GOOD_PUBLISH)
    for pattern, indices in zip(patterns, got):
        assert indices == [i for i, t in enumerate(GOOD_PUBLISH) if topics.matches(pattern, t)]
    for index in range(len(GOOD_PUBLISH)):
        assert got[len(GOOD_PATTERN) + index] == [index]
    # ">" sees every published topic except the reserved _INBOX ones.
    assert [GOOD_PUBLISH[i] for i in got[GOOD_PATTERN.index(">")]] == [
        t for t in GOOD_PUBLISH if not t.startswith("_")]


def test_publish_to_inbox_is_delivered_to_its_subscriber(bus):
    sub = bus.subscribe("_INBOX.abc.>")
    bus.publish("_INBOX.abc.1", "reply")
    assert sub.recv(timeout=5).data == "reply"


# ---- wildcard semantics through the broker ----

CASES = [
    ("a.b", "a.b", True), ("a.b", "a.b.c", False), ("a.b", "a", False), ("a.b", "a.bc", False),
    ("ab", "a", False), ("a", "ab", False),
    ("a.*", "a.b", True), ("a.*", "a", False), ("a.*", "a.b.c", False),
    ("*", "a", True), ("*", "a.b", False), ("*.b", "a.b", True), ("*.b", "a.c", False),
    ("*.*.c", "a.b.c", True), ("a.*.c", "a.x.c", True), ("a.*.c", "a.x.d", False),
    ("a.>", "a.b", True), ("a.>", "a.b.c.d", True), ("a.>", "a", False), ("a.>", "b.c", False),
    (">", "a", True), (">", "a.b.c", True), ("*.>", "a", False), ("*.>", "a.b", True),
    ("a.*.>", "a.b", False), ("a.*.>", "a.b.c", True),
    ("a.>", "a._b", True), ("*.*", "x._y", True),             # only the first token reserves
    (">", "_INBOX.a", False), ("*.x", "_INBOX.x", False), ("*.*", "_INBOX.a", False),
    ("*.>", "_INBOX.a.b", False),
    ("_INBOX.>", "_INBOX.a", True), ("_INBOX.>", "_INBOX.a.b", True),
    ("_INBOX.*", "_INBOX.a", True), ("_INBOX.a", "_INBOX.a", True),
    ("_INBOX.*", "_INBOX.a.b", False),
    ("é.*", "é.ü", True), ("é.*", "e.ü", False),
]


def drain(sub):
    """Everything queued for sub. Call after flush() on the subscriber's own
    bus: the broker wrote every routed message before the flush's answer."""
    got = []
    while batch := sub.recv_many(timeout=0.02):
        got += batch
    return got


def deliveries(bus, patterns, published):
    """Subscribe to each pattern, publish each topic (data = its index), and
    return for each pattern the indices of the topics it received."""
    subs = [bus.subscribe(p) for p in patterns]
    bus.publish_many((topic, index) for index, topic in enumerate(published))
    bus.flush(timeout=5)
    result = []
    for sub in subs:
        got = drain(sub)
        assert all(published[m.data] == m.topic for m in got)
        result.append([m.data for m in got])
        sub.unsubscribe()
    return result


@pytest.mark.parametrize("pattern, topic, expected", CASES)
def test_reference_matches_the_table(pattern, topic, expected):
    assert topics.matches(pattern, topic) is expected


def test_broker_routes_the_table(bus):
    patterns = [p for p, _, _ in CASES]
    published = [t for _, t, _ in CASES]
    got = deliveries(bus, patterns, published)
    for index, (pattern, topic, expected) in enumerate(CASES):
        assert (index in got[index]) is expected, (pattern, topic)
        # Every other pairing of the table must follow the reference too,
        # in publish order.
        assert got[index] == [i for i, t in enumerate(published) if topics.matches(pattern, t)]


# ---- random patterns and topics over a small alphabet ----

@pytest.fixture(scope="module")
def shared_bus(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("topics") / "bus.sock")
    with busx.Broker(unix_path=path) as broker, busx.connect(broker.url) as client:
        yield client


TOKENS = ["a", "b", "c"]
first_tokens = st.sampled_from(TOKENS + ["_INBOX"])
random_topics = st.tuples(first_tokens, st.lists(st.sampled_from(TOKENS), max_size=3)).map(
    lambda parts: ".".join([parts[0], *parts[1]])).filter(topics.is_valid_topic)
pattern_tokens = st.sampled_from(TOKENS + ["*"])
random_patterns = st.one_of(st.just(">"), st.tuples(
    st.one_of(first_tokens, st.just("*")), st.lists(pattern_tokens, max_size=3),
    st.booleans()).map(lambda parts: ".".join([parts[0], *parts[1]] + ([">"] if parts[2] else []))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns=st.lists(random_patterns, min_size=1, max_size=8),
       published=st.lists(random_topics, min_size=1, max_size=20))
def test_broker_routing_equals_reference(shared_bus, patterns, published):
    got = deliveries(shared_bus, patterns, published)
    expected = [[i for i, t in enumerate(published) if topics.matches(p, t)] for p in patterns]
    assert got == expected


# ---- the route cache growing ----

def test_routes_hold_while_the_route_cache_grows(broker):
    # Past 8,192 subscriptions the cache grows fourfold and drops its
    # entries, the one a publisher remembers for its last topic included.
    with busx.connect(broker.url) as subscriber, busx.connect(broker.url) as publisher:
        first = subscriber.subscribe("fleet.0.temp")
        publisher.publish("fleet.0.temp", 0)
        assert first.recv(timeout=5).data == 0
        entries = broker.stats()["route_cache_entries"]
        fleet = [subscriber.subscribe(f"fleet.{i}.temp") for i in range(1, entries + 1)]
        second = subscriber.subscribe("fleet.0.temp")
        subscriber.flush(timeout=30)
        assert broker.stats()["route_cache_entries"] == 4 * entries
        publisher.publish("fleet.0.temp", 1)            # the remembered route, looked up anew
        for i in (1, entries // 2, entries):
            publisher.publish(f"fleet.{i}.temp", i)
        publisher.flush(timeout=5)
        assert [first.recv(timeout=5).data, second.recv(timeout=5).data] == [1, 1]
        assert [fleet[i - 1].recv(timeout=5).data for i in (1, entries // 2, entries)] == [
            1, entries // 2, entries]


def test_the_route_cache_stops_growing_at_its_bound(broker):
    # 262,144 entries (34 MiB, docs/guarantees.md) however many subscribe.
    peer = RawPeer(broker, "unix")
    peer.handshake()
    for held in (80_000, 160_000, 240_000):
        peer.send(b"".join(protocol.encode_frame(protocol.SUB, f"cap.{i}.t".encode(), id=i + 1)
                           for i in range(held - 80_000, held)))
        wait_for(lambda want=held: broker.stats()["subscriptions"] == want, timeout=30)
        assert broker.stats()["route_cache_entries"] == 262_144
    with busx.connect(broker.url) as bus:
        sub = bus.subscribe("cap.1.t")
        bus.publish("cap.239999.t", "not for sub")
        bus.publish("cap.1.t", "routed")
        assert sub.recv(timeout=5).data == "routed"


# ---- the broker's look-ahead ----
# The broker hashes the topics of the frames after the one it routes, and
# routes each with its own frame's hash: also when frames follow the CONNECT
# in the same read, and when SUB frames (which may grow the cache) sit
# between PUB frames.

def test_frames_pipelined_behind_the_handshake_route_by_their_own_topics(broker):
    with busx.connect(broker.url) as subscriber:
        sub = subscriber.subscribe("pipe.>")
        subscriber.flush(timeout=5)
        peer = RawPeer(broker, "unix")
        peer.read_hello()
        topics_sent = [f"pipe.{i % 7}.{i}" for i in range(60)] + ["pipe.same"] * 5
        peer.send(protocol.PREAMBLE
                  + protocol.encode_frame(protocol.CONNECT, payload=pack({"heartbeats": True}))
                  + b"".join(protocol.encode_frame(protocol.PUB, topic.encode(), pack(n))
                             for n, topic in enumerate(topics_sent)))
        got = [sub.recv(timeout=5) for _ in topics_sent]
        assert [(m.topic, m.data) for m in got] == list(zip(topics_sent, range(len(topics_sent))))


def test_subscriptions_between_publishes_in_one_read(broker):
    entries = broker.stats()["route_cache_entries"]
    with busx.connect(broker.url) as subscriber:
        sub = subscriber.subscribe("mix.>")
        subscriber.flush(timeout=5)
        peer = RawPeer(broker, "unix")
        peer.handshake()
        frames = []
        for i in range(entries + 40):       # the SUBs grow the route cache mid-read
            frames.append(protocol.encode_frame(protocol.SUB, f"mine.{i}".encode(), id=i + 1))
            if i % 1000 == 0 or i >= entries:
                frames.append(protocol.encode_frame(protocol.PUB, f"mix.{i}".encode(), pack(i)))
        peer.send(b"".join(frames))
        expected = [i for i in range(entries + 40) if i % 1000 == 0 or i >= entries]
        assert [sub.recv(timeout=10).data for _ in expected] == expected
        assert broker.stats()["route_cache_entries"] == 4 * entries


# ---- the route cache under subscription churn ----
# The broker caches each topic's matches and remembers, per publisher, the
# last topic's; a subscription change must reach both at once (a literal
# pattern's own entry, or every entry for a wildcard). Publish, change,
# publish the same topics again: each message reaches exactly the
# subscriptions active when it was published.

@pytest.fixture(scope="module")
def churn_pair(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("churn") / "bus.sock")
    with busx.Broker(unix_path=path) as broker, busx.connect(broker.url) as subscriber, \
            busx.connect(broker.url) as publisher:
        yield subscriber, publisher


churn_steps = st.lists(st.one_of(
    st.tuples(st.just("sub"), st.one_of(random_patterns, random_topics)),
    st.tuples(st.just("unsub"), st.integers(0, 7)),
    st.tuples(st.just("pub"), st.lists(random_topics, min_size=1, max_size=4))),
    min_size=1, max_size=25)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=churn_steps)
@example(steps=[("pub", ["a.b"]), ("sub", "a.b"), ("pub", ["a.b"]), ("unsub", 0),
                ("pub", ["a.b"])])                                  # a literal's own entry
@example(steps=[("pub", ["a.b", "a.c"]), ("sub", "a.*"), ("pub", ["a.c", "a.b"]),
                ("unsub", 0), ("pub", ["a.b"])])                    # every entry, lazily
def test_routing_follows_subscription_churn(churn_pair, steps):
    subscriber, publisher = churn_pair
    active = []             # (pattern, Subscription) in subscription order
    try:
        for action, argument in steps:
            if action == "sub":
                active.append((argument, subscriber.subscribe(argument)))
            elif action == "unsub" and active:
                _, sub = active.pop(argument % len(active))
                sub.unsubscribe()
            elif action == "pub":
                for topic in argument:
                    publisher.publish(topic, topic)
                publisher.flush(timeout=5)
                subscriber.flush(timeout=5)
                for pattern, sub in active:
                    got = [m.topic for m in drain(sub)]
                    assert got == [t for t in argument if topics.matches(pattern, t)], pattern
    finally:
        for _, sub in active:
            sub.unsubscribe()
