# Included by _core.pxd, so declarations only: Cython drops the initialiser
# of a `cdef double X = ...` in a .pxd without a word, and X reads 0. Hence
# every tunable is an integer enum, its unit in its name.

# Tunables, with their units and where they came from.

cdef enum:
    # Frame header: u32 size, u8 kind, flags, topic_len, reply_len, stamp_len,
    # nfds, fds_lost, reserved, u32 id (docs/protocol.md).
    HEADER_SIZE = 16
    PREAMBLE_SIZE = 8
    MAX_NAME = 255                # bytes in a topic, reply or stamp field
    MAX_FDS_PER_FRAME = 250       # SPEC.md; the kernel's SCM_MAX_FD is 253
    MAX_FDS_ON_WIRE = 251         # and a payload memfd on top
    # Payloads from this size up travel in a sealed memfd over UNIX: the
    # broker forwards the fd instead of copying the bytes twice through
    # the kernel (benchmarks/compare.py, large payloads).
    PAYLOAD_FD_MIN = 256 * 1024
    MAX_FDS_PER_SEND = 253        # SCM_MAX_FD
    # Bytes asked of one recv(). 256 KiB holds ~2,000 small frames, so one
    # syscall feeds a whole batch (benchmarks/test_throughput.py).
    READ_CHUNK = 256 * 1024
    # TLS reads ahead up to this much in one read(): a small record costs one
    # syscall, not three (header, body, EAGAIN); see tls_recv.
    TLS_READ_AHEAD = 64 * 1024
    # Bytes handed to one send()/sendmsg(): the socket buffer takes about this
    # much at once; larger sends only return partial writes.
    WRITE_CHUNK = 1024 * 1024
    SPIN_AFTER_AT_MOST = 4        # frames routed in a turn that count as a trickle
    MAX_EVENTS = 128              # epoll events taken per wait
    # The client's writer yields the CPU once before sending less than this
    # while publishers keep appending (benchmarks/compare.py).
    YIELD_BELOW = 16 * 1024
    # Sets of the router's topic cache (CACHE_WAYS entries each, the least
    # recently used evicted): 8,192 hot topics to begin with. It grows
    # fourfold while it has fewer than two entries a subscription, up to
    # 262,144 entries (34 MiB): a fleet's topics stay cached (BENCHMARKS.md,
    # Routing at scale).
    ROUTE_CACHE_SETS = 1024
    ROUTE_CACHE_MAX_SETS = 32768
    # Subscription pointers all cache entries together may hold (32 MiB): a
    # topic matching a million subscriptions must not be cached 8,192 times.
    CACHE_MAX_REFS = 4 * 1024 * 1024
    TOPIC_CACHE_SIZE = 4096       # validated topics a client remembers
    # fds a client holds in unsent publishes before publish blocks: each is
    # an open file of the process, and a broker that is away (reconnecting)
    # must not make a publisher run out of them.
    MAX_QUEUED_FDS = 512
    # Bytes of publish's packing buffer kept between calls; a larger payload
    # gives its memory back.
    PACKED_KEEP = 1024 * 1024

cdef enum:
    # uint64 words of control buffer for MAX_FDS_PER_SEND fds:
    # CMSG_SPACE(253 * 4) = 1032 bytes on 64-bit Linux, rounded up.
    CMSG_WORDS = 136

cdef enum:
    # The broker's first busy-poll window (µs), doubled after each sleep the
    # longest window would have saved (busx.Broker's busy_poll_us).
    POLL_WINDOW_START_US = 10
    # How long a blocked call in the main thread waits (ms) before letting
    # Python run signal handlers (Ctrl-C) and waiting again.
    SIGNAL_CHECK_MS = 50
    # A frame queued longer than this (ns) after the previous one is sent
    # straight from the publishing thread when the I/O thread is idle (see
    # ClientIO._send_directly); closer frames are a burst, batched by the
    # I/O thread.
    DIRECT_SEND_GAP_NS = 5000
