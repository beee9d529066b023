# The OS boundary: every libc / Linux declaration busx uses, in one place.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EAGAIN
        EWOULDBLOCK
        EMFILE
        ENFILE
        ETIMEDOUT
        ECONNRESET
        EPIPE
        EPROTO
        ENOBUFS
        ENOMEM


cdef extern from *:
    """
    #include <errno.h>
    static inline void busx_set_errno(int value) { errno = value; }
    """
    # Cython makes a name assigned in a function local to it: errno is set
    # through this instead.
    void busx_set_errno(int value) nogil


cdef extern from *:
    """
    static inline void busx_prefetch(const void *p) { __builtin_prefetch(p); }
    """
    # A hint to start loading p's cache line; never faults, whatever p is.
    void busx_prefetch(const void *p) nogil


cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ        # bytes written to a socket that its peer has not yet taken


cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    int dlclose(void *handle)
    enum:
        RTLD_LAZY
        RTLD_NOLOAD


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    ssize_t pread(int fd, void *buf, size_t count, long offset)
    int close(int fd)
    int dup(int fd)
    int getpid()


cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    enum:
        F_GETFL
        F_SETFL
        F_DUPFD_CLOEXEC
        O_NONBLOCK
        F_ADD_SEALS
        F_GET_SEALS
        F_SEAL_SEAL
        F_SEAL_SHRINK
        F_SEAL_GROW
        F_SEAL_WRITE


cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        MFD_CLOEXEC
        MFD_ALLOW_SEALING
        PROT_READ
        MAP_SHARED


cdef extern from "<sys/stat.h>" nogil:
    cdef struct struct_stat "stat":
        long st_size
    int fstat(int fd, struct_stat *buf)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *msgh)
    cmsghdr *CMSG_NXTHDR(msghdr *msgh, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int shutdown(int fd, int how)
    enum:
        SOL_SOCKET
        SCM_RIGHTS
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_CTRUNC
        MSG_CMSG_CLOEXEC
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SHUT_RDWR
        SHUT_WR


cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)


cdef extern from "<sys/resource.h>" nogil:
    ctypedef unsigned long rlim_t
    struct rlimit:
        rlim_t rlim_cur
        rlim_t rlim_max
    enum: RLIMIT_NOFILE
    rlim_t RLIM_INFINITY
    int getrlimit(int resource, rlimit *limits)


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    ctypedef struct pthread_condattr_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_condattr_init(pthread_condattr_t *a)
    int pthread_condattr_setclock(pthread_condattr_t *a, int clk)
    int pthread_condattr_destroy(pthread_condattr_t *a)
    int pthread_cond_init(pthread_cond_t *c, pthread_condattr_t *a)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_timedwait(pthread_cond_t *c, pthread_mutex_t *m, const timespec *t)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_cond_signal(pthread_cond_t *c)


cdef extern from "wire.h" nogil:
    # Little-endian loads and stores for the frame header, whatever the host.
    uint32_t busx_load_u32(const char *p)
    void busx_store_u32(char *p, uint32_t v)
    uint64_t busx_load_u64(const char *p)
    void busx_store_u64(char *p, uint64_t v)
    void busx_store_be(char *p, uint64_t v, int width)
    uint64_t busx_hash(const char *p, size_t n)
    bint busx_same_bytes(const char *a, const char *b, size_t n)


cdef extern from "counters.h" nogil:
    enum busx_counter_kind:
        BUSX_BUFFER_BYTES
        BUSX_QUEUED_FDS
        BUSX_MAPPINGS
        BUSX_CONNS
        BUSX_SUBSCRIPTIONS
        BUSX_POLLERS
    bint BUSX_COUNTING
    void busx_count(int which, long long delta)
    long long busx_counter(int which)


cdef extern from "trace.h" nogil:
    enum busx_trace_stage:
        BUSX_TRACE_MARK
        BUSX_TRACE_PUBLISH
        BUSX_TRACE_CLIENT_SEND
        BUSX_TRACE_BROKER_READ
        BUSX_TRACE_BROKER_SEND
        BUSX_TRACE_CLIENT_READ
        BUSX_TRACE_TAKEN
        BUSX_TRACE_STAGES
    enum:
        BUSX_TRACE_CAPACITY
    ctypedef struct busx_trace_event:
        uint64_t ns
        uint64_t thread
        uint32_t stage
    int busx_tracing
    busx_trace_event busx_trace_ring[]
    uint64_t busx_trace_cursor
    void busx_trace(int stage)
