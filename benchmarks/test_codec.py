"""Frame encode/decode: the compiled codec (busx._core) beside the pure-Python
reference (busx.protocol) it is tested against."""

import msgpack
import pytest
from peers import SMALL_DICT

from busx import _core, protocol

CODECS = {"core": _core, "protocol": protocol}
PAYLOAD = msgpack.packb(SMALL_DICT)
BATCH_FRAMES = 1000


@pytest.fixture(params=CODECS)
def codec(request):
    return CODECS[request.param]


def test_encode_one_frame(benchmark, codec):
    frame = benchmark(codec.encode_frame, protocol.PUB, b"bench.data", PAYLOAD)
    assert frame == protocol.encode_frame(protocol.PUB, b"bench.data", PAYLOAD)


def test_decode_batch(benchmark, codec):
    """Feed 1000 back-to-back 100-byte-payload frames in one chunk, as a
    socket read delivers them."""
    batch = protocol.encode_frame(protocol.MSG, b"bench.data", PAYLOAD, stamp=b"s") * BATCH_FRAMES
    frames = benchmark(lambda: codec.FrameDecoder().feed(batch))
    assert len(frames) == BATCH_FRAMES and frames[-1].payload == PAYLOAD
    benchmark.extra_info["frames_per_call"] = BATCH_FRAMES
