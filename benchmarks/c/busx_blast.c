/* A busx peer in C that speaks the wire protocol directly (docs/protocol.md),
 * to measure what the broker itself can route, with no Python on either side.
 *
 *   busx_blast pub SOCKET COUNT SIZE   publish COUNT frames (topic "bench",
 *                                      SIZE-byte payload) in 64 KiB writes
 *   busx_blast sub SOCKET COUNT        subscribe to "bench", print "ready",
 *                                      then count COUNT messages (received or
 *                                      reported dropped by the broker) and
 *                                      print "<msgs/s> <seconds> <dropped>"
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

enum { HEADER = 16, CONNECT = 2, READY = 3, PUB = 4, MSG = 5, SUB = 6, PING = 8, PONG = 9, OK = 10,
       DROPPED = 12 };
static const char PREAMBLE[8] = {'B', 'U', 'S', 'X', 1, 0, 0, 0};

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}

static uint32_t get_u32(const unsigned char *p) {
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}

/* A msgpack unsigned integer (a DROPPED frame's count). */
static uint64_t get_msgpack_uint(const unsigned char *p) {
    uint64_t v = 0;
    int bytes = p[0] == 0xcc ? 1 : p[0] == 0xcd ? 2 : p[0] == 0xce ? 4 : p[0] == 0xcf ? 8 : 0;
    if (!bytes) return p[0];        /* positive fixint */
    for (int i = 1; i <= bytes; i++) v = v << 8 | p[i];
    return v;
}

/* Encode one frame into out; returns its size. */
static size_t frame(unsigned char *out, int kind, uint32_t id, const char *topic,
                    const unsigned char *payload, size_t payload_len) {
    size_t topic_len = topic ? strlen(topic) : 0;
    size_t size = HEADER + topic_len + payload_len;
    memset(out, 0, HEADER);
    put_u32(out, size - 4);
    out[4] = kind;
    out[6] = topic_len;
    put_u32(out + 12, id);
    memcpy(out + HEADER, topic, topic_len);
    memcpy(out + HEADER + topic_len, payload, payload_len);
    return size;
}

static void read_exact(int fd, unsigned char *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r <= 0) die("read");
        p += r;
        n -= r;
    }
}

/* Read one frame (handshake and replies only); returns its kind. */
static int read_frame(int fd) {
    unsigned char head[HEADER];
    static unsigned char body[1 << 16];
    read_exact(fd, head, 4);
    uint32_t rest = get_u32(head);
    if (rest > sizeof(body)) { fprintf(stderr, "frame too large\n"); exit(1); }
    read_exact(fd, body, rest);
    return body[0];
}

static int connect_bus(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    unsigned char buf[64], preamble[8];
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) die("connect");
    read_exact(fd, preamble, 8);                       /* broker speaks first */
    read_frame(fd);                                    /* HELLO */
    memcpy(buf, PREAMBLE, 8);
    size_t n = 8 + frame(buf + 8, CONNECT, 0, NULL, (const unsigned char *)"\x80", 1);
    write_all(fd, buf, n);                             /* CONNECT {} */
    if (read_frame(fd) != READY) { fprintf(stderr, "handshake refused\n"); exit(1); }
    return fd;
}

static int publish(int fd, long count, size_t size) {
    enum { BATCH = 64 * 1024 };
    unsigned char *payload = calloc(1, size + 5), *batch = malloc(BATCH + size + 64);
    unsigned char ping[HEADER];
    size_t used = 0, payload_len;
    /* The payload is msgpack bin of size bytes, as busx would publish bytes. */
    payload[0] = 0xc6;
    put_u32(payload + 1, __builtin_bswap32(size));
    payload_len = size + 5;
    for (long i = 0; i < count; i++) {
        used += frame(batch + used, PUB, 0, "bench", payload, payload_len);
        if (used >= BATCH) { write_all(fd, batch, used); used = 0; }
    }
    write_all(fd, batch, used);
    write_all(fd, ping, frame(ping, PING, 1, NULL, NULL, 0));
    while (read_frame(fd) != PONG) {}
    return 0;
}

static int subscribe(int fd, long count) {
    enum { CHUNK = 16 << 20 };     /* room for the largest frame the broker allows */
    unsigned char sub[64], *buf = malloc(CHUNK);
    size_t have = 0;
    long seen = 0, dropped = 0;
    double start = 0;
    write_all(fd, sub, frame(sub, SUB, 1, "bench", NULL, 0));
    if (read_frame(fd) != OK) { fprintf(stderr, "subscribe refused\n"); return 1; }
    printf("ready\n");
    fflush(stdout);
    while (seen < count) {
        ssize_t r = read(fd, buf + have, CHUNK - have);
        if (r <= 0) die("read");
        if (!start) start = now();
        have += r;
        size_t at = 0;
        while (have - at >= 4) {
            size_t size = get_u32(buf + at) + 4;
            if (size > CHUNK) { fprintf(stderr, "frame too large\n"); return 1; }
            if (have - at < size) break;
            if (buf[at + 4] == MSG) seen++;
            if (buf[at + 4] == DROPPED) {   /* slow consumer: they never come */
                uint64_t n = get_msgpack_uint(buf + at + HEADER);
                seen += n;
                dropped += n;
            }
            at += size;
        }
        memmove(buf, buf + at, have - at);
        have -= at;
    }
    double elapsed = now() - start;
    printf("%.0f %.6f %ld\n", (count - dropped) / elapsed, elapsed, dropped);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && !strcmp(argv[1], "pub"))
        return publish(connect_bus(argv[2]), atol(argv[3]), atol(argv[4]));
    if (argc >= 4 && !strcmp(argv[1], "sub"))
        return subscribe(connect_bus(argv[2]), atol(argv[3]));
    fprintf(stderr, "usage: busx_blast pub SOCKET COUNT SIZE | sub SOCKET COUNT\n");
    return 2;
}
