# Byte buffers and fd queues in C memory. Every buffer grows on demand; the
# limits (max_pending, max_buffer, max_frame) are enforced by their owners.
# The debug build counts the bytes and fds they hold (includes/counters.h).

from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memcmp


cdef inline size_t buf_len(const Buffer *b) noexcept nogil:
    return b.end - b.start


cdef int buf_reserve(Buffer *b, size_t n) noexcept nogil:
    """Make room for n more bytes after b.end; -1 when memory runs out."""
    cdef size_t used = b.end - b.start
    cdef size_t new_cap
    cdef char *grown
    if b.cap - b.end >= n:
        return 0
    if b.start:
        # Slide the live bytes to the front before growing: the tail room
        # has run out, so this happens once per buffer's worth of data.
        memmove(b.data, b.data + b.start, used)
        b.start = 0
        b.end = used
        if b.cap - used >= n:
            return 0
    new_cap = b.cap if b.cap else 4096
    while new_cap - used < n:
        new_cap *= 2
    grown = <char *>realloc(b.data, new_cap)
    if grown == NULL:
        return -1
    busx_count(BUSX_BUFFER_BYTES, <long long>(new_cap - b.cap))
    b.data = grown
    b.cap = new_cap
    return 0


cdef int buf_append(Buffer *b, const char *p, size_t n) noexcept nogil:
    if buf_reserve(b, n) < 0:
        return -1
    memcpy(b.data + b.end, p, n)
    b.end += n
    return 0


cdef inline void buf_consume(Buffer *b, size_t n) noexcept nogil:
    b.start += n
    if b.start == b.end:
        b.start = 0
        b.end = 0


cdef void buf_shrink(Buffer *b, size_t keep) noexcept nogil:
    """Give memory back after a burst: an empty buffer keeps at most `keep` bytes."""
    if b.start == b.end and b.cap > keep:
        busx_count(BUSX_BUFFER_BYTES, -<long long>b.cap)
        free(b.data)
        b.data = NULL
        b.cap = 0
        b.start = 0
        b.end = 0


cdef inline void buf_swap(Buffer *a, Buffer *b) noexcept nogil:
    cdef Buffer t = a[0]
    a[0] = b[0]
    b[0] = t


cdef void buf_free(Buffer *b) noexcept nogil:
    busx_count(BUSX_BUFFER_BYTES, -<long long>b.cap)
    free(b.data)
    b.data = NULL
    b.start = 0
    b.end = 0
    b.cap = 0


cdef inline size_t fdq_len(const FdQueue *q) noexcept nogil:
    return q.tail - q.head


cdef int fdq_push(FdQueue *q, unsigned long long offset, int fd,
                  size_t held=0) noexcept nogil:
    cdef size_t n = q.tail - q.head
    cdef QueuedFd *grown
    if q.tail == q.cap:
        if q.head:
            memmove(q.items, q.items + q.head, n * sizeof(QueuedFd))
            q.head = 0
            q.tail = n
        if q.tail == q.cap:
            grown = <QueuedFd *>realloc(q.items, (q.cap * 2 + 16) * sizeof(QueuedFd))
            if grown == NULL:
                return -1
            q.items = grown
            q.cap = q.cap * 2 + 16
    q.items[q.tail].offset = offset
    q.items[q.tail].fd = fd
    q.items[q.tail].held = held
    q.held += held
    q.tail += 1
    busx_count(BUSX_QUEUED_FDS, 1)
    return 0


cdef inline int fdq_pop(FdQueue *q) noexcept nogil:
    cdef int fd
    if q.head == q.tail:
        return -1
    fd = q.items[q.head].fd
    q.held -= q.items[q.head].held
    q.head += 1
    busx_count(BUSX_QUEUED_FDS, -1)
    if q.head == q.tail:
        q.head = 0
        q.tail = 0
    return fd


cdef void fdq_drop_last(FdQueue *q, size_t n) noexcept nogil:
    """Forget the last n fds pushed, without closing them (their owner
    still holds them)."""
    while n and q.tail > q.head:
        q.tail -= 1
        q.held -= q.items[q.tail].held
        busx_count(BUSX_QUEUED_FDS, -1)
        n -= 1


cdef void fdq_close_all(FdQueue *q) noexcept nogil:
    """Close every queued fd: they are owned by the queue."""
    cdef int fd = fdq_pop(q)
    while fd >= 0:
        close(fd)
        fd = fdq_pop(q)


cdef void fdq_close_from(FdQueue *q, unsigned long long offset) noexcept nogil:
    """Close the queued fds of the frames at stream offset `offset` and later."""
    while q.tail > q.head and q.items[q.tail - 1].offset >= offset:
        q.tail -= 1
        q.held -= q.items[q.tail].held
        busx_count(BUSX_QUEUED_FDS, -1)
        close(q.items[q.tail].fd)


cdef inline void close_fd(int *fd) noexcept nogil:
    """Close *fd if open and mark it closed."""
    if fd[0] >= 0:
        close(fd[0])
        fd[0] = -1


cdef void fdq_free(FdQueue *q) noexcept nogil:
    fdq_close_all(q)
    free(q.items)
    q.items = NULL
    q.cap = 0
