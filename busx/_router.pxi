# Topic routing in C: a trie of tokens ("*" and ">" are ordinary children
# matched specially), fronted by a cache from topic to matching subscriptions
# so a steady stream on one topic costs one hash lookup per message.


cdef struct Subscription:
    void *conn            # the owning Conn (opaque to the router)
    uint32_t sid          # the client's subscription id
    uint64_t queue        # hash of the queue group's name, 0 for none
    char *queue_name      # the group's name (owned), NULL for none
    uint8_t queue_len
    void *node            # TrieNode holding it
    unsigned long long dropped_unreported   # slow-consumer drops not yet told to the client
    unsigned long long dropped


cdef struct TrieNode:
    TrieNode *parent
    TrieNode *children
    TrieNode *sibling
    char *token
    size_t token_len
    Subscription **subs
    size_t nsubs
    size_t subs_cap


cdef struct RouteSlot:
    char *topic           # NULL: empty slot
    size_t topic_len
    uint64_t hash
    Subscription **subs   # queue members grouped together (see route_collect)
    size_t nsubs


cdef struct Router:
    TrieNode root
    RouteSlot *cache
    size_t cached
    unsigned long long generation   # bumped whenever cached slots are freed
    size_t subscriptions
    Subscription **scratch   # match results under construction
    size_t scratch_len
    size_t scratch_cap


cdef int router_init(Router *r) noexcept nogil:
    memset(r, 0, sizeof(Router))
    r.cache = <RouteSlot *>calloc(ROUTE_CACHE_SLOTS, sizeof(RouteSlot))
    return 0 if r.cache != NULL else -1


cdef void cache_clear(Router *r) noexcept nogil:
    cdef size_t i
    r.generation += 1
    if not r.cached:
        return
    for i in range(<size_t>ROUTE_CACHE_SLOTS):
        if r.cache[i].topic != NULL:
            free(r.cache[i].topic)
            free(r.cache[i].subs)
            r.cache[i].topic = NULL
    r.cached = 0


cdef void node_free(TrieNode *n) noexcept nogil:
    cdef TrieNode *child = n.children
    cdef TrieNode *next_child
    while child != NULL:
        next_child = child.sibling
        node_free(child)
        free(child)
        child = next_child
    free(n.token)
    free(n.subs)


cdef void router_free(Router *r) noexcept nogil:
    cache_clear(r)
    free(r.cache)
    r.cache = NULL
    node_free(&r.root)
    free(r.scratch)
    r.scratch = NULL


cdef TrieNode *child_for(TrieNode *n, const char *token, size_t token_len,
                         bint create) noexcept nogil:
    cdef TrieNode *child = n.children
    while child != NULL:
        if child.token_len == token_len and memcmp(child.token, token, token_len) == 0:
            return child
        child = child.sibling
    if not create:
        return NULL
    child = <TrieNode *>calloc(1, sizeof(TrieNode))
    if child == NULL:
        return NULL
    child.token = <char *>malloc(token_len)
    if child.token == NULL:
        free(child)
        return NULL
    memcpy(child.token, token, token_len)
    child.token_len = token_len
    child.parent = n
    child.sibling = n.children
    n.children = child
    return child


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
        node = child_for(node, pattern + start, end - start, True)
        if node == NULL:
            return -1
        start = end + 1
    if node.nsubs == node.subs_cap:
        grown = <Subscription **>realloc(node.subs, (node.subs_cap * 2 + 4) * sizeof(void *))
        if grown == NULL:
            return -1
        node.subs = grown
        node.subs_cap = node.subs_cap * 2 + 4
    node.subs[node.nsubs] = s
    node.nsubs += 1
    s.node = node
    r.subscriptions += 1
    cache_clear(r)
    return 0


cdef void router_remove(Router *r, Subscription *s) noexcept nogil:
    """Take s out of the trie and prune the branch it leaves empty."""
    cdef TrieNode *node = <TrieNode *>s.node
    cdef TrieNode *parent
    cdef TrieNode **link
    cdef size_t i
    if node == NULL:
        return
    for i in range(node.nsubs):
        if node.subs[i] == s:
            node.nsubs -= 1
            node.subs[i] = node.subs[node.nsubs]
            break
    s.node = NULL
    r.subscriptions -= 1
    cache_clear(r)
    while node.parent != NULL and node.nsubs == 0 and node.children == NULL:
        parent = node.parent
        link = &parent.children
        while link[0] != node:
            link = &link[0].sibling
        link[0] = node.sibling
        free(node.token)
        free(node.subs)
        free(node)
        node = parent


cdef int scratch_add(Router *r, Subscription **subs, size_t n) noexcept nogil:
    cdef Subscription **grown
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
    cdef TrieNode *child = node.children
    cdef bint wild_ok = not (first and reserved)
    while end < length and topic[end] != b'.':
        end += 1
    while child != NULL:
        if child.token_len == 1 and child.token[0] == b'>':
            if wild_ok and scratch_add(r, child.subs, child.nsubs) < 0:
                return -1
        elif (child.token_len == 1 and child.token[0] == b'*' and wild_ok) or (
                child.token_len == end - start
                and memcmp(child.token, topic + start, end - start) == 0):
            if end == length:
                if scratch_add(r, child.subs, child.nsubs) < 0:
                    return -1
            elif match_tokens(r, child, topic, length, end + 1, False, reserved) < 0:
                return -1
        child = child.sibling
    return 0


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


cdef void group_queues(Subscription **subs, size_t n) noexcept nogil:
    """Stable insertion sort by queue group so each group's members are adjacent."""
    cdef size_t i, j
    cdef Subscription *s
    for i in range(1, n):
        s = subs[i]
        j = i
        while j > 0 and queue_order(subs[j - 1], s) > 0:
            subs[j] = subs[j - 1]
            j -= 1
        subs[j] = s


cdef void subscription_free(Subscription *s) noexcept nogil:
    free(s.queue_name)
    free(s)


cdef RouteSlot *router_lookup(Router *r, const char *topic, size_t length) noexcept nogil:
    """The subscriptions matching topic, from the cache or freshly matched.
    NULL when memory runs out. Valid until the next add/remove."""
    cdef uint64_t h = busx_hash(topic, length)
    cdef size_t i = h & (ROUTE_CACHE_SLOTS - 1)
    cdef RouteSlot *slot
    while r.cache[i].topic != NULL:
        slot = &r.cache[i]
        if slot.hash == h and slot.topic_len == length and memcmp(slot.topic, topic, length) == 0:
            return slot
        i = (i + 1) & (ROUTE_CACHE_SLOTS - 1)
    if r.cached >= <size_t>ROUTE_CACHE_SLOTS // 2:
        cache_clear(r)
        return router_lookup(r, topic, length)
    r.scratch_len = 0
    if match_tokens(r, &r.root, topic, length, 0, True, topic[0] == b'_') < 0:
        return NULL
    group_queues(r.scratch, r.scratch_len)
    slot = &r.cache[i]
    slot.topic = <char *>malloc(length)
    slot.subs = <Subscription **>malloc(r.scratch_len * sizeof(void *) + 1)
    if slot.topic == NULL or slot.subs == NULL:
        free(slot.topic)
        free(slot.subs)
        slot.topic = NULL
        return NULL
    memcpy(slot.topic, topic, length)
    memcpy(slot.subs, r.scratch, r.scratch_len * sizeof(void *))
    slot.topic_len = length
    slot.hash = h
    slot.nsubs = r.scratch_len
    r.cached += 1
    return slot
