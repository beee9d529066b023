# The poller room: an epoll set with the eventfd that wakes it, the tags that
# say which of a loop's own fds is ready, and the monotonic clock. The
# broker's loop and the client's I/O thread each own one.
#
# Threads: the thread that waits on a Poller owns it. poller_wake() may be
# called from any thread while the Poller is open (an eventfd write is
# atomic); whoever closes it must make sure no waker is left. The client
# wakes holding a room's lock or read_lock, and closes under both room
# locks only once its I/O thread has ended and no direct reader is left
# (ClientIO.release), so no waker can be.


cdef inline void poller_init(Poller *p) noexcept nogil:
    """A closed Poller (before poller_open, or after poller_close)."""
    p.epfd = -1
    p.wake_fd = -1


cdef void poller_close(Poller *p) noexcept nogil:
    if p.epfd >= 0 and p.wake_fd >= 0:
        busx_count(BUSX_POLLERS, -1)
    close_fd(&p.wake_fd)
    close_fd(&p.epfd)


cdef int poller_add(Poller *p, int fd, uint32_t events, uint64_t tag) noexcept nogil:
    """Watch fd for events, reported with tag; -1 with errno set on failure."""
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = tag
    return epoll_ctl(p.epfd, EPOLL_CTL_ADD, fd, &ev)


cdef int poller_open(Poller *p) noexcept nogil:
    """Create the epoll set and its wake eventfd: 0, or -errno on failure,
    leaving nothing open."""
    cdef int failure
    p.epfd = epoll_create1(EPOLL_CLOEXEC)
    p.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if p.epfd >= 0 and p.wake_fd >= 0 and poller_add(p, p.wake_fd, EPOLLIN, TAG_WAKE) == 0:
        busx_count(BUSX_POLLERS, 1)
        return 0
    failure = -errno
    poller_close(p)
    return failure


cdef inline void poller_modify(Poller *p, int fd, uint32_t events, uint64_t tag) noexcept nogil:
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = tag
    epoll_ctl(p.epfd, EPOLL_CTL_MOD, fd, &ev)


cdef inline void poller_remove(Poller *p, int fd) noexcept nogil:
    epoll_ctl(p.epfd, EPOLL_CTL_DEL, fd, NULL)


cdef inline int poller_wait(Poller *p, epoll_event *events, int max_events,
                            int timeout_ms) noexcept nogil:
    return epoll_wait(p.epfd, events, max_events, timeout_ms)


cdef inline void poller_wake(Poller *p) noexcept nogil:
    """Make the owner's poller_wait return (TAG_WAKE). Any thread."""
    cdef uint64_t one = 1
    if p.wake_fd >= 0:
        write(p.wake_fd, &one, 8)


cdef inline void poller_drain(Poller *p) noexcept nogil:
    """Reset the wake eventfd after TAG_WAKE. The owner only."""
    cdef uint64_t drained
    read(p.wake_fd, &drained, 8)


# ---- the monotonic clock ----

cdef double now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6


cdef void deadline_after(timespec *ts, double seconds) noexcept nogil:
    cdef double whole
    clock_gettime(CLOCK_MONOTONIC, ts)
    whole = <long>seconds
    ts.tv_sec += <long>whole
    ts.tv_nsec += <long>((seconds - whole) * 1e9)
    if ts.tv_nsec >= 1000000000:
        ts.tv_sec += 1
        ts.tv_nsec -= 1000000000


cdef int ms_until(const timespec *until) noexcept nogil:
    """Milliseconds from now to the CLOCK_MONOTONIC time until, rounded up,
    for poll(); -1 (no limit) for NULL."""
    cdef timespec now
    cdef long long ms
    if until == NULL:
        return -1
    clock_gettime(CLOCK_MONOTONIC, &now)
    ms = ((until.tv_sec - now.tv_sec) * 1000LL
          + (until.tv_nsec - now.tv_nsec + 999999) // 1000000)
    return <int>min(max(ms, 0LL), <long long>INT_MAX)


cdef inline bint timespec_before(const timespec *a, const timespec *b) noexcept nogil:
    return a.tv_sec < b.tv_sec or (a.tv_sec == b.tv_sec and a.tv_nsec < b.tv_nsec)


cdef bint cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *lock,
                          const timespec *until) noexcept nogil:
    """Wait on cond, lock held, until signalled or the CLOCK_MONOTONIC time
    until (NULL: no limit); False once that time has passed. The caller
    checks its condition again either way (wake-ups may be spurious)."""
    if until == NULL:
        pthread_cond_wait(cond, lock)
        return True
    return pthread_cond_timedwait(cond, lock, until) != ETIMEDOUT
