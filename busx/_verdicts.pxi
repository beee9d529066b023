# The verdict room: per connection, the policy's answer for each topic it
# published to, so the policy (Python) is asked once per topic rather than
# per message. Only built when a policy is loaded.
#
# Threads: a connection's Verdicts belong to the broker's loop thread, like
# the rest of its Conn.


cdef Verdict *verdict_slot(Verdicts *vs, const char *topic, size_t length) noexcept nogil:
    """The slot holding topic's verdict, or the empty slot to fill with
    verdict_store (clearing the table when it is half full). NULL when memory
    runs out."""
    cdef uint64_t h = busx_hash(topic, length)
    cdef size_t i = h & (VERDICT_SLOTS - 1)
    cdef Verdict *v
    if vs.slots == NULL:
        vs.slots = <Verdict *>calloc(VERDICT_SLOTS, sizeof(Verdict))
        if vs.slots == NULL:
            return NULL
    while vs.slots[i].topic != NULL:
        v = &vs.slots[i]
        if v.hash == h and v.topic_len == length and memcmp(v.topic, topic, length) == 0:
            return v
        i = (i + 1) & (VERDICT_SLOTS - 1)
    if vs.count >= <size_t>VERDICT_SLOTS // 2:
        verdicts_clear(vs)
        i = h & (VERDICT_SLOTS - 1)
    return &vs.slots[i]


cdef void verdict_store(Verdicts *vs, Verdict *v, const char *topic, size_t length,
                        bint allowed) noexcept nogil:
    """Fill the empty slot v (from verdict_slot) with topic's verdict. Out of
    memory, it stays empty: the policy is asked again next time."""
    v.allowed = allowed
    v.reported = False
    v.topic = <char *>malloc(length)
    if v.topic == NULL:
        return
    memcpy(v.topic, topic, length)
    v.topic_len = length
    v.hash = busx_hash(topic, length)
    vs.count += 1


cdef void verdicts_clear(Verdicts *vs) noexcept nogil:
    cdef size_t i
    if vs.slots == NULL:
        return
    for i in range(<size_t>VERDICT_SLOTS):
        free(vs.slots[i].topic)
        vs.slots[i].topic = NULL
    vs.count = 0


cdef void verdicts_rearm(Verdicts *vs) noexcept nogil:
    """A PING: denials may be told again, once each, before the next one."""
    cdef size_t i
    if vs.slots == NULL:
        return
    for i in range(<size_t>VERDICT_SLOTS):
        vs.slots[i].reported = False


cdef void verdicts_free(Verdicts *vs) noexcept nogil:
    verdicts_clear(vs)
    free(vs.slots)
    vs.slots = NULL
