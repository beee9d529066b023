/* ping_pong: the round trip of a UNIX stream socket between two processes
 * when the program costs nothing: what this machine's wake-ups allow, the
 * floor under every round-trip row (benchmarks/compare.py builds and runs it).
 *
 *   ping_pong COUNT PAYLOAD_BYTES RELAYS
 *
 * The parent writes a frame (u32 little-endian length + payload) and blocks
 * until a forked echo process has read it whole and written it back; one
 * frame in flight. With RELAYS = 1 a third process sits in between and
 * passes the frame on both ways, as a broker does: four wake-ups per round
 * trip instead of two. After COUNT / 10 warm-up round trips, COUNT are timed
 * one by one.
 * Prints one JSON line: {"p50_us": ..., "p99_us": ...}.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

/* Returns 0 on EOF before the first byte, 1 once n bytes are read. */
static int read_all(int fd, char *p, size_t n) {
    size_t have = 0;
    while (have < n) {
        ssize_t got = read(fd, p + have, n - have);
        if (got == 0 && have == 0)
            return 0;
        if (got <= 0) {
            perror("read");
            exit(1);
        }
        have += (size_t)got;
    }
    return 1;
}

static void echo(int fd, char *frame, size_t size) {
    while (read_all(fd, frame, size))
        write_all(fd, frame, size);
}

/* Passes each frame from `near` to `far` and the answer back. */
static void relay(int near, int far, char *frame, size_t size) {
    while (read_all(near, frame, size)) {
        write_all(far, frame, size);
        read_all(far, frame, size);
        write_all(near, frame, size);
    }
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Starts the echo process (behind a relay if asked); returns the parent's end. */
static int start_peers(int relays, char *frame, size_t size) {
    int near[2], far[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, near) < 0)
        die("socketpair");
    if (!relays) {
        if (fork() == 0) {
            close(near[0]);
            echo(near[1], frame, size);
            _exit(0);
        }
        close(near[1]);
        return near[0];
    }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, far) < 0)
        die("socketpair");
    if (fork() == 0) {
        close(near[0]);
        close(near[1]);
        close(far[0]);
        echo(far[1], frame, size);
        _exit(0);
    }
    if (fork() == 0) {
        close(near[0]);
        close(far[1]);
        relay(near[1], far[0], frame, size);
        _exit(0);
    }
    close(near[1]);
    close(far[0]);
    close(far[1]);
    return near[0];
}

int main(int argc, char **argv) {
    long count = argc == 4 ? atol(argv[1]) : 0;
    if (count <= 0) {
        fprintf(stderr, "usage: %s COUNT(>0) PAYLOAD_BYTES RELAYS(0|1)\n", argv[0]);
        return 2;
    }
    uint32_t payload = (uint32_t)atol(argv[2]);
    int relays = atoi(argv[3]) != 0;
    size_t size = 4 + payload;
    char *frame = calloc(1, size);
    double *samples = malloc(sizeof(double) * (size_t)(count > 0 ? count : 1));
    if (!frame || !samples)
        die("malloc");
    memcpy(frame, &payload, 4);            /* x86 and ARM Linux are little-endian */
    int fd = start_peers(relays, frame, size);
    for (long i = -(count / 10); i < count; i++) {
        double began = now();
        write_all(fd, frame, size);
        read_all(fd, frame, size);
        if (i >= 0)
            samples[i] = now() - began;
    }
    close(fd);                             /* EOF ends the relay, then the echo */
    while (wait(NULL) > 0)
        ;
    qsort(samples, (size_t)count, sizeof(double), by_value);
    printf("{\"p50_us\": %.2f, \"p99_us\": %.2f}\n",
           samples[count / 2] * 1e6, samples[(long)(0.99 * count)] * 1e6);
    return 0;
}
