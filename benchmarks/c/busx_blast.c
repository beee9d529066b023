/* A busx peer in C that speaks the wire protocol directly (docs/protocol.md),
 * to measure what the broker itself can route, with no Python on either side.
 *
 *   busx_blast pub SOCKET COUNT SIZE   publish COUNT frames (topic "bench",
 *                                      SIZE-byte payload) in 64 KiB writes
 *   busx_blast sub SOCKET COUNT        subscribe to "bench", print "ready",
 *                                      then count COUNT messages (received or
 *                                      reported dropped by the broker) and
 *                                      print "<msgs/s> <seconds> <dropped>"
 *
 * The routing scale matrix (benchmarks/scale.py) adds:
 *
 *   busx_blast subs SOCKET COUNT NSUBS WILD
 *       subscribe to NSUBS patterns, "dev.<i>.temp" for i < NSUBS, WILD
 *       percent of them as wildcards ("*.<i>.temp" or "dev.<i>.>", which
 *       match the same topic), then count as `sub` does
 *   busx_blast topics SOCKET COUNT SIZE NTOPICS NSUBS
 *       publish COUNT frames cycling over NTOPICS topics "dev.<k>.temp",
 *       spread over k < NSUBS, so each matches exactly one of the
 *       subscriber's patterns; print "<msgs/s> <seconds>", timed from the
 *       first write to the PONG that follows the last frame (the broker has
 *       routed them all)
 *   busx_blast churn SOCKET RATE NSUBS
 *       until SIGTERM: each millisecond, RATE/1000 SUBs of "dev.<k>.temp"
 *       for random k < NSUBS, and the UNSUBs of the previous millisecond's;
 *       read and discard what arrives; print "<changes/s>" at the end
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

enum { HEADER = 16, CONNECT = 2, READY = 3, PUB = 4, MSG = 5, SUB = 6, UNSUB = 7, PING = 8,
       PONG = 9, OK = 10, DROPPED = 12 };
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

/* Count COUNT messages, received or reported dropped by the broker, and
 * print "<msgs/s> <seconds> <dropped>". */
static int count_messages(int fd, long count) {
    enum { CHUNK = 16 << 20 };     /* room for the largest frame the broker allows */
    unsigned char *buf = malloc(CHUNK);
    size_t have = 0;
    long seen = 0, dropped = 0;
    double start = 0;
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

static int subscribe(int fd, long count) {
    unsigned char sub[64];
    write_all(fd, sub, frame(sub, SUB, 1, "bench", NULL, 0));
    if (read_frame(fd) != OK) { fprintf(stderr, "subscribe refused\n"); return 1; }
    return count_messages(fd, count);
}

/* The pattern of scale subscription i: "dev.<i>.temp", or for WILD percent
 * of them a wildcard matching that same topic, alternately "*" high in the
 * tree (every lookup descends it) and ">" at the end. */
static void scale_pattern(char *out, size_t cap, long i, int wild) {
    if (i % 100 < wild)
        snprintf(out, cap, (i / 100) % 2 ? "dev.%ld.>" : "*.%ld.temp", i);
    else
        snprintf(out, cap, "dev.%ld.temp", i);
}

/* Send SUB (or UNSUB) frames for ids [first, first + n) with their patterns
 * in 64 KiB writes; the replies are read by the caller. */
static void send_subs(int fd, int kind, long first, long n, const long *keys, int wild) {
    enum { BATCH = 64 * 1024 };
    static unsigned char batch[BATCH + 256];
    char pattern[64];
    size_t used = 0;
    for (long i = first; i < first + n; i++) {
        scale_pattern(pattern, sizeof(pattern), keys ? keys[i - first] : i, wild);
        used += frame(batch + used, kind, (uint32_t)(i + 1), pattern, NULL, 0);
        if (used >= BATCH) { write_all(fd, batch, used); used = 0; }
    }
    write_all(fd, batch, used);
}

static int subscribe_many(int fd, long count, long nsubs, int wild) {
    enum { AT_ONCE = 10000 };      /* SUBs in flight: their OKs fit the socket buffers */
    for (long first = 0; first < nsubs; first += AT_ONCE) {
        long n = nsubs - first < AT_ONCE ? nsubs - first : AT_ONCE;
        send_subs(fd, SUB, first, n, NULL, wild);
        for (long i = 0; i < n; i++)
            if (read_frame(fd) != OK) { fprintf(stderr, "subscribe refused\n"); return 1; }
    }
    return count_messages(fd, count);
}

static int publish_topics(int fd, long count, size_t size, long ntopics, long nsubs) {
    enum { BATCH = 64 * 1024 };
    unsigned char *payload = calloc(1, size + 5), *batch = malloc(BATCH + size + 128);
    unsigned char ping[HEADER];
    char topic[64];
    size_t used = 0;
    payload[0] = 0xc6;
    put_u32(payload + 1, __builtin_bswap32(size));
    /* Every topic's frame encoded once, then copied into the batches. */
    size_t frame_cap = HEADER + sizeof(topic) + size + 5;
    unsigned char *frames = malloc(ntopics * frame_cap);
    size_t *sizes = malloc(ntopics * sizeof(size_t));
    for (long j = 0; j < ntopics; j++) {
        snprintf(topic, sizeof(topic), "dev.%ld.temp", (long)((double)j * nsubs / ntopics));
        sizes[j] = frame(frames + j * frame_cap, PUB, 0, topic, payload, size + 5);
    }
    double start = now();
    for (long i = 0; i < count; i++) {
        long j = i % ntopics;
        memcpy(batch + used, frames + j * frame_cap, sizes[j]);
        used += sizes[j];
        if (used >= BATCH) { write_all(fd, batch, used); used = 0; }
    }
    write_all(fd, batch, used);
    write_all(fd, ping, frame(ping, PING, 1, NULL, NULL, 0));
    while (read_frame(fd) != PONG) {}
    double elapsed = now() - start;
    printf("%.0f %.6f\n", count / elapsed, elapsed);
    return 0;
}

static volatile sig_atomic_t stopping;
static void on_term(int sig) { (void)sig; stopping = 1; }

/* Subscription churn: SUB then, a millisecond later, UNSUB, RATE of each a
 * second, on random hot topics, reading (and dropping) what arrives. */
static int churn(int fd, long rate, long nsubs) {
    long per_tick = rate / 1000 > 0 ? rate / 1000 : 1, changes = 0, next_sid = 0;
    long *keys = malloc(per_tick * sizeof(long));
    static unsigned char sink[1 << 16];
    long previous = -1;
    double start = now(), tick = start;
    signal(SIGTERM, on_term);
    srand(1);
    printf("ready\n");
    fflush(stdout);
    while (!stopping) {
        if (previous >= 0) {
            send_subs(fd, UNSUB, previous, per_tick, keys, 0);
            changes += per_tick;
        }
        for (long i = 0; i < per_tick; i++)
            keys[i] = rand() % nsubs;
        send_subs(fd, SUB, next_sid, per_tick, keys, 0);
        previous = next_sid;
        next_sid += per_tick;
        changes += per_tick;
        tick += 0.001;
        while (!stopping && now() < tick)
            if (recv(fd, sink, sizeof(sink), MSG_DONTWAIT) < 0 && errno != EAGAIN) die("read");
    }
    printf("%.0f\n", changes / (now() - start));
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 5 && !strcmp(argv[1], "pub"))
        return publish(connect_bus(argv[2]), atol(argv[3]), atol(argv[4]));
    if (argc >= 4 && !strcmp(argv[1], "sub"))
        return subscribe(connect_bus(argv[2]), atol(argv[3]));
    if (argc >= 6 && !strcmp(argv[1], "subs"))
        return subscribe_many(connect_bus(argv[2]), atol(argv[3]), atol(argv[4]), atoi(argv[5]));
    if (argc >= 7 && !strcmp(argv[1], "topics"))
        return publish_topics(connect_bus(argv[2]), atol(argv[3]), atol(argv[4]), atol(argv[5]),
                              atol(argv[6]));
    if (argc >= 5 && !strcmp(argv[1], "churn"))
        return churn(connect_bus(argv[2]), atol(argv[3]), atol(argv[4]));
    fprintf(stderr, "usage: busx_blast pub SOCKET COUNT SIZE | sub SOCKET COUNT | "
                    "subs SOCKET COUNT NSUBS WILD | topics SOCKET COUNT SIZE NTOPICS NSUBS | "
                    "churn SOCKET RATE NSUBS\n");
    return 2;
}
