/* Byte order for the frame header (the wire is little-endian) and msgpack
 * (big-endian), and the topic hash: small inline helpers the Cython core uses. */
#ifndef BUSX_WIRE_H
#define BUSX_WIRE_H
#include <stdint.h>
#include <string.h>

static inline uint32_t busx_load_u32(const char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline void busx_store_u32(char *p, uint32_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    memcpy(p, &v, 4);
}

static inline uint64_t busx_load_u64(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void busx_store_u64(char *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

/* The low `width` bytes of v, most significant first: msgpack's byte order. */
static inline void busx_store_be(char *p, uint64_t v, int width) {
    for (int i = width - 1; i >= 0; i--) {
        p[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

/* The topic hash: eight bytes at a time, each word folded in by a multiply,
 * then mixed so that the low bits (a cache set's index) depend on every
 * byte. Byte-at-a-time FNV-1a took ~20 ns for a 14-byte topic, a fifth of
 * what the broker spends on a message (BENCHMARKS.md, Routing at scale).
 * Only this process's tables use it: the value never leaves the process. */
static inline uint64_t busx_hash_fold(uint64_t h, uint64_t word) {
    h = (h ^ word) * 0x9fb21c651e98df25ULL;
    return h ^ (h >> 32);
}

static inline uint64_t busx_hash(const char *p, size_t n) {
    uint64_t h = 0x243f6a8885a308d3ULL ^ n, word;
    uint32_t lo, hi;
    size_t at = 0;
    for (; at + 8 <= n; at += 8) {
        memcpy(&word, p + at, 8);
        h = busx_hash_fold(h, word);
    }
    if (at < n && n >= 8) {             /* the last 8 bytes, overlapping */
        memcpy(&word, p + n - 8, 8);
        h = busx_hash_fold(h, word);
    } else if (at < n && n >= 4) {      /* 4..7 bytes: two overlapping halves */
        memcpy(&lo, p, 4);
        memcpy(&hi, p + n - 4, 4);
        h = busx_hash_fold(h, ((uint64_t)hi << 32) | lo);
    } else if (at < n) {                /* 1..3 bytes: first, middle, last */
        h = busx_hash_fold(h, ((uint64_t)(unsigned char)p[0] << 16)
                              | ((uint64_t)(unsigned char)p[n >> 1] << 8)
                              | (unsigned char)p[n - 1]);
    }
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ULL;
    return h ^ (h >> 32);
}
/* Whether n bytes at a and b are equal: topics and tokens, compared eight
 * bytes at a time in line, where a call to memcmp cost more than the
 * comparing (BENCHMARKS.md, Routing at scale). */
static inline int busx_same_bytes(const char *a, const char *b, size_t n) {
    uint64_t x, y;
    uint32_t u, v;
    size_t at = 0;
    if (n >= 8) {
        for (; at + 8 <= n; at += 8) {
            memcpy(&x, a + at, 8);
            memcpy(&y, b + at, 8);
            if (x != y)
                return 0;
        }
        if (at == n)
            return 1;
        memcpy(&x, a + n - 8, 8);       /* the tail, overlapping */
        memcpy(&y, b + n - 8, 8);
        return x == y;
    }
    if (n >= 4) {
        memcpy(&u, a, 4);
        memcpy(&v, b, 4);
        if (u != v)
            return 0;
        memcpy(&u, a + n - 4, 4);
        memcpy(&v, b + n - 4, 4);
        return u == v;
    }
    for (; at < n; at++)
        if (a[at] != b[at])
            return 0;
    return 1;
}

#endif
