"""msg.data's decoder is held to msgpack.unpackb: same values, same errors."""

import math
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busx._core import decode


def reference(raw):
    return msgpack.unpackb(raw, strict_map_key=False)


def outcome(function, raw):
    try:
        return ("ok", function(raw))
    except Exception as exc:            # the error type is part of the contract
        return ("error", type(exc))


def same(a, b):
    """Equality that also treats NaN as equal to NaN and checks types."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text() | st.binary())
values = st.recursive(
    scalars,
    lambda children: st.lists(children) | st.dictionaries(
        st.text() | st.integers(-(2**63), 2**64 - 1) | st.binary(), children),
    max_leaves=40)


@settings(max_examples=800)
@given(values)
def test_packed_values_decode_like_msgpack(value):
    raw = msgpack.packb(value)
    assert same(decode(raw), reference(raw))


@settings(max_examples=800)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_fail_like_msgpack(raw):
    mine, theirs = outcome(decode, raw), outcome(reference, raw)
    assert mine[0] == theirs[0]
    if mine[0] == "ok":
        assert same(mine[1], theirs[1])
    else:
        assert mine[1] is theirs[1]


@settings(max_examples=300)
@given(values, st.data())
def test_truncated_and_extended_payloads(value, data):
    raw = msgpack.packb(value)
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (raw[:cut], raw + b"\xc0"):
        mine, theirs = outcome(decode, candidate), outcome(reference, candidate)
        assert mine[0] == theirs[0] and (mine[0] == "error" or same(mine[1], theirs[1]))


@pytest.mark.parametrize("raw", [
    msgpack.packb(msgpack.ExtType(5, b"abc")),
    msgpack.packb(msgpack.Timestamp(1, 2)),
    struct.pack(">Bf", 0xCA, 1.5),                     # float32
    b"\x81\x91\x01\x02",                               # {[1]: 2}: list key
    b"\x81\x80\x01",                                   # {{}: 1}: dict key
    b"\xa2\xff\xfe",                                   # invalid UTF-8
    b"\xc1",                                           # never used
    b"\x91" * 100 + b"\xc0",                           # nested deeper than the fast path goes
    b"\xdd\xff\xff\xff\xff",                           # array claiming 4 billion items
])
def test_unusual_payloads_match_msgpack(raw):
    mine, theirs = outcome(decode, raw), outcome(reference, raw)
    assert mine[0] == theirs[0]
    assert same(mine[1], theirs[1]) if mine[0] == "ok" else mine[1] is theirs[1]
