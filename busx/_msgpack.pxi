# Decoding msg.data: a C fast path for the msgpack types services publish
# (nil, bool, int, float, str, bin, array, map), reading the payload in
# place. Anything else - ext types, malformed or truncated input, trailing
# bytes, unhashable keys, deep nesting - goes to msgpack.unpackb, so results
# and errors are exactly msgpack's (tests/test_decode.py holds them equal).

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8

from cpython.ref cimport PyObject, Py_XDECREF

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void *PyUnicode_DATA(object)
    # Sized for n items up front: a dict grown one insert at a time resizes
    # at its sixth key, and a message map has that many keys often.
    dict _PyDict_NewPresized(Py_ssize_t n)


# Decoded short map keys by their UTF-8 bytes: the same few keys arrive in
# every message, and a cached str spares a decode and an allocation. Only
# touched with the GIL held.
cdef PyObject *key_cache[KEY_CACHE_SLOTS]
cdef char key_cache_bytes[KEY_CACHE_SLOTS][KEY_CACHE_MAX]
cdef uint8_t key_cache_len[KEY_CACHE_SLOTS]


class _SlowPath(Exception):
    """Internal: this payload needs msgpack.unpackb."""


cdef inline const unsigned char *take(Reader *r, size_t n) except NULL:
    cdef const unsigned char *at = r.p
    if <size_t>(r.end - r.p) < n:
        raise _SlowPath()
    r.p += n
    return at


cdef inline uint64_t be(Reader *r, int width) except? 0:
    cdef const unsigned char *at = take(r, width)
    cdef uint64_t v = 0
    cdef int i
    for i in range(width):
        v = (v << 8) | at[i]
    return v


cdef object decode_value(Reader *r, int depth):
    cdef unsigned char tag = take(r, 1)[0]
    cdef uint64_t n
    cdef double d
    cdef float f
    cdef uint32_t f_bits
    cdef uint64_t d_bits
    if tag <= 0x7f:
        return PyLong_FromLongLong(tag)
    if tag >= 0xe0:
        return PyLong_FromLongLong(<signed char>tag)
    if 0xa0 <= tag <= 0xbf:
        return decode_str(r, tag & 0x1f)
    if 0x80 <= tag <= 0x8f:
        return decode_map(r, tag & 0x0f, depth)
    if 0x90 <= tag <= 0x9f:
        return decode_array(r, tag & 0x0f, depth)
    if tag == 0xc0:
        return None
    if tag == 0xc2:
        return False
    if tag == 0xc3:
        return True
    if tag == 0xcc or tag == 0xcd or tag == 0xce or tag == 0xcf:
        return PyLong_FromUnsignedLongLong(be(r, 1 << (tag - 0xcc)))
    if tag == 0xd0:
        return PyLong_FromLongLong(<signed char>be(r, 1))
    if tag == 0xd1:
        return PyLong_FromLongLong(<short>be(r, 2))
    if tag == 0xd2:
        return PyLong_FromLongLong(<int>be(r, 4))
    if tag == 0xd3:
        return PyLong_FromLongLong(<long long>be(r, 8))
    if tag == 0xca:
        f_bits = <uint32_t>be(r, 4)
        memcpy(&f, &f_bits, 4)
        return <double>f
    if tag == 0xcb:
        d_bits = be(r, 8)
        memcpy(&d, &d_bits, 8)
        return d
    if tag == 0xd9 or tag == 0xda or tag == 0xdb:
        return decode_str(r, be(r, 1 << (tag - 0xd9)))
    if tag == 0xc4 or tag == 0xc5 or tag == 0xc6:
        n = be(r, 1 << (tag - 0xc4))
        return PyBytes_FromStringAndSize(<const char *>take(r, n), n)
    if tag == 0xdc or tag == 0xdd:
        return decode_array(r, be(r, 2 if tag == 0xdc else 4), depth)
    if tag == 0xde or tag == 0xdf:
        return decode_map(r, be(r, 2 if tag == 0xde else 4), depth)
    raise _SlowPath()           # ext types, 0xc1


cdef inline object decode_str(Reader *r, uint64_t n):
    cdef const char *text = <const char *>take(r, n)
    cdef object s
    if n <= SHORT_ASCII and is_ascii(text, n):
        # Most strings in messages are short ASCII: copy them straight into
        # a new str, skipping the UTF-8 decoder's general machinery.
        s = PyUnicode_New(n, 127)
        memcpy(PyUnicode_DATA(s), text, n)
        return s
    return PyUnicode_DecodeUTF8(text, n, NULL)


cdef inline bint is_ascii(const char *text, size_t n) noexcept:
    """No byte has its top bit set; eight bytes at a time."""
    cdef uint64_t word, seen = 0
    cdef size_t i = 0
    while i + 8 <= n:
        memcpy(&word, text + i, 8)
        seen |= word
        i += 8
    while i < n:
        seen |= <unsigned char>text[i]
        i += 1
    return (seen & 0x8080808080808080ULL) == 0


cdef object decode_array(Reader *r, uint64_t n, int depth):
    cdef list items
    cdef object item
    cdef Py_ssize_t i
    if depth >= FAST_DECODE_DEPTH or n > <uint64_t>(r.end - r.p):
        raise _SlowPath()       # each element takes at least one byte
    items = PyList_New(n)
    for i in range(<Py_ssize_t>n):
        item = decode_value(r, depth + 1)
        Py_INCREF(item)
        PyList_SET_ITEM(items, i, item)
    return items


cdef object decode_map(Reader *r, uint64_t n, int depth):
    cdef dict result
    cdef object key
    cdef uint64_t i
    if depth >= FAST_DECODE_DEPTH or n > <uint64_t>(r.end - r.p):
        raise _SlowPath()
    result = _PyDict_NewPresized(n)
    for i in range(n):
        key = decode_key(r, depth)
        if type(key) is list or type(key) is dict:
            raise _SlowPath()   # msgpack has its own rules for these keys
        PyDict_SetItem(result, key, decode_value(r, depth + 1))
    return result


cdef object decode_key(Reader *r, int depth):
    """A map key: short str keys come from key_cache."""
    cdef unsigned char tag = r.p[0] if r.p < r.end else 0
    cdef size_t n
    cdef const char *text
    cdef size_t slot
    cdef object key
    if not (0xa0 <= tag <= 0xbf) or (tag & 0x1f) > KEY_CACHE_MAX:
        return decode_value(r, depth + 1)
    n = tag & 0x1f
    take(r, 1)
    text = <const char *>take(r, n)
    slot = busx_hash(text, n) & (KEY_CACHE_SLOTS - 1)
    if (key_cache[slot] != NULL and key_cache_len[slot] == n
            and memcmp(key_cache_bytes[slot], text, n) == 0):
        return <object>key_cache[slot]
    key = PyUnicode_DecodeUTF8(text, n, NULL)
    Py_XDECREF(key_cache[slot])
    Py_INCREF(key)
    key_cache[slot] = <PyObject *>key
    memcpy(key_cache_bytes[slot], text, n)
    key_cache_len[slot] = n
    return key


cdef object decode_payload(const char *payload, size_t size, bytes raw):
    """msgpack.unpackb(payload[:size], strict_map_key=False), faster for
    common data; raw: those bytes as an object, if there is one already."""
    cdef Reader r
    cdef object value
    r.p = <const unsigned char *>payload
    r.end = r.p + size
    try:
        value = decode_value(&r, 0)
        if r.p == r.end:
            return value
    except (_SlowPath, UnicodeDecodeError, TypeError):
        pass
    if raw is None:
        raw = PyBytes_FromStringAndSize(payload, size)
    return PyObject_Call(_unpackb, (raw,), _UNPACK_OPTIONS)


def decode(bytes raw):
    """What msg.data returns for a payload: msgpack.unpackb(raw,
    strict_map_key=False), with a C fast path."""
    return decode_payload(raw, len(raw), raw)
