# The broker's event loop: accept, read, route, write, all without the GIL.
# Python is called (with the GIL) only on the control path: a new
# connection, its handshake, a subscription, a stats request.

cpdef enum LoopStatus:         # BrokerLoop.run() returns these
    LOOP_STOP = 0
    LOOP_SIGNAL = 1


cdef void append_msgpack_str(Buffer *b, const char *s, size_t n) noexcept nogil:
    n = min(n, <size_t>0xffff)
    pack_str_head(b, n)
    buf_append(b, s, n)


cdef int write_error_frame(Buffer *b, uint32_t id, uint8_t flags, const char *code,
                           const char *message, const char *topic,
                           size_t topic_len) noexcept nogil:
    """ERROR frame with payload msgpack {"code": code, "message": message}; the
    frame's topic field names the topic concerned, if any."""
    cdef Buffer payload
    cdef int rc
    memset(&payload, 0, sizeof(Buffer))
    buf_append(&payload, b"\x82", 1)
    append_msgpack_str(&payload, b"code", 4)
    append_msgpack_str(&payload, code, strlen(code))
    append_msgpack_str(&payload, b"message", 7)
    append_msgpack_str(&payload, message, strlen(message))
    rc = write_frame(b, K_ERROR, flags, id, topic, topic_len, NULL, 0, NULL, 0,
                     payload.data + payload.start, buf_len(&payload), 0, 0)
    buf_free(&payload)
    return rc


def error_frame(str code, str message, bint fatal=True, unsigned int ref=0):
    """An ERROR frame as bytes, built by the same code as the loop's own
    (write_error_frame), for the handshake's Python half."""
    cdef bytes code_b = code.encode(), message_b = message.encode()
    cdef Buffer b
    memset(&b, 0, sizeof(Buffer))
    try:
        if write_error_frame(&b, ref, F_FATAL if fatal else 0, code_b, message_b, NULL, 0) < 0:
            raise MemoryError()
        return b.data[b.start:b.end]
    finally:
        buf_free(&b)


cdef class BrokerLoop:
    """The broker's connections, router and epoll loop. busx.Broker owns one
    and runs it on a thread (or the main thread for serve_forever).

    Threads and locks: busx/_core.pxd, beside its fields."""

    def __cinit__(self):
        poller_init(&self.poller)
        pthread_mutex_init(&self.state_lock, NULL)
        if router_init(&self.router) < 0:
            raise MemoryError()

    def __init__(self, handler, size_t max_pending, size_t max_frame,
                 bint disconnect_slow, bint check_publish, size_t max_connections=65536,
                 size_t max_subscriptions=1000000, size_t max_pending_fds=1024,
                 double handshake_timeout=5.0, double heartbeat=0.0):
        """handler: the Python side (busx.broker) with on_accept, on_connect,
        on_subscribe, on_close and on_stats callbacks. The limits are
        busx.Broker's (SPEC.md, Limits)."""
        self.handler = handler
        self.max_pending = max_pending
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.max_subscriptions = max_subscriptions
        self.handshake_timeout_ms = handshake_timeout * 1000
        self.heartbeat_ms = heartbeat * 1000
        self.check_publish = check_publish
        self.next_id = 1
        self.delivery.max_pending = max_pending
        self.delivery.max_pending_fds = max_pending_fds
        self.delivery.disconnect_slow = disconnect_slow
        self.delivery.payload_fd_budget = <size_t>-1
        self.delivery.totals = &self.totals
        cdef int status = poller_open(&self.poller)
        if status < 0:
            raise_os_error("cannot create the broker's event loop", -status)

    @property
    def payload_fd_budget(self):
        """Bytes of payload memfds that may be in flight to clients at once
        (see Delivery); busx.Broker sets it from RLIMIT_NOFILE."""
        return self.delivery.payload_fd_budget

    @payload_fd_budget.setter
    def payload_fd_budget(self, size_t value):
        self.delivery.payload_fd_budget = value

    @property
    def msgs_in(self):
        """Messages routed so far (readable after the loop has stopped)."""
        return self.totals.msgs_in

    def __dealloc__(self):
        cdef int i
        self.handler = None
        self.close_all()
        for i in range(self.nlisten):
            if self.listen_tls[i] != NULL:
                SSL_CTX_free(self.listen_tls[i])
        router_free(&self.router)
        pthread_mutex_destroy(&self.state_lock)

    cdef void _watch(self, int fd, uint64_t tag) except *:
        if poller_add(&self.poller, fd, EPOLLIN, tag) < 0:
            raise_os_error("epoll_ctl")

    def add_listener(self, int fd, bint is_unix, TlsContext tls=None):
        """Accept connections on fd (a listening, non-blocking socket the
        broker keeps owning: this loop never closes it), speaking TLS with
        tls's certificates when given."""
        if self.nlisten == MAX_LISTENERS:
            raise ValueError("too many listeners")
        self.listen_fds[self.nlisten] = fd
        self.listen_unix[self.nlisten] = is_unix
        if tls is not None:
            SSL_CTX_up_ref(tls.ctx)
            self.listen_tls[self.nlisten] = tls.ctx
        self._watch(fd, TAG_LISTEN + self.nlisten)
        self.nlisten += 1

    def watch_signal_fd(self, int fd):
        """Return from run() with LOOP_SIGNAL when fd (Python's signal
        wakeup fd) becomes readable, so signal handlers get to run."""
        self._watch(fd, TAG_SIGNAL)

    def request_stop(self):
        """Make run() return; safe from any thread."""
        self.stop_requested = 1
        poller_wake(&self.poller)

    def run(self):
        """Serve until request_stop() or a signal; returns a LoopStatus."""
        cdef int status
        with nogil:
            status = self._loop()
        if status < 0:
            raise_os_error("broker event loop failed", -status)
        return status

    cdef int _loop(self) noexcept nogil:
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, timeout
        cdef uint64_t tag
        cdef int status = -1
        cdef double idle_since = 0     # when the last trickle turn ended; 0 after any other
        cdef unsigned long long routed_before
        while status < 0:
            timeout = self._timer_ms()
            if self.backlog != NULL:
                timeout = 0
            n = 0
            if timeout != 0 and idle_since > 0 and self.poll_window_ms > 0:
                n = self._spin(events, idle_since + self.poll_window_ms)
            if n == 0:
                n = poller_wait(&self.poller, events, MAX_EVENTS, timeout)
                if n > 0 and timeout != 0 and idle_since > 0:
                    self._adapt_poll_window(now_ms() - idle_since)
            if n < 0:
                if errno == EINTR:
                    continue
                return -errno
            self.turn_ms = now_ms()
            pthread_mutex_lock(&self.state_lock)
            routed_before = self.totals.msgs_in
            for i in range(n):
                tag = events[i].data.u64
                if tag == TAG_WAKE:
                    poller_drain(&self.poller)
                elif tag == TAG_SIGNAL:
                    status = LOOP_SIGNAL
                elif tag >= TAG_LISTEN and tag < TAG_LISTEN + MAX_LISTENERS:
                    self._accept(<int>(tag - TAG_LISTEN))
                else:
                    self._on_conn_event(<Conn *>events[i].data.ptr, events[i].events)
            self._take_backlog()
            self._flush_dirty()
            self._housekeeping()
            self._bury_dead()
            pthread_mutex_unlock(&self.state_lock)
            # Spin only after a trickle (request/reply traffic); a batch
            # means the peers are busy producing the next one, and spinning
            # would take the core they need.
            idle_since = 0
            if n > 0 and 0 < self.totals.msgs_in - routed_before <= SPIN_AFTER_AT_MOST:
                idle_since = now_ms()
            if self.stop_requested:
                status = LOOP_STOP
        return status

    cdef int _timer_ms(self) noexcept nogil:
        """How long the loop may sleep before _housekeeping has work: -1 for
        as long as it likes."""
        cdef int timeout = -1
        cdef double due
        if self.accept_paused or self.nclosing:
            timeout = ACCEPT_RETRY_MS
        if self.handshaking != NULL:
            due = self.handshaking.opened_at + self.handshake_timeout_ms - now_ms()
            due = max(due, 0.0) + 1
            if timeout < 0 or due < timeout:
                timeout = <int>min(due, <double>INT_MAX)
        if self.heartbeat_ms > 0 and self.nconns:
            due = max(self.next_heartbeat_ms - now_ms(), 0.0) + 1
            if timeout < 0 or due < timeout:
                timeout = <int>min(due, <double>INT_MAX)
        return timeout

    cdef int _spin(self, epoll_event *events, double until) noexcept nogil:
        """Poll without sleeping until `until` (ms): traffic just flowed,
        and the next frame usually follows within tens of microseconds, less
        than it costs to wake a sleeping thread. Yields each turn, so a
        process that shares this core runs first."""
        cdef int n = 0
        self.busy_polls += 1
        while n == 0 and not self.stop_requested and now_ms() < until:
            sched_yield()
            n = poller_wait(&self.poller, events, MAX_EVENTS, 0)
        self.busy_poll_hits += n > 0
        return n

    cdef void _adapt_poll_window(self, double idle_ms) noexcept nogil:
        """After a trickle turn the broker slept idle_ms before the next
        event. Poll longer next time if the longest poll would have caught
        it; shorter if no allowed poll could, so sparse traffic costs no
        CPU. (KVM adapts its halt polling the same way.)"""
        cdef double start_ms = POLL_WINDOW_START_US / 1000.0
        if idle_ms <= self.busy_poll_ms:
            self.poll_window_ms = min(self.busy_poll_ms,
                                      max(start_ms, 2 * self.poll_window_ms))
        elif self.poll_window_ms / 2 >= start_ms:
            self.poll_window_ms /= 2
        else:
            self.poll_window_ms = 0

    # ---- connections ----

    cdef void _accept(self, int index) noexcept nogil:
        cdef int fd, k
        cdef bint is_unix = self.listen_unix[index]
        for k in range(64):
            fd = accept4(self.listen_fds[index], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                if errno == EINTR:
                    continue
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    # Out of fds: stop watching the listeners for a moment
                    # instead of spinning on a backlog we cannot take.
                    self._pause_accept()
                return
            self._open_conn(fd, is_unix, self.listen_tls[index])

    cdef void _pause_accept(self) noexcept nogil:
        cdef int i
        for i in range(self.nlisten):
            poller_modify(&self.poller, self.listen_fds[i], 0, TAG_LISTEN + i)
        self.accept_paused = True
        self.accept_resume_at = now_ms() + ACCEPT_RETRY_MS

    cdef void _resume_accept(self) noexcept nogil:
        cdef int i
        for i in range(self.nlisten):
            poller_modify(&self.poller, self.listen_fds[i], EPOLLIN, TAG_LISTEN + i)
        self.accept_paused = False

    cdef void _refuse(self, int fd, const char *code, const char *message) noexcept nogil:
        """Greet fd with the preamble and a fatal ERROR, best effort, and close
        it: a client learns why (connect raises ConnectError saying so)."""
        cdef Buffer b
        memset(&b, 0, sizeof(Buffer))
        self._py_security_event(0, fd, code, message)     # logged before the peer can know
        if (buf_append(&b, PREAMBLE_BYTES, PREAMBLE_SIZE) == 0
                and write_error_frame(&b, 0, F_FATAL, code, message, NULL, 0) == 0):
            send(fd, b.data, buf_len(&b), MSG_NOSIGNAL | MSG_DONTWAIT)
        buf_free(&b)
        close(fd)

    cdef void _open_conn(self, int fd, bint is_unix, SSL_CTX *tls) noexcept nogil:
        cdef Conn *c
        cdef Conn **grown
        if self.nconns >= self.max_connections:
            self.refused += 1
            if tls != NULL:     # no words before TLS: the refusal is only logged
                self._py_security_event(0, fd, b"limit", b"too many connections")
                close(fd)
                return
            self._refuse(fd, b"limit", b"too many connections: the broker serves at most "
                         b"max_connections clients; try again later or raise the limit")
            return
        c = <Conn *>calloc(1, sizeof(Conn))
        if c == NULL:
            close(fd)
            return
        if self._keep_conn(c) < 0:
            free(c)
            close(fd)
            return
        busx_count(BUSX_CONNS, 1)
        c.fd = fd
        if tls != NULL:
            c.tls = tls_new(tls, fd, True)
        c.next_frame = PREAMBLE_SIZE       # the greeting starts with the preamble
        c.id = self.next_id
        self.next_id += 1
        c.is_unix = is_unix
        c.state = CS_PREAMBLE
        c.opened_at = now_ms()
        c.last_in_ms = c.last_out_ms = c.opened_at
        self._queue_handshake(c)
        if ((tls != NULL and c.tls == NULL)
                or poller_add(&self.poller, fd, EPOLLIN | EPOLLRDHUP, <uint64_t><uintptr_t>c) < 0):
            self._close_conn(c)
            return
        if self._py_accept(c) < 0:
            self._close_conn(c)
            return
        self._mark_dirty(c)

    cdef int _keep_conn(self, Conn *c) noexcept nogil:
        """Add c to the connection table; -1 when memory runs out."""
        cdef Conn **grown
        if self.nconns == self.conns_cap:
            grown = <Conn **>realloc(self.conns, (self.conns_cap * 2 + 64) * sizeof(void *))
            if grown == NULL:
                return -1
            self.conns = grown
            self.conns_cap = self.conns_cap * 2 + 64
        c.slot = self.nconns
        self.conns[self.nconns] = c
        self.nconns += 1
        return 0

    cdef int _py_accept(self, Conn *c) noexcept with gil:
        """Ask Python for the HELLO to greet c with (it reads SO_PEERCRED)."""
        try:
            self._queue_bytes(c, self.handler.on_accept(c.id, c.fd, c.is_unix, c.tls != NULL))
            return 0
        except BaseException as exc:
            self._report(exc)
            return -1

    cdef int _queue_bytes(self, Conn *c, bytes data) except -1:
        if buf_append(&c.wbuf, data, len(data)) < 0:
            raise MemoryError()
        return 0

    cdef void _report(self, BaseException exc) noexcept:
        try:
            self.handler.on_internal_error(exc)
        except BaseException:
            pass

    cdef void _on_conn_event(self, Conn *c, uint32_t events) noexcept nogil:
        if c.state == CS_CLOSED:
            return          # closed earlier in this batch
        if events & EPOLLOUT:
            self._mark_dirty(c)
            if c.tls_want == SSL_ERROR_WANT_WRITE and c.state != CS_CLOSING:
                events |= EPOLLIN       # the last read waited for room to write
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP):
            if c.state == CS_CLOSING:
                self._discard_input(c)
            elif c.input_paused:
                if events & (EPOLLERR | EPOLLHUP):
                    self._close_conn(c)     # gone: its answers can never be read
            elif not c.backlogged:      # read more once what it sent is routed
                self._read(c)

    cdef void _discard_input(self, Conn *c) noexcept nogil:
        """A closing connection's input, read and dropped so that closing
        does not reset it. At EOF: closed if its last words are out, else
        it is no longer read (nothing more can come) while they are sent."""
        cdef char sink[65536]
        cdef ssize_t n = recv(c.fd, sink, sizeof(sink), MSG_DONTWAIT)
        if n > 0 or (n < 0 and (errno == EAGAIN or errno == EINTR)):
            return
        if n < 0 or c.lingering:
            self._close_conn(c)
            return
        c.peer_closed = True
        c.input_paused = True
        self._set_events(c)

    cdef void _read(self, Conn *c) noexcept nogil:
        cdef bint truncated = False
        cdef ssize_t n
        if buf_reserve(&c.rbuf, READ_CHUNK) < 0:
            self._fail(c, b"internal", b"broker out of memory")
            return
        n = self._recv(c, &truncated)
        self.read_calls += 1
        if n < 0:
            if errno == EPROTO:
                self._tls_failed(c)
            elif errno != EAGAIN:
                self._close_conn(c)
            return
        if truncated:
            self._fail(c, b"fds-truncated",
                       b"file descriptors sent to the broker were lost (the broker is out "
                       b"of fds); this connection cannot tell which message they belonged to")
            return
        if n == 0:
            # Peer gone; a partial frame in rbuf dies with it.
            self._close_conn(c)
            return
        busx_trace(BUSX_TRACE_BROKER_READ)
        c.last_in_ms = self.turn_ms
        c.rbuf.end += n
        c.stream_in += n
        c.bytes_in += n
        self.totals.bytes_in += n
        if c.state != CS_READY and fdq_len(&c.in_fds):
            self._fail(c, b"protocol", b"file descriptors sent during the handshake")
            return
        if c.is_link:
            link_take(self, c)
        else:
            self._take_frames(c)
        if c.tls_more:
            self._defer(c)

    cdef ssize_t _recv(self, Conn *c, bint *truncated) noexcept nogil:
        """One recv into c's rbuf (reserved): with the fds that came along
        over UNIX, decrypted over TLS. TLS may have to write to read (its
        handshake): then the bytes c is owed are tried again too."""
        cdef ssize_t n, more
        cdef int reserved
        if c.tls == NULL:
            return recv_with_fds(c.fd, c.rbuf.data + c.rbuf.end, c.rbuf.cap - c.rbuf.end,
                                 &c.in_fds if c.is_unix else NULL, truncated, c.stream_in)
        c.tls_want = 0
        n = tls_recv(c.tls, c.rbuf.data + c.rbuf.end, c.rbuf.cap - c.rbuf.end, &c.tls_want)
        # What OpenSSL read ahead is invisible to epoll: take it now, up to a
        # chunk a turn; past that the connection is read again next turn
        # (_take_backlog), so one sender cannot hold the loop.
        while n > 0 and tls_holds_more(c.tls) and n < READ_CHUNK:
            c.rbuf.end += n         # buf_reserve keeps only [start, end)
            reserved = buf_reserve(&c.rbuf, TLS_READ_AHEAD)
            c.rbuf.end -= n
            if reserved < 0:
                break
            more = tls_recv(c.tls, c.rbuf.data + c.rbuf.end + n,
                            c.rbuf.cap - c.rbuf.end - n, &c.tls_want)
            if more <= 0:
                break
            n += more
        c.tls_more = n > 0 and tls_holds_more(c.tls)
        if buf_len(&c.wbuf):
            self._mark_dirty(c)     # a write that waited for the handshake may go now
        if c.tls_want == SSL_ERROR_WANT_WRITE and not c.want_out:
            c.want_out = True
            self._set_events(c)
        return n

    cdef void _tls_failed(self, Conn *c) noexcept nogil:
        """TLS failed on c (a bad handshake: no certificate, an unknown CA,
        plain bytes at a TLS listener): logged and closed. Nothing can be
        said to the peer: no words pass outside TLS."""
        cdef char why[256]
        tls_error_text(c.tls, why, sizeof(why))
        self.tls_failures += 1
        self._py_security_event(c.id, c.fd, b"tls", why)
        self._close_conn(c)

    cdef void _defer(self, Conn *c) noexcept nogil:
        if not c.backlogged and (buf_len(&c.rbuf) or c.tls_more):
            c.backlogged = True
            c.next_backlog = self.backlog
            self.backlog = c

    cdef void _take_backlog(self) noexcept nogil:
        """Give every deferred connection its next turn."""
        cdef Conn *queue = self.backlog
        cdef Conn *c
        self.backlog = NULL
        while queue != NULL:
            c = queue
            queue = c.next_backlog
            c.backlogged = False
            if c.is_link:
                link_take(self, c)
            else:
                self._take_frames(c)
            if (c.tls_more and not c.backlogged and not c.input_paused
                    and (c.state == CS_CONNECT or c.state == CS_READY)):
                self._read(c)       # what OpenSSL still holds (_recv)

    cdef void _take_frames(self, Conn *c) noexcept nogil:
        cdef FrameView f
        cdef int status
        cdef Lookahead ahead
        ahead.bytes = ahead.parsed = ahead.taken = 0
        if c.state == CS_PREAMBLE and not self._take_preamble(c):
            return
        # One connection's turn routes at most DELIVERY_BUDGET copies: a
        # chunk fanned out to thousands of subscribers must not hold up every
        # other connection's events. The rest waits for its next turn.
        self.budget = DELIVERY_BUDGET
        while c.state == CS_CONNECT or c.state == CS_READY:
            if self.budget <= 0:
                self._defer(c)
                break
            status = parse_frame(c.rbuf.data + c.rbuf.start, buf_len(&c.rbuf),
                                 self.max_frame if c.state == CS_READY else HANDSHAKE_MAX_FRAME,
                                 &f)
            if status == PARSE_NEED_MORE:
                break
            if status == PARSE_TOO_LARGE:
                self._fail(c, b"too-large", b"frame exceeds the broker's max_frame (64 KiB "
                           b"before the handshake completes); publish smaller payloads or "
                           b"raise max_frame")
                return
            if status == PARSE_MALFORMED:
                self._fail(c, b"protocol", b"malformed frame header")
                return
            if buf_len(&c.wbuf) > self.max_pending and self._must_wait_for_room(c, &f):
                self._pause_input(c)
                break
            # A frame that calls into Python (SUB, STATS) costs as much as
            # CONTROL_COST copies: one client's burst of SUBs must not hold
            # everyone's messages for long (tests/test_hardening.py).
            self.budget -= CONTROL_COST if f.kind == K_SUB or f.kind == K_STATS else 1
            self.topic_hash = 0
            # Looking ahead pays only while topics change; a stream on one
            # topic is routed by c's remembered route, and would only pay
            # for parsing every frame twice.
            if c.state == CS_READY and (ahead.taken == 0 or self.routed_by_topic):
                self._look_ahead(c, &ahead)
                self.topic_hash = ahead.hashes[ahead.taken % LOOKAHEAD_RING]
            self._handle(c, &f)
            buf_consume(&c.rbuf, f.size)
            ahead.bytes -= min(ahead.bytes, f.size)
            ahead.taken += 1
            if c.input_paused:
                break           # its messages wait for the NATS link to drain
        if c.state == CS_READY and holds_unclaimed_fds(c):
            self._fail(c, b"protocol", b"file descriptors arrived that no frame declares")
        if c.fd_bytes_taken and c.state == CS_READY and buf_len(&c.wbuf) <= self.max_pending:
            self._report_fd_bytes_taken(c)
        if c.state != CS_CLOSED:
            buf_shrink(&c.rbuf, READ_CHUNK * 2)

    cdef void _look_ahead(self, Conn *c, Lookahead *ahead) noexcept nogil:
        """Before c's frame number ahead.taken is taken: start loading what
        the frames after it will route through, a stage per distance, so
        that each miss has LOOKAHEAD frames' work to land in (_router.pxi,
        prefetching): the cache tags of the frame 3 x LOOKAHEAD on (hashing
        its topic), the entry of the one 2 x LOOKAHEAD on, the first
        subscription of the one LOOKAHEAD on. Frames on the topic c
        published last need none: their route is remembered."""
        cdef FrameView f
        cdef size_t k, first_stage3 = ahead.taken + LOOKAHEAD
        cdef size_t first_stage2 = ahead.taken + 2 * LOOKAHEAD
        cdef RouteSlot *slot
        # Starting, or again after frames taken without looking (during the
        # handshake, or on one topic): every stage for the frames closer.
        cdef bint fresh = ahead.parsed <= ahead.taken
        if fresh:
            ahead.parsed = ahead.taken
            ahead.bytes = 0
            first_stage2 = first_stage3 = ahead.taken
        while ahead.parsed < ahead.taken + 3 * LOOKAHEAD and parse_frame(
                c.rbuf.data + c.rbuf.start + ahead.bytes, buf_len(&c.rbuf) - ahead.bytes,
                self.max_frame, &f) == PARSE_OK:
            k = ahead.parsed % LOOKAHEAD_RING
            ahead.hashes[k] = 0
            ahead.slots[k] = NULL
            if f.kind == K_PUB and f.topic_len and not (
                    f.topic_len == c.last_topic_len
                    and busx_same_bytes(f.topic, c.last_topic, f.topic_len)):
                ahead.hashes[k] = busx_hash(f.topic, f.topic_len)
                prefetch_tags(&self.router, ahead.hashes[k])
            ahead.bytes += f.size
            ahead.parsed += 1
        for k in range(first_stage2, min(ahead.taken + 2 * LOOKAHEAD + 1, ahead.parsed)):
            if ahead.hashes[k % LOOKAHEAD_RING]:
                ahead.slots[k % LOOKAHEAD_RING] = prefetch_slot(
                    &self.router, ahead.hashes[k % LOOKAHEAD_RING])
        for k in range(first_stage3, min(ahead.taken + LOOKAHEAD + 1, ahead.parsed)):
            slot = ahead.slots[k % LOOKAHEAD_RING]
            # Checked: a SUB taken since may have grown the cache (cache_fit).
            if slot != NULL and slot_in_cache(&self.router, slot):
                prefetch_subscription(slot)

    cdef bint _take_preamble(self, Conn *c) noexcept nogil:
        """Check and consume the client's preamble; False while it is not
        complete or when it is wrong (c is then closing)."""
        if buf_len(&c.rbuf) < PREAMBLE_SIZE:
            return False
        if memcmp(c.rbuf.data + c.rbuf.start, PREAMBLE_BYTES, 4) != 0:
            self._fail(c, b"protocol", b"not a busx client: the connection did not "
                       b"start with the busx preamble")
            return False
        if memcmp(c.rbuf.data + c.rbuf.start, PREAMBLE_BYTES, PREAMBLE_SIZE) != 0:
            self._fail(c, b"protocol", b"unsupported busx protocol version: this "
                       b"broker speaks version 1; upgrade the client or the broker")
            return False
        buf_consume(&c.rbuf, PREAMBLE_SIZE)
        c.state = CS_CONNECT
        return True

    cdef bint _must_wait_for_room(self, Conn *c, FrameView *f) noexcept nogil:
        """Whether f asks for an answer that c has no room for: its unsent
        output already exceeds max_pending. Then c is not read until it
        reads (SPEC.md, Limits: control replies count against max_pending)."""
        return (c.state == CS_READY and buf_len(&c.wbuf) > self.max_pending
                and ((f.kind == K_PING and f.id != 0) or f.kind == K_SUB
                     or f.kind == K_UNSUB or f.kind == K_STATS))

    cdef void _pause_input(self, Conn *c) noexcept nogil:
        c.input_paused = True
        self._set_events(c)

    cdef void _resume_input(self, Conn *c) noexcept nogil:
        """c read enough of its answers: take its waiting frames again."""
        c.input_paused = False
        c.last_in_ms = self.turn_ms      # its silence counts from now
        self._set_events(c)
        self._defer(c)

    cdef void _set_events(self, Conn *c) noexcept nogil:
        """What epoll watches c's socket for."""
        poller_modify(&self.poller, c.fd,
                      ((0 if c.input_paused else EPOLLIN | EPOLLRDHUP)
                       | (EPOLLOUT if c.want_out else 0)), <uint64_t><uintptr_t>c)

    cdef void _handle(self, Conn *c, FrameView *f) noexcept nogil:
        cdef const char *mismatch
        if c.state == CS_CONNECT:
            if f.kind != K_CONNECT:
                self._fail(c, b"protocol", b"expected a CONNECT frame to complete the handshake")
            elif fdq_len(&c.in_fds):
                self._fail(c, b"protocol", b"file descriptors sent during the handshake")
            else:
                self._on_connect(c, f)
            return
        if f.nfds or fdq_len(&c.in_fds):
            mismatch = fds_mismatch(c, f)
            if mismatch != NULL:
                self._fail(c, b"protocol", mismatch)
                return
        if f.nfds and f.kind != K_PUB:
            self._fail(c, b"protocol", b"only PUB frames carry file descriptors")
            return
        if f.kind == K_PUB:
            self._route(c, f)
        elif f.kind == K_PING and f.id == 0:
            # A heartbeat: its arrival was the point. It is answered only
            # when nothing else is on its way to c, which would tell c as
            # much; so heartbeats never pile up behind a client that is not
            # reading, and never count against max_pending.
            if buf_len(&c.wbuf) == 0:
                write_frame(&c.wbuf, K_PONG, 0, 0, NULL, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0)
                self._mark_dirty(c)
        elif f.kind == K_PING:
            self._report_untold_denials(c)
            verdicts_rearm(&c.verdicts)
            # A PING naming the backbone (a backbone flush) is answered when
            # the NATS server answers ours, sent after everything before it.
            if not (f.topic_len and self.link != NULL and link_ping(self, c.id, f.id)):
                write_frame(&c.wbuf, K_PONG, 0, f.id, NULL, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0)
                self._mark_dirty(c)
        elif f.kind == K_SUB:
            self._subscribe(c, f)
        elif f.kind == K_UNSUB:
            self._unsubscribe(c, f.id)
        elif f.kind == K_STATS:
            self._stats(c, f)
        elif f.kind == K_PONG:
            pass                        # a heartbeat's answer: arriving was its job
        elif f.kind == K_RECEIVED and f.payload_len == 8:
            fd_bytes_received(&self.delivery, c, busx_load_u64(f.payload))
            self._mark_dirty(c)         # room again: owed drop reports may go out
        else:
            self._fail(c, b"protocol", b"unexpected frame kind from a client")

    cdef void _queue_handshake(self, Conn *c) noexcept nogil:
        """c joins the end of the handshake queue: connections open longer
        than handshake_timeout without READY are closed (_housekeeping)."""
        c.hs_prev = self.handshaking_last
        c.hs_next = NULL
        if self.handshaking_last != NULL:
            self.handshaking_last.hs_next = c
        else:
            self.handshaking = c
        self.handshaking_last = c

    cdef void _handshake_over(self, Conn *c) noexcept nogil:
        """c left the handshake (READY, closing or closed)."""
        if c.hs_prev == NULL and self.handshaking != c:
            return      # not queued
        if c.hs_prev != NULL:
            c.hs_prev.hs_next = c.hs_next
        else:
            self.handshaking = c.hs_next
        if c.hs_next != NULL:
            c.hs_next.hs_prev = c.hs_prev
        else:
            self.handshaking_last = c.hs_prev
        c.hs_next = c.hs_prev = NULL

    cdef void _on_connect(self, Conn *c, FrameView *f) noexcept nogil:
        if self._py_connect(c, f) == 1:
            c.state = CS_READY
            self._handshake_over(c)
            self._mark_dirty(c)
        else:
            self._begin_closing(c)

    cdef int _py_connect(self, Conn *c, FrameView *f) noexcept with gil:
        """Python checks the CONNECT (token proof, policy) and returns
        (accepted, reply frame bytes, sender stamp, takes payload memfds).
        1 when accepted."""
        try:
            accepted, reply, stamp, payload_fds, answers_pings = self.handler.on_connect(
                c.id, f.payload[:f.payload_len],
                tls_peer_common_name(c.tls) if c.tls != NULL else None)
            self._queue_bytes(c, reply)
            if not accepted:
                return 0
            c.payload_fds = payload_fds
            c.answers_pings = answers_pings
            if len(stamp) > MAX_NAME:
                raise ValueError("sender stamp longer than its 255-byte field")
            c.stamp_len = len(stamp)
            memcpy(c.stamp, <char *>stamp, c.stamp_len)
            return 1
        except BaseException as exc:
            self._report(exc)
            return -1

    # ---- routing ----

    cdef void _route(self, Conn *src, FrameView *f) noexcept nogil:
        cdef RouteSlot *slot
        cdef int fds[MAX_FDS_ON_WIRE]
        cdef FdPayload big
        cdef int k
        for k in range(f.nfds):
            fds[k] = fdq_pop(&src.in_fds)
        big.fd = -1
        big.loaded = False
        if f.flags & F_PAYLOAD_FD and not self._take_payload_fd(src, f, fds, &big):
            pass
        elif big.fd < 0 and f.size + src.stamp_len > self.max_frame:
            # Stamped, it would be too large for every subscriber: refused
            # here, so no accepted message is ever one a subscriber refuses.
            self._fail(src, b"too-large", b"this message with the broker's sender stamp "
                       b"exceeds max_frame; busx clients keep 255 bytes of room for it")
        elif f.reply_len and not self._reply_ok(f):
            self._fail(src, b"protocol", b"a PUB's reply field must be empty or a valid "
                       b"_INBOX. topic")
        elif (src.last_slot != NULL and slot_current(&self.router, src.last_slot, src.last_version)
                and f.topic_len == src.last_topic_len
                and busx_same_bytes(src.last_topic, f.topic, f.topic_len)):
            self.routed_by_topic = False
            self._deliver_all(src, f, src.last_slot, fds, &big, NULL)
        else:
            self.routed_by_topic = True
            self._route_by_topic(src, f, fds, &big)
        for k in range(f.nfds):
            close(fds[k])
        unload_payload(&self.delivery, &big)

    cdef void _route_by_topic(self, Conn *src, FrameView *f, int *fds,
                              FdPayload *big) noexcept nogil:
        """Route f through the router's cache, or the trie on a miss. A topic
        the cache holds was checked against the topic rules when it was
        cached; any other is checked first."""
        cdef uint64_t h = self.topic_hash or busx_hash(f.topic, f.topic_len)
        cdef RouteSlot *slot = router_cached(&self.router, f.topic, f.topic_len, h)
        if slot == NULL and not self._topic_ok(f.topic, f.topic_len):
            self._fail(src, b"invalid-topic", b"PUB topic breaks the topic rules")
            return
        if self.check_publish and not self._may_publish(src, f):
            return
        if slot == NULL:
            slot = router_lookup_hashed(&self.router, f.topic, f.topic_len, h)
        if slot == NULL:
            self._fail(src, b"internal", b"broker out of memory")
            return
        memcpy(src.last_topic, f.topic, f.topic_len)
        src.last_topic_len = f.topic_len
        src.last_slot = slot
        src.last_version = slot.version
        self._deliver_all(src, f, slot, fds, big, NULL)

    cdef bint _take_payload_fd(self, Conn *src, FrameView *f, int *fds,
                               FdPayload *big) noexcept nogil:
        """Check a F_PAYLOAD_FD frame: its last fd must be a sealed memfd of
        the size it announces, within max_frame. Closes the sender if not."""
        if f.payload_len != 8 or f.nfds == 0:
            self._fail(src, b"protocol", b"a payload-fd frame carries an 8-byte size and the fd")
            return False
        big.size = busx_load_u64(f.payload)
        if frame_size(f.topic_len, f.reply_len, src.stamp_len, big.size) > self.max_frame:
            self._fail(src, b"too-large", b"payload fd larger than max_frame (with the "
                       b"broker's sender stamp)")
            return False
        if not payload_fd_ok(fds[f.nfds - 1], big.size):
            self._fail(src, b"protocol", b"a payload fd must be a memfd of the announced size, "
                                         b"sealed against writing, shrinking and growing")
            return False
        big.fd = fds[f.nfds - 1]
        src.fd_bytes_taken += big.size
        src.bytes_in += big.size
        self.totals.bytes_in += big.size
        return True

    cdef void _report_fd_bytes_taken(self, Conn *c) noexcept nogil:
        """Tell a publisher its payload memfds were taken, once per read turn."""
        cdef char taken[8]
        busx_store_u64(taken, c.fd_bytes_taken)
        c.fd_bytes_taken = 0
        if write_frame(&c.wbuf, K_RECEIVED, 0, 0, NULL, 0, NULL, 0, NULL, 0, taken, 8,
                       0, 0) < 0:
            self._fail(c, b"internal", b"broker out of memory")
            return
        self._mark_dirty(c)

    cdef void _deliver_all(self, Conn *src, FrameView *f, RouteSlot *slot,
                           int *fds, FdPayload *big, NatsMsg *from_nats) noexcept nogil:
        """Deliver to every matching subscription; one member per queue
        group (from NATS: per group the hub named). Then to the backbone,
        when someone elsewhere wants a local message."""
        cdef size_t i = 0, j, group_end
        cdef int result
        src.msgs_in += 1
        self.totals.msgs_in += 1
        while i < slot.nsubs:
            if slot.subs[i].queue == 0:
                j = i
                i += 1
            else:
                group_end = i + 1
                while group_end < slot.nsubs and same_queue(slot.subs[group_end], slot.subs[i]):
                    group_end += 1
                j = i + self.rr_counter % (group_end - i)     # round robin
                self.rr_counter += 1
                i = group_end
                if from_nats != NULL and not nats_names_group(from_nats, slot.subs[j]):
                    continue
            self.budget -= 1
            result = deliver(&self.delivery, slot.subs[j], src, f, fds, big)
            if result == DELIVERED:
                self._mark_dirty(<Conn *>slot.subs[j].conn)
            elif result > DROPPED:
                self._delivery_failed(<Conn *>slot.subs[j].conn, result)
        if self.link != NULL and from_nats == NULL:
            link_send(self, src, f, slot, big)

    cdef void _delivery_failed(self, Conn *dst, int result) noexcept nogil:
        if result == CUT_OFF:
            self._fail(dst, b"slow-consumer",
                       b"slow consumer: this subscriber fell more than max_pending bytes "
                       b"behind and the broker's policy is to disconnect it")
        elif result == NO_MEMORY:
            self._fail(dst, b"internal", b"broker out of memory")
        else:
            self._fail(dst, b"internal", b"broker could not read a payload memfd")

    cdef bint _topic_ok(self, const char *topic, size_t length) noexcept nogil:
        """The PUB topic rules in C for ASCII topics; others ask Python."""
        cdef int verdict = check_publish_topic(topic, length)
        if verdict == TOPIC_ASK_PYTHON:
            return self._py_topic_ok(topic, length)
        return verdict == TOPIC_VALID

    cdef bint _reply_ok(self, FrameView *f) noexcept nogil:
        """A reply field names an inbox: a valid topic under _INBOX. (SPEC.md,
        Inboxes). Anything else could not be decoded, or answered, by the
        subscribers it reaches."""
        return is_inbox_topic(f.reply, f.reply_len) and self._topic_ok(f.reply, f.reply_len)

    cdef bint _py_topic_ok(self, const char *topic, size_t length) noexcept with gil:
        try:
            return self.handler.topic_is_valid(topic[:length])
        except BaseException as exc:
            self._report(exc)
            return False

    cdef bint _may_publish(self, Conn *src, FrameView *f) noexcept nogil:
        """The policy's verdict on (connection, topic): a hash probe after the
        first message; Python decides only on a miss. A denial is told to the
        publisher once per topic between PINGs, so flush() can name it."""
        cdef Verdict *v = verdict_slot(&src.verdicts, f.topic, f.topic_len)
        if v == NULL:
            self._fail(src, b"internal", b"broker out of memory")
            return False
        if v.topic == NULL:
            verdict_store(&src.verdicts, v, f.topic, f.topic_len, self._py_may_publish(src, f))
        if not v.allowed:
            self.totals.publishes_denied += 1
        if not v.allowed and not v.reported:
            if buf_len(&src.wbuf) > self.max_pending:
                src.denials_untold += 1     # no room: told in bulk at the next PING
            else:
                v.reported = True
                self._send_error(src, 0, b"denied", b"policy denies publishing to this topic",
                                 f.topic, f.topic_len)
        return v.allowed

    cdef void _report_untold_denials(self, Conn *c) noexcept nogil:
        """Before a PONG: denials that found c's output full are reported
        now, so flush() still raises PermissionDenied for them."""
        if c.denials_untold:
            c.denials_untold = 0
            self._send_error(c, 0, b"denied", b"policy denied publishes that were not reported "
                             b"one by one (this client was not reading its answers)")

    cdef bint _py_may_publish(self, Conn *src, FrameView *f) noexcept with gil:
        try:
            return self.handler.may_publish(src.id, f.topic[:f.topic_len])
        except BaseException as exc:
            self._report(exc)
            return False

    # ---- subscriptions ----

    cdef void _subscribe(self, Conn *c, FrameView *f) noexcept nogil:
        """SUB: O(1) apart from the trie walk of its pattern's tokens. A SUB
        repeating an active subscription (same id, pattern and queue group)
        is answered OK: a client that reconnects may send one twice."""
        cdef Subscription *s = sid_find(&c.sids, f.id)
        if s != NULL:
            if same_subscription(s, f.topic, f.topic_len, f.reply, f.reply_len):
                self._send_simple(c, K_OK, f.id)
            else:
                self._send_error(c, f.id, b"invalid", b"subscription id already in use")
            return
        if c.nsubs >= self.max_subscriptions:
            self.limits_hit += 1
            self._send_error(c, f.id, b"limit", b"too many subscriptions on this connection "
                             b"(the broker's max_subscriptions): unsubscribe some first")
            self._py_security_event(c.id, -1, b"limit", b"too many subscriptions on this "
                                    b"connection (max_subscriptions)")
            return
        if self._py_subscribe(c, f) < 0:
            return      # refused; the error frame is queued
        s = new_subscription(c, f.id, f.reply, f.reply_len)
        if s == NULL or self._keep_subscription(c, s) < 0:
            if s != NULL:
                subscription_free(s)
            self._send_error(c, f.id, b"internal", b"broker out of memory")
            return
        if router_add(&self.router, s, f.topic, f.topic_len) < 0:
            self._forget_subscription(c, s)
            subscription_free(s)
            self._send_error(c, f.id, b"internal", b"broker out of memory")
            return
        if self.link != NULL:
            link_interest(self, s, 1)
        self._send_simple(c, K_OK, f.id)

    cdef int _keep_subscription(self, Conn *c, Subscription *s) noexcept nogil:
        """Add s to c's list and id table; -1 when memory runs out."""
        cdef Subscription **grown
        if c.nsubs == c.subs_cap:
            grown = <Subscription **>realloc(c.subs, (c.subs_cap * 2 + 4) * sizeof(void *))
            if grown == NULL:
                return -1
            c.subs = grown
            c.subs_cap = c.subs_cap * 2 + 4
        if sid_insert(&c.sids, s) < 0:
            return -1
        s.conn_index = c.nsubs
        c.subs[c.nsubs] = s
        c.nsubs += 1
        return 0

    cdef void _forget_subscription(self, Conn *c, Subscription *s) noexcept nogil:
        """Take s out of c's list (swapping the last one in) and id table."""
        cdef Subscription *moved
        sid_delete(&c.sids, s)
        c.nsubs -= 1
        moved = c.subs[c.nsubs]
        c.subs[s.conn_index] = moved
        moved.conn_index = s.conn_index

    cdef int _py_subscribe(self, Conn *c, FrameView *f) noexcept with gil:
        """Python validates the pattern and queue name and applies the
        policy: None to accept, (code, message) to refuse. -1 when refused
        (with the ERROR frame queued)."""
        try:
            verdict = self.handler.on_subscribe(
                c.id, f.id, f.topic[:f.topic_len], f.reply[:f.reply_len])
            if verdict is None:
                return 0
            self._send_error(c, f.id, verdict[0].encode(), verdict[1].encode())
        except BaseException as exc:
            self._report(exc)
            self._send_error(c, f.id, b"internal", b"broker error during subscribe")
        return -1

    cdef void _unsubscribe(self, Conn *c, uint32_t sid) noexcept nogil:
        cdef Subscription *s = sid_find(&c.sids, sid)
        if s != NULL:
            if self.link != NULL:
                link_interest(self, s, -1)
            router_remove(&self.router, s)
            self._forget_subscription(c, s)
            subscription_free(s)
        self._send_simple(c, K_OK, sid)

    cdef void _stats(self, Conn *c, FrameView *f) noexcept nogil:
        self._py_stats(c, f)
        self._mark_dirty(c)

    cdef void _py_stats(self, Conn *c, FrameView *f) noexcept with gil:
        try:
            payload = self.handler.on_stats_request(c.id, self._snapshot())
            if payload is None:
                self._send_error(c, f.id, b"denied", b"policy denies reading the broker's stats "
                                 b"(allow subscribing to _SYS.stats)")
                return
            write_frame(&c.wbuf, K_STATS, 0, f.id, NULL, 0, NULL, 0, NULL, 0,
                        <bytes>payload, len(payload), 0, 0)
        except BaseException as exc:
            self._report(exc)
            self._send_error(c, f.id, b"internal", b"broker error during stats")

    # ---- output ----

    cdef void _send_simple(self, Conn *c, uint8_t kind, uint32_t id) noexcept nogil:
        write_frame(&c.wbuf, kind, 0, id, NULL, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0)
        self._mark_dirty(c)

    cdef void _send_error(self, Conn *c, uint32_t id, const char *code,
                          const char *message, const char *topic=NULL,
                          size_t topic_len=0) noexcept nogil:
        write_error_frame(&c.wbuf, id, 0, code, message, topic, topic_len)
        self._mark_dirty(c)

    cdef void _fail(self, Conn *c, const char *code, const char *message) noexcept nogil:
        """A fatal error on one connection: tell it why, then close it."""
        if c.state >= CS_CLOSING:
            return
        self._py_security_event(c.id, -1, code, message)
        if c.tls != NULL and not SSL_is_init_finished(c.tls):
            self._close_conn(c)     # no words can reach a peer before TLS is up
            return
        write_error_frame(&c.wbuf, 0, F_FATAL, code, message, NULL, 0)
        self._begin_closing(c)

    cdef void _begin_closing(self, Conn *c) noexcept nogil:
        # The router keeps c's subscriptions until _close_conn: this may run
        # while _route walks a cached match list, which removing them would
        # free. A closing connection is skipped by deliver() instead.
        c.state = CS_CLOSING
        self._handshake_over(c)
        c.close_by = now_ms() + CLOSE_GRACE_MS
        self.nclosing += 1
        if c.input_paused:      # from now on its input is read, and discarded
            c.input_paused = False
            self._set_events(c)
        self._mark_dirty(c)

    cdef void _linger(self, Conn *c) noexcept nogil:
        """c's last words are with the kernel: send FIN after them, and close
        once the peer closes (or LINGER_MS passes), so unread input cannot
        turn the close into a reset that drops them."""
        if c.peer_closed:
            self._close_conn(c)
            return
        if not c.lingering:
            c.lingering = True
            if c.tls != NULL:
                ERR_clear_error()
                SSL_shutdown(c.tls)     # close_notify, best effort: it ends c's TLS stream
            shutdown(c.fd, SHUT_WR)
            c.close_by = min(c.close_by, now_ms() + LINGER_MS)
        self._discard_input(c)

    cdef inline void _mark_dirty(self, Conn *c) noexcept nogil:
        if not c.dirty:
            c.dirty = True
            c.next_dirty = self.dirty
            self.dirty = c

    cdef void _flush_dirty(self) noexcept nogil:
        cdef Conn *c
        while self.dirty != NULL:
            c = self.dirty
            self.dirty = c.next_dirty
            c.dirty = False
            if c.state != CS_CLOSED:
                self._write(c)

    cdef void _write(self, Conn *c) noexcept nogil:
        cdef ssize_t n
        if c.owes_drop_report and pending_bytes(c) <= self.max_pending // 2:
            report_drops(c)       # room made by K_RECEIVED, not by writing
        while buf_len(&c.wbuf):
            n = self._send_some(c)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                self._close_conn(c)
                return
            self._pass_frames(c, c.wbuf_sent + n)
            c.last_out_ms = self.turn_ms
            buf_consume(&c.wbuf, n)
            c.wbuf_sent += n
            c.bytes_out += n
            self.totals.bytes_out += n
            if c.owes_drop_report and pending_bytes(c) <= self.max_pending // 2:
                report_drops(c)
        if buf_len(&c.wbuf) == 0:
            buf_shrink(&c.wbuf, WRITE_CHUNK)
            if c.state == CS_CLOSING:
                if c.want_out:      # else a shut-down socket, always writable, spins the loop
                    c.want_out = False
                    self._set_events(c)
                self._linger(c)
                return
        if c.state == CS_READY and buf_len(&c.wbuf) <= self.max_pending:
            if c.fd_bytes_taken:
                self._report_fd_bytes_taken(c)      # held back while output was full
            if c.input_paused and not c.waits_for_link:
                self._resume_input(c)
        if c.is_link and self.link.publishers_wait:
            link_drained(self, c)
        if wants_output(c) != c.want_out:
            c.want_out = not c.want_out
            self._set_events(c)

    cdef inline void _pass_frames(self, Conn *c, unsigned long long sent_end) noexcept nogil:
        """Move next_frame past the frames the wire has begun, reading their
        lengths while the bytes are still in wbuf."""
        while c.next_frame < sent_end:
            c.next_frame += busx_load_u32(
                c.wbuf.data + c.wbuf.start + (c.next_frame - c.wbuf_sent)) + 4

    cdef ssize_t _send_some(self, Conn *c) noexcept nogil:
        """One send()/sendmsg() of up to WRITE_CHUNK bytes. fds travel with
        the call whose bytes start at or before their frame, so they arrive
        no later than the frame does (docs/protocol.md, fd passing)."""
        cdef size_t length = buf_len(&c.wbuf)
        cdef size_t queued_fd_bytes = c.out_fds.held
        cdef ssize_t n
        if length > WRITE_CHUNK:
            length = WRITE_CHUNK
        self.write_calls += 1
        if c.tls != NULL:
            c.tls_want = 0
            n = tls_send(c.tls, c.wbuf.data + c.wbuf.start, length, &c.tls_want)
            if n < 0 and errno == EAGAIN:
                # OpenSSL may have sealed these bytes into a record it still
                # has to send, and the retry must offer them again: they are
                # begun, so discard_unsent never cuts into them.
                self._pass_frames(c, c.wbuf_sent + length)
        elif fdq_len(&c.out_fds) == 0:
            n = send(c.fd, c.wbuf.data + c.wbuf.start, length, MSG_NOSIGNAL | MSG_DONTWAIT)
        else:
            n = send_with_fds(c.fd, c.wbuf.data + c.wbuf.start, length, c.wbuf_sent, &c.out_fds)
            # Memfd payloads now on their way: only these may be reported received.
            c.fd_bytes_sent += queued_fd_bytes - c.out_fds.held
        busx_trace(BUSX_TRACE_BROKER_SEND)
        return n

    cdef void _housekeeping(self) noexcept nogil:
        """Timers: close handshakes that took too long; resume accepting
        after EMFILE; close connections that could not drain their last
        words in time, or whose peer did not close after them."""
        cdef double now
        cdef size_t i
        if self.heartbeat_ms > 0 and self.turn_ms >= self.next_heartbeat_ms:
            self._check_heartbeats()
        if not (self.accept_paused or self.nclosing or self.handshaking != NULL):
            return
        now = now_ms()
        while (self.handshaking != NULL
               and now - self.handshaking.opened_at >= self.handshake_timeout_ms):
            self.handshake_timeouts += 1
            self._fail(self.handshaking, b"timeout", b"the handshake did not complete within "
                       b"the broker's handshake_timeout")
        if self.accept_paused and now >= self.accept_resume_at:
            self._resume_accept()
        if self.nclosing:
            i = 0
            while i < self.nconns:
                if self.conns[i].state == CS_CLOSING and now >= self.conns[i].close_by:
                    self._close_conn(self.conns[i])    # moves the last conn into slot i
                else:
                    i += 1

    cdef void _check_heartbeats(self) noexcept nogil:
        """Every quarter heartbeat: PING the clients heard nothing from, or
        sent nothing, for a heartbeat; close those heard nothing from for
        three (SPEC.md, Heartbeats). So a dead client is freed within 3.25 heartbeats. A
        sweep visits every connection, a few nanoseconds each: 10,000 idle
        clients cost tens of microseconds a sweep (BENCHMARKS.md)."""
        cdef double now = self.turn_ms
        cdef size_t i = 0
        cdef Conn *c
        cdef int verdict
        cdef bint was_away = (self.last_sweep_ms > 0
                              and now - self.last_sweep_ms > self.heartbeat_ms)
        self.next_heartbeat_ms = now + self.heartbeat_ms / 4
        self.last_sweep_ms = now
        while i < self.nconns:
            c = self.conns[i]
            if was_away:
                # The broker itself did not run (stopped, or starved) for
                # longer than a heartbeat: the silence it could not hear
                # does not count against its clients.
                c.last_in_ms = max(c.last_in_ms, now)
                c.last_out_ms = max(c.last_out_ms, now)
            if c.is_link:
                if link_beat(self, c, now):
                    i += 1
                continue
            if c.input_paused or c.backlogged:
                # Not read by the broker's own choice (back-pressure, or
                # frames waiting for their turn): not silent. A client that
                # stopped reading is the slow-consumer policy's to judge.
                c.last_in_ms = now
            verdict = heartbeat_verdict(c, now, self.heartbeat_ms)
            if verdict == HB_DEAD:
                self.heartbeat_timeouts += 1
                self._close_conn(c)     # moves the last conn into slot i
                continue
            if verdict == HB_PING:
                write_frame(&c.wbuf, K_PING, 0, 0, NULL, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0)
                c.last_ping_ms = now
                c.ping_end = stream_end(c)
                self._mark_dirty(c)
            i += 1
        self._flush_dirty()     # the loop flushed before housekeeping: PINGs go now

    cdef void _drop_subscriptions(self, Conn *c) noexcept nogil:
        cdef size_t i
        for i in range(c.nsubs):
            if self.link != NULL:
                link_interest(self, c.subs[i], -1)
            router_remove(&self.router, c.subs[i])
            subscription_free(c.subs[i])
        c.nsubs = 0
        sid_free(&c.sids)

    cdef void _close_conn(self, Conn *c) noexcept nogil:
        """Close now. The struct is freed after the current batch of events,
        which may still mention it."""
        cdef Conn *last
        if c.state == CS_CLOSED:
            return
        if c.state == CS_CLOSING:
            self.nclosing -= 1
        c.state = CS_CLOSED
        self._handshake_over(c)
        self._undefer(c)
        self._drop_subscriptions(c)
        poller_remove(&self.poller, c.fd)
        if c.tls != NULL:
            SSL_free(c.tls)
            c.tls = NULL
        close(c.fd)
        fdq_close_all(&c.in_fds)
        fdq_close_all(&c.out_fds)
        fd_bytes_gone(&self.delivery, c, c.fd_bytes_unreceived)
        last = self.conns[self.nconns - 1]
        self.conns[c.slot] = last
        last.slot = c.slot
        self.nconns -= 1
        c.next_dead = self.dead
        self.dead = c
        if self.accept_paused:
            self._resume_accept()
        if c.is_link:
            link_closed(self, c)
        else:
            self._py_closed(c.id)

    cdef void _py_security_event(self, uint32_t conn_id, int fd, const char *code,
                                 const char *message) noexcept with gil:
        """Tell Python (busx.broker, which logs it) that a connection was
        refused, failed or hit a limit: conn_id, or 0 and its fd when it was
        refused before it became one. Off the message path: failures only."""
        if self.handler is not None:
            try:
                self.handler.on_security_event(conn_id, fd, code.decode(), message.decode())
            except BaseException as exc:
                self._report(exc)

    cdef void _py_closed(self, uint32_t conn_id) noexcept with gil:
        if self.handler is not None:
            try:
                self.handler.on_close(conn_id)
            except BaseException as exc:
                self._report(exc)

    cdef void _undefer(self, Conn *c) noexcept nogil:
        cdef Conn **link = &self.backlog
        if not c.backlogged:
            return
        while link[0] != NULL:
            if link[0] == c:
                link[0] = c.next_backlog
                break
            link = &link[0].next_backlog
        c.backlogged = False

    cdef void _bury_dead(self) noexcept nogil:
        cdef Conn *c
        while self.dead != NULL:
            c = self.dead
            self.dead = c.next_dead
            buf_free(&c.rbuf)
            buf_free(&c.wbuf)
            fdq_free(&c.in_fds)
            fdq_free(&c.out_fds)
            free(c.subs)
            sid_free(&c.sids)
            verdicts_free(&c.verdicts)
            free(c)
            busx_count(BUSX_CONNS, -1)

    # ---- shutdown and introspection (Python side) ----

    def drain(self, double timeout):
        """Write out what connections still hold, for up to timeout seconds.
        Returns True when everything was delivered."""
        cdef double deadline = now_ms() + timeout * 1000
        cdef bint pending = True
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i
        with nogil:
            pthread_mutex_lock(&self.state_lock)
            while self.backlog != NULL:     # route what was read but not yet routed
                self._take_backlog()
            while True:
                pending = False
                for i in range(<int>self.nconns):
                    if buf_len(&self.conns[i].wbuf):
                        self._write(self.conns[i])
                for i in range(<int>self.nconns):
                    if buf_len(&self.conns[i].wbuf) and self.conns[i].state != CS_CLOSED:
                        pending = True
                if not pending or now_ms() >= deadline:
                    break
                pthread_mutex_unlock(&self.state_lock)
                poller_wait(&self.poller, events, MAX_EVENTS, 10)
                pthread_mutex_lock(&self.state_lock)
            self._bury_dead()
            pthread_mutex_unlock(&self.state_lock)
        return not pending

    def close_all(self):
        """Close every connection and the loop's own fds (not the listeners)."""
        with nogil:
            pthread_mutex_lock(&self.state_lock)
            while self.nconns:
                self._close_conn(self.conns[self.nconns - 1])
            self._bury_dead()
            nats_link_free(self.link)
            self.link = NULL
            pthread_mutex_unlock(&self.state_lock)
        free(self.conns)
        self.conns = NULL
        self.conns_cap = 0
        buf_free(&self.delivery.fd_payload)
        poller_close(&self.poller)

    def snapshot(self):
        """Counters of the broker and each connection, as plain data."""
        cdef object result
        with nogil:
            pthread_mutex_lock(&self.state_lock)
            self._take_snapshot()       # takes the GIL under state_lock: the lock order
            pthread_mutex_unlock(&self.state_lock)
        result, self.snapshot_taken = self.snapshot_taken, None
        return result

    cdef void _take_snapshot(self) noexcept with gil:
        try:
            self.snapshot_taken = self._snapshot()
        except BaseException as exc:
            self._report(exc)
            self.snapshot_taken = {}

    cdef object _snapshot(self):
        cdef size_t i
        cdef Conn *c
        connections = []
        for i in range(self.nconns):
            c = self.conns[i]
            if c.state != CS_READY or c.is_link:
                continue
            connections.append({
                "id": c.id, "subscriptions": c.nsubs, "pending_bytes": pending_bytes(c),
                "msgs_in": c.msgs_in, "msgs_out": c.msgs_out, "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out, "dropped": c.dropped,
            })
        return {
            "connections": connections, "subscriptions": self.router.subscriptions,
            "msgs_in": self.totals.msgs_in, "msgs_out": self.totals.msgs_out,
            "bytes_in": self.totals.bytes_in, "bytes_out": self.totals.bytes_out,
            "dropped": self.totals.dropped,
            "slow_consumer_cuts": self.totals.slow_consumer_cuts,
            "publishes_denied": self.totals.publishes_denied,
            "read_calls": self.read_calls, "write_calls": self.write_calls,
            "busy_polls": self.busy_polls, "busy_poll_hits": self.busy_poll_hits,
            "connections_refused": self.refused, "handshake_timeouts": self.handshake_timeouts,
            "heartbeat_timeouts": self.heartbeat_timeouts, "tls_failures": self.tls_failures,
            "subscriptions_refused": self.limits_hit,
            "busy_poll_window_us": round(self.poll_window_ms * 1000, 1),
            "route_cache_entries": self.router.cache_sets * CACHE_WAYS,
            "nats": self._link_snapshot() if self.link != NULL else None,
        }

    cdef object _link_snapshot(self):
        cdef NatsLink *link = self.link
        return {
            "state": ("down", "joining", "up")[link.state],
            "msgs_out": link.msgs_out, "msgs_in": link.msgs_in,
            "bytes_out": link.bytes_out, "bytes_in": link.bytes_in,
            "dropped_too_large": link.dropped_too_large,
            "dropped_buffer_full": link.dropped_buffer_full,
            "dropped_invalid": link.dropped_invalid, "dropped_denied": link.dropped_denied,
            "publisher_pauses": link.publisher_pauses,
            "fds_lost": link.fds_lost,
            "bytes_lost": link.bytes_lost, "max_payload": link.max_payload,
            "buffered_bytes": buf_len(&link.pending) + (buf_len(&link.conn.wbuf) if link.conn != NULL else 0),
            "remote_interest": link.remote.subscriptions,
        }

    # ---- the NATS link (_link.pxi has its behaviour) ----

    def enable_link(self, backbone, size_t buffer_max, bytes origin, bytes instance):
        """Give this broker a NATS link, before it runs: backbone is its
        Python half (busx.backbone.Backbone); instance names this broker
        (NATS_INSTANCE_LEN hex characters)."""
        if self.link != NULL:
            raise ValueError("this broker already has a NATS link")
        if len(instance) != NATS_INSTANCE_LEN:
            raise ValueError(f"instance must be {NATS_INSTANCE_LEN} characters")
        self.link = nats_link_new(buffer_max, origin, len(origin), instance)
        if self.link == NULL:
            raise MemoryError()
        self.backbone = backbone

    def attach_link(self, int fd, size_t max_payload, TlsStream tls=None):
        """The connector's new connection to a hub, CONNECT sent: the loop
        owns fd (and tls's session) from here. Any thread; the GIL is
        released first."""
        cdef SSL *session = tls.take() if tls is not None else NULL
        with nogil:
            pthread_mutex_lock(&self.state_lock)
            if self.link != NULL:
                link_attach(self, fd, max_payload, session)
            else:               # closed meanwhile (close_all)
                if session != NULL:
                    SSL_free(session)
                close(fd)
            pthread_mutex_unlock(&self.state_lock)
        poller_wake(&self.poller)

    def drop_link(self, str why):
        """Give the link's connection up. The loop thread only (from a
        backbone callback)."""
        link_lose(self, why.encode())

    def remote_add(self, uint32_t sid, bytes pattern, bytes queue):
        """Interest elsewhere (an LS+ within nats_export), as subscription
        sid of the remote router. The loop thread only (from on_line)."""
        cdef NatsLink *link = self.link
        cdef Subscription *s = new_subscription(NULL, sid, queue, len(queue))
        if s == NULL:
            raise MemoryError()
        if sid_insert(&link.sids, s) < 0:
            subscription_free(s)
            raise MemoryError()
        if router_add(&link.remote, s, pattern, len(pattern)) < 0:
            sid_delete(&link.sids, s)
            subscription_free(s)
            raise MemoryError()

    def remote_remove(self, uint32_t sid):
        """Interest elsewhere withdrawn (LS-, or not in a new snapshot)."""
        cdef NatsLink *link = self.link
        cdef Subscription *s = sid_find(&link.sids, sid)
        if s != NULL:
            sid_delete(&link.sids, s)
            router_remove(&link.remote, s)
            subscription_free(s)
