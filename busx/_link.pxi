# The broker's side of the NATS link: its connection as one more peer of
# the broker loop. Messages from the hub are routed to local subscribers;
# local messages someone elsewhere wants are written to the hub; local
# interest changes go out as LS+/LS-; the link is PINGed every heartbeat
# and given up after three silent ones. The wire format is _nats.pxi's;
# the handshake, the interest tables and reconnecting are busx.backbone's,
# called here (with the GIL) for control lines only.
#
# Threads: the broker loop's, holding state_lock; attach_link() takes
# state_lock from busx.backbone's connector thread (GIL released first).


cdef Conn *link_open(BrokerLoop loop, int fd, SSL *tls) noexcept nogil:
    """The link's new connection (TLS when tls), in the loop's table and
    its epoll set; NULL (fd and tls freed) when that fails."""
    cdef Conn *c = <Conn *>calloc(1, sizeof(Conn))
    if c == NULL:
        if tls != NULL:
            SSL_free(tls)
        close(fd)
        return NULL
    busx_count(BUSX_CONNS, 1)
    c.fd = fd
    c.tls = tls
    c.is_link = True
    c.state = CS_READY
    c.next_frame = <unsigned long long>-1   # no busx frames in its stream (_pass_frames)
    c.id = loop.next_id
    loop.next_id += 1
    c.opened_at = now_ms()
    c.last_in_ms = c.last_out_ms = c.opened_at
    if loop._keep_conn(c) < 0:
        if tls != NULL:
            SSL_free(tls)
        close(fd)
        free(c)
        busx_count(BUSX_CONNS, -1)
        return NULL
    if poller_add(&loop.poller, fd, EPOLLIN | EPOLLRDHUP, <uint64_t><uintptr_t>c) < 0:
        loop._close_conn(c)
        return NULL
    return c


cdef void link_attach(BrokerLoop loop, int fd, size_t max_payload, SSL *tls) noexcept nogil:
    """The connector has sent CONNECT on fd: announce our interest, PING
    (the hub's PONG ends its snapshot of interest: LINK_UP), read on."""
    cdef NatsLink *link = loop.link
    cdef Conn *c
    if link.conn != NULL:
        loop._close_conn(link.conn)
    c = link_open(loop, fd, tls)
    if c == NULL:
        link_py_down(loop, b"cannot register the link's socket")
        return
    link.conn = c
    link.state = LINK_JOINING
    link.max_payload = max_payload
    if link_py_hello(loop, c) < 0:
        link_lose(loop, b"could not announce this broker's interest")
        return
    link_ping(loop, 0, 0)
    loop._write(c)


cdef void link_up(BrokerLoop loop) noexcept nogil:
    """The hub answered our first PING: it holds our interest and we hold
    its snapshot. What waited in the outage buffer goes now, in order."""
    cdef NatsLink *link = loop.link
    link.state = LINK_UP
    if buf_len(&link.pending):
        if buf_append(&link.conn.wbuf, link.pending.data + link.pending.start, buf_len(&link.pending)) < 0:
            link_lose(loop, b"out of memory")
            return
        buf_free(&link.pending)
        loop._mark_dirty(link.conn)
    link_py_event(loop, b"up")


cdef void link_lose(BrokerLoop loop, const char *why) noexcept nogil:
    """Give the connection up (the connector reconnects): why is logged."""
    cdef NatsLink *link = loop.link
    if link.conn == NULL:
        return
    snprintf(link.why, sizeof(link.why), b"%s", why)
    loop._close_conn(link.conn)


cdef void link_closed(BrokerLoop loop, Conn *c) noexcept nogil:
    """_close_conn closed the link's connection. Its unsent bytes are lost
    (counted); interest stays known until the next snapshot replaces it,
    so messages for the backbone wait in the outage buffer meanwhile."""
    cdef NatsLink *link = loop.link
    if link == NULL or link.conn != c:
        return
    link.bytes_lost += buf_len(&c.wbuf)
    link.conn = NULL
    link.state = LINK_DOWN
    link.skip = 0
    if link.publishers_wait:
        link_drained(loop, NULL)    # an outage holds no one
    while link.pings_count:        # their flushes cannot learn more: answered now
        link_pong(loop)
    if not link.why[0]:
        snprintf(link.why, sizeof(link.why), b"the NATS server closed the connection")
    link_py_down(loop, link.why)
    link.why[0] = 0


cdef bint link_beat(BrokerLoop loop, Conn *c, double now) noexcept nogil:
    """Every heartbeat sweep: PING the hub once a heartbeat; give the link
    up after three heartbeats without a byte from it. False when it was
    closed (its slot in the table now holds another connection)."""
    cdef NatsLink *link = loop.link
    if now - c.last_in_ms >= 3 * loop.heartbeat_ms:
        link_lose(loop, b"no word from the NATS server for three heartbeats")
        return False
    if now - link.last_ping_ms >= loop.heartbeat_ms:
        link_ping(loop, 0, 0)
    return True


cdef bint link_ping(BrokerLoop loop, uint32_t conn_id, uint32_t ping_id) noexcept nogil:
    """PING the hub, for a client's backbone flush (conn_id, ping_id) or
    for ourselves (0, 0). False when too many PINGs are unanswered."""
    cdef NatsLink *link = loop.link
    cdef LinkPing *entry
    if link.conn == NULL or link.pings_count == NATS_MAX_PINGS:
        return False
    if buf_append(&link.conn.wbuf, b"PING\r\n", 6) < 0:
        return False
    entry = &link.pings[(link.pings_head + link.pings_count) % NATS_MAX_PINGS]
    entry.conn_id = conn_id
    entry.ping_id = ping_id
    link.pings_count += 1
    link.last_ping_ms = loop.turn_ms
    loop._mark_dirty(link.conn)
    return True


cdef void link_pong(BrokerLoop loop) noexcept nogil:
    """The hub answered our oldest PING: everything we sent before it is
    in the hub's hands. The first ends the joining; one for a client's
    backbone flush answers that flush."""
    cdef NatsLink *link = loop.link
    cdef LinkPing entry
    cdef size_t i
    cdef Conn *c
    if link.pings_count == 0:
        return          # not ours to count: ignored
    entry = link.pings[link.pings_head]
    link.pings_head = (link.pings_head + 1) % NATS_MAX_PINGS
    link.pings_count -= 1
    if link.state == LINK_JOINING:
        link_up(loop)
    if entry.conn_id == 0:
        return
    for i in range(loop.nconns):
        c = loop.conns[i]
        if c.id == entry.conn_id:
            if c.state == CS_READY:
                write_frame(&c.wbuf, K_PONG, 0, entry.ping_id, NULL, 0, NULL, 0, NULL, 0,
                            NULL, 0, 0, 0)
                loop._mark_dirty(c)
            return


# ---- from the hub ----

cdef void link_take(BrokerLoop loop, Conn *c) noexcept nogil:
    """Handle the whole lines and messages in c's input, within the turn's
    delivery budget (the rest waits for the next turn)."""
    cdef const char *p
    cdef const char *eol
    cdef size_t avail, line_len, used
    loop.budget = DELIVERY_BUDGET
    while c.state == CS_READY:
        if loop.budget <= 0:
            loop._defer(c)
            break
        p = c.rbuf.data + c.rbuf.start
        avail = buf_len(&c.rbuf)
        if loop.link.skip:          # the rest of a message too large to take
            used = min(avail, loop.link.skip)
            loop.link.skip -= used
            buf_consume(&c.rbuf, used)
            if loop.link.skip:
                break
            continue
        eol = <const char *>memchr(p, b'\n', min(avail, <size_t>NATS_MAX_CONTROL_LINE))
        if eol == NULL:
            if avail >= NATS_MAX_CONTROL_LINE:
                link_lose(loop, b"a line from the NATS server longer than 64 KiB")
            break
        used = eol - p + 1
        line_len = used - 1
        if line_len and p[line_len - 1] == b'\r':
            line_len -= 1
        if nats_op(p, line_len, b"LMSG", 4) or nats_op(p, line_len, b"HMSG", 4):
            used = link_message(loop, c, p, line_len, used, avail)
            if used == 0:
                break           # the rest has not arrived (or the link was lost)
        elif nats_op(p, line_len, b"PING", 4):
            buf_append(&c.wbuf, b"PONG\r\n", 6)
            loop._mark_dirty(c)
        elif nats_op(p, line_len, b"PONG", 4):
            link_pong(loop)
        else:
            loop.budget -= CONTROL_COST     # INFO, LS+, LS-, -ERR: Python's
            link_py_line(loop, p, line_len)
        if c.state != CS_READY:
            break
        buf_consume(&c.rbuf, used)
    if c.state != CS_CLOSED:
        buf_shrink(&c.rbuf, READ_CHUNK * 2)


cdef size_t link_message(BrokerLoop loop, Conn *c, const char *p, size_t line_len,
                         size_t head_len, size_t avail) noexcept nogil:
    """One LMSG/HMSG at p: the bytes it used, 0 when it has not all arrived
    or the link was lost over it. A message larger than this broker's
    max_frame (yet within the server's max_payload, so any NATS client may
    send one) is dropped alone: counted, and its bytes skipped as they come."""
    cdef NatsMsg m
    cdef size_t size
    if not nats_parse_msg(p + 4, line_len - 4, p[0] == b'H' or p[0] == b'h', &m):
        link_lose(loop, b"a malformed LMSG/HMSG line from the NATS server")
        return 0
    size = head_len + m.total_len + 2
    if m.total_len > loop.max_frame:
        if m.total_len > loop.link.max_payload:
            link_lose(loop, b"a message from the NATS server larger than its own max_payload")
            return 0
        loop.link.dropped_too_large += 1
        loop.link.skip = size - min(avail, size)
        return min(avail, size)
    if avail < size:
        return 0
    if p[size - 2] != b'\r' or p[size - 1] != b'\n':
        link_lose(loop, b"a message from the NATS server not ended by CRLF")
        return 0
    loop.budget -= 1
    link_route(loop, c, &m, p + head_len)
    return size


cdef void link_route(BrokerLoop loop, Conn *c, NatsMsg *m, const char *body) noexcept nogil:
    """Deliver a message from the hub to the local subscribers it names:
    every plain subscription that matches, and one member of each queue
    group the hub chose this broker for. Never back to the hub."""
    cdef NatsLink *link = loop.link
    cdef FrameView f
    cdef RouteSlot *slot
    cdef FdPayload inline_payload
    inline_payload.fd = -1
    inline_payload.loaded = False
    memset(&f, 0, sizeof(f))
    f.kind = K_PUB
    f.payload = body + m.hdr_len
    f.payload_len = m.total_len - m.hdr_len
    if m.subject_len > MAX_NAME or not loop._topic_ok(m.subject, m.subject_len):
        link.dropped_invalid += 1
        return
    f.topic = m.subject
    f.topic_len = <uint8_t>m.subject_len
    if m.reply != NULL and m.reply_len <= MAX_NAME and loop._topic_ok(m.reply, m.reply_len):
        f.reply = m.reply
        f.reply_len = <uint8_t>m.reply_len
    c.stamp_len = <uint8_t>nats_sender_stamp(link, body, m.hdr_len, &f.fds_lost)
    memcpy(c.stamp, link.remote_stamp, c.stamp_len)
    if frame_size(f.topic_len, f.reply_len, c.stamp_len, f.payload_len) > loop.max_frame:
        link.dropped_too_large += 1
        return
    if loop.check_publish and not link_py_may_deliver(loop, c, &f):
        link.dropped_denied += 1
        return
    link.msgs_in += 1
    link.bytes_in += f.payload_len
    slot = router_lookup(&loop.router, f.topic, f.topic_len)
    if slot == NULL:
        return
    loop._deliver_all(c, &f, slot, NULL, &inline_payload, m)


cdef bint nats_names_group(NatsMsg *m, Subscription *s) noexcept nogil:
    cdef int k
    for k in range(m.nqueues):
        if (m.queue_lens[k] == s.queue_len
                and memcmp(m.queues[k], s.queue_name, s.queue_len) == 0):
            return True
    return False


# ---- to the hub ----

cdef bint slot_has_group(RouteSlot *slot, Subscription *member) noexcept nogil:
    cdef size_t k
    for k in range(slot.nsubs):
        if same_queue(slot.subs[k], member):
            return True
    return False


cdef void link_send(BrokerLoop loop, Conn *src, FrameView *f, RouteSlot *local,
                    FdPayload *big) noexcept nogil:
    """A local message goes to the hub when someone elsewhere wants it (and
    nats_export lets it): plain interest, or a queue group with no member
    here (members here are preferred, and already have it). Past the
    server's max_payload, or nats_buffer, it is dropped and counted."""
    cdef NatsLink *link = loop.link
    cdef RouteSlot *remote
    cdef Subscription *queues[NATS_MAX_QUEUES]
    cdef int nqueues = 0
    cdef bint plain = False
    cdef size_t i = 0, payload_len
    cdef const char *payload
    cdef int user_fds = f.nfds - (big.fd >= 0)
    cdef Buffer *out
    if link.remote.subscriptions == 0:
        return
    remote = router_lookup(&link.remote, f.topic, f.topic_len)
    if remote == NULL:
        return
    while i < remote.nsubs:
        if remote.subs[i].queue == 0:
            plain = True
        elif (nqueues < NATS_MAX_QUEUES and not slot_has_group(local, remote.subs[i])
                and (nqueues == 0 or not same_queue(queues[nqueues - 1], remote.subs[i]))):
            queues[nqueues] = remote.subs[i]
            nqueues += 1
        i += 1
    if not plain and nqueues == 0:
        return
    if big.fd >= 0:
        if not load_payload(&loop.delivery, big):
            return
        payload, payload_len = loop.delivery.fd_payload.data, big.size
    else:
        payload, payload_len = f.payload, f.payload_len
    if nats_header_size(link, src.stamp_len, user_fds) + payload_len > link.max_payload:
        link.dropped_too_large += 1
        return
    out = &link.conn.wbuf if link.state == LINK_UP else &link.pending
    if buf_len(out) + payload_len > link.buffer_max:
        link.dropped_buffer_full += 1
        return
    if nats_write_msg(link, out, f.topic, f.topic_len, f.reply, f.reply_len, queues, nqueues,
                      src.stamp, src.stamp_len, user_fds + f.fds_lost,
                      payload, payload_len) < 0:
        link.dropped_buffer_full += 1
        return
    link.msgs_out += 1
    link.bytes_out += payload_len
    link.fds_lost += user_fds
    if link.state == LINK_UP:
        loop._mark_dirty(link.conn)
        if buf_len(out) > link.buffer_max // 2 and not src.waits_for_link:
            link_hold(loop, src)


cdef void link_hold(BrokerLoop loop, Conn *src) noexcept nogil:
    """src publishes what is wanted elsewhere faster than the NATS server
    takes it: it is not read until the link's queue drains (back-pressure,
    as NATS stalls fast producers), so a burst to a live link loses nothing.
    An outage never holds anyone: the buffer drops and counts instead."""
    src.waits_for_link = True
    loop.link.publishers_wait = True
    loop.link.publisher_pauses += 1
    if not src.input_paused:
        loop._pause_input(src)


cdef void link_drained(BrokerLoop loop, Conn *link_conn) noexcept nogil:
    """After a write to the link (or when it is lost): once its queue is
    down to a quarter of nats_buffer, the publishers it held are read again."""
    cdef size_t i
    cdef Conn *c
    if link_conn != NULL and buf_len(&link_conn.wbuf) > loop.link.buffer_max // 4:
        return
    loop.link.publishers_wait = False
    for i in range(loop.nconns):
        c = loop.conns[i]
        if c.waits_for_link:
            c.waits_for_link = False
            if c.input_paused and c.state == CS_READY and buf_len(&c.wbuf) <= loop.max_pending:
                loop._resume_input(c)


cdef void link_interest(BrokerLoop loop, Subscription *s, int delta) noexcept nogil:
    """A local subscription came (+1) or went (-1): busx.backbone keeps the
    counts and says what the hub must hear (LS+/LS-)."""
    cdef char pattern[MAX_NAME + 1]
    cdef size_t length
    if s.node == NULL:
        return
    length = node_pattern(<TrieNode *>s.node, pattern)
    link_py_interest(loop, pattern, length, s, delta)


# ---- Python's half (busx.backbone), with the GIL ----

cdef int link_py_hello(BrokerLoop loop, Conn *c) noexcept with gil:
    try:
        loop._queue_bytes(c, loop.backbone.on_attached())
        return 0
    except BaseException as exc:
        loop._report(exc)
        return -1


cdef void link_py_line(BrokerLoop loop, const char *line, size_t length) noexcept with gil:
    try:
        loop.backbone.on_line(line[:length])
    except BaseException as exc:
        loop._report(exc)


cdef void link_py_interest(BrokerLoop loop, const char *pattern, size_t length,
                           Subscription *s, int delta) noexcept with gil:
    cdef Conn *c = loop.link.conn
    try:
        lines = loop.backbone.on_local_interest(
            pattern[:length], s.queue_name[:s.queue_len] if s.queue_len else b"", delta)
        if lines and c != NULL:
            loop._queue_bytes(c, lines)
            loop._mark_dirty(c)
    except BaseException as exc:
        loop._report(exc)


cdef bint link_py_may_deliver(BrokerLoop loop, Conn *c, FrameView *f) noexcept with gil:
    """The policy's rules for senders on other hosts (origin=, remote=)."""
    try:
        return loop.handler.remote_may_publish(c.stamp[:c.stamp_len], f.topic[:f.topic_len])
    except BaseException as exc:
        loop._report(exc)
        return False


cdef void link_py_event(BrokerLoop loop, const char *event) noexcept with gil:
    try:
        loop.backbone.on_event(event.decode())
    except BaseException as exc:
        loop._report(exc)


cdef void link_py_down(BrokerLoop loop, const char *why) noexcept with gil:
    try:
        loop.backbone.on_down(why.decode(errors="replace"))
    except BaseException as exc:
        loop._report(exc)
