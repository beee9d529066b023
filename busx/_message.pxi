# Messages handed to subscribers, and the per-subscription queue they wait in.

cimport cython
import msgpack
from cpython.object cimport PyObject_Call

cdef object _UNDECODED = object()
cdef object _unpackb = msgpack.unpackb
# Built once: passing keywords the usual way builds this dict per message.
cdef dict _UNPACK_OPTIONS = {"strict_map_key": False}
cdef dict _senders = {}          # stamp bytes -> Credentials; stamps repeat


cdef object decode_stamp(bytes stamp):
    cdef object sender = _senders.get(stamp)
    if sender is None:
        if not stamp:
            return None
        # [pid, uid, gid, identity, host, port], and origin when it came
        # over the NATS backbone (_nats.pxi, nats_sender_stamp).
        fields = msgpack.unpackb(stamp)
        pid, uid, gid, identity, host, port = fields[:6]
        sender = Credentials(pid, uid, gid, identity,
                             (host, port) if host is not None else None,
                             fields[6] if len(fields) > 6 else None)
        if len(_senders) > 4096:
            _senders.clear()
        _senders[stamp] = sender
    return sender


# Not tracked by the cyclic GC: a Message refers to nothing that can refer
# back to it (the Bus only through a weak reference), and tracking a
# million short-lived objects cost a quarter of the receiving side's time.
@cython.no_gc
cdef class Message:
    """A received message. `data` is decoded from `raw` on first access;
    `sender` is stamped by the broker; `fds` are owned by the receiver. A
    payload that came in a memfd stays mapped until `raw` is asked for, so
    `data` decodes it in place."""

    def __cinit__(self):
        self._data = _UNDECODED
        self.fds = ()

    def __dealloc__(self):
        if self.mapped != NULL:
            munmap(<void *>self.mapped, self.size)
            busx_count(BUSX_MAPPINGS, -1)

    @property
    def raw(self):
        if self._raw is None:
            self._raw = PyBytes_FromStringAndSize(self.mapped, self.size)
        return self._raw

    @property
    def data(self):
        if self._data is _UNDECODED:
            try:
                if self._raw is None:
                    self._data = decode_payload(self.mapped, self.size, None)
                else:
                    self._data = decode_payload(self._raw, len(self._raw), self._raw)
            except (ValueError, msgpack.UnpackException) as exc:
                # Not msgpack: a native NATS client's bytes, say (docs/backbone.md).
                raise ValueError(
                    f"the payload of this {self.topic!r} message is not msgpack "
                    f"({type(exc).__name__}: {exc}); msg.raw has its {self.size} bytes "
                    f"as sent") from exc
        return self._data

    @property
    def sender(self):
        return decode_stamp(self.stamp)

    def respond(self, data):
        """Publish data to this request's reply_to inbox."""
        if self.reply_to is None:
            raise BusError("this message has no reply_to: it was not sent with request()")
        bus = self.bus_ref() if self.bus_ref is not None else None
        if bus is None:
            raise Closed("the bus this message arrived on is gone")
        return bus.publish(self.reply_to, data)

    def __repr__(self):
        return f"Message(topic={self.topic!r}, raw={self.raw[:40]!r}, sender={self.sender})"


cdef Message new_message(bytes raw, const char *mapped, size_t size):
    """A Message whose payload is raw, or else size bytes mapped at mapped,
    which it unmaps when it dies."""
    cdef Message msg = Message.__new__(Message)
    msg._raw = raw
    msg.mapped = mapped
    msg.size = size
    return msg


cdef class MessageQueue:
    """FIFO of Messages for one subscription. push and pop are C calls. Its
    bytes count against the owning connection's receive limit (max_buffer),
    except the reply inbox's, which is bounded on its own (`apart`): replies
    must never be dropped because another subscription is not read.
    Owned by whichever thread holds the Bus's pump lock (or the event loop)."""

    def __cinit__(self, ClientIO owner):
        self.items = []
        self.owner = owner

    cdef void push(self, Message msg) except *:
        self.items.append(msg)
        self.bytes += msg.size
        self.owner.inbox.held += msg.size
        self.owner.inbox.held_fds += len(msg.fds)

    def __len__(self):
        return len(self.items) - self.head

    cpdef object pop(self):
        """The oldest message, or None."""
        cdef object msg
        if self.head >= len(self.items):
            return None
        msg = self.items[self.head]
        self.items[self.head] = None
        self.head += 1
        self._release((<Message>msg).size, len((<Message>msg).fds))
        self._compact()
        return msg

    cpdef list pop_many(self, Py_ssize_t max_count):
        """Up to max_count oldest messages."""
        cdef Py_ssize_t end = min(len(self.items), self.head + max_count)
        cdef Py_ssize_t i
        cdef list batch
        cdef size_t size = 0, fds = 0
        if self.head == 0 and end == len(self.items):
            batch = self.items
            self.items = []
        else:
            batch = self.items[self.head:end]
            for i in range(self.head, end):
                self.items[i] = None
            self.head = end
            self._compact()
        for i in range(len(batch)):
            size += (<Message>batch[i]).size
            fds += len((<Message>batch[i]).fds)
        self.bytes -= size
        self.owner.inbox.held -= size
        self.owner.inbox.held_fds -= fds
        self.owner._resume_reading()
        return batch

    cdef inline void _compact(self) except *:
        """Drop the popped prefix: at once when nothing is left, else once it
        is most of the list, so each message is moved O(1) times."""
        if self.head == len(self.items):
            self.items = []
            self.head = 0
        elif self.head > 4096 and self.head * 2 > len(self.items):
            del self.items[:self.head]
            self.head = 0

    cdef inline void _release(self, size_t size, size_t fds) noexcept:
        self.bytes -= size
        self.owner.inbox.held -= size
        self.owner.inbox.held_fds -= fds
        if self.owner.inbox.reading_paused:
            self.owner._resume_reading()

    def discard(self):
        """Drop every queued message, closing the fds they carried; they are
        counted in the connection's `discarded`."""
        cdef Message msg
        for msg in self.items[self.head:]:
            close_fd_tuple(msg.fds)
            self.owner.inbox.held -= msg.size
            self.owner.inbox.held_fds -= len(msg.fds)
            self.owner.discarded += 1
        self.items = []
        self.head = 0
        self.bytes = 0
        self.owner._resume_reading()
