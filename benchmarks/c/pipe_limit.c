/* pipe_limit: how many length-prefixed frames per second one UNIX stream
 * socket carries between two processes when the program costs almost
 * nothing. The ceiling busx's throughput is compared against
 * (benchmarks/compare.py builds and runs it).
 *
 *   pipe_limit COUNT PAYLOAD_BYTES BATCH_BYTES
 *
 * A forked child writes COUNT frames (u32 little-endian length + payload),
 * gathering them into BATCH_BYTES writes (0: one write per frame); the
 * parent reads 256 KiB at a time and walks every frame's length, as a
 * receiver must. Prints one JSON line: {"msgs_per_s": ..., "mb_per_s": ...}.
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

#define READ_CHUNK (256 * 1024)

static void send_frames(int fd, long count, uint32_t payload, size_t batch) {
    size_t frame = 4 + payload;
    size_t capacity = batch > frame ? batch + frame : frame;
    char *out = calloc(1, capacity);
    size_t used = 0;
    for (long i = 0; i < count; i++) {
        memcpy(out + used, &payload, 4);   /* x86 and ARM Linux are little-endian */
        used += frame;                     /* payload bytes: whatever is there, as a memcpy'd body would be */
        if (used >= batch) {
            write_all(fd, out, used);
            used = 0;
        }
    }
    write_all(fd, out, used);
    free(out);
}

/* Returns the number of whole frames read before EOF. */
static long receive_frames(int fd, size_t frame) {
    char *buf = malloc(frame + READ_CHUNK);     /* a whole frame plus one read */
    size_t have = 0;
    long frames = 0;
    for (;;) {
        ssize_t got = read(fd, buf + have, READ_CHUNK);
        if (got <= 0)
            break;
        have += (size_t)got;
        size_t at = 0;
        while (have - at >= 4) {
            uint32_t size;
            memcpy(&size, buf + at, 4);
            if (have - at - 4 < size)
                break;
            at += 4 + size;
            frames++;
        }
        memmove(buf, buf + at, have - at);
        have -= at;
    }
    free(buf);
    return frames;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s COUNT PAYLOAD_BYTES BATCH_BYTES\n", argv[0]);
        return 2;
    }
    long count = atol(argv[1]);
    uint32_t payload = (uint32_t)atol(argv[2]);
    size_t batch = (size_t)atol(argv[3]);
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pair) < 0) {
        perror("socketpair");
        return 1;
    }
    double start = now();
    pid_t child = fork();
    if (child == 0) {
        close(pair[0]);
        send_frames(pair[1], count, payload, batch);
        _exit(0);
    }
    close(pair[1]);
    long frames = receive_frames(pair[0], 4 + (size_t)payload);
    double seconds = now() - start;
    waitpid(child, NULL, 0);
    if (frames != count) {
        fprintf(stderr, "received %ld frames of %ld\n", frames, count);
        return 1;
    }
    printf("{\"msgs_per_s\": %.0f, \"mb_per_s\": %.1f, \"seconds\": %.4f}\n",
           count / seconds, count * (4.0 + payload) / seconds / 1e6, seconds);
    return 0;
}
