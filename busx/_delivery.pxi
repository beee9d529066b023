# The delivery room: one routed message onto one subscriber's connection -
# its MSG frame into the write buffer, duplicates of its fds, its memfd
# payload passed on or read for an inline copy - within that subscriber's
# bounds (max_pending bytes, max_pending_fds fds) and the broker-wide budget
# of memfd bytes in flight; past a bound, the slow-consumer policy. It also
# keeps the accounts those bounds are made of: memfd bytes acknowledged
# (K_RECEIVED), frames discarded unsent, drops reported (K_DROPPED).
#
# It queues and counts; it never closes a connection or touches epoll: what
# a delivery asks of the loop (write, or cut the subscriber off) it returns.
#
# Threads: the broker's loop thread, holding state_lock, like the Conns.


cdef int deliver(Delivery *d, Subscription *s, Conn *src, FrameView *f, int *fds,
                 FdPayload *big) noexcept nogil:
    """Queue f, published by src, for subscription s: a DeliveryResult."""
    cdef Conn *dst = <Conn *>s.conn
    cdef const char *payload = f.payload
    cdef size_t payload_len = f.payload_len if big.fd < 0 else big.size
    cdef size_t size = frame_size(f.topic_len, f.reply_len, src.stamp_len, payload_len)
    cdef size_t pending = pending_bytes(dst)
    cdef int user_fds = f.nfds - (big.fd >= 0)
    cdef int k, copy
    cdef uint8_t flags = 0
    cdef uint8_t sent_fds = 0
    cdef bint by_fd
    cdef int lost_fds = f.fds_lost     # lost on the publisher's side (TCP)
    if dst.state != CS_READY:
        return NOT_READY
    if (pending and pending + size > d.max_pending) or (
            dst.is_unix and f.nfds
            and fdq_len(&dst.out_fds) + f.nfds > d.max_pending_fds):
        return slow_consumer(d, dst, s)
    by_fd = (big.fd >= 0 and dst.payload_fds
             and d.payload_fd_bytes + big.size <= d.payload_fd_budget)
    if big.fd >= 0 and not by_fd and not load_payload(d, big):
        return PAYLOAD_UNREADABLE   # before any fd is queued: they would ride the error
    if dst.is_unix:
        for k in range(user_fds):
            copy = fcntl(fds[k], F_DUPFD_CLOEXEC, 0)
            if copy < 0 or fdq_push(&dst.out_fds, stream_end(dst), copy) < 0:
                if copy >= 0:
                    close(copy)
                lost_fds += 1
            else:
                sent_fds += 1
    else:
        lost_fds += user_fds
    if big.fd >= 0:
        if by_fd and pass_payload_fd(d, dst, big):
            flags = F_PAYLOAD_FD
            payload_len = f.payload_len
            sent_fds += 1
        elif load_payload(d, big):
            payload = d.fd_payload.data
        else:
            return PAYLOAD_UNREADABLE
    if write_frame(&dst.wbuf, K_MSG, flags, s.sid, f.topic, f.topic_len, f.reply,
                   f.reply_len, src.stamp, src.stamp_len, payload, payload_len,
                   sent_fds, <uint8_t>min(lost_fds, 255)) < 0:
        return NO_MEMORY
    dst.msgs_out += 1
    d.totals.msgs_out += 1
    return DELIVERED


cdef int slow_consumer(Delivery *d, Conn *dst, Subscription *s) noexcept nogil:
    """dst is past a bound: cut it off (its unsent frames discarded, so the
    reason reaches it first), or drop this message for s and count it."""
    if d.disconnect_slow:
        discard_unsent(d, dst)
        d.totals.slow_consumer_cuts += 1
        return CUT_OFF
    s.dropped += 1
    s.dropped_unreported += 1
    dst.dropped += 1
    d.totals.dropped += 1
    dst.owes_drop_report = True
    return DROPPED


cdef bint pass_payload_fd(Delivery *d, Conn *dst, FdPayload *big) noexcept nogil:
    """Queue a duplicate of the payload memfd for dst, counted against its
    max_pending until dst reports it received."""
    cdef int copy = fcntl(big.fd, F_DUPFD_CLOEXEC, 0)
    if copy < 0:
        return False
    if fdq_push(&dst.out_fds, stream_end(dst), copy, big.size) < 0:
        close(copy)
        return False
    dst.fd_bytes_unreceived += big.size
    d.payload_fd_bytes += big.size
    dst.bytes_out += big.size
    d.totals.bytes_out += big.size
    return True


cdef bint load_payload(Delivery *d, FdPayload *big) noexcept nogil:
    """The memfd's bytes in fd_payload, read once per message, for the
    clients that take payloads inline (TCP, or out of fds)."""
    if big.loaded:
        return True
    d.fd_payload.start = d.fd_payload.end = 0
    if (buf_reserve(&d.fd_payload, big.size) < 0
            or read_payload_fd(big.fd, d.fd_payload.data, big.size) < 0):
        return False
    d.fd_payload.end = big.size
    big.loaded = True
    return True


cdef void unload_payload(Delivery *d, FdPayload *big) noexcept nogil:
    """After routing: give back what a large loaded payload took."""
    if big.loaded:
        d.fd_payload.start = d.fd_payload.end = 0
        buf_shrink(&d.fd_payload, READ_CHUNK)


cdef void discard_unsent(Delivery *d, Conn *c) noexcept nogil:
    """Drop every queued frame not yet begun on the wire (counting the
    messages among them), so a stalled client's last words - why it is
    being closed - are not stuck behind max_pending bytes."""
    cdef unsigned long long at = c.next_frame
    cdef unsigned long long end = stream_end(c)
    cdef const char *frame
    cdef size_t held = c.out_fds.held
    while at < end:
        frame = c.wbuf.data + c.wbuf.start + (at - c.wbuf_sent)
        if frame[4] == K_MSG:
            c.dropped += 1
            d.totals.dropped += 1
        at += busx_load_u32(frame) + 4
    c.wbuf.end = c.wbuf.start + (c.next_frame - c.wbuf_sent)
    fdq_close_from(&c.out_fds, c.next_frame)
    fd_bytes_gone(d, c, held - c.out_fds.held)


cdef void fd_bytes_received(Delivery *d, Conn *c, unsigned long long n) noexcept nogil:
    """c reports n bytes of payload memfds received: at most what was sent
    to it counts, so a client cannot ack its way past max_pending."""
    n = min(n, <unsigned long long>c.fd_bytes_sent)
    c.fd_bytes_sent -= n
    fd_bytes_gone(d, c, n)


cdef inline void fd_bytes_gone(Delivery *d, Conn *c, size_t n) noexcept nogil:
    """n bytes of c's payload memfds are no longer in flight: received, or
    never to be sent."""
    n = min(n, c.fd_bytes_unreceived)
    c.fd_bytes_unreceived -= n
    d.payload_fd_bytes -= n


cdef bint report_drops(Conn *c) noexcept nogil:
    """Queue a DROPPED frame for each of c's subscriptions with drops not
    yet told; False when memory runs out (the rest are told next time)."""
    cdef char count[9]
    cdef size_t i
    cdef Subscription *s
    cdef unsigned long long n
    cdef int shift
    for i in range(c.nsubs):
        s = c.subs[i]
        if s.dropped_unreported == 0:
            continue
        n = s.dropped_unreported
        count[0] = <char>0xcf       # msgpack uint64, big-endian
        for shift in range(8):
            count[1 + shift] = <char>((n >> (56 - 8 * shift)) & 0xff)
        if write_frame(&c.wbuf, K_DROPPED, 0, s.sid, NULL, 0, NULL, 0, NULL, 0,
                       count, 9, 0, 0) < 0:
            return False
        s.dropped_unreported = 0
    c.owes_drop_report = False
    return True
