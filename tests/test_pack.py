"""Bus.publish's packer is held to msgpack.packb: the same bytes for every
value, the same errors for what msgpack refuses."""

import collections
import datetime
import enum
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from busx._core import encode


def outcome(function, value):
    try:
        return ("ok", function(value))
    except Exception as exc:            # the error type is part of the contract
        return ("error", type(exc))


def assert_packs_like_msgpack(value):
    assert outcome(encode, value) == outcome(msgpack.packb, value)


# Integers beyond 64 bits and odd strings included: msgpack refuses those,
# and so must busx.
scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**65) | st.floats()
           | st.text() | st.binary() | st.binary().map(bytearray))
values = st.recursive(
    scalars,
    lambda children: (st.lists(children) | st.lists(children).map(tuple)
                      | st.dictionaries(st.text() | st.integers(-(2**63), 2**64 - 1)
                                        | st.binary() | st.booleans(), children)),
    max_leaves=40)


@settings(max_examples=1500)
@given(values)
def test_values_pack_like_msgpack(value):
    assert_packs_like_msgpack(value)


@pytest.mark.parametrize("value", [
    # every integer width at both edges
    0, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, 0xffffffff, 0x100000000, 2**63 - 1,
    2**63, 2**64 - 1, 2**64, -1, -32, -33, -0x80, -0x81, -0x8000, -0x8001,
    -0x80000000, -0x80000001, -(2**63), -(2**63) - 1,
    # every length header at both edges
    "x" * 31, "x" * 32, "x" * 255, "x" * 256, "x" * 65535, "x" * 65536,
    b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536,
    list(range(15)), list(range(16)), list(range(65536)),
    {i: i for i in range(15)}, {i: i for i in range(16)}, {i: i for i in range(65536)},
    math.nan, math.inf, -0.0, "é\u2603\U0001f600",
], ids=repr)
def test_edges_pack_like_msgpack(value):
    assert_packs_like_msgpack(value)


class Colour(enum.IntEnum):
    RED = 1


class Tagged(dict):
    pass


@pytest.mark.parametrize("value", [
    Colour.RED, Tagged(a=1), collections.OrderedDict(b=2), memoryview(b"abc"),
    msgpack.ExtType(5, b"xyz"), [1, {"deep": [Colour.RED]}],
    "\ud800",                                   # a lone surrogate: not UTF-8
    object(), {1, 2}, datetime.datetime(2026, 1, 1), 1j,
    {(1, 2): 3},                                # tuple keys pack as arrays
], ids=repr)
def test_what_the_fast_path_leaves_to_msgpack_packs_or_fails_the_same(value):
    assert_packs_like_msgpack(value)


def test_nesting_deeper_than_the_fast_path_packs_like_msgpack():
    deep = current = []
    for _ in range(100):
        current.append([])
        current = current[0]
    assert_packs_like_msgpack(deep)


def test_a_structure_containing_itself_fails_like_msgpack():
    loop = []
    loop.append(loop)
    assert outcome(encode, loop) == outcome(msgpack.packb, loop)
    assert outcome(encode, loop)[0] == "error"
