# Topic routing in C. Subscriptions live in a trie of tokens; each node finds
# a literal child by hashing the token (an open-addressing table), and keeps
# its "*" and ">" children apart, so matching a topic costs one probe per
# token and level, whatever the number of subscriptions. In front of the
# trie, a bounded 8-way set-associative cache maps a topic to its matching
# subscriptions: a steady stream on one topic costs one hash lookup per
# message. Each set's tags (topic hashes) share a cache line and an entry
# keeps a short topic and a lone match inside it, so a hit reads three lines
# (tags, entry, subscription), which the broker prefetches ahead (below).
# The cache grows with the subscriptions (cache_fit), so a fleet's hot
# topics fit in it. A subscription change invalidates only the cache entry
# of its own topic when its pattern is literal; a wildcard pattern may match
# any topic, so it makes every entry stale at once by bumping an epoch, and
# entries are recomputed as they are next used (nats-server's sublist does
# the same job with a generation counter).
#
# Owned by the broker's loop thread (under BrokerLoop.state_lock); nothing
# here takes a lock or the GIL.


cdef int router_init(Router *r) noexcept nogil:
    memset(r, 0, sizeof(Router))
    r.next_version = 1
    return cache_alloc(r, ROUTE_CACHE_SETS)


cdef int cache_alloc(Router *r, size_t sets) noexcept nogil:
    """An empty cache of sets sets, aligned so that a set's tags share one
    cache line. -1 (and the old cache kept) when memory runs out."""
    cdef size_t entries = sets * CACHE_WAYS
    cdef RouteSlot *cache = <RouteSlot *>aligned_alloc(64, entries * sizeof(RouteSlot))
    cdef uint64_t *tags = <uint64_t *>aligned_alloc(64, entries * sizeof(uint64_t))
    if cache == NULL or tags == NULL:
        free(cache)
        free(tags)
        return -1
    memset(cache, 0, entries * sizeof(RouteSlot))
    memset(tags, 0, entries * sizeof(uint64_t))
    r.cache = cache
    r.tags = tags
    r.cache_sets = sets
    return 0


cdef void cache_fit(Router *r) noexcept nogil:
    """Grow the cache fourfold while it has fewer than two entries a
    subscription (up to ROUTE_CACHE_MAX_SETS): a fleet's topics then stay
    cached. At one entry a subscription, a topic per subscription left a
    fifth of the sets with more hot topics than ways, and least recently
    used eviction misses every time in such a set. The entries are dropped,
    and refilled as their topics are next published."""
    cdef RouteSlot *old_cache = r.cache
    cdef uint64_t *old_tags = r.tags
    cdef size_t old_sets = r.cache_sets
    cdef size_t sets = old_sets
    while sets * CACHE_WAYS < 2 * r.subscriptions and sets < ROUTE_CACHE_MAX_SETS:
        sets *= 4
    if sets == old_sets:
        return
    cache_clear(r)
    if cache_alloc(r, min(sets, <size_t>ROUTE_CACHE_MAX_SETS)) < 0:
        return              # the old one serves on
    free(old_cache)
    free(old_tags)


cdef void slot_clear(Router *r, RouteSlot *slot) noexcept nogil:
    r.cached_refs -= slot.nsubs
    if slot.topic != &slot.inline_topic[0]:
        free(slot.topic)
    if slot.subs != &slot.one:
        free(slot.subs)
    slot.topic = NULL
    slot.subs = NULL
    slot.nsubs = 0
    slot.version = 0


cdef void cache_clear(Router *r) noexcept nogil:
    cdef size_t i
    for i in range(r.cache_sets * CACHE_WAYS):
        slot_clear(r, &r.cache[i])


cdef void node_free(TrieNode *n) noexcept nogil:
    """Free n's subtree and its own tables (not n itself)."""
    cdef size_t i
    for i in range(n.children_cap):
        if n.children[i] != NULL:
            node_free(n.children[i])
            free(n.children[i])
    if n.star != NULL:
        node_free(n.star)
        free(n.star)
    if n.rest != NULL:
        node_free(n.rest)
        free(n.rest)
    free(n.children)
    free(n.token)
    free(n.subs)


cdef void router_free(Router *r) noexcept nogil:
    cdef size_t i
    if r.cache != NULL:
        cache_clear(r)
        free(r.cache)
        free(r.tags)
        r.cache = NULL
        r.tags = NULL
    node_free(&r.root)
    memset(&r.root, 0, sizeof(TrieNode))
    free(r.scratch)
    r.scratch = NULL


# ---- a node's literal children: linear probing, backward-shift deletion ----

cdef inline bint is_wild(const char *token, size_t token_len) noexcept nogil:
    return token_len == 1 and (token[0] == b'*' or token[0] == b'>')


cdef TrieNode *child_lookup(TrieNode *n, const char *token, size_t token_len,
                            uint64_t h) noexcept nogil:
    cdef size_t mask, i
    cdef TrieNode *child
    if n.children == NULL:
        return NULL
    mask = n.children_cap - 1
    i = h & mask
    while True:
        child = n.children[i]
        if child == NULL:
            return NULL
        if (child.token_hash == h and child.token_len == token_len
                and busx_same_bytes(child.token, token, token_len)):
            return child
        i = (i + 1) & mask


cdef void child_place(TrieNode **table, size_t cap, TrieNode *child) noexcept nogil:
    cdef size_t i = child.token_hash & (cap - 1)
    while table[i] != NULL:
        i = (i + 1) & (cap - 1)
    table[i] = child


cdef int child_insert(TrieNode *n, TrieNode *child) noexcept nogil:
    """Add child to n's table, growing it to stay at most half full."""
    cdef size_t cap, i
    cdef TrieNode **grown
    if (n.nchildren + 1) * 2 > n.children_cap:
        cap = n.children_cap * 2 if n.children_cap else 4
        grown = <TrieNode **>calloc(cap, sizeof(TrieNode *))
        if grown == NULL:
            return -1
        for i in range(n.children_cap):
            if n.children[i] != NULL:
                child_place(grown, cap, n.children[i])
        free(n.children)
        n.children = grown
        n.children_cap = cap
    child_place(n.children, n.children_cap, child)
    n.nchildren += 1
    return 0


cdef void child_delete(TrieNode *n, TrieNode *child) noexcept nogil:
    """Take child out of n's table, shifting later entries of its probe run
    back so lookups never meet a hole before their entry."""
    cdef size_t mask = n.children_cap - 1
    cdef size_t i = child.token_hash & mask
    cdef size_t j, home
    while n.children[i] != child:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if n.children[j] == NULL:
            break
        home = n.children[j].token_hash & mask
        # Entry j may move to the hole at i unless its home lies in (i, j].
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            n.children[i] = n.children[j]
            i = j
    n.children[i] = NULL
    n.nchildren -= 1
    if n.nchildren == 0:
        free(n.children)
        n.children = NULL
        n.children_cap = 0


cdef TrieNode *child_for(Router *r, TrieNode *n, const char *token,
                         size_t token_len) noexcept nogil:
    """n's child for token, created if missing; NULL when memory runs out."""
    cdef uint64_t h = busx_hash(token, token_len)
    cdef TrieNode *child
    if is_wild(token, token_len):
        child = n.star if token[0] == b'*' else n.rest
    else:
        child = child_lookup(n, token, token_len, h)
    if child != NULL:
        return child
    child = <TrieNode *>calloc(1, sizeof(TrieNode))
    if child == NULL:
        return NULL
    child.token = <char *>malloc(token_len)
    if child.token == NULL:
        free(child)
        return NULL
    memcpy(child.token, token, token_len)
    child.token_len = token_len
    child.token_hash = h
    child.parent = n
    if is_wild(token, token_len):
        if token[0] == b'*':
            n.star = child
        else:
            n.rest = child
    elif child_insert(n, child) < 0:
        free(child.token)
        free(child)
        return NULL
    r.nodes += 1
    return child


cdef void prune(Router *r, TrieNode *node) noexcept nogil:
    """Free node and its ancestors while they hold nothing."""
    cdef TrieNode *parent
    while (node.parent != NULL and node.nsubs == 0 and node.nchildren == 0
           and node.star == NULL and node.rest == NULL):
        parent = node.parent
        if node == parent.star:
            parent.star = NULL
        elif node == parent.rest:
            parent.rest = NULL
        else:
            child_delete(parent, node)
        free(node.token)
        free(node.subs)
        free(node)
        r.nodes -= 1
        node = parent


# ---- subscriptions ----

cdef bint pattern_is_literal(const char *pattern, size_t length) noexcept nogil:
    cdef size_t i
    for i in range(length):
        if (pattern[i] == b'*' or pattern[i] == b'>') and (
                i == 0 or pattern[i - 1] == b'.') and (i + 1 == length or pattern[i + 1] == b'.'):
            return False
    return True


cdef void invalidate(Router *r, const char *pattern, size_t length) noexcept nogil:
    """Make the cache forget what a subscription change to pattern alters: the
    one entry of a literal pattern, or (lazily) every entry for a wildcard."""
    cdef RouteSlot *slot
    r.transient.version = 0
    if not pattern_is_literal(pattern, length):
        r.wild_epoch += 1
        return
    slot = cache_find(r, pattern, length, busx_hash(pattern, length))
    if slot != NULL:
        slot_clear(r, slot)


cdef int router_add(Router *r, Subscription *s, const char *pattern,
                    size_t length) noexcept nogil:
    """Insert s under pattern (already validated). -1 when memory runs out."""
    cdef TrieNode *node = &r.root
    cdef size_t start = 0, end
    cdef Subscription **grown
    while start <= length:
        end = start
        while end < length and pattern[end] != b'.':
            end += 1
        node = child_for(r, node, pattern + start, end - start)
        if node == NULL:
            return -1
        start = end + 1
    if node.nsubs == node.subs_cap:
        grown = <Subscription **>realloc(node.subs, (node.subs_cap * 2 + 4) * sizeof(void *))
        if grown == NULL:
            prune(r, node)
            return -1
        node.subs = grown
        node.subs_cap = node.subs_cap * 2 + 4
    s.node_index = node.nsubs
    node.subs[node.nsubs] = s
    node.nsubs += 1
    s.node = node
    r.subscriptions += 1
    invalidate(r, pattern, length)
    cache_fit(r)
    return 0


cdef size_t node_pattern(TrieNode *node, char *out) noexcept nogil:
    """Write the pattern node stands for into out (at least 255 bytes)."""
    cdef TrieNode *n = node
    cdef size_t length = 0, at
    while n.parent != NULL:
        length += n.token_len + (1 if n.parent.parent != NULL else 0)
        n = n.parent
    at = length
    n = node
    while n.parent != NULL:
        at -= n.token_len
        memcpy(out + at, n.token, n.token_len)
        if n.parent.parent != NULL:
            at -= 1
            out[at] = b'.'
        n = n.parent
    return length


cdef void router_remove(Router *r, Subscription *s) noexcept nogil:
    """Take s out of the trie (O(1)) and prune the branch it leaves empty."""
    cdef TrieNode *node = <TrieNode *>s.node
    cdef Subscription *moved
    cdef char pattern[MAX_NAME + 1]
    cdef size_t length
    if node == NULL:
        return
    pattern[0] = 0
    node.nsubs -= 1
    moved = node.subs[node.nsubs]
    node.subs[s.node_index] = moved
    moved.node_index = s.node_index
    s.node = NULL
    r.subscriptions -= 1
    length = node_pattern(node, pattern)
    invalidate(r, pattern, length)
    prune(r, node)


# ---- matching ----

cdef int scratch_add(Router *r, Subscription **subs, size_t n) noexcept nogil:
    cdef Subscription **grown
    if n == 0:
        return 0
    if r.scratch_len + n > r.scratch_cap:
        grown = <Subscription **>realloc(r.scratch, (r.scratch_len + n) * 2 * sizeof(void *))
        if grown == NULL:
            return -1
        r.scratch = grown
        r.scratch_cap = (r.scratch_len + n) * 2
    memcpy(r.scratch + r.scratch_len, subs, n * sizeof(void *))
    r.scratch_len += n
    return 0


cdef int match_tokens(Router *r, TrieNode *node, const char *topic, size_t length,
                      size_t start, bint first, bint reserved) noexcept nogil:
    """Collect the subscriptions under node matching topic[start:]. A wildcard
    in the first token never matches a reserved topic (SPEC.md, Topics)."""
    cdef size_t end = start
    cdef bint wild_ok = not (first and reserved)
    cdef TrieNode *child
    while end < length and topic[end] != b'.':
        end += 1
    if wild_ok and node.rest != NULL and scratch_add(r, node.rest.subs, node.rest.nsubs) < 0:
        return -1
    if wild_ok and node.star != NULL and match_next(r, node.star, topic, length, end,
                                                    reserved) < 0:
        return -1
    child = child_lookup(node, topic + start, end - start, busx_hash(topic + start, end - start))
    if child != NULL and match_next(r, child, topic, length, end, reserved) < 0:
        return -1
    return 0


cdef inline int match_next(Router *r, TrieNode *child, const char *topic, size_t length,
                           size_t end, bint reserved) noexcept nogil:
    """child matched the token ending at end: take its subscriptions if that
    was the last token, else match the rest below it."""
    if end == length:
        return scratch_add(r, child.subs, child.nsubs)
    return match_tokens(r, child, topic, length, end + 1, False, reserved)


cdef inline int queue_order(const Subscription *a, const Subscription *b) noexcept nogil:
    """Order by queue hash, then name: exact names, hash only for speed."""
    cdef int by_name
    if a.queue != b.queue:
        return -1 if a.queue < b.queue else 1
    if a.queue == 0:
        return 0
    by_name = memcmp(a.queue_name, b.queue_name, min(a.queue_len, b.queue_len))
    return by_name if by_name else <int>a.queue_len - <int>b.queue_len


cdef inline bint same_queue(const Subscription *a, const Subscription *b) noexcept nogil:
    return a.queue != 0 and queue_order(a, b) == 0


cdef int compare_queues(const void *a, const void *b) noexcept nogil:
    cdef const Subscription *x = (<const Subscription **>a)[0]
    cdef const Subscription *y = (<const Subscription **>b)[0]
    cdef int order = queue_order(x, y)
    if order:
        return order
    return (x > y) - (x < y)        # a total order: qsort is not stable


cdef void group_queues(Subscription **subs, size_t n) noexcept nogil:
    """Sort by queue group so each group's members are adjacent (members of
    no group, queue 0, first). Runs on a cache miss; O(n log n), so a client
    holding many groups on one topic cannot stall the loop. Skipped when no
    match belongs to a group, the common case."""
    cdef size_t i
    for i in range(n):
        if subs[i].queue != 0:
            qsort(subs, n, sizeof(void *), compare_queues)
            return


cdef void subscription_free(Subscription *s) noexcept nogil:
    busx_count(BUSX_SUBSCRIPTIONS, -1)
    free(s.queue_name)
    free(s)


cdef Subscription *new_subscription(void *conn, uint32_t sid, const char *queue,
                                    size_t queue_len) noexcept nogil:
    """A subscription of conn's, in the queue group named queue (none when
    queue_len is 0); NULL when memory runs out."""
    cdef Subscription *s = <Subscription *>calloc(1, sizeof(Subscription))
    if s == NULL:
        return NULL
    busx_count(BUSX_SUBSCRIPTIONS, 1)
    s.conn = conn
    s.sid = sid
    if queue_len:
        s.queue_name = <char *>malloc(queue_len)
        if s.queue_name == NULL:
            subscription_free(s)
            return NULL
        memcpy(s.queue_name, queue, queue_len)
        s.queue_len = queue_len
        s.queue = busx_hash(queue, queue_len) | 1     # never 0: 0 means none
    return s


cdef bint same_subscription(Subscription *s, const char *pattern, size_t length,
                            const char *queue, size_t queue_len) noexcept nogil:
    """Whether s is a subscription to pattern in the queue group named queue."""
    cdef char own[MAX_NAME + 1]
    if s.queue_len != queue_len or (queue_len and memcmp(s.queue_name, queue, queue_len) != 0):
        return False
    return (node_pattern(<TrieNode *>s.node, own) == length
            and memcmp(own, pattern, length) == 0)


# ---- the cache ----

cdef inline size_t cache_set(Router *r, uint64_t h) noexcept nogil:
    """The index of h's set's first way."""
    return (h & (r.cache_sets - 1)) * CACHE_WAYS


cdef RouteSlot *cache_find(Router *r, const char *topic, size_t length,
                           uint64_t h) noexcept nogil:
    cdef size_t first = cache_set(r, h)
    cdef RouteSlot *slot
    cdef int k
    for k in range(CACHE_WAYS):
        if r.tags[first + k] == h:
            slot = &r.cache[first + k]
            if (slot.topic != NULL and slot.topic_len == length
                    and busx_same_bytes(slot.topic, topic, length)):
                return slot
    return NULL


cdef inline bint slot_in_cache(Router *r, RouteSlot *slot) noexcept nogil:
    """Whether slot lies in the current cache: one remembered from before
    cache_fit grew it was freed with the old one."""
    cdef uintptr_t at = <uintptr_t>slot
    cdef uintptr_t start = <uintptr_t>r.cache
    return start <= at < start + r.cache_sets * CACHE_WAYS * sizeof(RouteSlot)


cdef inline bint slot_current(Router *r, RouteSlot *slot, unsigned long long version) noexcept nogil:
    """Whether a slot remembered with version still holds its topic's
    current matches. It is read only if it is still there to read."""
    if slot != &r.transient and not slot_in_cache(r, slot):
        return False
    return slot.version == version and slot.epoch == r.wild_epoch


cdef RouteSlot *router_lookup(Router *r, const char *topic, size_t length) noexcept nogil:
    """The subscriptions matching topic, from the cache or freshly matched
    into it. NULL when memory runs out. Valid until the next add/remove."""
    return router_lookup_hashed(r, topic, length, busx_hash(topic, length))


cdef RouteSlot *router_cached(Router *r, const char *topic, size_t length,
                              uint64_t h) noexcept nogil:
    """topic's current cache entry (h its busx_hash), or NULL. Every caller
    checks a topic against the PUB topic rules before router_lookup caches
    it, so a topic found here needs no check again."""
    cdef RouteSlot *slot = cache_find(r, topic, length, h)
    if slot == NULL or slot.epoch != r.wild_epoch:
        return NULL
    r.tick += 1
    slot.used = r.tick
    return slot


cdef RouteSlot *router_lookup_hashed(Router *r, const char *topic, size_t length,
                                     uint64_t h) noexcept nogil:
    """router_lookup, with the topic's busx_hash already computed."""
    cdef RouteSlot *slot = router_cached(r, topic, length, h)
    if slot != NULL:
        return slot
    r.transient.version = 0         # its subs (scratch) are about to change
    if is_inbox_topic(topic, length):
        return transient_lookup(r, topic, length)
    slot = cache_find(r, topic, length, h)      # NULL, or stale: refilled in place
    r.tick += 1
    if slot == NULL:
        slot = cache_victim(r, h)
    slot_clear(r, slot)
    r.scratch_len = 0
    if match_tokens(r, &r.root, topic, length, 0, True, topic[0] == b'_') < 0:
        return NULL
    group_queues(r.scratch, r.scratch_len)
    if r.cached_refs + r.scratch_len > CACHE_MAX_REFS:
        cache_clear(r)      # topics matching very many subscriptions: memory stays bounded
    if slot_fill(r, slot, topic, length, h) < 0:
        return NULL
    return slot


cdef RouteSlot *cache_victim(Router *r, uint64_t h) noexcept nogil:
    """The way of h's set to fill: an empty one, else the least recently used."""
    cdef size_t first = cache_set(r, h)
    cdef RouteSlot *slot = &r.cache[first]
    cdef int k
    for k in range(CACHE_WAYS):
        if r.cache[first + k].topic == NULL:
            return &r.cache[first + k]
        if r.cache[first + k].used < slot.used:
            slot = &r.cache[first + k]
    return slot


cdef int slot_fill(Router *r, RouteSlot *slot, const char *topic, size_t length,
                   uint64_t h) noexcept nogil:
    """Remember topic's matches (r.scratch) in an empty slot. A short topic
    and a lone match are kept inside it. -1 when memory runs out."""
    slot.topic = &slot.inline_topic[0] if length <= SLOT_TOPIC_INLINE else <char *>malloc(length)
    if r.scratch_len <= 1:
        slot.subs = &slot.one
        slot.one = r.scratch[0] if r.scratch_len else NULL
    else:
        slot.subs = <Subscription **>malloc(r.scratch_len * sizeof(void *))
    if slot.topic == NULL or slot.subs == NULL:
        slot_clear(r, slot)
        return -1
    memcpy(slot.topic, topic, length)
    if slot.subs != &slot.one:
        memcpy(slot.subs, r.scratch, r.scratch_len * sizeof(void *))
    slot.topic_len = length
    r.tags[slot - r.cache] = h
    slot.nsubs = r.scratch_len
    r.cached_refs += slot.nsubs
    slot.epoch = r.wild_epoch
    slot.version = r.next_version
    r.next_version += 1
    slot.used = r.tick
    return 0


# ---- prefetching: the broker fetches the next messages' entries early ----
#
# A stream over many hot topics finds each set's tags, entry and
# subscription far from the CPU: three dependent misses a message, one
# after another. The broker calls these a few frames ahead of routing
# (BrokerLoop._look_ahead), one stage each, so the misses of several
# messages overlap. Hints only: an entry that changes meanwhile is looked
# up as usual.

cdef inline void prefetch_tags(Router *r, uint64_t h) noexcept nogil:
    busx_prefetch(&r.tags[cache_set(r, h)])


cdef inline RouteSlot *prefetch_slot(Router *r, uint64_t h) noexcept nogil:
    """After prefetch_tags(h): start loading h's entry; NULL if it is not cached."""
    cdef size_t first = cache_set(r, h)
    cdef RouteSlot *slot
    cdef int k
    for k in range(CACHE_WAYS):
        if r.tags[first + k] == h:
            slot = &r.cache[first + k]
            busx_prefetch(slot)
            busx_prefetch(<char *>slot + 64)
            return slot
    return NULL


cdef inline void prefetch_subscription(RouteSlot *slot) noexcept nogil:
    """After prefetch_slot: start loading the entry's first subscription."""
    if slot.nsubs:
        busx_prefetch(slot.subs[0])


cdef RouteSlot *transient_lookup(Router *r, const char *topic, size_t length) noexcept nogil:
    """An _INBOX. topic's matches, in the transient slot (see Router)."""
    cdef RouteSlot *slot = &r.transient
    r.scratch_len = 0
    if match_tokens(r, &r.root, topic, length, 0, True, True) < 0:
        return NULL
    group_queues(r.scratch, r.scratch_len)
    slot.subs = r.scratch
    slot.nsubs = r.scratch_len
    slot.epoch = r.wild_epoch
    slot.version = r.next_version
    r.next_version += 1
    return slot


# ---- a connection's subscriptions by id: linear probing, backward-shift deletion ----


cdef inline size_t sid_home(uint32_t sid, size_t cap) noexcept nogil:
    return <size_t>((<uint64_t>sid * 0x9E3779B97F4A7C15ULL) >> 32) & (cap - 1)


cdef Subscription *sid_find(SidTable *t, uint32_t sid) noexcept nogil:
    cdef size_t i
    if t.cap == 0:
        return NULL
    i = sid_home(sid, t.cap)
    while t.slots[i] != NULL:
        if t.slots[i].sid == sid:
            return t.slots[i]
        i = (i + 1) & (t.cap - 1)
    return NULL


cdef void sid_place(Subscription **slots, size_t cap, Subscription *s) noexcept nogil:
    cdef size_t i = sid_home(s.sid, cap)
    while slots[i] != NULL:
        i = (i + 1) & (cap - 1)
    slots[i] = s


cdef int sid_insert(SidTable *t, Subscription *s) noexcept nogil:
    cdef size_t cap, i
    cdef Subscription **grown
    if (t.count + 1) * 2 > t.cap:
        cap = t.cap * 2 if t.cap else 8
        grown = <Subscription **>calloc(cap, sizeof(void *))
        if grown == NULL:
            return -1
        for i in range(t.cap):
            if t.slots[i] != NULL:
                sid_place(grown, cap, t.slots[i])
        free(t.slots)
        t.slots = grown
        t.cap = cap
    sid_place(t.slots, t.cap, s)
    t.count += 1
    return 0


cdef void sid_delete(SidTable *t, Subscription *s) noexcept nogil:
    cdef size_t mask = t.cap - 1
    cdef size_t i = sid_home(s.sid, t.cap)
    cdef size_t j, home
    while t.slots[i] != s:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if t.slots[j] == NULL:
            break
        home = sid_home(t.slots[j].sid, t.cap)
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            t.slots[i] = t.slots[j]
            i = j
    t.slots[i] = NULL
    t.count -= 1


cdef void sid_free(SidTable *t) noexcept nogil:
    free(t.slots)
    t.slots = NULL
    t.cap = 0
    t.count = 0
