# Encoding payloads for Bus.publish: a C packer for the types services
# publish (exactly dict, list, tuple, str, bytes, bytearray, int, float, bool
# and None) writing straight into a buffer, with no Python call per value.
# Anything else - subclasses, ext types, ints beyond 64 bits, deep nesting,
# strings that are not UTF-8 - goes to msgpack.packb, so the bytes and the
# errors are exactly msgpack's (tests/test_pack.py holds them equal).

from cpython.dict cimport PyDict_Next
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef extern from "Python.h":
    double PyFloat_AS_DOUBLE(object)
    char *PyByteArray_AS_STRING(object)
    Py_ssize_t PyByteArray_GET_SIZE(object)


cdef object _packb = msgpack.packb


cdef inline char *pack_room(Buffer *b, size_t n) except NULL:
    if buf_reserve(b, n) < 0:
        raise MemoryError()
    return b.data + b.end


cdef int pack_head(Buffer *b, uint8_t tag, uint64_t value, int width) except -1:
    """A tag byte, then value as a big-endian number of `width` bytes."""
    cdef char *p = pack_room(b, 1 + width)
    p[0] = <char>tag
    busx_store_be(p + 1, value, width)
    b.end += 1 + width
    return 0


cdef int pack_len(Buffer *b, uint64_t n, uint8_t fix, uint64_t fix_limit, uint8_t tag8,
                  uint8_t tag16) except -1:
    """A length header in the smallest form msgpack uses: `fix | n` below
    fix_limit, else tag8 (if the type has one), tag16, tag16 + 1."""
    if n < fix_limit:
        return pack_head(b, fix | n, 0, 0)
    if tag8 and n < 0x100:
        return pack_head(b, tag8, n, 1)
    if n < 0x10000:
        return pack_head(b, tag16, n, 2)
    if n <= 0xffffffff:
        return pack_head(b, tag16 + 1, n, 4)
    raise _SlowPath()


cdef inline int pack_str_head(Buffer *b, size_t n) noexcept nogil:
    """The header of an n-byte str; also used by the broker for its ERROR
    payloads, which is why it cannot fail (those strings are short)."""
    cdef char head[3]
    if n < 32:
        head[0] = <char>(0xa0 | n)
        return buf_append(b, head, 1)
    if n < 0x100:
        head[0] = <char>0xd9
        busx_store_be(head + 1, n, 1)
        return buf_append(b, head, 2)
    head[0] = <char>0xda
    busx_store_be(head + 1, n, 2)
    return buf_append(b, head, 3)


cdef int pack_bytes(Buffer *b, const char *p, size_t n, bint is_str) except -1:
    if is_str:
        pack_len(b, n, 0xa0, 32, 0xd9, 0xda)
    else:
        pack_len(b, n, 0, 0, 0xc4, 0xc5)
    memcpy(pack_room(b, n), p, n)
    b.end += n
    return 0


cdef int pack_int(Buffer *b, object value) except -1:
    cdef int overflow
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return pack_head(b, 0xcf, PyLong_AsUnsignedLongLong(value), 8)
    if overflow < 0:
        raise _SlowPath()
    if v >= 0:
        if v < 0x80:
            return pack_head(b, <uint8_t>v, 0, 0)
        if v < 0x100:
            return pack_head(b, 0xcc, v, 1)
        if v < 0x10000:
            return pack_head(b, 0xcd, v, 2)
        if v < 0x100000000:
            return pack_head(b, 0xce, v, 4)
        return pack_head(b, 0xcf, v, 8)
    if v >= -32:
        return pack_head(b, <uint8_t>v, 0, 0)
    if v >= -0x80:
        return pack_head(b, 0xd0, <uint64_t>v, 1)
    if v >= -0x8000:
        return pack_head(b, 0xd1, <uint64_t>v, 2)
    if v >= -0x80000000:
        return pack_head(b, 0xd2, <uint64_t>v, 4)
    return pack_head(b, 0xd3, <uint64_t>v, 8)


cdef int pack_value(Buffer *b, object value, int depth) except -1:
    cdef type t = type(value)
    cdef const char *text
    cdef Py_ssize_t n
    cdef double d
    cdef uint64_t bits
    if t is str:
        text = PyUnicode_AsUTF8AndSize(value, &n)
        return pack_bytes(b, text, n, True)
    if t is int:
        return pack_int(b, value)
    if t is dict:
        return pack_map(b, <dict>value, depth)
    if t is float:
        d = PyFloat_AS_DOUBLE(value)
        memcpy(&bits, &d, 8)
        return pack_head(b, 0xcb, bits, 8)
    if value is None:
        return pack_head(b, 0xc0, 0, 0)
    if t is bool:
        return pack_head(b, 0xc3 if value is True else 0xc2, 0, 0)
    if t is bytes:
        return pack_bytes(b, value, len(<bytes>value), False)
    if t is bytearray:
        return pack_bytes(b, PyByteArray_AS_STRING(value), PyByteArray_GET_SIZE(value),
                          False)
    if t is list or t is tuple:
        return pack_array(b, value, depth)
    raise _SlowPath()


cdef int pack_map(Buffer *b, dict value, int depth) except -1:
    cdef Py_ssize_t pos = 0
    cdef PyObject *key
    cdef PyObject *item
    if depth >= FAST_PACK_DEPTH:
        raise _SlowPath()
    pack_len(b, len(value), 0x80, 16, 0, 0xde)
    # Nothing here runs Python code, so the dict cannot change underneath.
    while PyDict_Next(value, &pos, &key, &item):
        pack_value(b, <object>key, depth + 1)
        pack_value(b, <object>item, depth + 1)
    return 0


cdef int pack_array(Buffer *b, object value, int depth) except -1:
    if depth >= FAST_PACK_DEPTH:
        raise _SlowPath()
    pack_len(b, len(value), 0x90, 16, 0, 0xdc)
    if type(value) is list:
        for item in <list>value:
            pack_value(b, item, depth + 1)
    else:
        for item in <tuple>value:
            pack_value(b, item, depth + 1)
    return 0


cdef bytes pack_payload(Buffer *b, object value):
    """Pack value into the empty buffer b, byte for byte as msgpack.packb(value).
    Returns None when it did; for what the fast path leaves to msgpack,
    returns msgpack.packb's bytes (or raises its error) with b empty."""
    b.start = 0
    b.end = 0
    try:
        pack_value(b, value, 0)
        return None
    except Exception:
        b.end = 0
    return _packb(value)


def encode(value):
    """msgpack.packb(value), with the C fast path Bus.publish uses."""
    cdef Buffer b
    cdef bytes packed
    memset(&b, 0, sizeof(Buffer))
    try:
        packed = pack_payload(&b, value)
        if packed is None:
            packed = PyBytes_FromStringAndSize(b.data, b.end)
        return packed
    finally:
        buf_free(&b)
