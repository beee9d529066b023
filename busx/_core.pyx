# cython: language_level=3, embedsignature=True
"""busx's compiled core: framing, buffers, routing, and the broker's and
client's event loops. Everything on the message path runs without the GIL;
busx.broker and busx.client are the Python faces over it. The layouts of
its structs and classes, with who owns each field, are in _core.pxd; the
behaviour is in the rooms included below, one job each."""

from libc.limits cimport INT_MAX
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, malloc, realloc, free, qsort
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcpy, memmove, memcmp, memset, strlen

from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject

from busx.includes.system cimport *

import os
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
include "_tls.pxi"
include "_frames.pxi"
include "_topics.pxi"
include "_router.pxi"
include "_verdicts.pxi"
include "_conn.pxi"
include "_delivery.pxi"
include "_nats.pxi"
include "_message.pxi"
include "_msgpack.pxi"
include "_pack.pxi"
include "_outbox.pxi"
include "_inbox.pxi"
include "_broker.pxi"
include "_link.pxi"
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


# The round-trip tracer's stages, by their number (includes/trace.h).
TRACE_STAGES = ("mark", "publish", "client send", "broker read", "broker send", "client read",
                "taken")


def trace(bint on):
    """Turn the round-trip tracer on (emptied) or off: while on, each stage a
    message passes in this process is stamped with CLOCK_MONOTONIC
    (includes/trace.h; benchmarks/trace_round_trip.py reads them)."""
    global busx_tracing, busx_trace_cursor
    if on:
        busx_trace_cursor = 0
    busx_tracing = on


def trace_mark():
    """Stamp a "mark" of the caller's own, e.g. before and after a round trip."""
    busx_trace(BUSX_TRACE_MARK)


def trace_events():
    """The tracer's stamps, oldest first (the last 65,536 at most): a list of
    (nanoseconds, thread id, stage name)."""
    cdef uint64_t end = busx_trace_cursor
    cdef uint64_t first = end - min(end, <uint64_t>BUSX_TRACE_CAPACITY)
    cdef busx_trace_event *e
    events = []
    for i in range(first, end):
        e = &busx_trace_ring[i % BUSX_TRACE_CAPACITY]
        events.append((e.ns, e.thread, TRACE_STAGES[e.stage]))
    return events


# The wire facts the C level is built on. busx.protocol, the tests' oracle,
# states them independently; tests/test_frames.py holds the two equal.
WIRE = {"preamble": PREAMBLE_BYTES[:PREAMBLE_SIZE], "header_size": HEADER_SIZE,
        "max_name": MAX_NAME, "max_fds_per_frame": MAX_FDS_PER_FRAME,
        "max_fds_on_wire": MAX_FDS_ON_WIRE}
