# The inbox room: the client's receive side. Whoever reads the socket (the
# I/O thread, or a thread waiting for messages) hands whole frames and
# their fds over here; the Python side swaps them out in batches (take) and
# turns them into Messages. Its lock is its own, apart from the outbox's, so
# a reader never holds up a publisher (STYLE.md, one room per owner).
#
# Threads: `lock` is taken by Python threads holding the GIL, so no thread
# may wait for the GIL while it holds `lock` (docs/development.md).


cdef void inbox_init(Inbox *box, size_t max_buffer, size_t max_held_fds) noexcept nogil:
    cdef pthread_condattr_t attr
    memset(box, 0, sizeof(Inbox))
    box.max_buffer = max_buffer
    box.max_held_fds = max_held_fds
    box.direct_result = -1
    box.direct_wake_fd = -1
    box.notify_fd = -1
    pthread_mutex_init(&box.lock, NULL)
    pthread_condattr_init(&attr)
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
    pthread_cond_init(&box.event_cond, &attr)
    pthread_condattr_destroy(&attr)


cdef void inbox_destroy(Inbox *box) noexcept nogil:
    """Free what inbox_init made; inbox_free first."""
    pthread_mutex_destroy(&box.lock)
    pthread_cond_destroy(&box.event_cond)


cdef void inbox_free(Inbox *box) noexcept nogil:
    """Close the fds and free the frames. Lock held, or the only thread."""
    close_fd(&box.notify_fd)
    close_fd(&box.direct_wake_fd)
    buf_free(&box.frames)
    fdq_free(&box.fds)


cdef inline bint inbox_full(Inbox *box) noexcept nogil:
    """Received, unread bytes (inbox and message queues) reached max_buffer,
    or their fds max_held_fds (each an open file of this process). While a
    round trip waits, only the inbox counts: the answer may sit behind
    messages nobody reads, so the waiting thread takes on, and
    ClientIO._has_room_for drops what its queue cannot hold. Lock held."""
    if box.round_trips:
        return (buf_len(&box.frames) + box.fd_bytes >= box.max_buffer
                or fdq_len(&box.fds) >= box.max_held_fds)
    return (buf_len(&box.frames) + box.fd_bytes + box.held >= box.max_buffer
            or fdq_len(&box.fds) + box.held_fds >= box.max_held_fds)


cdef void inbox_signal(Inbox *box) noexcept nogil:
    """Something for Python: frames arrived or the state changed. Wakes
    blocked threads and, through the eventfd, asyncio. Lock held."""
    cdef uint64_t one = 1
    box.events_seq += 1
    pthread_cond_broadcast(&box.event_cond)
    if box.notify_fd >= 0:
        write(box.notify_fd, &one, 8)
    if box.direct_reader and not box.direct_reading:
        write(box.direct_wake_fd, &one, 8)


cdef void inbox_add(Inbox *box, Buffer *rbuf, size_t whole, FdQueue *received,
                    size_t claimed, size_t fd_bytes) noexcept nogil:
    """Take the first `whole` bytes of rbuf (whole frames), the `claimed` fds
    they carry from `received`, and count the fd_bytes their memfds hold.
    The fds of a frame still arriving stay in `received`, which a lost
    connection closes. Lock held."""
    while claimed and fdq_len(received):
        fdq_push(&box.fds, 0, fdq_pop(received))
        claimed -= 1
    box.fd_bytes += fd_bytes
    if buf_len(&box.frames) == 0:
        # Hand the chunk over without copying; keep only the tail.
        buf_swap(&box.frames, rbuf)
        rbuf.start = 0
        rbuf.end = 0
        buf_append(rbuf, box.frames.data + box.frames.start + whole,
                   buf_len(&box.frames) - whole)
        box.frames.end = box.frames.start + whole
    else:
        buf_append(&box.frames, rbuf.data + rbuf.start, whole)
        buf_consume(rbuf, whole)
    inbox_signal(box)


cdef int inbox_pop_fds(Inbox *box, int *fds, int count) noexcept nogil:
    """Pop the next count received fds into fds; returns how many there were."""
    cdef int i, taken = 0
    pthread_mutex_lock(&box.lock)
    for i in range(count):
        fds[taken] = fdq_pop(&box.fds)
        if fds[taken] >= 0:
            taken += 1
    pthread_mutex_unlock(&box.lock)
    return taken
