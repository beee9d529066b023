/* Live counters of what the C level holds: buffer memory, queued fds,
 * payload mappings, broker connections and subscriptions. Only the debug
 * build (BUSX_DEBUG=1 defines BUSX_COUNTERS) keeps them; the test suite
 * asserts that each test gives back what it took. Updated from any thread,
 * so atomically; the release build compiles every update away. */
#ifndef BUSX_COUNTERS_H
#define BUSX_COUNTERS_H

enum busx_counter_kind {
    BUSX_BUFFER_BYTES,      /* bytes allocated by Buffers */
    BUSX_QUEUED_FDS,        /* fds held in FdQueues */
    BUSX_MAPPINGS,          /* memfd payloads mapped into Messages */
    BUSX_CONNS,             /* the broker's Conn structs */
    BUSX_SUBSCRIPTIONS,     /* the router's Subscription structs */
    BUSX_POLLERS,           /* open Pollers (an epoll fd and an eventfd each) */
    BUSX_COUNTER_COUNT
};

#ifdef BUSX_COUNTERS
#define BUSX_COUNTING 1
static long long busx_counters[BUSX_COUNTER_COUNT];
static inline void busx_count(int which, long long delta) {
    __atomic_add_fetch(&busx_counters[which], delta, __ATOMIC_RELAXED);
}
static inline long long busx_counter(int which) {
    return __atomic_load_n(&busx_counters[which], __ATOMIC_RELAXED);
}
#else
#define BUSX_COUNTING 0
static inline void busx_count(int which, long long delta) { (void)which; (void)delta; }
static inline long long busx_counter(int which) { (void)which; return 0; }
#endif

#endif
