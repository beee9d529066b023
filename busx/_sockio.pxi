# Socket calls shared by the broker and the client: fds ride along with the
# bytes of their frame, and every errno becomes an exception in one place.

from libc.string cimport strerror


cdef object raise_os_error(str what, int err=0):
    """The one errno -> exception conversion for busx's own syscalls."""
    if err == 0:
        err = errno
    raise OSError(err, f"{what}: {strerror(err).decode()}")


cdef ssize_t send_with_fds(int fd, const char *data, size_t length,
                           unsigned long long base, FdQueue *q) noexcept nogil:
    """send() data[:length], whose first byte is at offset `base` of the
    stream, with the queued fds of the frames starting inside it. The kernel
    attaches them to the first byte sent, so each fd arrives no later than its
    frame; the receiver hands fds out in frame order (docs/protocol.md). Sent
    fds are popped and closed here: the kernel holds its own references."""
    cdef uint64_t control[CMSG_WORDS]
    cdef size_t nfds = 0
    cdef size_t i = q.head
    cdef iovec iov
    cdef msghdr msg
    cdef cmsghdr *cmsg
    cdef int *slots
    cdef ssize_t n
    while i < q.tail and q.items[i].offset < base + length:
        if nfds == MAX_FDS_PER_SEND:
            # The rest wait for the next call, which must start at their frame.
            length = <size_t>(q.items[i].offset - base)
            break
        nfds += 1
        i += 1
    if nfds == 0:
        return send(fd, data, length, MSG_NOSIGNAL | MSG_DONTWAIT)
    iov.iov_base = <void *>data
    iov.iov_len = length
    memset(&msg, 0, sizeof(msghdr))
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = control
    msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
    cmsg = CMSG_FIRSTHDR(&msg)
    cmsg.cmsg_level = SOL_SOCKET
    cmsg.cmsg_type = SCM_RIGHTS
    cmsg.cmsg_len = CMSG_LEN(nfds * sizeof(int))
    slots = <int *>CMSG_DATA(cmsg)
    for i in range(nfds):
        slots[i] = q.items[q.head + i].fd
    n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT)
    if n >= 0:
        for i in range(nfds):
            close(fdq_pop(q))
    return n


cdef ssize_t recv_with_fds(int fd, char *buf, size_t capacity, FdQueue *fds,
                           bint *truncated, unsigned long long offset=0) noexcept nogil:
    """recv() into buf; with fds given (UNIX sockets), received fds are
    appended to it in arrival order, each marked with the stream offset just
    past the bytes received with it (`offset` being that of buf[0]), for a
    receiver that checks which frame an fd came with. *truncated is set when
    the kernel dropped fds (MSG_CTRUNC: the receiver ran out of fds)."""
    cdef uint64_t control[CMSG_WORDS]
    cdef iovec iov
    cdef msghdr msg
    cdef cmsghdr *cmsg
    cdef int *received
    cdef size_t i, count
    cdef ssize_t n
    if fds == NULL:
        while True:
            n = recv(fd, buf, capacity, MSG_DONTWAIT)
            if n >= 0 or errno != EINTR:
                return n
    iov.iov_base = buf
    iov.iov_len = capacity
    memset(&msg, 0, sizeof(msghdr))
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = control
    msg.msg_controllen = sizeof(control)
    while True:
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)
        if n >= 0 or errno != EINTR:
            break
    if n < 0:
        return n
    if msg.msg_controllen:
        cmsg = CMSG_FIRSTHDR(&msg)
        while cmsg != NULL:
            if cmsg.cmsg_level == SOL_SOCKET and cmsg.cmsg_type == SCM_RIGHTS:
                received = <int *>CMSG_DATA(cmsg)
                count = (cmsg.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                for i in range(count):
                    if fdq_push(fds, offset + <size_t>n, received[i]) < 0:
                        close(received[i])
                        truncated[0] = True
            cmsg = CMSG_NXTHDR(&msg, cmsg)
    if msg.msg_flags & MSG_CTRUNC:
        truncated[0] = True
    return n


cdef int payload_memfd(const char *head, size_t head_len, const char *body,
                       size_t body_len) noexcept nogil:
    """A sealed memfd holding head then body; -1 if the system cannot make
    one (the caller then sends the payload inline)."""
    cdef int fd = memfd_create(b"busx-payload", MFD_CLOEXEC | MFD_ALLOW_SEALING)
    if fd < 0:
        return -1
    if (write_all(fd, head, head_len) < 0 or write_all(fd, body, body_len) < 0
            or fcntl(fd, F_ADD_SEALS, PAYLOAD_SEALS | F_SEAL_SEAL) < 0):
        close(fd)
        return -1
    return fd


cdef int write_all(int fd, const char *data, size_t size) noexcept nogil:
    cdef size_t done = 0
    cdef ssize_t n
    while done < size:
        n = write(fd, data + done, size - done)
        if n < 0 and errno == EINTR:
            continue
        if n <= 0:
            return -1
        done += n
    return 0


cdef bint payload_fd_ok(int fd, size_t size) noexcept nogil:
    """Whether fd is a memfd of exactly size bytes that nobody can change."""
    cdef int seals = fcntl(fd, F_GET_SEALS)
    cdef struct_stat st
    return (seals >= 0 and (seals & PAYLOAD_SEALS) == PAYLOAD_SEALS
            and fstat(fd, &st) == 0 and <size_t>st.st_size == size)


cdef int read_payload_fd(int fd, char *into, size_t size) noexcept nogil:
    """Copy a payload memfd's bytes into `into`; -1 if it holds fewer. pread:
    every receiver shares the file offset, so none may move it."""
    cdef size_t done = 0
    cdef ssize_t n
    while done < size:
        n = pread(fd, into + done, size - done, done)
        if n < 0 and errno == EINTR:
            continue
        if n <= 0:
            return -1
        done += n
    return 0
