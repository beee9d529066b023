# Frame layout (docs/protocol.md), all integers little-endian:
#   0 u32 size       bytes after this field: 12 + sections
#   4 u8  kind       5 u8 flags
#   6 u8  topic_len  7 u8 reply_len   8 u8 stamp_len
#   9 u8  nfds      10 u8 fds_lost   11 u8 reserved (0)
#  12 u32 id         subscription id, sequence number or 0
#  16 topic, reply, stamp, payload

cpdef enum FrameKind:      # busx.protocol names the same (tests/test_frames.py)
    K_HELLO = 1      # broker -> client, first frame: msgpack map of broker facts
    K_CONNECT = 2    # client -> broker: msgpack map (name, token proof)
    K_READY = 3      # broker -> client: handshake accepted
    K_PUB = 4        # client -> broker: topic, reply, payload, fds
    K_MSG = 5        # broker -> client: id = subscription, stamp = sender
    K_SUB = 6        # client -> broker: id = subscription, topic = pattern, reply = queue
    K_UNSUB = 7      # client -> broker: id = subscription
    K_PING = 8       # client -> broker: id = sequence; answered after all before it
    K_PONG = 9       # broker -> client
    K_OK = 10        # broker -> client: SUB/UNSUB id accepted
    K_ERROR = 11     # broker -> client: msgpack {code, message, ...}; id = refers to
    K_DROPPED = 12   # broker -> client: id = subscription, payload msgpack count
    K_STATS = 13     # client -> broker request (id = seq) / broker -> client reply
    K_RECEIVED = 14  # either way: payload u64, bytes of payload memfds received
    KIND_LIMIT = 15

cpdef enum FrameFlag:
    F_FATAL = 1      # on ERROR: the broker closes the connection after it
    # On PUB and MSG: the payload is in a sealed memfd, the frame's last fd;
    # the inline payload is its size, u64 (docs/protocol.md, large payloads).
    F_PAYLOAD_FD = 2


cdef int parse_frame(const char *p, size_t avail, size_t max_frame,
                     FrameView *f) noexcept nogil:
    """Read the frame at p. An absurd length is refused as soon as its four
    bytes arrive, before any body is buffered."""
    cdef size_t size, sections
    if avail < 4:
        return PARSE_NEED_MORE
    size = <size_t>busx_load_u32(p) + 4
    if size > max_frame:
        return PARSE_TOO_LARGE
    if size < HEADER_SIZE:
        return PARSE_MALFORMED
    if avail < HEADER_SIZE:
        return PARSE_NEED_MORE
    f.kind = <uint8_t>p[4]
    f.flags = <uint8_t>p[5]
    f.topic_len = <uint8_t>p[6]
    f.reply_len = <uint8_t>p[7]
    f.stamp_len = <uint8_t>p[8]
    f.nfds = <uint8_t>p[9]
    f.fds_lost = <uint8_t>p[10]
    sections = <size_t>f.topic_len + f.reply_len + f.stamp_len
    if (p[11] != 0 or f.kind == 0 or f.kind >= KIND_LIMIT
            or HEADER_SIZE + sections > size or f.nfds > MAX_FDS_ON_WIRE):
        return PARSE_MALFORMED
    if avail < size:
        return PARSE_NEED_MORE
    f.size = size
    f.id = busx_load_u32(p + 12)
    f.topic = p + HEADER_SIZE
    f.reply = f.topic + f.topic_len
    f.stamp = f.reply + f.reply_len
    f.payload = f.stamp + f.stamp_len
    f.payload_len = size - HEADER_SIZE - sections
    return PARSE_OK


cdef int write_frame(Buffer *b, uint8_t kind, uint8_t flags, uint32_t id,
                     const char *topic, size_t topic_len,
                     const char *reply, size_t reply_len,
                     const char *stamp, size_t stamp_len,
                     const char *payload, size_t payload_len,
                     uint8_t nfds, uint8_t fds_lost) noexcept nogil:
    """Append one frame. The caller has checked the name lengths (<= 255)
    and the total against max_frame."""
    cdef size_t size = HEADER_SIZE + topic_len + reply_len + stamp_len + payload_len
    cdef char *p
    if buf_reserve(b, size) < 0:
        return -1
    p = b.data + b.end
    busx_store_u32(p, <uint32_t>(size - 4))
    p[4] = <char>kind
    p[5] = <char>flags
    p[6] = <char>topic_len
    p[7] = <char>reply_len
    p[8] = <char>stamp_len
    p[9] = <char>nfds
    p[10] = <char>fds_lost
    p[11] = 0
    busx_store_u32(p + 12, id)
    p += HEADER_SIZE
    if topic_len:
        memcpy(p, topic, topic_len)
        p += topic_len
    if reply_len:
        memcpy(p, reply, reply_len)
        p += reply_len
    if stamp_len:
        memcpy(p, stamp, stamp_len)
        p += stamp_len
    if payload_len:
        memcpy(p, payload, payload_len)
    b.end += size
    return 0


cdef inline size_t frame_size(size_t topic_len, size_t reply_len, size_t stamp_len,
                              size_t payload_len) noexcept nogil:
    return HEADER_SIZE + topic_len + reply_len + stamp_len + payload_len


# ---- Python face of the codec: the fuzz tests hold it against busx.protocol ----

def encode_frame(int kind, bytes topic=b"", bytes payload=b"", *, unsigned int id=0,
                 int flags=0, bytes reply=b"", bytes stamp=b"", int nfds=0,
                 int fds_lost=0):
    """Encode one frame to bytes (the same API as busx.protocol.encode_frame)."""
    cdef Buffer b
    if len(topic) > MAX_NAME or len(reply) > MAX_NAME or len(stamp) > MAX_NAME:
        raise ValueError("topic, reply and stamp are at most 255 bytes each")
    if not (0 < kind < 256 and 0 <= flags < 256 and 0 <= nfds <= MAX_FDS_ON_WIRE
            and 0 <= fds_lost < 256):
        raise ValueError("kind, flags, nfds or fds_lost out of range")
    if frame_size(len(topic), len(reply), len(stamp), len(payload)) > 0xFFFFFFFF:
        raise ValueError("frame larger than 4 GiB")
    b.data = NULL
    b.start = b.end = b.cap = 0
    try:
        if write_frame(&b, kind, flags, id, topic, len(topic), reply, len(reply),
                       stamp, len(stamp), payload, len(payload), nfds, fds_lost):
            raise MemoryError()
        return b.data[b.start:b.end]
    finally:
        buf_free(&b)


cdef object view_to_frame(FrameView *f):
    return Frame(f.kind, f.flags, f.id, f.topic[:f.topic_len], f.reply[:f.reply_len],
                 f.stamp[:f.stamp_len], f.payload[:f.payload_len], f.nfds, f.fds_lost)


cdef class FrameDecoder:
    """Incremental frame decoder: feed() it chunks split anywhere, it returns
    the whole frames they complete. Raises ProtocolError on a malformed or
    oversize frame, after which the decoder is unusable (as the connection
    would be)."""

    def __cinit__(self, size_t max_frame=64 << 20):
        self.max_frame = max_frame

    def __dealloc__(self):
        buf_free(&self.buf)

    @property
    def buffered(self):
        """Bytes held that do not yet make a whole frame."""
        return buf_len(&self.buf)

    def feed(self, data):
        cdef const unsigned char[:] view = data
        cdef FrameView f
        cdef int status
        cdef list frames = []
        if self.failed:
            raise ProtocolError("decoder already failed")
        if view.shape[0]:
            if buf_append(&self.buf, <const char *>&view[0], view.shape[0]):
                raise MemoryError()
        while True:
            status = parse_frame(self.buf.data + self.buf.start, buf_len(&self.buf),
                                 self.max_frame, &f)
            if status == PARSE_OK:
                frames.append(view_to_frame(&f))
                buf_consume(&self.buf, f.size)
            elif status == PARSE_NEED_MORE:
                return frames
            else:
                self.failed = True
                raise ProtocolError(describe_parse_error(status, self.buf.data + self.buf.start,
                                                         self.max_frame))


cdef str describe_parse_error(int status, const char *p, size_t max_frame):
    if status == PARSE_TOO_LARGE:
        return (f"frame of {busx_load_u32(p) + 4} bytes exceeds the limit of "
                f"{max_frame} bytes (max_frame)")
    return "malformed frame header"
