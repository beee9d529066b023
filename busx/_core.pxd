# cython: language_level=3
# What busx's compiled core holds, room by room: every struct's layout and
# every extension class's fields, with beside each field the thread that
# owns it or the lock that guards it. Behaviour lives in the rooms, the
# .pxi files _core.pyx includes, in the same order as here; the map of who
# may call whom is docs/development.md.
#
# Threads and locks: each class states its lock order once, at its top
# here. The broker's Conns, Router, Delivery and Verdicts belong to its loop
# thread; a client's Outbox and Inbox each have a lock of their own.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from busx.includes.system cimport *
from busx.includes.openssl cimport *

include "includes/consts.pxi"


# ---- buffers (_buffers.pxi) ----

cdef struct Buffer:
    char *data
    size_t start        # first byte not yet consumed
    size_t end          # one past the last byte written
    size_t cap


# An fd queued to travel with the frame that starts at byte `offset` of a
# stream (offsets count bytes ever appended, so they survive compaction).
cdef struct QueuedFd:
    unsigned long long offset
    int fd
    size_t held         # bytes of payload this fd carries (a payload memfd), else 0


cdef struct FdQueue:
    QueuedFd *items
    size_t head
    size_t tail
    size_t cap
    size_t held         # sum of the queued fds' held bytes


# ---- poller (_poller.pxi) ----

cdef enum PollTag:
    # epoll data for a loop's own fds; the broker's connections carry their
    # Conn pointer instead (always above these).
    TAG_WAKE = 1
    TAG_SIGNAL = 2
    TAG_SOCKET = 3      # the client's connection to its broker
    TAG_LISTEN = 8      # TAG_LISTEN + listener index


cdef struct Poller:
    int epfd            # -1: closed
    int wake_fd         # eventfd, watched with TAG_WAKE


# ---- sockio (_sockio.pxi) ----

# Large payloads over UNIX travel in a memfd sealed against every change, so
# the broker passes the fd on instead of copying the bytes through the kernel
# twice, and no reader can see them change or shrink (docs/protocol.md).
cdef enum:
    PAYLOAD_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE


# ---- frames (_frames.pxi) ----

cdef enum ParseStatus:
    PARSE_MALFORMED = -1
    PARSE_TOO_LARGE = -2
    PARSE_NEED_MORE = 0
    PARSE_OK = 1


cdef struct FrameView:
    size_t size          # whole frame, length prefix included
    uint32_t id
    uint8_t kind
    uint8_t flags
    uint8_t topic_len
    uint8_t reply_len
    uint8_t stamp_len
    uint8_t nfds
    uint8_t fds_lost
    const char *topic
    const char *reply
    const char *stamp
    const char *payload
    size_t payload_len


cdef class FrameDecoder:
    cdef Buffer buf
    cdef size_t max_frame
    cdef bint failed


# ---- topics (_topics.pxi) ----

cdef enum TopicCheck:
    TOPIC_INVALID = 0
    TOPIC_VALID = 1
    TOPIC_ASK_PYTHON = 2        # not ASCII


# ---- router (_router.pxi) ----

cdef struct Subscription:
    void *conn            # the owning Conn (opaque to the router)
    uint32_t sid          # the client's subscription id
    uint64_t queue        # hash of the queue group's name, 0 for none
    char *queue_name      # the group's name (owned), NULL for none
    uint8_t queue_len
    void *node            # TrieNode holding it
    size_t node_index     # its index in node.subs: O(1) removal
    size_t conn_index     # its index in its Conn's subs: O(1) removal
    unsigned long long dropped_unreported   # slow-consumer drops not yet told to the client
    unsigned long long dropped


cdef struct TrieNode:
    TrieNode *parent
    char *token
    size_t token_len
    uint64_t token_hash
    TrieNode **children   # literal children, open addressing by token_hash; NULL: none yet
    size_t children_cap   # a power of two
    size_t nchildren
    TrieNode *star        # the "*" child
    TrieNode *rest        # the ">" child
    Subscription **subs
    size_t nsubs
    size_t subs_cap


cdef enum:
    # Entries per cache set: a hot topic is evicted only by seven hotter
    # ones that hash to its set. A set's tags fill one cache line. (With 4,
    # a fleet cycling over 100,000 topics found 7% of them in sets of five or
    # more, where least-recently-used eviction misses every time.)
    CACHE_WAYS = 8
    # Topics up to this long are kept inside their cache entry, which then
    # fills two cache lines with no pointer to chase (the rest are malloc'd).
    SLOT_TOPIC_INLINE = 64
    # The broker prefetches a frame's route in three stages, this many
    # frames apart (BrokerLoop._look_ahead), over a ring of 4 x as many.
    LOOKAHEAD = 4
    LOOKAHEAD_RING = 16


cdef struct RouteSlot:
    # subs: the matches, queue members grouped together (see group_queues);
    # &one when there is at most one
    Subscription **subs
    Subscription *one
    size_t nsubs
    unsigned long long epoch      # Router.wild_epoch when filled: older is stale
    # Unique per fill: a Conn's remembered slot is still its topic's while
    # the version holds.
    unsigned long long version
    unsigned long long used       # Router.tick at the last hit: the set evicts the oldest
    char *topic           # NULL: empty; else inline_topic or malloc'd
    size_t topic_len
    char inline_topic[SLOT_TOPIC_INLINE]   # 128 bytes in all: two cache lines


cdef struct Lookahead:
    # The broker's view of a connection's frames past the one being taken,
    # during one turn of _take_frames (BrokerLoop._look_ahead).
    size_t bytes          # of input looked at, from the frame being taken on
    size_t parsed         # frames looked at this turn
    size_t taken          # frames taken this turn
    uint64_t hashes[LOOKAHEAD_RING]     # by frame number: its topic's hash, 0 if not hashed
    RouteSlot *slots[LOOKAHEAD_RING]    # by frame number: its prefetched cache entry


cdef struct Router:
    TrieNode root
    # cache_sets * CACHE_WAYS entries, a set's ways side by side; tags holds
    # each entry's topic hash, a set's in one cache line, so finding the way
    # reads one line (and a prefetch can fetch it ahead: _router.pxi).
    RouteSlot *cache
    uint64_t *tags
    size_t cache_sets     # a power of two, grown with the subscriptions (cache_fit)
    # The matches of the last _INBOX. topic, kept out of the cache: a reply
    # topic is used once, and caching it would only evict topics that repeat.
    # Its subs are `scratch`; any lookup or subscription change retires it.
    RouteSlot transient
    unsigned long long wild_epoch   # bumped by every wildcard subscribe/unsubscribe
    unsigned long long next_version
    unsigned long long tick
    size_t cached_refs    # subscription pointers held by cache entries (CACHE_MAX_REFS)
    size_t subscriptions
    size_t nodes
    Subscription **scratch   # match results under construction
    size_t scratch_len
    size_t scratch_cap


cdef struct SidTable:
    Subscription **slots   # NULL: empty
    size_t cap             # a power of two, or 0
    size_t count


# ---- verdicts (_verdicts.pxi) ----

cdef enum:
    VERDICT_SLOTS = 256        # topics whose publish verdict a connection remembers


cdef struct Verdict:
    char *topic                # NULL: empty slot; else owned (malloc)
    uint8_t topic_len
    bint allowed
    bint reported              # denial already told since the last PING
    uint64_t hash


cdef struct Verdicts:
    Verdict *slots             # VERDICT_SLOTS, open addressing; NULL until first use
    size_t count


# ---- TLS (_tls.pxi) ----

cdef class TlsContext:
    cdef SSL_CTX *ctx           # set once by for_broker/for_client/of_python; freed with the object
    cdef readonly bint check_hostname   # clients: the broker's certificate must name its host
    cdef int _start(self, const SSL_METHOD *method) except -1
    cdef int _load_identity(self, str cert, str key) except -1
    cdef int _trust(self, str ca) except -1


cdef class TlsStream:
    # The thread running busx's handshake owns it, until take().
    cdef SSL *ssl
    cdef int fd
    cdef double deadline        # now_ms() by which the current call ends; < 0: none
    cdef int _wait_or_raise(self, int rc) except -1
    cdef SSL *take(self)


# ---- conn (_conn.pxi) ----

cdef enum ConnState:
    CS_PREAMBLE = 0     # waiting for the client's 8-byte preamble
    CS_CONNECT = 1      # waiting for its CONNECT frame
    CS_READY = 2
    CS_CLOSING = 3      # fatal error sent: write what is queued, then close
    CS_CLOSED = 4


cdef enum HeartbeatVerdict:      # heartbeat_verdict(): what a connection's silence calls for
    HB_FINE = 0
    HB_PING = 1         # nothing heard from it, or sent to it, for a heartbeat
    HB_DEAD = 2         # nothing heard from it for three


cdef enum:
    # fds a connection may have sent ahead of the frame that claims them:
    # one frame's worth (docs/protocol.md, fd passing).
    MAX_FDS_AHEAD = MAX_FDS_ON_WIRE


cdef struct Conn:
    int fd
    SSL *tls                # TLS listener's connections: every byte goes through it
    int tls_want            # what OpenSSL waited for when it last said EAGAIN
    bint tls_more           # OpenSSL holds input epoll cannot announce: read again
    uint32_t id
    int state
    bint is_unix
    bint dirty              # on the broker's dirty list: has output to try
    bint want_out           # EPOLLOUT armed
    bint owes_drop_report   # some subscription has drops to report
    bint payload_fds        # takes large payloads as memfds (said so in CONNECT)
    # Payload bytes in memfds queued or sent to this client and not yet
    # reported received (K_RECEIVED): they count against max_pending.
    size_t fd_bytes_unreceived
    # Payload bytes in memfds taken from this client's PUBs and not yet
    # reported to it (it counts them against its max_buffer until then).
    size_t fd_bytes_taken
    # CS_CLOSING: closed at close_by at the latest. Its last words written,
    # the broker shuts down its side (lingering) and discards what the peer
    # still sends until the peer closes too: closing a socket with unread
    # input resets it, and a reset drops what the kernel has not yet sent.
    double close_by
    bint lingering          # SHUT_WR done: waiting for the peer's EOF
    bint peer_closed        # EOF read: nothing more can arrive
    Buffer rbuf
    Buffer wbuf
    unsigned long long wbuf_sent    # bytes ever sent: wbuf.data[wbuf.start] is byte wbuf_sent
    unsigned long long next_frame   # stream offset of the first frame not yet begun on the wire
    # in_fds: received, waiting for their PUB frame; each one's offset is the
    # stream offset where the recv that brought it ended (see _fds_until).
    FdQueue in_fds
    unsigned long long stream_in    # bytes received: rbuf's end is this stream offset
    FdQueue out_fds         # duplicates waiting to travel with their MSG frame
    char stamp[255]
    uint8_t stamp_len
    # Payload bytes in memfds sent to this client (out of out_fds) and not
    # yet reported received: a K_RECEIVED counts for at most these.
    size_t fd_bytes_sent
    unsigned long long msgs_in, msgs_out, bytes_in, bytes_out, dropped
    Subscription **subs        # dense; each knows its conn_index
    size_t nsubs, subs_cap
    SidTable sids              # the same subscriptions by id
    Verdicts verdicts          # policy only: publish verdicts by topic
    unsigned long long denials_untold   # denials not reported while output was full
    # Not read while its unsent output exceeds max_pending and its next
    # frame asks for an answer (SPEC.md, Limits: control replies).
    bint input_paused
    double opened_at           # handshake_timeout counts from here
    # Heartbeats (SPEC.md): the loop's turn clock when bytes last arrived
    # from this client, and when bytes last left for it.
    double last_in_ms
    double last_out_ms
    double last_ping_ms        # at most one PING a heartbeat
    unsigned long long ping_end     # stream offset just past the last PING queued
    bint answers_pings         # said so in CONNECT; older clients are never judged
    bint is_link               # the NATS link's connection (_nats.pxi), not a client
    # Not read until the NATS link drains: what it publishes is wanted
    # elsewhere faster than the NATS server takes it (_link.pxi, link_send).
    bint waits_for_link
    Conn *hs_next              # the handshake queue, oldest first (until READY)
    Conn *hs_prev
    # The last topic this connection published to, already validated,
    # allowed and routed: publishers mostly repeat their topic.
    char last_topic[255]
    uint8_t last_topic_len
    RouteSlot *last_slot       # valid while slot_current(router, last_slot, last_version)
    unsigned long long last_version
    Conn *next_dirty
    bint backlogged            # has whole frames left over from its last turn
    Conn *next_backlog
    Conn *next_dead
    size_t slot


# ---- delivery (_delivery.pxi) ----

cdef struct FdPayload:
    # A routed PUB's payload carried in a memfd (F_PAYLOAD_FD).
    int fd                  # the memfd, the frame's last fd; -1: the payload is inline
    size_t size
    bint loaded             # Delivery.fd_payload holds its bytes (for TCP clients)


cdef struct Totals:
    # The broker's counters (stats()), added to by the loop and by delivery.
    unsigned long long msgs_in, msgs_out, bytes_in, bytes_out, dropped
    unsigned long long slow_consumer_cuts   # subscribers cut off (slow_consumer="disconnect")
    unsigned long long publishes_denied     # PUBs the policy refused


cdef struct Delivery:
    size_t max_pending          # busx.Broker's limits, fixed at construction
    size_t max_pending_fds
    bint disconnect_slow        # slow-consumer policy: cut off, or drop newest
    # Bytes of payload memfds handed to clients and not yet received. The
    # kernel counts fds in flight against this user's RLIMIT_NOFILE (past it
    # sendmsg fails with ETOOMANYREFS), so over the budget a payload goes
    # inline; every memfd holds at least PAYLOAD_FD_MIN bytes, so the budget
    # in bytes bounds their number.
    size_t payload_fd_bytes
    size_t payload_fd_budget
    Buffer fd_payload           # a memfd payload read for inline delivery (load_payload)
    Totals *totals              # BrokerLoop.totals


cdef enum DeliveryResult:
    DELIVERED = 0           # queued: the subscriber has output to write
    NOT_READY = 1           # the subscriber is closing: nothing queued
    DROPPED = 2             # past a bound, dropped and counted (drop policy)
    CUT_OFF = 3             # past a bound, policy disconnect: unsent frames discarded
    NO_MEMORY = 4
    PAYLOAD_UNREADABLE = 5


# ---- NATS link (_nats.pxi) ----

cdef enum LinkState:
    LINK_DOWN = 0       # no connection: messages for the backbone wait in `pending`
    LINK_JOINING = 1    # connected, our interest sent; the hub's snapshot ends with its PONG
    LINK_UP = 2


cdef enum:
    # Longest control line a hub may send (16 x nats-server's max_control_line).
    NATS_MAX_CONTROL_LINE = 65536
    # Longest `Busx-Origin` a broker stamps: with the longest sender stamp it
    # still fits the 255-byte stamp field.
    NATS_MAX_ORIGIN = 48
    # A broker's instance id in hex (Busx-Broker): what it recognises as its own.
    NATS_INSTANCE_LEN = 16
    # Queue groups one outgoing message may name.
    NATS_MAX_QUEUES = 16
    # Our PINGs the hub has not answered yet, at most: past it, a client's
    # backbone flush is answered without waiting (it cannot be PINGed for).
    NATS_MAX_PINGS = 4096


cdef struct LinkPing:
    # One PING we sent the hub, in order (PONGs come back in the same order):
    # the client flush (connection and PING id) its PONG answers, or 0.
    uint32_t conn_id
    uint32_t ping_id


cdef struct NatsMsg:
    # One LMSG/HMSG control line, parsed: views into the line.
    const char *subject
    size_t subject_len
    const char *reply           # NULL: none
    size_t reply_len
    const char *queues[NATS_MAX_QUEUES]     # the groups it is for ("| q1 q2")
    size_t queue_lens[NATS_MAX_QUEUES]
    int nqueues
    size_t hdr_len              # 0: LMSG
    size_t total_len            # headers and payload


cdef struct NatsLink:
    # The broker's link to a NATS server (SPEC.md, Across hosts). Threads:
    # the broker loop's, under state_lock, like the Conns; it outlives each
    # connection, so interest and the outage buffer survive a reconnect.
    Conn *conn                  # the current connection (is_link), NULL while down
    int state                   # a LinkState
    Router remote               # what the rest of the deployment wants, within nats_export
    SidTable sids               # remote's subscriptions by the id Python gave them
    Buffer pending              # messages for the backbone while it is not up
    size_t buffer_max           # nats_buffer: bytes pending or unsent, past which messages drop
    size_t max_payload          # the server's (INFO): headers plus payload
    char origin[NATS_MAX_ORIGIN]    # this broker's host name, as remote senders see it
    uint8_t origin_len
    char instance[NATS_INSTANCE_LEN]
    char remote_stamp[256]      # the stamp of the message being routed from NATS
    double last_ping_ms
    LinkPing *pings             # ring of NATS_MAX_PINGS, allocated with the link
    size_t pings_head           # the oldest unanswered
    size_t pings_count
    char why[160]               # why the connection is being given up, for the log
    unsigned long long bytes_lost           # written for the hub, unsent when a connection died
    bint publishers_wait        # some connection waits_for_link
    size_t skip                 # bytes still to discard of a message too large for us
    unsigned long long publisher_pauses     # times a publisher waited for the link to drain
    unsigned long long msgs_out, msgs_in, bytes_out, bytes_in
    unsigned long long dropped_too_large    # over the server's max_payload
    unsigned long long dropped_buffer_full  # past nats_buffer
    unsigned long long dropped_invalid      # from NATS, not a valid busx topic
    unsigned long long dropped_denied       # from NATS, refused by the policy (origin=, remote=)
    unsigned long long fds_lost             # fds that stayed on this host


# ---- message (_message.pxi) ----

cdef class Message:
    cdef readonly str topic
    cdef bytes _raw
    cdef const char *mapped     # the payload memfd's bytes, or NULL
    cdef size_t size            # payload bytes
    cdef readonly object reply_to
    cdef readonly tuple fds
    cdef readonly int fds_lost
    cdef bytes stamp
    cdef object _data
    cdef object bus_ref         # weakref.ref to the Bus that msg.respond() publishes with


cdef class MessageQueue:
    cdef list items
    cdef Py_ssize_t head
    cdef ClientIO owner
    cdef size_t bytes           # payload bytes of the queued messages
    cdef public bint apart      # the reply inbox: ClientIO._has_room_for checks its bytes
    cdef public unsigned long long dropped   # by the broker, or by has_room_for

    # Methods, defined in _message.pxi:
    cdef void push(self, Message msg) except *
    cpdef object pop(self)
    cpdef list pop_many(self, Py_ssize_t max_count)
    cdef inline void _compact(self) except *
    cdef inline void _release(self, size_t size, size_t fds) noexcept


# ---- msgpack (_msgpack.pxi) ----

cdef enum:
    FAST_DECODE_DEPTH = 32      # deeper nesting is left to msgpack
    SHORT_ASCII = 64            # strings up to this long are checked for ASCII first
    KEY_CACHE_SLOTS = 512       # map keys remembered (they repeat message after message)
    KEY_CACHE_MAX = 24          # longest key, in bytes, worth remembering


cdef struct Reader:
    const unsigned char *p
    const unsigned char *end


# ---- pack (_pack.pxi) ----

cdef enum:
    FAST_PACK_DEPTH = 32        # deeper nesting is left to msgpack (it has its own limit)


# ---- outbox (_outbox.pxi) ----

cdef enum AppendStatus:
    APPEND_OK = 0
    APPEND_CLOSED = -1
    APPEND_TIMEOUT = -2
    APPEND_FAILED = -3
    APPEND_NOMEM = -4
    APPEND_NO_ROOM = -5
    APPEND_FORKED = -6
    APPEND_TOO_LARGE = -7


cdef struct Room:
    # What a frame needs of the output buffer (outbox_has_room).
    size_t bytes
    int fds


cdef struct Outbox:
    pthread_mutex_t lock
    pthread_cond_t room_cond    # broadcast when `out` may have room, or the state changed
    Buffer out                  # lock: frames publishers queued
    FdQueue out_fds             # lock: their fds; offsets index out.data
    # The batch being sent: the I/O thread's, except that a publisher may
    # send a lone frame from it under the lock while it is empty and the I/O
    # thread idle (ClientIO._send_directly); so the I/O thread consumes it
    # under the lock too.
    Buffer sending
    FdQueue sending_fds
    # Payload bytes of memfds published and not yet reported taken by the
    # broker (K_RECEIVED): they count against max_buffer. lock.
    size_t fd_bytes_unacked
    bint acks_stalled           # lock: the inbox stopped reading, so acks cannot arrive
    bint want_out               # lock; written by the I/O thread: the socket was full
    int wake_pending            # lock: the I/O thread is awake, or has been woken
    double last_append          # lock: CLOCK_MONOTONIC ms of the last frame queued
    double last_ping            # lock: ... of the last heartbeat PING queued
    size_t max_buffer           # fixed at construction


# ---- inbox (_inbox.pxi) ----

cdef struct Inbox:
    pthread_mutex_t lock
    pthread_cond_t event_cond   # broadcast whenever events_seq moves
    Buffer frames               # lock: whole frames for Python
    FdQueue fds                 # lock: the fds those frames carry, in order
    size_t fd_bytes             # lock: payload bytes in memfds of those frames
    unsigned long long events_seq   # lock: bumped when frames arrive or the state changes
    bint reading_paused         # lock: the I/O thread stopped reading (inbox_full)
    # A thread waiting for messages may read the socket itself while the I/O
    # thread is idle (ClientIO._read_directly).
    bint direct_reader          # lock: such a thread watches the socket
    bint direct_reading         # ClientIO.read_lock: ... and is inside _read
    int direct_result           # lock: a RunResult it found, for the I/O thread
    int direct_wake_fd          # wakes it when events happen meanwhile; lock (release closes it)
    int notify_fd               # eventfd for asyncio, made on first use; lock (release closes it)
    # The Python side's (under the Bus's pump lock): bytes and fds of
    # messages waiting in MessageQueues, bytes take() is parsing, round trips
    # awaited. The reader reads them without the lock to decide whether to
    # read on: a stale value only delays that decision to its next look.
    size_t held
    size_t held_fds
    size_t taking
    int round_trips
    size_t max_buffer           # fixed at construction
    # fds of received messages the application has not taken before the
    # client stops reading its socket, as max_buffer is for bytes: a quarter
    # of this process's open-file limit. Fixed at construction.
    size_t max_held_fds


# ---- broker (_broker.pxi) ----

cdef enum:
    MAX_LISTENERS = 4
    # How long a closing connection may take to read its last words (why it
    # is closed): a stalled client learns the reason when it resumes. Cheap:
    # what a closing connection still holds is that one frame.
    CLOSE_GRACE_MS = 30000
    # How long, after its last words are sent, the broker waits for the peer
    # to close (discarding its input) before closing anyway.
    LINGER_MS = 2000
    # Copies one connection's turn may route before the loop serves others
    # (tests/test_load.py: a ping among 1,000 subscribers).
    DELIVERY_BUDGET = 65536
    CONTROL_COST = 512         # copies a SUB or STATS counts for in that budget: ~1 ms a turn
    ACCEPT_RETRY_MS = 100      # pause before accepting again after EMFILE
    # Frames before READY (preamble, CONNECT): an unauthenticated peer costs
    # at most this much buffer (SPEC.md, Limits).
    HANDSHAKE_MAX_FRAME = 64 * 1024


cdef class BrokerLoop:
    # Threads: every field below belongs to the loop thread, which holds
    # state_lock for each turn of the loop (without the GIL). Other threads
    # (snapshot() for stats; drain() and close_all() once the loop has
    # ended) take state_lock as well; request_stop() only sets
    # stop_requested and wakes the poller.
    #
    # Lock order: state_lock, then the GIL. The loop calls into Python (the
    # control path: accept, handshake, SUB, stats) while holding state_lock,
    # which is safe because no thread ever takes state_lock while holding
    # the GIL: every caller releases the GIL first (`with nogil:`).
    cdef Poller poller
    cdef int listen_fds[MAX_LISTENERS]
    cdef bint listen_unix[MAX_LISTENERS]
    cdef SSL_CTX *listen_tls[MAX_LISTENERS]    # a reference each; NULL: plain
    cdef int nlisten
    cdef bint accept_paused
    cdef double accept_resume_at
    cdef Conn **conns
    cdef size_t conns_cap
    cdef size_t nconns
    cdef Conn *dirty
    cdef Conn *backlog         # connections whose frames wait for their next turn
    cdef long budget           # deliveries left in the current connection's turn
    cdef uint64_t topic_hash   # the frame being handled's topic hash, if prefetching made it (else 0)
    cdef bint routed_by_topic  # the last PUB routed missed its publisher's remembered route
    cdef Conn *dead
    cdef size_t nclosing
    cdef Conn *handshaking        # oldest connection not yet READY (hs_next: newer)
    cdef Conn *handshaking_last
    cdef Router router
    cdef Delivery delivery       # the delivery room; its totals point at ours
    cdef Totals totals
    cdef size_t max_pending      # = delivery.max_pending, for the control path
    cdef size_t max_frame
    cdef size_t max_connections
    cdef size_t max_subscriptions
    cdef double handshake_timeout_ms
    cdef double heartbeat_ms           # 0: heartbeats off
    cdef double next_heartbeat_ms      # when _check_heartbeats next runs
    cdef double last_sweep_ms          # when it last ran
    cdef double turn_ms                # now_ms() read once per turn of the loop
    cdef public double busy_poll_ms    # the longest poll: busx.Broker's busy_poll_us
    cdef double poll_window_ms         # the poll now, adapted between 0 and busy_poll_ms
    cdef bint check_publish     # a policy is loaded: ask it about each new topic
    cdef volatile int stop_requested
    cdef uint32_t next_id
    cdef unsigned long long rr_counter      # round robin among a queue group's members
    cdef pthread_mutex_t state_lock
    cdef public unsigned long long read_calls, write_calls
    cdef public unsigned long long busy_polls, busy_poll_hits     # polls begun, ended by events
    cdef public unsigned long long refused             # connections past max_connections
    cdef public unsigned long long limits_hit          # SUBs past max_subscriptions
    cdef public unsigned long long handshake_timeouts
    cdef public unsigned long long heartbeat_timeouts  # clients closed: silent for 3 heartbeats
    cdef public unsigned long long tls_failures        # connections closed: TLS failed
    cdef NatsLink *link         # the NATS backbone (_nats.pxi); NULL: none
    cdef object handler
    cdef object backbone        # busx.backbone.Backbone: the link's Python half
    cdef object snapshot_taken   # snapshot()'s result, handed across its nogil block

    # Methods, defined in _broker.pxi:
    cdef void _watch(self, int fd, uint64_t tag) except *
    cdef int _loop(self) noexcept nogil
    cdef int _timer_ms(self) noexcept nogil
    cdef int _spin(self, epoll_event *events, double until) noexcept nogil
    cdef void _adapt_poll_window(self, double idle_ms) noexcept nogil
    cdef void _accept(self, int index) noexcept nogil
    cdef void _pause_accept(self) noexcept nogil
    cdef void _resume_accept(self) noexcept nogil
    cdef void _refuse(self, int fd, const char *code, const char *message) noexcept nogil
    cdef void _open_conn(self, int fd, bint is_unix, SSL_CTX *tls) noexcept nogil
    cdef int _keep_conn(self, Conn *c) noexcept nogil
    cdef int _py_accept(self, Conn *c) noexcept with gil
    cdef int _queue_bytes(self, Conn *c, bytes data) except -1
    cdef void _report(self, BaseException exc) noexcept
    cdef void _on_conn_event(self, Conn *c, uint32_t events) noexcept nogil
    cdef void _discard_input(self, Conn *c) noexcept nogil
    cdef void _read(self, Conn *c) noexcept nogil
    cdef ssize_t _recv(self, Conn *c, bint *truncated) noexcept nogil
    cdef void _tls_failed(self, Conn *c) noexcept nogil
    cdef void _defer(self, Conn *c) noexcept nogil
    cdef void _take_backlog(self) noexcept nogil
    cdef void _take_frames(self, Conn *c) noexcept nogil
    cdef void _look_ahead(self, Conn *c, Lookahead *ahead) noexcept nogil
    cdef bint _take_preamble(self, Conn *c) noexcept nogil
    cdef bint _must_wait_for_room(self, Conn *c, FrameView *f) noexcept nogil
    cdef void _pause_input(self, Conn *c) noexcept nogil
    cdef void _resume_input(self, Conn *c) noexcept nogil
    cdef void _set_events(self, Conn *c) noexcept nogil
    cdef void _handle(self, Conn *c, FrameView *f) noexcept nogil
    cdef void _queue_handshake(self, Conn *c) noexcept nogil
    cdef void _handshake_over(self, Conn *c) noexcept nogil
    cdef void _on_connect(self, Conn *c, FrameView *f) noexcept nogil
    cdef int _py_connect(self, Conn *c, FrameView *f) noexcept with gil
    cdef void _route(self, Conn *src, FrameView *f) noexcept nogil
    cdef void _route_by_topic(self, Conn *src, FrameView *f, int *fds,
                              FdPayload *big) noexcept nogil
    cdef bint _take_payload_fd(self, Conn *src, FrameView *f, int *fds,
                               FdPayload *big) noexcept nogil
    cdef void _report_fd_bytes_taken(self, Conn *c) noexcept nogil
    cdef void _deliver_all(self, Conn *src, FrameView *f, RouteSlot *slot,
                           int *fds, FdPayload *big, NatsMsg *from_nats) noexcept nogil
    cdef void _delivery_failed(self, Conn *dst, int result) noexcept nogil
    cdef bint _topic_ok(self, const char *topic, size_t length) noexcept nogil
    cdef bint _reply_ok(self, FrameView *f) noexcept nogil
    cdef bint _py_topic_ok(self, const char *topic, size_t length) noexcept with gil
    cdef bint _may_publish(self, Conn *src, FrameView *f) noexcept nogil
    cdef void _report_untold_denials(self, Conn *c) noexcept nogil
    cdef bint _py_may_publish(self, Conn *src, FrameView *f) noexcept with gil
    cdef void _subscribe(self, Conn *c, FrameView *f) noexcept nogil
    cdef int _keep_subscription(self, Conn *c, Subscription *s) noexcept nogil
    cdef void _forget_subscription(self, Conn *c, Subscription *s) noexcept nogil
    cdef int _py_subscribe(self, Conn *c, FrameView *f) noexcept with gil
    cdef void _unsubscribe(self, Conn *c, uint32_t sid) noexcept nogil
    cdef void _stats(self, Conn *c, FrameView *f) noexcept nogil
    cdef void _py_stats(self, Conn *c, FrameView *f) noexcept with gil
    cdef void _send_simple(self, Conn *c, uint8_t kind, uint32_t id) noexcept nogil
    cdef void _send_error(self, Conn *c, uint32_t id, const char *code,
                          const char *message, const char *topic=*,
                          size_t topic_len=*) noexcept nogil
    cdef void _fail(self, Conn *c, const char *code, const char *message) noexcept nogil
    cdef void _begin_closing(self, Conn *c) noexcept nogil
    cdef void _linger(self, Conn *c) noexcept nogil
    cdef inline void _mark_dirty(self, Conn *c) noexcept nogil
    cdef void _flush_dirty(self) noexcept nogil
    cdef void _write(self, Conn *c) noexcept nogil
    cdef inline void _pass_frames(self, Conn *c, unsigned long long sent_end) noexcept nogil
    cdef ssize_t _send_some(self, Conn *c) noexcept nogil
    cdef void _housekeeping(self) noexcept nogil
    cdef void _check_heartbeats(self) noexcept nogil
    cdef void _drop_subscriptions(self, Conn *c) noexcept nogil
    cdef void _close_conn(self, Conn *c) noexcept nogil
    cdef void _py_security_event(self, uint32_t conn_id, int fd, const char *code,
                                 const char *message) noexcept with gil
    cdef void _py_closed(self, uint32_t conn_id) noexcept with gil
    cdef void _undefer(self, Conn *c) noexcept nogil
    cdef void _bury_dead(self) noexcept nogil
    cdef void _take_snapshot(self) noexcept with gil
    cdef object _snapshot(self)
    cdef object _link_snapshot(self)


# ---- client (_client.pxi) ----

cdef enum ClientState:
    CL_DETACHED = 0       # no socket: before attach, or reconnecting
    CL_ATTACHED = 1
    CL_FAILED = 2         # disconnected for good; publish raises Disconnected
    CL_CLOSED = 3


cdef class ClientIO:
    # Threads: the I/O thread (run(), no GIL); publishers (any Python thread,
    # holding the GIL); the Python side (take() and friends, under the Bus's
    # pump lock, holding the GIL); a thread waiting for messages, which may
    # read the socket itself (_read_directly, no GIL).
    #
    # Lock order: read_lock, inbox.lock, outbox.lock, watch_lock (tls_lock is
    # a leaf, taken under any of them and nothing under it); the GIL is
    # never acquired while any of them is held. Publishers take outbox.lock,
    # and the Python side inbox.lock, while holding the GIL, so a thread
    # holding either and waiting for the GIL would deadlock the process:
    # every lock/unlock pair sits inside one `with nogil:` block or one nogil
    # function, and no code under a lock calls into Python. read_lock and
    # watch_lock are only ever taken without the GIL.
    # Beside each field: who owns it, or which lock guards it.
    cdef Outbox outbox          # the send side; its fields say their owners
    cdef Inbox inbox            # the receive side; likewise
    # The connection: written under both rooms' locks (attach, detach and
    # state changes), so either lock is enough to read them.
    cdef int fd
    cdef SSL *tls               # TLS connections: every byte goes through it
    # OpenSSL holds input that epoll cannot announce: read again without
    # waiting. Written under read_lock; the I/O thread peeks at it.
    cdef bint tls_more
    # Serialises the calls on tls, which the I/O thread, a publisher
    # sending directly and a direct reader may each make: a leaf, held for
    # one OpenSSL call and nothing else.
    cdef pthread_mutex_t tls_lock
    cdef int state              # a ClientState
    cdef bint is_unix
    cdef bint payload_fds       # the broker takes large payloads as memfds
    cdef size_t max_frame
    cdef double heartbeat_ms    # fixed at construction; 0: heartbeats off
    # When bytes last arrived: written by whoever holds read_lock (and by
    # _resume_input, when silence starts to count again). The I/O thread's
    # heartbeat check reads it without the lock: one aligned word, and a
    # stale value only delays that check's verdict by a turn.
    cdef double last_in_ms
    cdef double last_beat_ms    # the I/O thread's: when _heartbeat last ran
    cdef int close_requested    # outbox.lock; the I/O thread reads it after each wake-up
    # The I/O thread waits on it. Others wake it holding either room's lock,
    # and release() closes it holding both, so no wake can hit a closed eventfd.
    cdef Poller poller
    # What the poller watches the socket for, from both rooms: the inbox
    # turns input off while paused or read directly, the outbox asks for
    # output while the socket is full. watch_lock, innermost.
    cdef pthread_mutex_t watch_lock
    cdef bint watch_in
    cdef bint watch_out
    # Held by whoever runs _read: the I/O thread, or a thread waiting for
    # messages (_read_directly). It guards the partial input.
    cdef pthread_mutex_t read_lock
    cdef Buffer rbuf
    cdef FdQueue recv_fds
    cdef bint forked            # set once in a fork()ed child: touch nothing shared
    # Python side only (under Bus's pump lock).
    cdef Buffer taken
    cdef size_t taken_fd_bytes  # payload bytes in memfds taken by this take()
    cdef bytes last_topic_b
    cdef object last_topic
    cdef bytes last_stamp
    cdef uint32_t last_sid
    cdef MessageQueue last_queue
    cdef object bus_ref         # weakref.ref to the Bus (or AsyncBus) messages respond with
    cdef dict topic_cache       # str -> validated UTF-8 bytes
    cdef Buffer packed          # publish's payload, reused; guarded by `packing`
    cdef bint packing
    cdef public int last_errno  # the I/O thread's, read after run() returns
    # Statistics: each written by one side (outbox.lock, the reader, the
    # Python side) and read as a snapshot.
    cdef public unsigned long long frames_out, write_calls, frames_in, read_calls
    cdef public unsigned long long direct_sends     # frames sent by the publishing thread
    cdef public unsigned long long direct_reads     # reads done by a thread waiting for messages
    cdef public unsigned long long fd_payloads_out, fd_payloads_in  # payloads sent as memfds
    cdef public unsigned long long discarded        # messages for subscriptions already gone
    cdef public unsigned long long malformed        # frames dropped: fields that do not decode
    cdef public unsigned long long unread_dropped   # messages dropped: their queue was full
    # Bytes written to connections that were then lost, which the broker's
    # side had not yet taken (SIOCOUTQ at detach): messages among them may
    # be lost. Written by detach() under both rooms' locks.
    cdef public unsigned long long bytes_lost_in_flight
    # Bytes sent on the current socket, by whichever thread may send (the
    # I/O thread, or a publisher sending directly while it is idle).
    cdef unsigned long long bytes_sent_on_socket

    # Methods, defined in _client.pxi:
    cdef void _release_shared(self) noexcept nogil
    cdef int _attach(self, int fd, SSL *tls, bint is_unix, const char *prologue,
                     size_t prologue_len, size_t max_frame, bint payload_fds) noexcept nogil
    cdef void _close_socket(self) noexcept nogil
    cdef ssize_t _recv_tls(self) noexcept nogil
    cdef ssize_t _send(self, const char *data, size_t length, FdQueue *fds,
                       unsigned long long base, int *tls_want) noexcept nogil
    cdef void _set_state(self, int state)
    cdef int _run(self) noexcept nogil
    cdef int _write(self) noexcept nogil
    cdef void _watch(self, int input, int output) noexcept nogil
    cdef inline void _watch_input(self) noexcept nogil
    cdef void _resume_input(self) noexcept nogil
    cdef int _read(self) noexcept nogil
    cdef void _resume_reading(self) noexcept
    cdef inline void _wake_io(self) noexcept nogil
    cdef size_t _whole_frames(self, size_t *fd_bytes, size_t *acked,
                              size_t *claimed, bint *pinged) noexcept nogil
    cdef int _heartbeat(self) noexcept nogil
    cdef inline bint _owes_tls_read(self) noexcept nogil
    cdef int _heartbeat_wait_ms(self) noexcept nogil
    cdef bint _publish_bytes_by_fd(self, bytes topic, bytes data, bytes reply, object fds,
                                   double timeout) except -1
    cdef bytes _topic(self, topic)
    cdef int _publish(self, bytes topic, const char *payload, size_t payload_len,
                      bytes reply, object fds, double timeout, int payload_fd=*) except -1
    cdef inline bint _deliverable(self, size_t topic_len, size_t reply_len,
                                  size_t payload_len) noexcept nogil
    cdef int _raise_append(self, int status, size_t size) except -1
    cdef int _append(self, uint8_t kind, uint8_t flags, uint32_t id, const char *topic,
                     size_t topic_len, const char *reply, size_t reply_len,
                     const char *payload, size_t payload_len, int *fds, int nfds,
                     size_t held, double timeout) except? -9
    cdef int _try_append(self, uint8_t kind, uint8_t flags, uint32_t id, const char *topic,
                         size_t topic_len, const char *reply, size_t reply_len,
                         const char *payload, size_t payload_len, int *fds, int nfds,
                         size_t held, Room *room, bint ignore_limit) noexcept nogil
    cdef inline bint _memfds_wanted(self, size_t payload_len) noexcept nogil
    cdef bint _send_directly(self, uint8_t kind, uint32_t id, const char *topic,
                             size_t topic_len, const char *reply, size_t reply_len,
                             const char *payload, size_t payload_len,
                             bint *wake) noexcept nogil
    cdef bint _sliced(self, unsigned long long seen, Room *room_for,
                      timespec *deadline) except -1
    cdef bint _wait_until(self, unsigned long long seen, Room *room_for,
                          timespec *until) noexcept
    cdef bint _wait_for_room(self, Room *room, timespec *until) noexcept nogil
    cdef bint _wait_for_events(self, unsigned long long seen, timespec *until) noexcept nogil
    cdef bint _may_read_directly(self) noexcept nogil
    cdef bint _read_directly(self, timespec *until) noexcept nogil
    cdef void _stop_direct_reader(self) noexcept nogil
    cdef void _dispatch(self, FrameView *f, dict queues) except *
    cdef inline bint _has_room_for(self, MessageQueue queue, size_t size,
                                   size_t nfds) noexcept
    cdef object _decode_topic(self, FrameView *f)
    cdef const char *_map_payload_fd(self, FrameView *f, tuple fds, size_t size)
    cdef tuple _take_fds(self, int count)
