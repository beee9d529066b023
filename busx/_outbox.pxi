# The outbox room: the client's send side. Publishers queue frames in `out`;
# the I/O thread swaps it out whole into `sending` and writes that in large
# sends. It has a lock of its own, apart from the inbox's, so a thread busy
# with received frames never holds up a publisher (STYLE.md, one room per
# owner).
#
# Threads: publishers take `lock` while holding the GIL, so no thread may
# wait for the GIL while it holds `lock`: every lock/unlock pair sits in one
# nogil function or `with nogil:` block (docs/development.md, lock order).


cdef void outbox_init(Outbox *box, size_t max_buffer) noexcept nogil:
    cdef pthread_condattr_t attr
    memset(box, 0, sizeof(Outbox))
    box.max_buffer = max_buffer
    pthread_mutex_init(&box.lock, NULL)
    pthread_condattr_init(&attr)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
    pthread_cond_init(&box.room_cond, &attr)
    pthread_condattr_destroy(&attr)


cdef void outbox_destroy(Outbox *box) noexcept nogil:
    """Free what outbox_init made; outbox_free first."""
    pthread_mutex_destroy(&box.lock)
    pthread_cond_destroy(&box.room_cond)


cdef void outbox_free(Outbox *box) noexcept nogil:
    """Free the buffers, closing queued fds. Lock held, or the only thread."""
    buf_free(&box.out)
    buf_free(&box.sending)
    fdq_free(&box.out_fds)
    fdq_free(&box.sending_fds)


cdef inline bint outbox_has_room(Outbox *box, Room *room) noexcept nogil:
    """Whether a frame fits: its bytes within max_buffer, its fds within
    MAX_QUEUED_FDS (each queued fd is one of this process's open files). An
    empty buffer takes any frame. Memfds the broker has not yet taken count
    too, else they could pile up in the socket - except while acks are
    stalled: then new payloads go inline (ClientIO._memfds_wanted) and only
    the socket's own back-pressure applies. Lock held."""
    cdef size_t used = buf_len(&box.out)
    if not box.acks_stalled:
        used += box.fd_bytes_unacked
    if used == 0:
        return True
    return (used + room.bytes <= box.max_buffer
            and fdq_len(&box.out_fds) + room.fds <= MAX_QUEUED_FDS)


cdef int outbox_queue(Outbox *box, uint8_t kind, uint8_t flags, uint32_t id,
                      const char *topic, size_t topic_len, const char *reply,
                      size_t reply_len, const char *payload, size_t payload_len,
                      int *fds, int nfds, size_t held) noexcept nogil:
    """Append one frame and its fds (the last fd carries `held` payload
    bytes, a memfd). APPEND_OK, or APPEND_NOMEM with nothing queued: the
    caller closes every fd then. Lock held."""
    cdef int queued = 0
    while queued < nfds and fdq_push(&box.out_fds, box.out.end, fds[queued],
                                     held if queued == nfds - 1 else 0) == 0:
        queued += 1
    if queued < nfds or write_frame(&box.out, kind, flags, id, topic, topic_len, reply,
                                    reply_len, NULL, 0, payload, payload_len, nfds, 0) < 0:
        fdq_drop_last(&box.out_fds, queued)
        return APPEND_NOMEM
    box.fd_bytes_unacked += held
    return APPEND_OK


cdef inline bint outbox_claim_wake(Outbox *box) noexcept nogil:
    """Whether the caller must wake the I/O thread for what it queued: only
    the first since that thread last found nothing to send. Lock held."""
    if box.wake_pending:
        return False
    box.wake_pending = 1
    return True


cdef bint outbox_take(Outbox *box) noexcept nogil:
    """The I/O thread: whether there is something to send. Swaps the
    publishers' buffer in once the last batch is sent, waking publishers
    waiting for room. When there is nothing, clears wake_pending, since the
    I/O thread is about to sleep: only then must publishers wake it."""
    cdef bint more
    pthread_mutex_lock(&box.lock)
    if buf_len(&box.sending) == 0 and buf_len(&box.out):
        buf_swap(&box.sending, &box.out)
        fdq_swap(&box.sending_fds, &box.out_fds)
        pthread_cond_broadcast(&box.room_cond)
    more = buf_len(&box.sending) != 0
    if not more:
        box.wake_pending = 0
        buf_shrink(&box.sending, WRITE_CHUNK)
    pthread_mutex_unlock(&box.lock)
    return more


cdef inline void outbox_sent(Outbox *box, size_t n) noexcept nogil:
    """The I/O thread sent n bytes of `sending`. Under the lock:
    ClientIO._send_directly may use `sending` the moment it looks empty."""
    pthread_mutex_lock(&box.lock)
    buf_consume(&box.sending, n)
    pthread_mutex_unlock(&box.lock)


cdef size_t outbox_send_length(Outbox *box) noexcept nogil:
    """Bytes of `sending` for the next send: at most WRITE_CHUNK, and a
    frame that carries fds goes in a send of its own, holding that frame
    alone. The kernel attaches a send's fds to its first byte and ends the
    receiver's recvmsg there, so the broker can tell which frame fds came
    with, and stray ones from a frame's (docs/protocol.md, fd passing). The
    price: fd-carrying messages are not batched. The I/O thread's."""
    cdef size_t length = min(buf_len(&box.sending), <size_t>WRITE_CHUNK)
    cdef size_t start = box.sending.start
    cdef unsigned long long first
    if box.sending_fds.head == box.sending_fds.tail:
        return length
    first = box.sending_fds.items[box.sending_fds.head].offset
    if first > start:
        return min(length, <size_t>(first - start))
    return min(length, <size_t>busx_load_u32(box.sending.data + start) + 4)


cdef bint outbox_received(Outbox *box, size_t acked, size_t fd_bytes,
                          bint pinged) noexcept nogil:
    """The reader's news for the send side: the broker took `acked` bytes of
    our memfds, and we took fd_bytes of its (said back to it in a K_RECEIVED
    frame, since it counts them against max_pending until then); it PINGed
    us (a heartbeat: answered with a PONG). Returns whether the I/O thread
    must be woken to send those frames."""
    cdef char received[8]
    cdef bint wake = False
    pthread_mutex_lock(&box.lock)
    if acked:
        box.fd_bytes_unacked -= min(acked, box.fd_bytes_unacked)
        pthread_cond_broadcast(&box.room_cond)
    if fd_bytes:
        busx_store_u64(received, fd_bytes)
        write_frame(&box.out, K_RECEIVED, 0, 0, NULL, 0, NULL, 0, NULL, 0, received, 8, 0, 0)
        wake = outbox_claim_wake(box)
    if pinged:
        write_frame(&box.out, K_PONG, 0, 0, NULL, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0)
        wake = outbox_claim_wake(box) or wake
    pthread_mutex_unlock(&box.lock)
    return wake


cdef void outbox_keep_alive(Outbox *box, double now, double interval,
                            double heard_at) noexcept nogil:
    """Queue a PING, at most one per `interval` ms, when nothing was queued
    or nothing heard (heard_at) for that long: the broker hears from us and
    answers, so a one-way stream in either direction stays alive (SPEC.md,
    Heartbeats). The I/O thread's, which sends what it queued on its way
    round."""
    pthread_mutex_lock(&box.lock)
    if now - box.last_ping >= interval and (now - box.last_append >= interval
                                            or now - heard_at >= interval):
        box.last_ping = now
        write_frame(&box.out, K_PING, 0, 0, NULL, 0, NULL, 0, NULL, 0, NULL, 0, 0, 0)
    pthread_mutex_unlock(&box.lock)


cdef void outbox_stall_acks(Outbox *box, bint stalled) noexcept nogil:
    """The inbox stopped (or resumed) reading: acks of our memfds cannot
    arrive meanwhile, so publishers waiting on them look again."""
    pthread_mutex_lock(&box.lock)
    box.acks_stalled = stalled
    pthread_cond_broadcast(&box.room_cond)
    pthread_mutex_unlock(&box.lock)


cdef inline size_t outbox_unsent(Outbox *box) noexcept nogil:
    """Bytes not yet taken by the broker, with the payloads of memfds (a
    snapshot read without the lock)."""
    return buf_len(&box.out) + buf_len(&box.sending) + box.fd_bytes_unacked


cdef size_t outbox_drop_partial_frame(Outbox *box) noexcept nogil:
    """Index in sending.data of the first frame not yet begun on the wire;
    the fds of the frame the lost connection cut in half are closed. Frames
    in `sending` start at index 0 (it was swapped in whole), so walking their
    lengths finds it. Lock held."""
    cdef size_t at = 0
    while at < box.sending.start:
        at += busx_load_u32(box.sending.data + at) + 4
    while fdq_len(&box.sending_fds) and box.sending_fds.items[box.sending_fds.head].offset < at:
        close(fdq_pop(&box.sending_fds))
    return at


cdef int outbox_reattach(Outbox *box, const char *prologue, size_t prologue_len,
                         bint is_unix, bint payload_fds) noexcept nogil:
    """For a new connection: `sending` becomes the prologue (re-subscriptions)
    followed by every frame not yet begun on the old one, from `sending`
    then `out`. Lock held; 0, or -1 when memory runs out (nothing changed)."""
    cdef Buffer fresh
    cdef FdQueue fresh_fds
    cdef size_t boundary = outbox_drop_partial_frame(box)
    memset(&fresh, 0, sizeof(Buffer))
    memset(&fresh_fds, 0, sizeof(FdQueue))
    if (buf_append(&fresh, prologue, prologue_len) < 0
            or carry_over(&box.sending, boundary, &box.sending_fds, &fresh, &fresh_fds,
                          is_unix, payload_fds) < 0
            or carry_over(&box.out, box.out.start, &box.out_fds, &fresh, &fresh_fds,
                          is_unix, payload_fds) < 0):
        buf_free(&fresh)
        fdq_free(&fresh_fds)
        return -1
    buf_free(&box.sending)
    fdq_free(&box.sending_fds)
    box.sending, box.sending_fds = fresh, fresh_fds
    box.out.start = box.out.end = 0
    # Memfds in flight on the old connection are gone with it.
    box.fd_bytes_unacked = box.sending_fds.held
    box.want_out = True
    box.acks_stalled = False
    pthread_cond_broadcast(&box.room_cond)      # `out` has room again
    return 0


cdef int carry_over(Buffer *frames, size_t at, FdQueue *fds, Buffer *into, FdQueue *into_fds,
                    bint is_unix, bint payload_fds) noexcept nogil:
    """Move the frames of frames.data[at:] (and their fds) to a new
    connection's output. Acks meant for the old broker are left behind;
    payload memfds go inline to a broker that does not take them, and fds
    cannot cross TCP: those frames say how many were lost. -1 when memory
    runs out."""
    cdef FrameView f
    cdef int frame_fds[MAX_FDS_ON_WIRE]
    cdef int nfds, user_fds, k
    cdef size_t held
    cdef int status = 0
    cdef Buffer payload
    memset(&payload, 0, sizeof(Buffer))
    while at < frames.end and status == 0:
        parse_frame(frames.data + at, frames.end - at, <size_t>-1, &f)
        nfds = 0
        held = 0
        while fdq_len(fds) and fds.items[fds.head].offset <= at and nfds < MAX_FDS_ON_WIRE:
            held += fds.items[fds.head].held
            frame_fds[nfds] = fdq_pop(fds)
            nfds += 1
        at += f.size
        if f.kind == K_RECEIVED:
            continue
        user_fds = nfds - (1 if f.flags & F_PAYLOAD_FD else 0)
        if (f.flags & F_PAYLOAD_FD) and not payload_fds:
            payload.start = payload.end = 0
            if (buf_reserve(&payload, held) < 0
                    or read_payload_fd(frame_fds[nfds - 1], payload.data, held) < 0):
                for k in range(nfds):
                    close(frame_fds[k])
                status = -1
                break
            f.payload, f.payload_len, payload.end = payload.data, held, held
            f.flags &= ~F_PAYLOAD_FD
            close(frame_fds[nfds - 1])
            nfds -= 1
        if not is_unix and user_fds:
            for k in range(nfds):
                close(frame_fds[k])
            f.fds_lost, nfds = user_fds, 0
        for k in range(nfds):
            if fdq_push(into_fds, into.end, frame_fds[k],
                        held if k == nfds - 1 and (f.flags & F_PAYLOAD_FD) else 0) < 0:
                close(frame_fds[k])
                status = -1
        if status == 0 and write_frame(into, f.kind, f.flags, f.id, f.topic, f.topic_len,
                                       f.reply, f.reply_len, NULL, 0, f.payload,
                                       f.payload_len, nfds, f.fds_lost) < 0:
            status = -1
    buf_free(&payload)
    return status


cdef inline void fdq_swap(FdQueue *a, FdQueue *b) noexcept nogil:
    cdef FdQueue t = a[0]
    a[0] = b[0]
    b[0] = t
