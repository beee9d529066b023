# The NATS link room: the leaf-node protocol's data half, as bytes. It
# parses the hub's LMSG/HMSG lines, turns a busx sender stamp into headers
# and back, and writes the messages a broker sends to the backbone. It
# holds the link's state between connections (NatsLink: the remote interest,
# the outage buffer, the counters) and never touches a socket or epoll: the
# broker loop reads and writes the link's connection like any other
# (_broker.pxi), and busx.backbone does the control half (handshake,
# interest, reconnects) in Python. docs/nats-leafnode.md is the protocol as
# nats-server speaks it.
#
# Threads: the broker loop's, holding state_lock, like the Conns.

cdef enum:
    NATS_MAX_ARGS = NATS_MAX_QUEUES + 5     # subject, marker, reply, queues, sizes
    STAMP_ARRAY6 = 0x96         # the msgpack fixarray a broker's stamp starts with
    STAMP_ARRAY7 = 0x97         # ... and with origin appended


cdef const char *HEADER_ORIGIN = b"Busx-Origin:"
cdef const char *HEADER_STAMP = b"Busx-Stamp:"
cdef const char *HEADER_FDS_LOST = b"Busx-Fds-Lost:"
cdef const char *HEADER_BROKER = b"Busx-Broker:"
cdef const char *HEX_DIGITS = b"0123456789abcdef"
# [None x 6, "nats"]: a message from a native NATS client.
cdef const char *NATIVE_STAMP = b"\x97\xc0\xc0\xc0\xc0\xc0\xc0\xa4nats"
cdef size_t NATIVE_STAMP_LEN = 12


cdef NatsLink *nats_link_new(size_t buffer_max, const char *origin, size_t origin_len,
                             const char *instance) noexcept nogil:
    """instance: NATS_INSTANCE_LEN characters naming this broker."""
    cdef NatsLink *link = <NatsLink *>calloc(1, sizeof(NatsLink))
    if link == NULL:
        return NULL
    link.pings = <LinkPing *>calloc(NATS_MAX_PINGS, sizeof(LinkPing))
    if link.pings == NULL or router_init(&link.remote) < 0:
        free(link.pings)
        free(link)
        return NULL
    link.buffer_max = buffer_max
    link.max_payload = 1 << 20         # nats-server's default, until its INFO says
    link.origin_len = <uint8_t>min(origin_len, <size_t>NATS_MAX_ORIGIN)
    memcpy(link.origin, origin, link.origin_len)
    memcpy(link.instance, instance, NATS_INSTANCE_LEN)
    return link


cdef void nats_link_free(NatsLink *link) noexcept nogil:
    cdef size_t i
    if link == NULL:
        return
    for i in range(link.sids.cap):
        if link.sids.slots[i] != NULL:
            router_remove(&link.remote, link.sids.slots[i])
            subscription_free(link.sids.slots[i])
    sid_free(&link.sids)
    router_free(&link.remote)
    buf_free(&link.pending)
    free(link.pings)
    free(link)


cdef inline bint nats_space(char c) noexcept nogil:
    return c == b' ' or c == b'\t'


cdef int nats_split(const char *p, size_t length, const char **args, size_t *lens,
                    int max_args) noexcept nogil:
    """Split p on spaces and tabs: the number of arguments, -1 past max_args."""
    cdef size_t i = 0, start
    cdef int n = 0
    while True:
        while i < length and nats_space(p[i]):
            i += 1
        if i == length:
            return n
        if n == max_args:
            return -1
        start = i
        while i < length and not nats_space(p[i]):
            i += 1
        args[n] = p + start
        lens[n] = i - start
        n += 1


cdef bint nats_size(const char *p, size_t length, size_t *out) noexcept nogil:
    """A decimal size of at most 10 digits."""
    cdef size_t i, value = 0
    if length == 0 or length > 10:
        return False
    for i in range(length):
        if not c'0' <= p[i] <= c'9':
            return False
        value = value * 10 + <size_t>(p[i] - c'0')
    out[0] = value
    return True


cdef bint nats_parse_msg(const char *args_p, size_t length, bint with_headers,
                         NatsMsg *m) noexcept nogil:
    """The arguments of an LMSG (or HMSG) line, after its operation name:
    `subj [reply | + reply q.. | | q..] [hdr_len] total_len`. False when
    malformed."""
    cdef const char *args[NATS_MAX_ARGS]
    cdef size_t lens[NATS_MAX_ARGS]
    cdef int n = nats_split(args_p, length, args, lens, NATS_MAX_ARGS)
    cdef int sizes = 2 if with_headers else 1
    cdef int middle, first_queue, k
    if n < 1 + sizes:
        return False
    m.subject = args[0]
    m.subject_len = lens[0]
    m.reply = NULL
    m.reply_len = 0
    m.nqueues = 0
    m.hdr_len = 0
    if not nats_size(args[n - 1], lens[n - 1], &m.total_len):
        return False
    if with_headers and (not nats_size(args[n - 2], lens[n - 2], &m.hdr_len)
                         or m.hdr_len > m.total_len):
        return False
    middle = n - 1 - sizes          # arguments between the subject and the sizes
    if middle == 0:
        return True
    first_queue = 0
    if lens[1] == 1 and args[1][0] == b'+':
        if middle < 3:
            return False
        m.reply = args[2]
        m.reply_len = lens[2]
        first_queue = 3
    elif lens[1] == 1 and args[1][0] == b'|':
        if middle < 2:
            return False
        first_queue = 2
    elif middle == 1:
        m.reply = args[1]
        m.reply_len = lens[1]
        return True
    else:
        return False
    for k in range(first_queue, 1 + middle):
        m.queues[m.nqueues] = args[k]
        m.queue_lens[m.nqueues] = lens[k]
        m.nqueues += 1
    return True


cdef const char *nats_header(const char *hdr, size_t hdr_len, const char *name,
                             size_t *value_len) noexcept nogil:
    """The value of header `name` (with its colon) in a NATS/1.0 block, or
    NULL. Names compare exactly: only busx writes these."""
    cdef size_t name_len = strlen(name)
    cdef const char *end = hdr + hdr_len
    cdef const char *line = hdr
    cdef const char *eol
    cdef const char *value
    while line < end:
        eol = <const char *>memchr(line, b'\n', end - line)
        if eol == NULL:
            return NULL
        if <size_t>(eol - line) > name_len and memcmp(line, name, name_len) == 0:
            value = line + name_len
            while value < eol and nats_space(value[0]):
                value += 1
            value_len[0] = eol - value
            if value_len[0] and value[value_len[0] - 1] == b'\r':
                value_len[0] -= 1
            return value
        line = eol + 1
    return NULL


cdef inline int hex_value(char c) noexcept nogil:
    if c'0' <= c <= c'9':
        return c - c'0'
    if c'a' <= c <= c'f':
        return c - c'a' + 10
    return -1


cdef bint stamp_is_valid(const uint8_t *p, size_t n) noexcept nogil:
    """Whether p is a broker's stamp: a msgpack array of exactly [pid, uid,
    gid, identity, host, port], each nil, an integer or (identity, host) a
    string, and nothing after it."""
    cdef size_t i = 1
    cdef int k
    cdef uint8_t b
    if n == 0 or p[0] != STAMP_ARRAY6:
        return False
    for k in range(6):
        if i >= n:
            return False
        b = p[i]
        if b == 0xc0:                               # nil
            i += 1
        elif k == 3 or k == 4:                      # identity, host: str
            if 0xa0 <= b <= 0xbf:
                i += 1 + (b & 31)
            elif b == 0xd9 and i + 1 < n:
                i += 2 + p[i + 1]
            else:
                return False
        elif b <= 0x7f or b >= 0xe0:                # fixint
            i += 1
        elif b == 0xcc or b == 0xd0:
            i += 2
        elif b == 0xcd or b == 0xd1:
            i += 3
        elif b == 0xce or b == 0xd2:
            i += 5
        elif b == 0xcf or b == 0xd3:
            i += 9
        else:
            return False
    return i == n


cdef inline bint printable(const char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if not 0x21 <= <uint8_t>p[i] <= 0x7e:
            return False
    return True


cdef size_t native_stamp(NatsLink *link) noexcept nogil:
    memcpy(link.remote_stamp, NATIVE_STAMP, NATIVE_STAMP_LEN)
    return NATIVE_STAMP_LEN


cdef size_t nats_sender_stamp(NatsLink *link, const char *hdr, size_t hdr_len,
                              uint8_t *fds_lost) noexcept nogil:
    """The stamp of a message from NATS, written into link.remote_stamp: its
    broker's stamp with that broker's origin appended; or [None x 6,
    "nats"] for a native client, for headers that do not parse, and for
    headers naming this very broker (a leaf's own messages never come back:
    a client that copied them, as nats-py's respond() copies a request's,
    is no broker). Also the fds its publisher lost on the way."""
    cdef size_t stamp_hex_len = 0, origin_len = 0, lost_len = 0, broker_len = 0, i, n
    cdef const char *stamp_hex = NULL
    cdef const char *origin = NULL
    cdef const char *broker = NULL
    cdef const char *lost
    cdef size_t lost_value
    cdef int hi, lo
    fds_lost[0] = 0
    if hdr_len == 0:
        return native_stamp(link)
    lost = nats_header(hdr, hdr_len, HEADER_FDS_LOST, &lost_len)
    if lost != NULL and nats_size(lost, lost_len, &lost_value):
        fds_lost[0] = <uint8_t>min(lost_value, <size_t>255)
    stamp_hex = nats_header(hdr, hdr_len, HEADER_STAMP, &stamp_hex_len)
    origin = nats_header(hdr, hdr_len, HEADER_ORIGIN, &origin_len)
    broker = nats_header(hdr, hdr_len, HEADER_BROKER, &broker_len)
    n = stamp_hex_len // 2
    if (stamp_hex == NULL or origin == NULL or stamp_hex_len % 2 or n < 2
            or origin_len == 0 or origin_len > NATS_MAX_ORIGIN or n + 2 + origin_len > MAX_NAME
            or not printable(origin, origin_len)
            or (broker != NULL and broker_len == NATS_INSTANCE_LEN
                and memcmp(broker, link.instance, NATS_INSTANCE_LEN) == 0)):
        return native_stamp(link)
    for i in range(n):
        hi = hex_value(stamp_hex[2 * i])
        lo = hex_value(stamp_hex[2 * i + 1])
        if hi < 0 or lo < 0:
            return native_stamp(link)
        link.remote_stamp[i] = <char>(hi * 16 + lo)
    if not stamp_is_valid(<const uint8_t *>link.remote_stamp, n):
        return native_stamp(link)
    link.remote_stamp[0] = <char>STAMP_ARRAY7
    link.remote_stamp[n] = <char>0xd9         # str 8: the origin
    link.remote_stamp[n + 1] = <char>origin_len
    memcpy(link.remote_stamp + n + 2, origin, origin_len)
    return n + 2 + origin_len


cdef size_t nats_header_size(NatsLink *link, size_t stamp_len, int fds_lost) noexcept nogil:
    # NATS/1.0\r\n  Busx-Origin: o\r\n  Busx-Broker: id\r\n  Busx-Stamp: hex\r\n
    # [Busx-Fds-Lost: n\r\n]  \r\n
    cdef size_t size = (10 + 13 + link.origin_len + 2 + 13 + NATS_INSTANCE_LEN + 2
                        + 12 + 2 * stamp_len + 2 + 2)
    if fds_lost:
        size += 15 + 3 + 2
    return size


cdef int nats_write_msg(NatsLink *link, Buffer *out, const char *topic, size_t topic_len,
                        const char *reply, size_t reply_len,
                        Subscription **queues, int nqueues,
                        const char *stamp, size_t stamp_len, int fds_lost,
                        const char *payload, size_t payload_len) noexcept nogil:
    """Append one HMSG for the backbone: the message, its sender stamp and
    origin in headers, and the queue groups it is for. -1 when memory runs
    out."""
    cdef size_t hdr_len = nats_header_size(link, stamp_len, fds_lost)
    cdef size_t line_max = 5 + topic_len + 3 + reply_len + 24 + 24
    cdef size_t i
    cdef int k, n
    cdef char *p
    for k in range(nqueues):
        line_max += 1 + queues[k].queue_len
    if buf_reserve(out, line_max + hdr_len + payload_len + 2) < 0:
        return -1
    p = out.data + out.end
    memcpy(p, b"HMSG ", 5)
    p += 5
    memcpy(p, topic, topic_len)
    p += topic_len
    if nqueues:
        if reply_len:
            memcpy(p, b" + ", 3)
            p += 3
            memcpy(p, reply, reply_len)
            p += reply_len
        else:
            memcpy(p, b" |", 2)
            p += 2
        for k in range(nqueues):
            p[0] = b' '
            memcpy(p + 1, queues[k].queue_name, queues[k].queue_len)
            p += 1 + queues[k].queue_len
    elif reply_len:
        p[0] = b' '
        memcpy(p + 1, reply, reply_len)
        p += 1 + reply_len
    n = snprintf(p, 48, b" %zu %zu\r\n", hdr_len, hdr_len + payload_len)
    p += n
    memcpy(p, b"NATS/1.0\r\nBusx-Origin: ", 23)
    p += 23
    memcpy(p, link.origin, link.origin_len)
    p += link.origin_len
    memcpy(p, b"\r\nBusx-Broker: ", 15)
    p += 15
    memcpy(p, link.instance, NATS_INSTANCE_LEN)
    p += NATS_INSTANCE_LEN
    memcpy(p, b"\r\nBusx-Stamp: ", 14)
    p += 14
    for i in range(stamp_len):
        p[0] = HEX_DIGITS[(<uint8_t>stamp[i]) >> 4]
        p[1] = HEX_DIGITS[(<uint8_t>stamp[i]) & 15]
        p += 2
    memcpy(p, b"\r\n", 2)
    p += 2
    if fds_lost:
        p += snprintf(p, 24, b"Busx-Fds-Lost: %3d\r\n", <int>min(fds_lost, 255))
    memcpy(p, b"\r\n", 2)
    p += 2
    memcpy(p, payload, payload_len)
    p += payload_len
    memcpy(p, b"\r\n", 2)
    p += 2
    out.end = p - out.data
    return 0


cdef inline bint nats_op(const char *line, size_t length, const char *name,
                         size_t name_len) noexcept nogil:
    """line starts with operation `name` (upper case), in any case, then a
    separator or its end."""
    cdef size_t i
    if length < name_len or (length > name_len and not nats_space(line[name_len])):
        return False
    for i in range(name_len):
        if (line[i] & ~0x20) != name[i] and line[i] != name[i]:
            return False
    return True
