# cython: language_level=3, embedsignature=True
"""busx's compiled core: framing, buffers, routing, and the broker's and
client's event loops. Everything on the message path runs without the GIL;
busx.broker and busx.client are the Python faces over it. The layouts of
its structs and classes, with who owns each field, are in _core.pxd; the
behaviour is in the rooms included below, one job each."""

from libc.limits cimport INT_MAX
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, malloc, realloc, free, qsort
from libc.string cimport memcpy, memmove, memcmp, memset, strlen

from cpython.exc cimport PyErr_CheckSignals

from busx.includes.system cimport *

import threading
import weakref

from busx.errors import (BusError, Closed, Disconnected, FdError, PayloadTooLarge,
                         ProtocolError, Timeout)
from busx.protocol import Frame
from busx.credentials import Credentials
from busx.topics import topic_bytes as validate_topic

cdef const char *PREAMBLE_BYTES = b"BUSX\x01\x00\x00\x00"

include "_buffers.pxi"
include "_poller.pxi"
include "_sockio.pxi"
include "_frames.pxi"
include "_topics.pxi"
include "_router.pxi"
include "_verdicts.pxi"
include "_conn.pxi"
include "_delivery.pxi"
include "_message.pxi"
include "_msgpack.pxi"
include "_pack.pxi"
include "_outbox.pxi"
include "_inbox.pxi"
include "_broker.pxi"
include "_client.pxi"

# Payloads of at least this many bytes travel in a sealed memfd over UNIX.
PAYLOAD_FD_THRESHOLD = PAYLOAD_FD_MIN


def debug_counters():
    """What the C level holds now, by kind: {} unless built with BUSX_DEBUG=1
    (includes/counters.h). The test suite checks each test gives it all back."""
    if not BUSX_COUNTING:
        return {}
    return {"buffer_bytes": busx_counter(BUSX_BUFFER_BYTES),
            "queued_fds": busx_counter(BUSX_QUEUED_FDS),
            "mappings": busx_counter(BUSX_MAPPINGS),
            "conns": busx_counter(BUSX_CONNS),
            "subscriptions": busx_counter(BUSX_SUBSCRIPTIONS),
            "pollers": busx_counter(BUSX_POLLERS)}


# The wire facts the C level is built on. busx.protocol, the tests' oracle,
# states them independently; tests/test_frames.py holds the two equal.
WIRE = {"preamble": PREAMBLE_BYTES[:PREAMBLE_SIZE], "header_size": HEADER_SIZE,
        "max_name": MAX_NAME, "max_fds_per_frame": MAX_FDS_PER_FRAME,
        "max_fds_on_wire": MAX_FDS_ON_WIRE}
