# The connection room: one client's state as the broker holds it - where
# its handshake stands, its read and write buffers with their stream
# offsets, the fds that came with its frames or wait to go with them, its
# subscriptions and counters - and the rules that read only that state.
#
# Threads: a Conn belongs to the broker's loop thread (holding state_lock).
# BrokerLoop creates and frees it; BrokerLoop and the delivery room change it.


cdef inline size_t pending_bytes(const Conn *c) noexcept nogil:
    """What c's subscriber has yet to take: queued bytes and memfd payloads."""
    return buf_len(&c.wbuf) + c.fd_bytes_unreceived


cdef inline bint wants_output(const Conn *c) noexcept nogil:
    """Whether c's socket must be watched for room: bytes are owed and the
    socket, not TLS waiting for the peer's next handshake message, holds
    them up; or TLS must write before it can read."""
    if c.tls_want == SSL_ERROR_WANT_WRITE:
        return True
    return buf_len(&c.wbuf) != 0 and c.tls_want != SSL_ERROR_WANT_READ


cdef inline unsigned long long stream_end(Conn *c) noexcept nogil:
    """Stream offset one past the last byte queued for c."""
    return c.wbuf_sent + buf_len(&c.wbuf)


cdef inline int heartbeat_verdict(const Conn *c, double now, double interval) noexcept nogil:
    """What c's silence calls for (SPEC.md, Heartbeats). Only clients that
    said in CONNECT that they answer PINGs are judged (older ones are left
    alone), and only once READY (before, handshake_timeout applies). The
    caller counts input the broker has not read yet as heard."""
    if c.state != CS_READY or not c.answers_pings:
        return HB_FINE
    if now - c.last_in_ms >= 3 * interval:
        return HB_DEAD
    if c.wbuf_sent < c.ping_end:
        return HB_FINE      # the last PING has not left yet: one is enough
    # Quiet either way: a one-way stream needs PINGs too, or the side that
    # only receives (its heartbeat off or longer) would never answer.
    if now - c.last_ping_ms >= interval and (now - c.last_in_ms >= interval
                                             or now - c.last_out_ms >= interval):
        return HB_PING
    return HB_FINE


# ---- which frame the fds a client sent belong to ----

cdef size_t fds_until(Conn *c, unsigned long long end) noexcept nogil:
    """How many of c's received fds came with a recv that ended at or before
    stream offset `end`. A client sends a frame that carries fds in a sendmsg
    of its own, holding that frame alone, and the kernel hands a sendmsg's
    fds to the recvmsg that takes its first byte, which then returns: so a
    frame's fds come with a recv that ends inside the frame (docs/protocol.md,
    fd passing)."""
    cdef size_t i
    for i in range(c.in_fds.head, c.in_fds.tail):
        if c.in_fds.items[i].offset > end:
            return i - c.in_fds.head
    return fdq_len(&c.in_fds)


cdef const char *fds_mismatch(Conn *c, FrameView *f) noexcept nogil:
    """NULL when the frame at the head of c's rbuf came with exactly the fds
    it declares; else what is wrong (malformed input: fds no frame declares,
    or declared fds that never came)."""
    cdef unsigned long long start = c.stream_in - buf_len(&c.rbuf)
    cdef size_t came
    if fds_until(c, start):
        return b"file descriptors arrived that no frame declares"
    came = fds_until(c, start + f.size)
    if came == f.nfds:
        return NULL
    if came < f.nfds:
        return b"frame announces more fds than arrived with it"
    return b"file descriptors arrived that no frame declares"


cdef bint holds_unclaimed_fds(Conn *c) noexcept nogil:
    """After a turn: fds held with no frame left to claim them, or more than
    the partial frame at the head of rbuf declares (malformed input). So a
    peer's stray fds cost the broker at most one frame's."""
    cdef size_t held = fdq_len(&c.in_fds)
    cdef size_t partial = buf_len(&c.rbuf)
    cdef size_t declared = MAX_FDS_AHEAD
    if held == 0 or c.input_paused or c.backlogged:
        return False
    if partial >= HEADER_SIZE:
        declared = <uint8_t>c.rbuf.data[c.rbuf.start + 9]
    return held > declared or fds_until(c, c.stream_in - partial) > 0
