/* What the benchmark's C programs share: a clock and a blocking write. */
#ifndef BUSX_BENCH_H
#define BUSX_BENCH_H
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        ssize_t sent = write(fd, p, n);
        if (sent < 0)
            die("write");
        p += sent;
        n -= (size_t)sent;
    }
}

#endif
