# The client's connection, in two rooms and a loop. The outbox
# (_outbox.pxi) is the send side: publishers append frames under its lock.
# The inbox (_inbox.pxi) is the receive side: whole frames for Python, under
# a lock of its own. One I/O thread (run(), without the GIL) swaps the
# outbox's frames out and writes them in large sends, and reads large chunks
# into the inbox. Python parses the inbox into Message objects in batches
# (take), so per-message Python work stays tiny.

cpdef enum RunResult:          # busx.client acts on these
    RUN_CLOSED = 0        # request_close() ended the loop
    RUN_EOF = 1           # the broker closed the connection
    RUN_ERROR = 2         # socket error: last_errno says which
    RUN_PROTOCOL = 3      # the broker sent something this client cannot parse
    RUN_FDS_LOST = 4      # received fds were dropped by the kernel (out of fds)
    RUN_SILENT = 5        # nothing arrived for 3 heartbeats: the broker or the path is gone


FORKED_MESSAGE = ("this bus was connected by the parent process before fork(); "
                  "connect again in the child with busx.connect()")


cdef class ClientIO:
    """One connection's rooms and I/O loop. busx.client.Bus owns it and
    runs run() on a daemon thread.

    Threads and locks: busx/_core.pxd, beside its fields."""

    def __cinit__(self):
        self.fd = -1
        poller_init(&self.poller)
        outbox_init(&self.outbox, 0)
        inbox_init(&self.inbox, 0, 0)
        pthread_mutex_init(&self.read_lock, NULL)
        pthread_mutex_init(&self.watch_lock, NULL)
        pthread_mutex_init(&self.tls_lock, NULL)

    def __init__(self, size_t max_buffer, size_t max_frame, double heartbeat=0.0):
        cdef rlimit files
        cdef size_t max_held_fds = 1024
        if getrlimit(RLIMIT_NOFILE, &files) == 0 and files.rlim_cur != RLIM_INFINITY:
            max_held_fds = max(<size_t>64, <size_t>files.rlim_cur // 4)
        self.outbox.max_buffer = max_buffer
        self.inbox.max_buffer = max_buffer
        self.inbox.max_held_fds = max_held_fds
        self.max_frame = max_frame
        self.heartbeat_ms = heartbeat * 1000
        self.topic_cache = {}
        cdef int status = poller_open(&self.poller)
        if status < 0:
            raise_os_error("cannot create the client's event loop", -status)
        self.inbox.direct_wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.inbox.direct_wake_fd < 0:
            raise_os_error("cannot create the client's event loop")

    def __dealloc__(self):
        self.release()
        buf_free(&self.packed)
        outbox_destroy(&self.outbox)
        inbox_destroy(&self.inbox)
        pthread_mutex_destroy(&self.read_lock)
        pthread_mutex_destroy(&self.watch_lock)
        pthread_mutex_destroy(&self.tls_lock)

    def release(self):
        """Free fds and buffers. Only once the I/O thread has ended, and
        under the Bus's pump lock (take() parses `taken`). Shared state is
        freed under both rooms' locks, which a publisher that raced close()
        takes before touching it and then finds the state CL_CLOSED."""
        if not self.forked:
            with nogil:
                pthread_mutex_lock(&self.inbox.lock)
                self._stop_direct_reader()
                pthread_mutex_lock(&self.outbox.lock)
                self._release_shared()
                pthread_mutex_unlock(&self.outbox.lock)
                pthread_mutex_unlock(&self.inbox.lock)
        else:
            self._release_shared()      # the child's only thread: no lock to take
        buf_free(&self.taken)
        if not self.packing:    # else a publisher is copying it into a memfd, GIL released
            buf_free(&self.packed)

    cdef void _release_shared(self) noexcept nogil:
        if self.forked:
            # A parent thread may have been inside a call on the TLS
            # session, or held OpenSSL's own locks, at fork(): leave it.
            self.tls = NULL
        self._close_socket()
        poller_close(&self.poller)
        outbox_free(&self.outbox)
        inbox_free(&self.inbox)
        buf_free(&self.rbuf)
        fdq_free(&self.recv_fds)

    @property
    def bus(self):
        """The Bus (or AsyncBus) msg.respond() publishes with; held weakly."""
        return self.bus_ref() if self.bus_ref is not None else None

    @bus.setter
    def bus(self, value):
        self.bus_ref = weakref.ref(value)

    # ---- connection lifecycle (the I/O thread, or before it starts) ----

    def attach(self, int fd, bint is_unix, bytes prologue, size_t max_frame,
               bint payload_fds=False, TlsStream tls=None):
        """Start using fd (connected, handshake done; this object owns it from
        now on), through tls's TLS session when given. prologue
        (re-subscriptions) goes out before anything still buffered from a
        previous connection; a frame the previous connection cut in half is
        dropped whole. payload_fds: the broker takes large payloads as memfds."""
        cdef const char *head = prologue
        cdef size_t head_len = len(prologue)
        cdef int status
        cdef SSL *session = tls.take() if tls is not None else NULL
        with nogil:
            pthread_mutex_lock(&self.inbox.lock)
            pthread_mutex_lock(&self.outbox.lock)
            status = self._attach(fd, session, is_unix, head, head_len, max_frame, payload_fds)
            pthread_mutex_unlock(&self.outbox.lock)
            pthread_mutex_unlock(&self.inbox.lock)
        if status == -1:
            raise MemoryError()
        if status < 0:
            raise_os_error("epoll_ctl", -status)

    cdef int _attach(self, int fd, SSL *tls, bint is_unix, const char *prologue,
                     size_t prologue_len, size_t max_frame, bint payload_fds) noexcept nogil:
        """attach() under both rooms' locks: 0, -1 when memory runs out, or -errno."""
        cdef int status
        self.tls = tls
        self.is_unix = is_unix
        self.payload_fds = payload_fds and is_unix
        if outbox_reattach(&self.outbox, prologue, prologue_len, is_unix, self.payload_fds) < 0:
            return -1
        buf_free(&self.rbuf)
        fdq_close_all(&self.recv_fds)
        self.fd = fd
        self.bytes_sent_on_socket = 0
        self.max_frame = max_frame
        self.inbox.direct_result = -1
        self.inbox.reading_paused = False
        self.last_in_ms = self.last_beat_ms = now_ms()
        self.state = CL_ATTACHED
        inbox_signal(&self.inbox)
        pthread_mutex_lock(&self.watch_lock)
        self.watch_in = self.watch_out = True
        status = -errno if poller_add(&self.poller, fd, EPOLLIN | EPOLLOUT, TAG_SOCKET) < 0 else 0
        pthread_mutex_unlock(&self.watch_lock)
        return status

    def detach(self):
        """Forget the dead socket: close it, drop its partial input, close the
        fds that partial input announced. Whole frames stay in the inbox.
        What was written to it and not yet taken by the broker's side is
        counted (bytes_lost_in_flight): at most once, and never silently."""
        cdef int unacknowledged = 0
        if self.forked:
            return
        with nogil:
            pthread_mutex_lock(&self.inbox.lock)
            pthread_mutex_lock(&self.outbox.lock)
            if self.state == CL_ATTACHED:
                self.state = CL_DETACHED
            pthread_mutex_unlock(&self.outbox.lock)
            # A direct reader takes the outbox's lock as it finishes: wait
            # for it without holding that lock.
            self._stop_direct_reader()
            pthread_mutex_lock(&self.outbox.lock)
            if self.fd >= 0:
                poller_remove(&self.poller, self.fd)
                # Over UNIX, SIOCOUTQ counts the kernel memory the unread
                # sends hold (per send, not per byte): never more than was sent.
                if ioctl(self.fd, SIOCOUTQ, &unacknowledged) == 0 and unacknowledged > 0:
                    self.bytes_lost_in_flight += min(<unsigned long long>unacknowledged,
                                                     self.bytes_sent_on_socket)
            self._close_socket()
            buf_free(&self.rbuf)
            fdq_close_all(&self.recv_fds)
            inbox_signal(&self.inbox)
            pthread_cond_broadcast(&self.outbox.room_cond)
            pthread_mutex_unlock(&self.outbox.lock)
            pthread_mutex_unlock(&self.inbox.lock)

    cdef void _close_socket(self) noexcept nogil:
        """Close the socket and free its TLS session. Both rooms' locks
        held (or the only thread left): nobody else is inside a call on them."""
        if self.tls != NULL:
            SSL_free(self.tls)
            self.tls = NULL
        close_fd(&self.fd)

    cdef ssize_t _send(self, const char *data, size_t length, FdQueue *fds,
                       unsigned long long base, int *tls_want) noexcept nogil:
        """One send() of data (fds over UNIX, see send_with_fds; through
        TLS when the connection has it). -1 with errno, as send()."""
        cdef ssize_t n
        if self.tls == NULL:
            if fds == NULL:
                n = send(self.fd, data, length, MSG_NOSIGNAL | MSG_DONTWAIT)
            else:
                n = send_with_fds(self.fd, data, length, base, fds)
        else:
            pthread_mutex_lock(&self.tls_lock)
            n = tls_send(self.tls, data, length, tls_want)
            pthread_mutex_unlock(&self.tls_lock)
        if n > 0:
            self.bytes_sent_on_socket += n
        return n

    cdef ssize_t _recv_tls(self) noexcept nogil:
        """_read's recv through TLS: what OpenSSL read ahead, which epoll
        cannot announce, up to READ_CHUNK (and one read-ahead) a call;
        tls_more says that more is held. A read that must first write
        (TLS's own messages) says EAGAIN like one with nothing to read: the
        I/O thread writes on its way round, and the socket stays watched for
        input. read_lock held."""
        cdef ssize_t n, more
        cdef int want = 0, reserved
        pthread_mutex_lock(&self.tls_lock)
        n = tls_recv(self.tls, self.rbuf.data + self.rbuf.end,
                     min(self.rbuf.cap - self.rbuf.end, <size_t>READ_CHUNK), &want)
        while n > 0 and tls_holds_more(self.tls) and n < READ_CHUNK:
            self.rbuf.end += n          # buf_reserve keeps only [start, end)
            reserved = buf_reserve(&self.rbuf, TLS_READ_AHEAD)
            self.rbuf.end -= n
            if reserved < 0:
                break
            more = tls_recv(self.tls, self.rbuf.data + self.rbuf.end + n,
                            self.rbuf.cap - self.rbuf.end - n, &want)
            if more <= 0:
                break
            n += more
        # Past a chunk, the rest waits for the next _read (the receive side
        # stays bounded); the I/O thread comes back for it without epoll.
        self.tls_more = n > 0 and tls_holds_more(self.tls)
        pthread_mutex_unlock(&self.tls_lock)
        return n

    def forget_in_child(self):
        """After fork(), in the child: close this copy's fds without touching
        the mutexes (another thread of the parent may have held them) or the
        socket's stream, which belongs to the parent."""
        self.forked = True
        self.state = CL_CLOSED
        self.release()

    def fail(self):
        """No reconnect: later publishes raise Disconnected."""
        self._set_state(CL_FAILED)

    def request_close(self):
        """Make run() return RUN_CLOSED and later calls raise Closed."""
        self._set_state(CL_CLOSED)
        if self.forked:
            return
        with nogil:
            pthread_mutex_lock(&self.outbox.lock)
            self.close_requested = 1
            self._wake_io()
            pthread_mutex_unlock(&self.outbox.lock)

    cdef void _set_state(self, int state):
        if self.forked:
            return
        with nogil:
            pthread_mutex_lock(&self.inbox.lock)
            pthread_mutex_lock(&self.outbox.lock)
            if self.state != CL_CLOSED:
                self.state = state
            inbox_signal(&self.inbox)
            pthread_cond_broadcast(&self.outbox.room_cond)
            pthread_mutex_unlock(&self.outbox.lock)
            pthread_mutex_unlock(&self.inbox.lock)

    @property
    def attached(self):
        return self.state == CL_ATTACHED

    @property
    def held_bytes(self):
        """Bytes of received messages queued for Python (inbox and queues)."""
        return buf_len(&self.inbox.frames) + self.inbox.fd_bytes + self.inbox.held

    @property
    def unsent_bytes(self):
        """Bytes not yet taken by the broker, with the payloads of memfds."""
        return outbox_unsent(&self.outbox)

    def notify_fd_open(self):
        """An eventfd that becomes readable when new frames reach the inbox
        (for asyncio's add_reader); created on first use."""
        cdef int fd
        if self.forked:     # the parent's threads may have held inbox.lock at fork()
            raise Closed(FORKED_MESSAGE)
        with nogil:
            pthread_mutex_lock(&self.inbox.lock)
            if self.inbox.notify_fd < 0:
                self.inbox.notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
            fd = self.inbox.notify_fd
            pthread_mutex_unlock(&self.inbox.lock)
        if fd < 0:
            raise_os_error("eventfd")
        return fd

    # ---- the I/O thread ----

    def run(self):
        """The I/O loop; returns a RunResult when the connection ends."""
        cdef int result
        with nogil:
            result = self._run()
        return result

    cdef int _run(self) noexcept nogil:
        cdef epoll_event events[4]
        cdef int n, i, result
        while True:
            n = poller_wait(&self.poller, events, 4,
                            0 if self._owes_tls_read() else self._heartbeat_wait_ms())
            if n < 0:
                if errno == EINTR:
                    continue
                self.last_errno = errno
                return RUN_ERROR
            for i in range(n):
                if events[i].data.u64 == TAG_WAKE:
                    poller_drain(&self.poller)
                elif events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    pthread_mutex_lock(&self.read_lock)
                    result = self._read()
                    pthread_mutex_unlock(&self.read_lock)
                    if result >= 0:
                        return result
            if self.close_requested:
                return RUN_CLOSED
            if self.inbox.direct_result >= 0:
                return self.inbox.direct_result
            if self.inbox.reading_paused:    # a peek; _resume_input looks under the lock
                self._resume_input()
            if self._owes_tls_read():
                pthread_mutex_lock(&self.read_lock)     # peeks; _read looks again
                result = self._read() if self.tls_more else -1
                pthread_mutex_unlock(&self.read_lock)
                if result >= 0:
                    return result
            result = self._heartbeat()
            if result >= 0:
                return result
            result = self._write()
            if result >= 0:
                return result

    cdef inline bint _owes_tls_read(self) noexcept nogil:
        """Whether the I/O thread must read what OpenSSL holds: it does, and
        nobody else reads or has paused reading. Peeks without locks."""
        return self.tls_more and not (self.inbox.reading_paused or self.inbox.direct_reader)

    cdef int _heartbeat(self) noexcept nogil:
        """SPEC.md, Heartbeats: PING a broker we sent nothing to, or heard
        nothing from, for a heartbeat (its PONG is what we hear back); a
        broker we heard nothing from for three is gone, or the path to it
        is. Silence does not count while we stopped reading (the inbox is
        full). -1 to carry on, else RUN_SILENT."""
        cdef double now
        if self.heartbeat_ms <= 0:
            return -1
        now = now_ms()
        if now - self.last_beat_ms > 2 * self.heartbeat_ms:
            # This thread did not run for that long (the process was
            # stopped): the silence it could not hear does not count.
            self.last_in_ms = max(self.last_in_ms, now)
        self.last_beat_ms = now
        if not self.inbox.reading_paused and now - self.last_in_ms >= 3 * self.heartbeat_ms:
            self.last_errno = ETIMEDOUT
            return RUN_SILENT
        outbox_keep_alive(&self.outbox, now, self.heartbeat_ms, self.last_in_ms)
        return -1

    cdef int _heartbeat_wait_ms(self) noexcept nogil:
        """How long the I/O thread may sleep before _heartbeat has work:
        -1 (for good) with heartbeats off. Peeks without locks: a stale
        value only moves one wake-up."""
        cdef double now, due
        if self.heartbeat_ms <= 0:
            return -1
        now = now_ms()
        due = max(self.outbox.last_ping,
                  min(self.outbox.last_append, self.last_in_ms)) + self.heartbeat_ms
        if not self.inbox.reading_paused:
            due = min(due, self.last_in_ms + 3 * self.heartbeat_ms)
        return <int>min(max(due - now, 0.0) + 1, 3600000.0)

    cdef int _write(self) noexcept nogil:
        """Send what is buffered until nothing is left or the socket is full.
        -1 to carry on, else a RunResult."""
        cdef Outbox *box = &self.outbox
        cdef ssize_t n
        cdef bint socket_full = False
        cdef bint blocked = False
        cdef bint chasing = False
        cdef int tls_want = 0
        while not blocked:
            if chasing and 0 < buf_len(&box.out) < YIELD_BELOW:
                # Publishers are still appending: let them (or the broker)
                # have this core for a moment so the next send carries a
                # batch. Free on an idle core; only contended cores wait.
                # Not when nothing was appended: a publisher waiting for an
                # answer would find this thread still busy (wake_pending)
                # and queue its next lone frame instead of sending it directly.
                sched_yield()
            if not outbox_take(box):
                break
            chasing = True
            while buf_len(&box.sending):
                n = self._send(box.sending.data + box.sending.start, outbox_send_length(box),
                               &box.sending_fds, box.sending.start, &tls_want)
                self.write_calls += 1
                busx_trace(BUSX_TRACE_CLIENT_SEND)
                if n < 0:
                    if errno == EINTR:
                        continue
                    if errno == EAGAIN:
                        # Full, or TLS waits for the broker's bytes (read
                        # anyway): only a full socket is watched for room.
                        blocked = True
                        socket_full = tls_want != SSL_ERROR_WANT_READ
                        break
                    self.last_errno = errno
                    return RUN_ERROR
                outbox_sent(box, n)
        if socket_full != box.want_out:
            pthread_mutex_lock(&box.lock)
            box.want_out = socket_full
            pthread_mutex_unlock(&box.lock)
            self._watch(-1, socket_full)
        return -1

    cdef void _watch(self, int input, int output) noexcept nogil:
        """Watch the socket for input and output (-1: as now). Each room
        changes its own half; the lock keeps the two halves together."""
        pthread_mutex_lock(&self.watch_lock)
        if input >= 0:
            self.watch_in = input
        if output >= 0:
            self.watch_out = output
        poller_modify(&self.poller, self.fd, ((EPOLLIN if self.watch_in else 0)
                                              | (EPOLLOUT if self.watch_out else 0)), TAG_SOCKET)
        pthread_mutex_unlock(&self.watch_lock)

    cdef inline void _watch_input(self) noexcept nogil:
        """The I/O thread reads unless reading is paused or a waiting thread
        reads directly. inbox.lock held."""
        self._watch(not (self.inbox.reading_paused or self.inbox.direct_reader), -1)

    cdef void _resume_input(self) noexcept nogil:
        """Read again once Python has made room. The I/O thread's."""
        pthread_mutex_lock(&self.inbox.lock)
        if self.inbox.reading_paused and not inbox_full(&self.inbox):
            self.inbox.reading_paused = False
            self.last_in_ms = now_ms()       # silence counts from now
            self._watch_input()
            outbox_stall_acks(&self.outbox, False)
        pthread_mutex_unlock(&self.inbox.lock)

    cdef int _read(self) noexcept nogil:
        """One recv; whole frames go to the inbox. -1 to carry on. read_lock held."""
        cdef bint truncated = False
        cdef ssize_t n
        cdef size_t whole
        cdef size_t fd_bytes = 0, acked = 0, claimed = 0
        cdef bint pinged = False
        if buf_reserve(&self.rbuf, READ_CHUNK) < 0:
            self.last_errno = ENOMEM
            return RUN_ERROR
        # At most READ_CHUNK per call keeps received-but-unread bytes within
        # max_buffer + READ_CHUNK (SPEC.md: the receive side is bounded).
        if self.tls == NULL:
            n = recv_with_fds(self.fd, self.rbuf.data + self.rbuf.end,
                              min(self.rbuf.cap - self.rbuf.end, <size_t>READ_CHUNK),
                              &self.recv_fds if self.is_unix else NULL, &truncated)
        else:
            n = self._recv_tls()
        self.read_calls += 1
        if n < 0:
            if errno == EAGAIN:
                return -1
            self.last_errno = errno
            return RUN_ERROR
        if truncated:
            return RUN_FDS_LOST
        if n == 0:
            return RUN_EOF
        busx_trace(BUSX_TRACE_CLIENT_READ)
        self.last_in_ms = now_ms()
        self.rbuf.end += n
        whole = self._whole_frames(&fd_bytes, &acked, &claimed, &pinged)
        if whole == <size_t>-1:
            return RUN_PROTOCOL
        if whole == 0:
            return -1
        if ((acked or fd_bytes or pinged)
                and outbox_received(&self.outbox, acked, fd_bytes, pinged)):
            self._wake_io()
        pthread_mutex_lock(&self.inbox.lock)
        inbox_add(&self.inbox, &self.rbuf, whole, &self.recv_fds, claimed, fd_bytes)
        if inbox_full(&self.inbox) and not self.inbox.reading_paused:
            # Python is not keeping up: stop reading the socket, so the
            # broker's slow-consumer policy sees it (SPEC.md, Guarantees).
            self.inbox.reading_paused = True
            self._watch_input()
            # Acks of payload memfds no longer reach us: publishers
            # waiting on them must look again (outbox_has_room).
            outbox_stall_acks(&self.outbox, True)
        pthread_mutex_unlock(&self.inbox.lock)
        return -1

    def begin_round_trip(self):
        self.inbox.round_trips += 1
        self._resume_reading()

    def end_round_trip(self):
        self.inbox.round_trips -= 1

    cdef void _resume_reading(self) noexcept:
        """Python made room: wake the I/O thread if it stopped reading and
        may read again (it looks for itself, _resume_input)."""
        if self.inbox.reading_paused and not self.forked:
            with nogil:
                pthread_mutex_lock(&self.inbox.lock)
                if self.inbox.reading_paused and not inbox_full(&self.inbox):
                    self._wake_io()
                pthread_mutex_unlock(&self.inbox.lock)

    cdef inline void _wake_io(self) noexcept nogil:
        """Wake the I/O thread. Either room's lock held, or read_lock:
        release() closes the poller under both, once no reader is left."""
        poller_wake(&self.poller)

    cdef size_t _whole_frames(self, size_t *fd_bytes, size_t *acked,
                              size_t *claimed, bint *pinged) noexcept nogil:
        """Bytes of whole frames at the front of rbuf, adding the payload
        bytes their memfds hold to fd_bytes, the bytes of our memfds the
        broker reports taken to acked, and the fds they carry to claimed;
        *pinged set when the broker PINGed. (size_t)-1 if malformed."""
        cdef size_t at = 0, avail = buf_len(&self.rbuf)
        cdef FrameView f
        cdef int status
        while True:
            status = parse_frame(self.rbuf.data + self.rbuf.start + at, avail - at,
                                 self.max_frame, &f)
            if status == PARSE_NEED_MORE:
                return at
            if status != PARSE_OK:
                return <size_t>-1
            if f.kind == K_MSG and f.flags & F_PAYLOAD_FD:
                if f.payload_len != 8 or f.nfds == 0:
                    return <size_t>-1
                fd_bytes[0] += busx_load_u64(f.payload)
            elif f.kind == K_RECEIVED and f.payload_len == 8:
                acked[0] += busx_load_u64(f.payload)
            elif f.kind == K_PING:
                pinged[0] = True
            claimed[0] += f.nfds
            at += f.size
            self.frames_in += 1

    # ---- publishing (any thread) ----

    def publish_data(self, topic, data, fds=(), timeout=None, reply=None):
        """Validate topic, pack data and queue it: Bus.publish's whole hot
        path in one C call (benchmarks/test_publish.py)."""
        cdef bytes topic_b = self._topic(topic)
        cdef bytes reply_b = None if reply is None else self._topic(reply)
        cdef double wait = -1.0 if timeout is None else timeout
        cdef Buffer own
        cdef Buffer *b = &self.packed
        cdef bytes fallback
        if type(data) is bytes and self._publish_bytes_by_fd(topic_b, data, reply_b, fds, wait):
            return
        if self.packing:
            # Another thread is between packing and queueing (waiting for
            # room, GIL released): this one packs into a buffer of its own.
            memset(&own, 0, sizeof(Buffer))
            b = &own
        else:
            self.packing = True
        try:
            fallback = pack_payload(b, data)
            if fallback is not None:
                self._publish(topic_b, fallback, len(fallback), reply_b, fds or None, wait)
            else:
                self._publish(topic_b, b.data, b.end, reply_b, fds or None, wait)
        finally:
            if b == &own:
                buf_free(&own)
            else:
                self.packing = False
                buf_shrink(&self.packed, PACKED_KEEP)

    cdef bint _publish_bytes_by_fd(self, bytes topic, bytes data, bytes reply, object fds,
                                   double timeout) except -1:
        """A large bytes payload goes into its memfd straight from the object,
        behind the msgpack bin32 header: no packing copy. False when it does
        not qualify (the caller packs it as usual)."""
        cdef size_t size = len(data)
        cdef const char *body = data
        cdef char head[5]
        cdef int fd
        if not (self._memfds_wanted(size) and size <= 0xffffffff):
            return False
        if not self._deliverable(len(topic), 0 if reply is None else len(reply), size + 5):
            return False            # _publish raises PayloadTooLarge before making a memfd
        head[0] = <char>0xc6
        busx_store_be(head + 1, size, 4)
        with nogil:
            fd = payload_memfd(head, 5, body, size)
        if fd < 0:
            return False
        self._publish(topic, NULL, size + 5, reply, fds or None, timeout, fd)
        return True

    def publish_many_data(self, items):
        """Bus.publish_many: pack every (topic, data) first, then queue them
        in order, so data msgpack cannot encode leaves nothing half-sent."""
        self.publish_batch([(self._topic(topic), encode(data)) for topic, data in items])

    cdef bytes _topic(self, topic):
        """topic validated and encoded. Remembered, but not reply topics:
        each is used once, and they would crowd out the topics that repeat."""
        cdef object cached
        cdef bytes encoded
        if type(topic) is not str:
            return validate_topic(topic)        # raises, or takes a str subclass's value
        cached = self.topic_cache.get(topic)
        if cached is not None:
            return <bytes>cached
        if (<str>topic).isascii():
            encoded = (<str>topic).encode("ascii")
            if check_publish_topic(encoded, len(encoded)) != TOPIC_VALID:
                validate_topic(topic)           # raises InvalidTopic saying why
        else:
            encoded = validate_topic(topic)
        if len(self.topic_cache) < TOPIC_CACHE_SIZE and not is_inbox_topic(encoded, len(encoded)):
            self.topic_cache[topic] = encoded
        return encoded

    def publish(self, bytes topic, bytes payload, bytes reply=None, fds=None,
                double timeout=-1.0):
        """Queue a PUB frame of encoded topic and payload; blocks while the
        buffer is full (back-pressure)."""
        self._publish(topic, payload, len(payload), reply, fds, timeout)

    cdef int _publish(self, bytes topic, const char *payload, size_t payload_len,
                      bytes reply, object fds, double timeout, int payload_fd=-1) except -1:
        """Queue a PUB. Over UNIX a payload of PAYLOAD_FD_MIN bytes or more
        goes into a memfd; payload_fd: one made already, holding the
        payload_len bytes (this call owns it)."""
        cdef int dup_fds[MAX_FDS_ON_WIRE]
        cdef int nfds = 0
        cdef int status = APPEND_OK
        cdef const char *reply_p = NULL
        cdef size_t reply_len = 0
        cdef uint8_t flags = 0
        cdef size_t held = 0
        cdef char size_field[8]
        if reply is not None:
            reply_p = reply
            reply_len = len(reply)
        try:
            if not self._deliverable(len(topic), reply_len, payload_len):
                self._raise_append(APPEND_TOO_LARGE, len(topic) + reply_len + payload_len)
            if fds:
                nfds = duplicate_fds(fds, dup_fds, self.is_unix)
            if payload_fd < 0 and self._memfds_wanted(payload_len):
                with nogil:
                    payload_fd = payload_memfd(NULL, 0, payload, payload_len)
            if payload_fd >= 0:
                # The frame carries the size; the memfd, its last fd, the bytes.
                busx_store_u64(size_field, payload_len)
                flags, held = F_PAYLOAD_FD, payload_len
                payload, payload_len = size_field, 8
                dup_fds[nfds] = payload_fd
                payload_fd = -1
                nfds += 1
            status = self._append(K_PUB, flags, 0, topic, len(topic), reply_p, reply_len,
                                  payload, payload_len, dup_fds, nfds, held, timeout)
        except BaseException:       # e.g. interrupted (Ctrl-C) while waiting for room
            status = APPEND_CLOSED
            raise
        finally:
            if status != APPEND_OK:
                for i in range(nfds):
                    close(dup_fds[i])
                if payload_fd >= 0:
                    close(payload_fd)
        if status != APPEND_OK:
            self._raise_append(status, len(topic) + reply_len + payload_len + held)
        if held:
            self.fd_payloads_out += 1
        return 0

    def publish_batch(self, list frames, double timeout=-1.0):
        """Queue many (topic, payload) PUB frames in order."""
        cdef bytes topic, payload
        cdef int status
        for topic, payload in frames:       # all or nothing: check sizes first
            if not self._deliverable(len(topic), 0, len(payload)):
                self._raise_append(APPEND_TOO_LARGE, len(topic) + len(payload))
        for topic, payload in frames:
            status = self._append(K_PUB, 0, 0, topic, len(topic), NULL, 0, payload,
                                  len(payload), NULL, 0, 0, timeout)
            if status != APPEND_OK:
                self._raise_append(status, len(topic) + len(payload))

    def send_control(self, int kind, unsigned int id, bytes topic=b"", bytes reply=b"",
                     bytes payload=b""):
        """Queue a control frame (SUB, UNSUB, PING, STATS); never blocks."""
        cdef int status = self._append(kind, 0, id, topic, len(topic), reply, len(reply),
                                       payload, len(payload), NULL, 0, 0, -2.0)
        if status != APPEND_OK:
            self._raise_append(status, len(payload))

    cdef inline bint _deliverable(self, size_t topic_len, size_t reply_len,
                                  size_t payload_len) noexcept nogil:
        """Whether a PUB's MSG fits max_frame once the broker stamps it with
        the sender (at most MAX_NAME bytes): a message every subscriber can
        take (SPEC.md, Limits)."""
        return frame_size(topic_len, reply_len, MAX_NAME, payload_len) <= self.max_frame

    cdef int _raise_append(self, int status, size_t size) except -1:
        if status == APPEND_CLOSED:
            raise Closed("the bus is closed")
        if status == APPEND_FORKED:
            raise Closed(FORKED_MESSAGE)
        if status == APPEND_FAILED:
            raise Disconnected("the connection to the broker was lost and reconnect=False")
        if status == APPEND_TIMEOUT:
            raise Timeout("publish buffer stayed full until the timeout: the broker is "
                          "not taking messages as fast as they are published")
        if status == APPEND_TOO_LARGE:
            raise PayloadTooLarge(
                f"a message of {size + HEADER_SIZE} bytes, with {MAX_NAME} bytes of room for "
                f"the broker's sender stamp, exceeds the broker's max_frame of "
                f"{self.max_frame} bytes: publish a smaller payload or raise max_frame")
        raise MemoryError()

    cdef int _append(self, uint8_t kind, uint8_t flags, uint32_t id, const char *topic,
                     size_t topic_len, const char *reply, size_t reply_len,
                     const char *payload, size_t payload_len, int *fds, int nfds,
                     size_t held, double timeout) except? -9:
        """Queue one frame, waiting for room while the buffer is full. held:
        payload bytes its last fd carries (a payload memfd), which count
        against the buffer like queued bytes do.
        timeout: < 0 waits forever; -2 never waits (control frames)."""
        cdef Room room
        cdef timespec deadline
        cdef int status
        room.bytes = frame_size(topic_len, reply_len, 0, payload_len) + held
        room.fds = nfds
        # A memfd payload (held bytes) stands for the same bytes inline.
        if not self._deliverable(topic_len, reply_len, held if held else payload_len):
            return APPEND_TOO_LARGE
        if timeout >= 0:
            deadline_after(&deadline, timeout)
        while True:
            status = self._try_append(kind, flags, id, topic, topic_len, reply, reply_len,
                                      payload, payload_len, fds, nfds, held, &room,
                                      timeout == -2.0)
            if status != APPEND_NO_ROOM:
                return status
            if not self._sliced(0, &room, &deadline if timeout >= 0 else NULL):
                return APPEND_TIMEOUT

    cdef int _try_append(self, uint8_t kind, uint8_t flags, uint32_t id, const char *topic,
                         size_t topic_len, const char *reply, size_t reply_len,
                         const char *payload, size_t payload_len, int *fds, int nfds,
                         size_t held, Room *room, bint ignore_limit) noexcept nogil:
        """Queue the frame if there is room (or ignore_limit). The outbox's
        lock is never held while waiting for the GIL, so taking it here with
        the GIL held cannot deadlock."""
        cdef Outbox *box = &self.outbox
        cdef int status = APPEND_OK
        cdef bint wake = False
        busx_trace(BUSX_TRACE_PUBLISH)
        if self.forked:
            return APPEND_FORKED
        pthread_mutex_lock(&box.lock)
        if self.state == CL_CLOSED:
            status = APPEND_CLOSED
        elif self.state == CL_FAILED:
            status = APPEND_FAILED
        elif not (ignore_limit or outbox_has_room(box, room)):
            status = APPEND_NO_ROOM
        elif nfds == 0 and self._send_directly(kind, id, topic, topic_len, reply, reply_len,
                                               payload, payload_len, &wake):
            pass
        else:
            status = outbox_queue(box, kind, flags, id, topic, topic_len, reply, reply_len,
                                  payload, payload_len, fds, nfds, held)
            if status == APPEND_OK:
                self.frames_out += 1
                wake = outbox_claim_wake(box)
        if wake:
            self._wake_io()
        pthread_mutex_unlock(&box.lock)
        return status

    cdef inline bint _memfds_wanted(self, size_t payload_len) noexcept nogil:
        """Whether a payload travels in a memfd: over UNIX, large, and
        while acks can come back (outbox_has_room)."""
        return (self.payload_fds and not self.outbox.acks_stalled
                and payload_len >= PAYLOAD_FD_MIN)

    cdef bint _send_directly(self, uint8_t kind, uint32_t id, const char *topic,
                             size_t topic_len, const char *reply, size_t reply_len,
                             const char *payload, size_t payload_len,
                             bint *wake) noexcept nogil:
        """Send a lone frame from the caller's thread, sparing the hand-off
        to the I/O thread (a wake-up each way costs tens of microseconds).
        Only when that thread is idle - nothing queued, nothing in flight, so
        it is not inside send() and cannot start until we drop the lock -
        and the previous frame is not recent: bursts still go out batched.
        outbox.lock held. Returns whether the frame was taken."""
        cdef Outbox *box = &self.outbox
        cdef double now = now_ms()
        cdef double gap = now - box.last_append
        cdef ssize_t n
        cdef int tls_want = 0
        box.last_append = now
        if (gap < DIRECT_SEND_GAP_NS / 1e6 or self.state != CL_ATTACHED or box.wake_pending
                or box.want_out or buf_len(&box.out) or buf_len(&box.sending)):
            return False
        if write_frame(&box.sending, kind, 0, id, topic, topic_len, reply, reply_len,
                       NULL, 0, payload, payload_len, 0, 0) < 0:
            return False
        self.frames_out += 1
        self.write_calls += 1
        self.direct_sends += 1
        while True:
            n = self._send(box.sending.data, buf_len(&box.sending), NULL, 0, &tls_want)
            if n >= 0 or errno != EINTR:
                break
        busx_trace(BUSX_TRACE_CLIENT_SEND)
        if n > 0:
            buf_consume(&box.sending, n)
        if buf_len(&box.sending):
            # Partly sent (or failed): the I/O thread carries on from here,
            # and sees any error for itself.
            box.wake_pending = 1
            wake[0] = True
        return True

    # ---- receiving (Python side, under the Bus's pump lock) ----

    @property
    def events_seq(self):
        """Bumped whenever frames arrive or the connection changes state."""
        return self.inbox.events_seq

    def wait(self, unsigned long long seen, double timeout):
        """Block (without the GIL) until events_seq moves past `seen`, or the
        timeout (< 0: none) passes. Returns whether it moved."""
        cdef timespec deadline
        if timeout >= 0:
            deadline_after(&deadline, timeout)
        return self._sliced(seen, NULL, &deadline if timeout >= 0 else NULL)

    cdef bint _sliced(self, unsigned long long seen, Room *room_for,
                      timespec *deadline) except -1:
        """Wait for events (room_for NULL) or for output room for a frame,
        until deadline (NULL: forever). The main thread waits in
        slices so Python can run signal handlers, like Ctrl-C, in between.
        Returns whether the condition came true."""
        cdef timespec until
        cdef bint last_slice
        if threading.current_thread() is not threading.main_thread():
            return self._wait_until(seen, room_for, deadline)
        while True:
            deadline_after(&until, SIGNAL_CHECK_MS / 1000.0)
            last_slice = deadline != NULL and not timespec_before(&until, deadline)
            if self._wait_until(seen, room_for, deadline if last_slice else &until):
                return True
            if last_slice:
                return False
            PyErr_CheckSignals()

    cdef bint _wait_until(self, unsigned long long seen, Room *room_for,
                          timespec *until) noexcept:
        """Wait without the GIL, until the absolute time `until` (NULL:
        forever), for events_seq to move past seen or, with room_for, for the
        outbox to take room_for's frame (or the state to change)."""
        cdef bint ready
        if self.forked:
            return True
        with nogil:
            if room_for != NULL:
                ready = self._wait_for_room(room_for, until)
            else:
                ready = self._wait_for_events(seen, until)
        return ready

    cdef bint _wait_for_room(self, Room *room, timespec *until) noexcept nogil:
        cdef bint ready
        pthread_mutex_lock(&self.outbox.lock)
        while True:
            ready = self.state >= CL_FAILED or outbox_has_room(&self.outbox, room)
            if ready or not cond_wait_until(&self.outbox.room_cond, &self.outbox.lock, until):
                break
        pthread_mutex_unlock(&self.outbox.lock)
        return ready

    cdef bint _wait_for_events(self, unsigned long long seen, timespec *until) noexcept nogil:
        cdef bint ready
        pthread_mutex_lock(&self.inbox.lock)
        while True:
            ready = self.inbox.events_seq != seen
            if ready:
                break
            if self._may_read_directly():
                if not self._read_directly(until):
                    break           # timed out
            elif not cond_wait_until(&self.inbox.event_cond, &self.inbox.lock, until):
                break
        pthread_mutex_unlock(&self.inbox.lock)
        return ready

    cdef bint _may_read_directly(self) noexcept nogil:
        """Whether a waiting thread may read the socket itself. inbox.lock held."""
        return (self.state == CL_ATTACHED and not self.inbox.direct_reader
                and self.inbox.direct_result < 0 and not self.inbox.reading_paused
                and self.fd >= 0)

    cdef bint _read_directly(self, timespec *until) noexcept nogil:
        """Wait for the socket (or other events) in this thread and read it
        here, sparing the hand-off from the I/O thread: a wake-up across
        cores costs tens of microseconds (BENCHMARKS.md, round trips). The
        I/O thread stops watching for input meanwhile; it still sends, and
        takes over whatever ends the connection. inbox.lock held on entry
        and exit, released in between. Returns False on timeout or EINTR."""
        cdef pollfd fds[2]
        cdef int n, result = -1
        cdef uint64_t drained
        self.inbox.direct_reader = True
        self._watch_input()
        pthread_mutex_unlock(&self.inbox.lock)
        fds[0].fd = self.fd
        fds[0].events = POLLIN
        fds[1].fd = self.inbox.direct_wake_fd
        fds[1].events = POLLIN
        n = poll(fds, 2, ms_until(until))
        if n > 0 and fds[1].revents:
            read(self.inbox.direct_wake_fd, &drained, 8)
        if n > 0 and fds[0].revents:
            pthread_mutex_lock(&self.read_lock)
            self.inbox.direct_reading = True    # inbox_signal: no need to wake us
            result = self._read()
            self.inbox.direct_reading = False
            self.direct_reads += 1
            pthread_mutex_unlock(&self.read_lock)
        pthread_mutex_lock(&self.inbox.lock)
        self.inbox.direct_reader = False
        if result >= 0:
            self.inbox.direct_result = result
            self._wake_io()     # it ends the connection
        elif self.tls_more:
            self._wake_io()     # OpenSSL holds more than this read took: the I/O thread's
        if self.state == CL_ATTACHED:
            self._watch_input()
        pthread_cond_broadcast(&self.inbox.event_cond)    # for _stop_direct_reader
        return n > 0        # else timed out, or a signal (EINTR) for Python to handle

    cdef void _stop_direct_reader(self) noexcept nogil:
        """Before the socket is closed (and with the state no longer
        CL_ATTACHED, so none starts again): wake a thread reading it
        directly and wait until it has stopped. inbox.lock held, and not
        outbox.lock, which that thread takes to finish its read."""
        cdef uint64_t one = 1
        while self.inbox.direct_reader:
            write(self.inbox.direct_wake_fd, &one, 8)
            pthread_cond_wait(&self.inbox.event_cond, &self.inbox.lock)

    def take(self, dict queues, list control):
        """Parse every whole frame received so far: MSG frames go to their
        subscription's MessageQueue (queues: sid -> MessageQueue; frames for
        unknown sids are discarded), all others are appended to control as
        busx.protocol.Frame. Returns the number of frames taken."""
        cdef FrameView f
        cdef size_t count = 0
        cdef size_t taken_bytes, taken_fd_bytes
        if self.forked:
            return 0
        if buf_len(&self.taken) == 0:
            with nogil:
                pthread_mutex_lock(&self.inbox.lock)
                buf_swap(&self.taken, &self.inbox.frames)
                pthread_mutex_unlock(&self.inbox.lock)
        # Count the taken bytes as held while they are parsed, so the I/O
        # thread never sees room that the queues are about to fill.
        taken_bytes = buf_len(&self.taken)
        self.inbox.held += taken_bytes
        self.inbox.taking = taken_bytes
        try:
            while buf_len(&self.taken):
                parse_frame(self.taken.data + self.taken.start, buf_len(&self.taken),
                            <size_t>-1, &f)
                # Consumed before it is handled: whatever handling raises, a
                # frame is taken once, so it can never wedge the queue. The
                # view stays valid: nothing writes `taken` meanwhile.
                buf_consume(&self.taken, f.size)
                count += 1
                if f.kind == K_MSG:
                    self._dispatch(&f, queues)
                elif f.kind != K_RECEIVED and f.kind != K_PING:    # the I/O thread's
                    control.append(view_to_frame(&f))
        finally:
            buf_shrink(&self.taken, READ_CHUNK * 2)
            self.last_queue = None
            self.inbox.held -= taken_bytes
            self.inbox.taking = 0
            if self.taken_fd_bytes:
                taken_fd_bytes = self.taken_fd_bytes
                self.taken_fd_bytes = 0
                with nogil:
                    pthread_mutex_lock(&self.inbox.lock)
                    self.inbox.fd_bytes -= taken_fd_bytes
                    pthread_mutex_unlock(&self.inbox.lock)
            self._resume_reading()
        if count:
            busx_trace(BUSX_TRACE_TAKEN)
        return count

    cdef void _dispatch(self, FrameView *f, dict queues) except *:
        """One MSG frame into its subscription's queue. A frame this client
        cannot decode is dropped and counted (malformed), its fds closed:
        it must cost the subscription nothing but itself."""
        cdef Message msg
        cdef MessageQueue queue
        cdef tuple fds = self._take_fds(f.nfds) if f.nfds else ()
        cdef const char *mapped = NULL
        cdef size_t size = 0
        cdef object topic, reply_to
        if f.flags & F_PAYLOAD_FD:
            size = busx_load_u64(f.payload)
            self.taken_fd_bytes += size
        if self.last_queue is None or self.last_sid != f.id:
            queue = queues.get(f.id)
            if queue is None:       # routed before the broker saw our UNSUB
                self.discarded += 1
                close_fd_tuple(fds)
                return
            self.last_queue = queue
            self.last_sid = f.id
        if not self._has_room_for(self.last_queue, f.payload_len + size, len(fds)):
            self.last_queue.dropped += 1
            self.unread_dropped += 1
            close_fd_tuple(fds)
            return
        if (self.last_topic_b is not None and len(self.last_topic_b) == f.topic_len
                and memcmp(<char *>self.last_topic_b, f.topic, f.topic_len) == 0):
            topic = self.last_topic        # publishers repeat their topics
        else:
            topic = self._decode_topic(f)
        reply_to = decode_name(f.reply, f.reply_len) if f.reply_len else None
        if topic is None or reply_to is False:
            self.malformed += 1
            close_fd_tuple(fds)
            return
        if f.flags & F_PAYLOAD_FD:
            mapped = self._map_payload_fd(f, fds, size)
            fds = fds[:max(len(fds) - 1, 0)]
            if mapped == NULL:
                self.malformed += 1
                close_fd_tuple(fds)
                return
            msg = new_message(None, mapped, size)
            self.fd_payloads_in += 1
        else:
            msg = new_message(f.payload[:f.payload_len], NULL, f.payload_len)
        msg.topic = topic
        if (self.last_stamp is None or len(self.last_stamp) != f.stamp_len
                or memcmp(<char *>self.last_stamp, f.stamp, f.stamp_len) != 0):
            self.last_stamp = f.stamp[:f.stamp_len]
        msg.stamp = self.last_stamp
        msg.reply_to = reply_to
        msg.fds = fds
        msg.fds_lost = f.fds_lost
        msg.bus_ref = self.bus_ref
        self.last_queue.push(msg)

    cdef inline bint _has_room_for(self, MessageQueue queue, size_t size,
                                   size_t nfds) noexcept:
        """Whether a message of size payload bytes and nfds fds may join
        queue. Reading stops at max_buffer (inbox_full), and one read adds
        at most a chunk or a frame, so a reader never meets this bound; only
        round trips read on past it (their answer may be behind messages
        nobody reads), and what they bring beyond it is dropped and counted,
        as a NATS client drops for a slow consumer. The reply inbox is
        bounded on its own, so replies never pay for an unread subscription.
        One read brings at most READ_CHUNK bytes and the frame they complete,
        whose payload (inline or memfd) is at most max_frame, and at most
        MAX_FDS_PER_SEND fds."""
        cdef size_t limit = self.inbox.max_buffer + self.max_frame + READ_CHUNK
        cdef size_t used = queue.bytes if queue.apart else self.inbox.held - self.inbox.taking
        return (used + size <= limit
                and self.inbox.held_fds + nfds <= self.inbox.max_held_fds + MAX_FDS_PER_SEND)

    cdef object _decode_topic(self, FrameView *f):
        """The frame's topic as str, remembered as the last one; None if it
        is not UTF-8."""
        cdef object topic = decode_name(f.topic, f.topic_len)
        if topic is False:
            return None
        self.last_topic_b = f.topic[:f.topic_len]
        self.last_topic = topic
        return topic

    cdef const char *_map_payload_fd(self, FrameView *f, tuple fds, size_t size):
        """Map the payload a F_PAYLOAD_FD frame carries in its last fd, which
        this closes; NULL if that fd is missing or not a sealed memfd of
        `size` bytes (never from a busx broker). The seals make the mapping
        safe: nobody can truncate the file under it."""
        cdef void *mapped = MAP_FAILED
        cdef int fd
        if not fds:
            return NULL
        fd = fds[len(fds) - 1]
        if len(fds) == f.nfds and f.payload_len == 8 and size and payload_fd_ok(fd, size):
            mapped = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0)
        close(fd)
        if mapped == MAP_FAILED:
            return NULL
        busx_count(BUSX_MAPPINGS, 1)
        return <const char *>mapped

    cdef tuple _take_fds(self, int count):
        """The next count received fds (fewer if fewer arrived). Popped under
        inbox.lock without the GIL, turned into Python ints after: the lock
        is never held while the GIL is taken (the lock order, docs/development.md)."""
        cdef int fds[MAX_FDS_ON_WIRE]
        cdef int i, taken
        count = min(count, <int>MAX_FDS_ON_WIRE)
        with nogil:
            taken = inbox_pop_fds(&self.inbox, fds, count)
        return tuple([fds[i] for i in range(taken)])


cdef object decode_name(const char *p, size_t n):
    """A topic or reply field as str; False if it is not UTF-8."""
    try:
        return p[:n].decode("utf-8")
    except UnicodeDecodeError:
        return False


cdef int duplicate_fds(object fds, int *out, bint is_unix) except -1:
    """dup() the caller's fds so it may close its own at once (SPEC.md).
    All or nothing: if any item is not an open fd, the copies already made
    are closed before the error propagates."""
    cdef int n = 0, fd, copy, err
    if not is_unix:
        raise FdError("file descriptors can only be passed over the UNIX transport; "
                      "this connection uses TCP")
    fds = list(fds)
    if len(fds) > MAX_FDS_PER_FRAME:
        raise FdError(f"at most {MAX_FDS_PER_FRAME} fds per message, not {len(fds)}")
    try:
        for item in fds:
            fd = item if isinstance(item, int) else item.fileno()
            copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
            if copy < 0:
                err = errno
                raise_os_error(f"cannot duplicate fd {fd} for sending", err)
            out[n] = copy
            n += 1
    except BaseException:
        for i in range(n):
            close(out[i])
        raise
    return n


cdef void close_fd_tuple(tuple fds):
    for fd in fds:
        close(fd)
