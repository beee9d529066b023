/* The round-trip tracer (benchmarks/trace_round_trip.py): while tracing is
 * on, each stage a message passes in this process is stamped with
 * CLOCK_MONOTONIC, which every process on the host shares, into a fixed
 * ring of the last BUSX_TRACE_CAPACITY stamps. Off (the default) a stage
 * costs one predictable branch. Stamps come from any thread, so the ring's
 * cursor is atomic; the events are read once the traced run is over. */
#ifndef BUSX_TRACE_H
#define BUSX_TRACE_H
#include <pthread.h>
#include <stdint.h>
#include <time.h>

enum busx_trace_stage {
    BUSX_TRACE_MARK,            /* a stamp of the caller's own (trace_mark) */
    BUSX_TRACE_PUBLISH,         /* a client queues a frame (publish, respond, request) */
    BUSX_TRACE_CLIENT_SEND,     /* a client's send() returned */
    BUSX_TRACE_BROKER_READ,     /* the broker's recv() returned bytes */
    BUSX_TRACE_BROKER_SEND,     /* the broker's send() to a connection returned */
    BUSX_TRACE_CLIENT_READ,     /* a client's recv() returned bytes */
    BUSX_TRACE_TAKEN,           /* a client's take() turned frames into Messages */
    BUSX_TRACE_STAGES
};

enum { BUSX_TRACE_CAPACITY = 1 << 16 };

typedef struct {
    uint64_t ns;
    uint64_t thread;
    uint32_t stage;
} busx_trace_event;

static int busx_tracing;
static busx_trace_event busx_trace_ring[BUSX_TRACE_CAPACITY];
static uint64_t busx_trace_cursor;

static inline void busx_trace(int stage) {
    if (__builtin_expect(busx_tracing, 0)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t i = __atomic_fetch_add(&busx_trace_cursor, 1, __ATOMIC_RELAXED);
        busx_trace_event *e = &busx_trace_ring[i % BUSX_TRACE_CAPACITY];
        e->ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        e->thread = (uint64_t)pthread_self();
        e->stage = (uint32_t)stage;
    }
}

#endif
