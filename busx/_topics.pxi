# The topic rules (SPEC.md, Topics) in C for ASCII topics, the common case:
# the broker checks every new PUB topic and reply field with it, the client
# every topic it has not published to before. Non-ASCII topics need
# Unicode categories: busx.topics decides those, in Python.


cdef inline bint is_inbox_topic(const char *topic, size_t length) noexcept nogil:
    return length > 7 and memcmp(topic, b"_INBOX.", 7) == 0


cdef int check_publish_topic(const char *topic, size_t length) noexcept nogil:
    """Whether topic may be published to: 1-255 bytes, tokens separated by
    single dots, no whitespace, control characters or wildcards, and no
    reserved first token but _INBOX."""
    cdef size_t i
    cdef unsigned char ch
    cdef bint ascii = True
    if length == 0 or length > MAX_NAME or topic[0] == b'.' or topic[length - 1] == b'.':
        return TOPIC_INVALID
    for i in range(length):
        ch = <unsigned char>topic[i]
        if ch >= 0x80:
            ascii = False
        elif ch <= 0x20 or ch == 0x7f or ch == b'*' or ch == b'>':
            return TOPIC_INVALID
        elif ch == b'.' and topic[i + 1] == b'.':
            return TOPIC_INVALID
    if topic[0] == b'_' and not is_inbox_topic(topic, length):
        return TOPIC_INVALID
    return TOPIC_VALID if ascii else TOPIC_ASK_PYTHON
