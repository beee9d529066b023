"""The compiled codec (busx._core) against its pure-Python twin
(busx.protocol): the same bytes out of both encoders, the same frames out of
both decoders however the stream is cut, and the same refusals of bad input."""

import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import busx
from busx import _core, protocol

DECODERS = [_core.FrameDecoder, protocol.FrameDecoder]
ENCODERS = [_core.encode_frame, protocol.encode_frame]
codec_settings = settings(max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])


def random_bytes(size_and_seed):
    size, seed = size_and_seed
    return random.Random(seed).randbytes(size)


names = st.binary(max_size=protocol.MAX_NAME)
small_payloads = st.binary(max_size=64)
# Drawing 300 kB through st.binary is slow; a seeded generator is not.
large_payloads = st.tuples(st.integers(0, 300_000), st.integers()).map(random_bytes)


def frames(payloads):
    return st.builds(
        protocol.Frame,
        kind=st.integers(1, protocol.KIND_LIMIT - 1), flags=st.integers(0, 255),
        id=st.integers(0, 2**32 - 1), topic=names, reply=names, stamp=names,
        payload=payloads, nfds=st.integers(0, protocol.MAX_FDS_ON_WIRE),
        fds_lost=st.integers(0, 255))


def encode(encoder, frame):
    return encoder(frame.kind, frame.topic, frame.payload, id=frame.id, flags=frame.flags,
                   reply=frame.reply, stamp=frame.stamp, nfds=frame.nfds,
                   fds_lost=frame.fds_lost)


def encode_both(batch):
    """Encode with both encoders, which must agree byte for byte."""
    compiled = b"".join(encode(_core.encode_frame, f) for f in batch)
    reference = b"".join(encode(protocol.encode_frame, f) for f in batch)
    assert compiled == reference
    return compiled


def cut(data, points):
    """data split at the given offsets (any order, duplicates allowed)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def feed_both(chunks, max_frame=protocol.DEFAULT_MAX_FRAME):
    """Feed the chunks to both decoders in lockstep; both must agree on every
    chunk: the same frames, the same `buffered`, or both a ProtocolError.
    Returns the frames and whether they failed."""
    decoders = [make(max_frame) for make in DECODERS]
    got = []
    for chunk in chunks:
        outcomes = []
        for decoder in decoders:
            try:
                outcomes.append(decoder.feed(chunk))
            except busx.ProtocolError:
                outcomes.append("error")
        assert outcomes[0] == outcomes[1]
        if outcomes[0] == "error":
            for decoder in decoders:        # a failed decoder keeps failing
                with pytest.raises(busx.ProtocolError):
                    decoder.feed(b"")
            return got, True
        got += outcomes[0]
        assert decoders[0].buffered == decoders[1].buffered
    return got, False


@codec_settings
@given(batch=st.lists(frames(st.one_of(small_payloads, large_payloads)), max_size=12),
       points=st.lists(st.integers(min_value=0), max_size=40))
def test_random_batches_survive_random_splits(batch, points):
    stream = encode_both(batch)
    assert len(stream) == sum(protocol.HEADER_SIZE + len(f.topic) + len(f.reply)
                              + len(f.stamp) + len(f.payload) for f in batch)
    got, failed = feed_both(cut(stream, points))
    assert not failed
    assert got == batch


@codec_settings
@given(batch=st.lists(frames(small_payloads), max_size=6))
def test_random_batches_fed_one_byte_at_a_time(batch):
    stream = encode_both(batch)
    got, failed = feed_both([stream[i:i + 1] for i in range(len(stream))])
    assert not failed
    assert got == batch


def test_whole_stream_in_one_chunk_and_empty_chunks():
    batch = [protocol.Frame(k, 0, k, b"t", b"", b"", b"p" * k, 0, 0)
             for k in range(1, protocol.KIND_LIMIT)]
    stream = encode_both(batch)
    got, failed = feed_both([b"", stream, b"", b""])
    assert (got, failed) == (batch, False)


# ---- hostile bytes ----

def mutate(data_and_edits):
    data, edits = data_and_edits
    data = bytearray(data)
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    return bytes(data)


valid_streams = st.lists(frames(small_payloads), max_size=5).map(
    lambda batch: b"".join(encode(protocol.encode_frame, f) for f in batch))
garbage = st.one_of(
    st.binary(max_size=2000),
    # Valid streams with a few bytes overwritten reach the header checks and
    # the body far more often than pure noise, whose length is mostly absurd.
    st.tuples(valid_streams, st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)),
                                      min_size=1, max_size=4)).map(mutate))


@codec_settings
@given(data=garbage, points=st.lists(st.integers(min_value=0), max_size=20),
       max_frame=st.sampled_from([protocol.HEADER_SIZE, 300, 4096, protocol.DEFAULT_MAX_FRAME]))
def test_garbage_gets_the_same_answer_from_both_decoders(data, points, max_frame):
    feed_both(cut(data, points), max_frame)


def header(size, kind=protocol.PUB, flags=0, topic_len=0, reply_len=0, stamp_len=0, nfds=0,
           fds_lost=0, reserved=0, frame_id=0):
    return protocol.HEADER.pack(size, kind, flags, topic_len, reply_len, stamp_len, nfds,
                                fds_lost, reserved, frame_id)


def fails_at(decoder, data):
    """Feed data one byte at a time; return the offset of the byte that made
    the decoder raise ProtocolError, or None."""
    for i in range(len(data)):
        try:
            decoder.feed(data[i:i + 1])
        except busx.ProtocolError:
            return i
    return None


@pytest.mark.parametrize("make", DECODERS, ids=["cython", "python"])
@pytest.mark.parametrize("size_field", [0xFFFFFFFF, 1001 - 4, 1 << 31])
def test_oversize_length_is_refused_on_its_fourth_byte(make, size_field):
    decoder = make(1000)
    assert fails_at(decoder, struct.pack("<I", size_field) + b"\0" * 64) == 3
    assert decoder.buffered <= 4    # no body was taken in


@pytest.mark.parametrize("make", DECODERS, ids=["cython", "python"])
def test_frame_of_exactly_max_frame_is_accepted(make):
    decoder = make(1000)
    frame = protocol.encode_frame(protocol.PUB, b"t", b"x" * (1000 - protocol.HEADER_SIZE - 1))
    assert len(frame) == 1000
    assert [f.payload for f in decoder.feed(frame)] == [b"x" * 983]


@pytest.mark.parametrize("make", DECODERS, ids=["cython", "python"])
@pytest.mark.parametrize("size_field", range(protocol.HEADER_SIZE - 4))
def test_size_below_the_header_is_refused_on_its_fourth_byte(make, size_field):
    assert fails_at(make(), struct.pack("<I", size_field) + b"\0" * 32) == 3


@pytest.mark.parametrize("make", DECODERS, ids=["cython", "python"])
@pytest.mark.parametrize("fields", [
    {"reserved": 1}, {"reserved": 0x80}, {"kind": 0}, {"kind": protocol.KIND_LIMIT},
    {"kind": 255}, {"topic_len": 1},
    {"size": 12 + 200, "topic_len": 100, "reply_len": 100, "stamp_len": 1},
    {"nfds": protocol.MAX_FDS_ON_WIRE + 1}, {"nfds": 255},
], ids=repr)
def test_malformed_header_is_refused_on_its_last_byte(make, fields):
    data = header(**{"size": 12, **fields}) + b"\0" * 300
    assert fails_at(make(), data) == protocol.HEADER_SIZE - 1


@pytest.mark.parametrize("make", DECODERS, ids=["cython", "python"])
def test_edge_headers_that_are_valid(make):
    decoder = make()
    sections = header(12 + 3, topic_len=1, reply_len=1, stamp_len=1,
                      nfds=protocol.MAX_FDS_ON_WIRE) + b"trs"
    minimal = header(12, kind=protocol.KIND_LIMIT - 1, frame_id=0xFFFFFFFF)
    assert decoder.feed(sections + minimal) == [
        protocol.Frame(protocol.PUB, 0, 0, b"t", b"r", b"s", b"", protocol.MAX_FDS_ON_WIRE, 0),
        protocol.Frame(protocol.KIND_LIMIT - 1, 0, 0xFFFFFFFF, b"", b"", b"", b"", 0, 0)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("make", DECODERS, ids=["cython", "python"])
def test_a_failed_decoder_keeps_raising(make):
    decoder = make()
    good = protocol.encode_frame(protocol.PUB, b"a", b"b")
    assert len(decoder.feed(good)) == 1
    with pytest.raises(busx.ProtocolError):
        decoder.feed(header(12, kind=0))
    for data in (b"", good, good * 3):
        with pytest.raises(busx.ProtocolError):
            decoder.feed(data)


@pytest.mark.parametrize("encoder", ENCODERS, ids=["cython", "python"])
@pytest.mark.parametrize("name", ["topic", "reply", "stamp"])
def test_encoders_refuse_names_over_255_bytes(encoder, name):
    assert len(encoder(protocol.PUB, **{name: b"x" * 255})) == protocol.HEADER_SIZE + 255
    with pytest.raises(ValueError):
        encoder(protocol.PUB, **{name: b"x" * 256})


def test_the_python_oracle_and_the_core_agree_on_the_wire_constants():
    # busx.protocol states the wire independently of the C level, so that it
    # can judge it; the two must state the same facts.
    assert _core.WIRE == {"preamble": protocol.PREAMBLE, "header_size": protocol.HEADER_SIZE,
                          "max_name": protocol.MAX_NAME,
                          "max_fds_per_frame": protocol.MAX_FDS_PER_FRAME,
                          "max_fds_on_wire": protocol.MAX_FDS_ON_WIRE}
    kinds = {kind.name.removeprefix("K_"): kind.value for kind in _core.FrameKind}
    assert kinds == {name: getattr(protocol, name) for name in kinds}
    assert _core.FrameFlag.F_FATAL == protocol.FATAL
    assert _core.FrameFlag.F_PAYLOAD_FD == protocol.PAYLOAD_FD


@pytest.mark.parametrize("fatal", [True, False])
def test_the_core_builds_error_frames_as_the_oracle_would(fatal):
    frame = _core.error_frame("auth", "wrong token: é", fatal=fatal, ref=7)
    expected = protocol.encode_frame(
        protocol.ERROR, payload=msgpack.packb({"code": "auth", "message": "wrong token: é"}),
        id=7, flags=protocol.FATAL if fatal else 0)
    assert frame == expected
