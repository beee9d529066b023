# The connection room: one client's state as the broker holds it - where
# its handshake stands, its read and write buffers with their stream
# offsets, the fds that came with its frames or wait to go with them, its
# subscriptions and counters - and the rules that read only that state.
#
# Threads: a Conn belongs to the broker's loop thread (holding state_lock).
# BrokerLoop creates and frees it; BrokerLoop and the delivery room change it.

cdef enum ConnState:
    CS_PREAMBLE = 0     # waiting for the client's 8-byte preamble
    CS_CONNECT = 1      # waiting for its CONNECT frame
    CS_READY = 2
    CS_CLOSING = 3      # fatal error sent: write what is queued, then close
    CS_CLOSED = 4

cdef enum:
    # fds a connection may have sent ahead of the frame that claims them:
    # one frame's worth (docs/protocol.md, fd passing).
    MAX_FDS_AHEAD = MAX_FDS_ON_WIRE


cdef struct Conn:
    int fd
    uint32_t id
    int state
    bint is_unix
    bint dirty              # on the broker's dirty list: has output to try
    bint want_out           # EPOLLOUT armed
    bint owes_drop_report   # some subscription has drops to report
    bint payload_fds        # takes large payloads as memfds (said so in CONNECT)
    # Payload bytes in memfds queued or sent to this client and not yet
    # reported received (K_RECEIVED): they count against max_pending.
    size_t fd_bytes_unreceived
    # Payload bytes in memfds taken from this client's PUBs and not yet
    # reported to it (it counts them against its max_buffer until then).
    size_t fd_bytes_taken
    # CS_CLOSING: closed at close_by at the latest. Its last words written,
    # the broker shuts down its side (lingering) and discards what the peer
    # still sends until the peer closes too: closing a socket with unread
    # input resets it, and a reset drops what the kernel has not yet sent.
    double close_by
    bint lingering          # SHUT_WR done: waiting for the peer's EOF
    bint peer_closed        # EOF read: nothing more can arrive
    Buffer rbuf
    Buffer wbuf
    unsigned long long wbuf_sent    # bytes ever sent: wbuf.data[wbuf.start] is byte wbuf_sent
    unsigned long long next_frame   # stream offset of the first frame not yet begun on the wire
    # in_fds: received, waiting for their PUB frame; each one's offset is the
    # stream offset where the recv that brought it ended (see _fds_until).
    FdQueue in_fds
    unsigned long long stream_in    # bytes received: rbuf's end is this stream offset
    FdQueue out_fds         # duplicates waiting to travel with their MSG frame
    char stamp[255]
    uint8_t stamp_len
    # Payload bytes in memfds sent to this client (out of out_fds) and not
    # yet reported received: a K_RECEIVED counts for at most these.
    size_t fd_bytes_sent
    unsigned long long msgs_in, msgs_out, bytes_in, bytes_out, dropped
    Subscription **subs        # dense; each knows its conn_index
    size_t nsubs, subs_cap
    SidTable sids              # the same subscriptions by id
    Verdicts verdicts          # policy only: publish verdicts by topic
    unsigned long long denials_untold   # denials not reported while output was full
    # Not read while its unsent output exceeds max_pending and its next
    # frame asks for an answer (SPEC.md, Limits: control replies).
    bint input_paused
    double opened_at           # handshake_timeout counts from here
    Conn *hs_next              # the handshake queue, oldest first (until READY)
    Conn *hs_prev
    # The last topic this connection published to, already validated,
    # allowed and routed: publishers mostly repeat their topic.
    char last_topic[255]
    uint8_t last_topic_len
    RouteSlot *last_slot       # valid while slot_current(router, last_slot, last_version)
    unsigned long long last_version
    Conn *next_dirty
    bint backlogged            # has whole frames left over from its last turn
    Conn *next_backlog
    Conn *next_dead
    size_t slot


cdef inline size_t pending_bytes(const Conn *c) noexcept nogil:
    """What c's subscriber has yet to take: queued bytes and memfd payloads."""
    return buf_len(&c.wbuf) + c.fd_bytes_unreceived


cdef inline unsigned long long stream_end(Conn *c) noexcept nogil:
    """Stream offset one past the last byte queued for c."""
    return c.wbuf_sent + buf_len(&c.wbuf)


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
