"""Worker processes for the benchmarks, and the parent-side code that drives them.

Each benchmark runs its publisher, subscribers, echo server and broker as
separate processes, so a measurement includes everything a real deployment
pays: syscalls, context switches, and one GIL per process. A worker is this
file run as a script (`python peers.py ROLE ARGS...`) and speaks a tiny
line protocol with its parent:

    worker -> parent   one JSON line when set up ({"ready": true, ...}),
                       then one JSON line with its result
    parent -> worker   "go" (start sending), "stop" (stop repeating end markers)

Timing: a subscriber reports time.monotonic() at its last message. Linux's
CLOCK_MONOTONIC is system-wide, so the parent subtracts the instant it said
"go" and gets the end-to-end time without the workers' start-up or a quiet
timeout in it.

The workload (SPEC.md, Benchmarks): SMALL_DICT, a dict that msgpack packs to
exactly 100 bytes, published on TOPIC; every subscriber decodes every message.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata

import msgpack

TOPIC = "bench.data"
TLS_CA_VARIABLE = "BUSX_BENCH_TLS_CA"     # the CA a TLS broker's workers trust
SMALL_DICT = {"id": 123456, "kind": "order.created", "price": 19.99, "qty": 3,
              "sku": "AB-1234-XY", "note": "x" * 31}
assert len(msgpack.packb(SMALL_DICT)) == 100, len(msgpack.packb(SMALL_DICT))

FIRST_WAIT = 60.0      # seconds a subscriber waits for the first message (publisher start-up)
QUIET = 3.0            # seconds without a message after which a subscriber gives up
PUBLISHER_GRACE = 15.0  # seconds a publisher may take to report after its subscribers did
END = b"END"           # pyzmq end marker; never valid msgpack for the workload
LENGTH = struct.Struct("<I")     # the plain socket's framing: u32 length, then payload
RAW_BATCH = 64 << 10             # bytes per write for the batched plain socket
HERE = os.path.dirname(os.path.abspath(__file__))


def payload_for(size: int):
    """The object to publish: SMALL_DICT at 100 bytes, else bytes packing to `size`."""
    if size == 100:
        return SMALL_DICT
    header = 3 if size - 3 <= 0xFFFF else 5     # msgpack bin16 / bin32
    return b"\xab" * (size - header)


# ---------------------------------------------------------------- worker side

def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def wait_for_line(expected: str) -> None:
    line = sys.stdin.readline().strip()
    if line != expected:
        sys.exit(f"expected {expected!r} from the parent, got {line!r}")


def stop_requested(wait: float) -> bool:
    """Whether the parent wrote "stop" (or went away) within `wait` seconds."""
    readable, _, _ = select.select([sys.stdin], [], [], wait)
    return bool(readable)


def connect(url: str):
    """busx.connect, trusting the benchmark's own CA for tls:// URLs."""
    import busx
    return busx.connect(url, tls_ca=os.environ.get(TLS_CA_VARIABLE) if url.startswith("tls://")
                        else None)


def run_broker(args) -> None:
    import busx
    tls = {}
    if args.tls:
        import trustme
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            os.path.join(args.tls, "broker.pem"))
        ca.cert_pem.write_to_path(os.path.join(args.tls, "ca.pem"))
        tls = {"tls_cert": os.path.join(args.tls, "broker.pem"),
               "tls_key": os.path.join(args.tls, "broker.pem")}
    with busx.Broker(unix_path=args.path, tcp=("127.0.0.1", 0), **tls) as broker:
        host, port = broker.tcp_address
        say(ready=True, unix=broker.url, tcp=f"{'tls' if args.tls else 'tcp'}://{host}:{port}",
            pid=os.getpid(), ca=os.path.join(args.tls, "ca.pem") if args.tls else None)
        sys.stdin.readline()    # runs until the parent closes our stdin


def run_busx_sub(args) -> None:
    import busx
    with connect(args.url) as bus:
        sub = bus.subscribe(TOPIC)
        say(ready=True)
        cpu = time.process_time()
        received, timeout = 0, FIRST_WAIT
        last = time.monotonic()
        try:
            if args.many:
                while received + sub.dropped < args.count:
                    batch = sub.recv_many(1024, timeout=timeout)
                    if not batch:
                        raise busx.Timeout()
                    for msg in batch:
                        msg.data    # decodes: the workload decodes every message
                    received += len(batch)
                    timeout = QUIET
            else:
                recv = sub.recv
                while received + sub.dropped < args.count:
                    recv(timeout).data    # decodes
                    received += 1
                    timeout = QUIET
            last = time.monotonic()
        except busx.Timeout:
            last = time.monotonic() - timeout
        say(received=received, dropped=sub.dropped, last=last, cpu=time.process_time() - cpu)


def run_busx_pub(args) -> None:
    data = payload_for(args.size)
    with connect(args.url) as bus:
        say(ready=True)
        wait_for_line("go")
        start, cpu = time.monotonic(), time.process_time()
        publish = bus.publish
        for _ in range(args.count):
            publish(TOPIC, data)
        bus.flush()
        say(sent=args.count, seconds=time.monotonic() - start, cpu=time.process_time() - cpu)


def run_busx_echo(args) -> None:
    with connect(args.url) as bus:
        sub = bus.subscribe(args.topic)
        say(ready=True)
        for msg in sub:
            data = msg.data
            if data == "stop":
                break
            msg.respond(data)
    say(done=True)


def zmq_context():
    import zmq
    return zmq, zmq.Context()


def run_zmq_sub(args) -> None:
    zmq, ctx = zmq_context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
    sock.connect(args.endpoint)
    say(ready=True)
    received, ended, timeout = 0, False, FIRST_WAIT
    last = time.monotonic()
    sock.RCVTIMEO = int(FIRST_WAIT * 1000)
    recv, unpackb = sock.recv_multipart, msgpack.unpackb
    try:
        while True:
            payload = recv()[1]
            if payload == END:
                ended = True
                break
            if args.decode:
                unpackb(payload)
            received += 1
            last = time.monotonic()
            if timeout != QUIET:
                timeout = QUIET
                sock.RCVTIMEO = int(QUIET * 1000)
    except zmq.Again:
        pass
    say(received=received, ended=ended, last=last)
    sock.close(linger=0)
    ctx.term()


def run_zmq_pub(args) -> None:
    """XPUB is PUB that also shows the subscriptions, so the publisher can wait
    until every subscriber is really attached (the "slow joiner" problem)
    instead of sleeping. Sending behaves as PUB's: default HWM, drops when full."""
    zmq, ctx = zmq_context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.bind(args.endpoint)
    say(bound=sock.getsockopt_string(zmq.LAST_ENDPOINT))
    for _ in range(args.subscribers):
        sock.recv()    # one subscription message per subscriber
    say(ready=True)
    wait_for_line("go")
    topic, data = TOPIC.encode(), payload_for(args.size)
    send, packb = sock.send_multipart, msgpack.packb
    start = time.monotonic()
    for _ in range(args.count):
        send([topic, packb(data)])
    seconds = time.monotonic() - start
    # A full HWM drops the marker like any message: repeat it until the parent
    # has heard from every subscriber.
    while not stop_requested(0.005):
        send([topic, END])
    say(sent=args.count, seconds=seconds)
    sock.close(linger=0)
    ctx.term()


def run_zmq_echo(args) -> None:
    zmq, ctx = zmq_context()
    sock = ctx.socket(zmq.REP)
    sock.bind(args.endpoint)
    say(ready=True, endpoint=sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        payload = sock.recv()
        if payload == END:
            sock.send(END)
            break
        sock.send(msgpack.packb(msgpack.unpackb(payload)))
    sock.close(linger=0)
    ctx.term()


def parse_address(address: str):
    """'unix:/path' or 'tcp:host:port' -> (family, sockaddr)."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, rest
    host, _, port = rest.rpartition(":")
    return socket.AF_INET, (host, int(port))


def listen(address: str) -> tuple[socket.socket, str]:
    family, sockaddr = parse_address(address)
    if family == socket.AF_UNIX and os.path.exists(sockaddr):
        os.unlink(sockaddr)     # left by an earlier run's worker in the same directory
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(sockaddr)
    server.listen(8)
    if family == socket.AF_INET:
        host, port = server.getsockname()
        address = f"tcp:{host}:{port}"
    return server, address


def connect_to(address: str) -> socket.socket:
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(sockaddr)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_frames(conn: socket.socket, decode: bool) -> tuple[int, float]:
    """Read length-prefixed frames until EOF; returns (count, time of the last)."""
    pending = bytearray()
    count, last = 0, time.monotonic()
    unpack_length, unpackb = LENGTH.unpack_from, msgpack.unpackb
    while True:
        chunk = conn.recv(256 << 10)
        if not chunk:
            return count, last
        pending += chunk
        at, end = 0, len(pending)
        while end - at >= 4:
            size = unpack_length(pending, at)[0]
            if end - at - 4 < size:
                break
            if decode:
                unpackb(pending[at + 4:at + 4 + size])
            at += 4 + size
            count += 1
        if at:
            del pending[:at]
            last = time.monotonic()


def run_raw_sub(args) -> None:
    server, address = listen(args.address)
    say(ready=True, address=address)
    conn, _ = server.accept()
    server.close()
    cpu = time.process_time()
    count, last = read_frames(conn, args.decode)
    say(received=count, last=last, cpu=time.process_time() - cpu)


def run_raw_pub(args) -> None:
    conns = [connect_to(address) for address in args.addresses]
    say(ready=True)
    wait_for_line("go")
    data, packb, length = payload_for(args.size), msgpack.packb, LENGTH.pack
    start, cpu = time.monotonic(), time.process_time()
    if args.batch:
        out = bytearray()
        for _ in range(args.count):
            payload = packb(data)
            out += length(len(payload))
            out += payload
            if len(out) >= args.batch:
                for conn in conns:
                    conn.sendall(out)
                out.clear()
        for conn in conns:
            conn.sendall(out)
    else:
        for _ in range(args.count):
            payload = packb(data)
            frame = length(len(payload)) + payload
            for conn in conns:
                conn.sendall(frame)
    for conn in conns:
        conn.close()
    say(sent=args.count, seconds=time.monotonic() - start, cpu=time.process_time() - cpu)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = conn.recv(size)
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise ConnectionError("peer closed mid-frame")
        data += more
    return data


def run_raw_echo(args) -> None:
    server, address = listen(args.address)
    say(ready=True, address=address)
    conn, _ = server.accept()
    server.close()
    if conn.family == socket.AF_INET:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        header = conn.recv(4)
        if not header:
            break
        header += recv_exactly(conn, 4 - len(header)) if len(header) < 4 else b""
        payload = msgpack.packb(msgpack.unpackb(recv_exactly(conn, LENGTH.unpack(header)[0])))
        conn.sendall(LENGTH.pack(len(payload)) + payload)
    say(done=True)


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="a benchmark worker (see module docstring)")
    roles = parser.add_subparsers(dest="role", required=True)
    role = roles.add_parser("broker")
    role.add_argument("path")
    role.add_argument("--tls", metavar="DIR", help="TCP with TLS: certificates made in DIR")
    role.set_defaults(run=run_broker)
    role = roles.add_parser("busx-sub")
    role.add_argument("url")
    role.add_argument("count", type=int)
    role.add_argument("--many", action="store_true", help="use recv_many instead of recv")
    role.set_defaults(run=run_busx_sub)
    role = roles.add_parser("busx-pub")
    role.add_argument("url")
    role.add_argument("count", type=int)
    role.add_argument("size", type=int)
    role.set_defaults(run=run_busx_pub)
    role = roles.add_parser("busx-echo")
    role.add_argument("url")
    role.add_argument("topic")
    role.set_defaults(run=run_busx_echo)
    role = roles.add_parser("zmq-sub")
    role.add_argument("endpoint")
    role.add_argument("--no-decode", dest="decode", action="store_false")
    role.set_defaults(run=run_zmq_sub)
    role = roles.add_parser("zmq-pub")
    role.add_argument("endpoint")
    role.add_argument("count", type=int)
    role.add_argument("size", type=int)
    role.add_argument("subscribers", type=int)
    role.set_defaults(run=run_zmq_pub)
    role = roles.add_parser("zmq-echo")
    role.add_argument("endpoint")
    role.set_defaults(run=run_zmq_echo)
    role = roles.add_parser("raw-sub")
    role.add_argument("address")
    role.add_argument("--no-decode", dest="decode", action="store_false")
    role.set_defaults(run=run_raw_sub)
    role = roles.add_parser("raw-pub")
    role.add_argument("count", type=int)
    role.add_argument("size", type=int)
    role.add_argument("addresses", nargs="+")
    role.add_argument("--batch", type=int, default=0, help="bytes per write; 0: one write a frame")
    role.set_defaults(run=run_raw_pub)
    role = roles.add_parser("raw-echo")
    role.add_argument("address")
    role.set_defaults(run=run_raw_echo)
    args = parser.parse_args(argv)
    trace_if_asked(args.role)
    args.run(args)


def trace_if_asked(role: str) -> None:
    """With BUSX_TRACE_DIR set (trace_round_trip.py), turn busx's round-trip
    tracer on and write its stamps to <dir>/<role>-<pid>.json at exit."""
    directory = os.environ.get("BUSX_TRACE_DIR")
    if not directory:
        return
    from busx import _core
    _core.trace(True)

    def dump() -> None:
        with open(os.path.join(directory, f"{role}-{os.getpid()}.json"), "w") as out:
            json.dump(_core.trace_events(), out)
    atexit.register(dump)


# ---------------------------------------------------------------- parent side

class PeerError(RuntimeError):
    pass


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine_lines(others: str) -> list[str]:
    """The run's machine and software, as BENCHMARKS.md shows them; others:
    the versions of the other systems in the run."""
    nproc = len(os.sched_getaffinity(0))     # what `nproc` prints
    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- nproc: {nproc}; CPU: {cpu_model()}; kernel: {platform.release()}; "
        f"load average at start: {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()}; busx {package_version('busx')}; "
        f"msgpack {package_version('msgpack')}; {others}",
    ]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process pid has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peer:
    """One worker process. Every read has a deadline, so a stuck worker fails
    the benchmark with its stderr instead of hanging it."""

    def __init__(self, role: str, *args, timeout: float = 60.0) -> None:
        self.role = role
        # Unbuffered pipes: a buffered reader could swallow a second line
        # that select() then never reports.
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "peers.py"), role, *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.info = self.read(timeout)

    def read(self, timeout: float = 60.0) -> dict:
        stdout = self.process.stdout
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if readable else b""
        if not line:
            self.kill()
            raise PeerError(f"{self.role} worker said nothing within {timeout}s: "
                            f"{self.stderr_tail()}")
        return json.loads(line)

    def stderr_tail(self) -> str:
        return self.process.stderr.read()[-2000:].decode(errors="replace")

    def tell(self, word: str) -> None:
        self.process.stdin.write(word.encode() + b"\n")

    def finish(self, timeout: float = 30.0) -> None:
        """Close its stdin (brokers and sinks exit on that) and reap it."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@dataclass
class Run:
    """One end-to-end transfer: `count` messages to each subscriber."""
    count: int
    seconds: float
    received: list = field(default_factory=list)   # per subscriber
    reported: list = field(default_factory=list)   # drops busx told each subscriber of
    cpu: dict = field(default_factory=dict)        # CPU seconds: publisher, broker, subscriber

    def cpu_per_message(self, who: str) -> float | None:
        """CPU microseconds `who` spent per message delivered, if measured."""
        seconds = self.cpu.get(who)
        return None if seconds is None else seconds / self.count * 1e6

    @property
    def msgs_per_s(self) -> float:
        """Messages delivered per second, per subscriber."""
        return sum(self.received) / len(self.received) / self.seconds

    @property
    def drops(self) -> int:
        return sum(self.count - got for got in self.received)

    @property
    def silent_drops(self) -> int:
        """Drops nobody was told about: busx promises none."""
        return self.drops - sum(self.reported)


class Transfer:
    """Publisher and subscriber processes set up and waiting; start() times
    the transfer. Split this way so a benchmark's timed part holds only it."""

    def __init__(self, publisher: Peer, subscribers: list, count: int, on_done=None,
                 broker_pid: int | None = None) -> None:
        self.publisher, self.subscribers, self.count = publisher, subscribers, count
        self.on_done = on_done
        self.broker_pid = broker_pid

    def start(self) -> Run:
        try:
            broker_cpu = cpu_seconds(self.broker_pid) if self.broker_pid else None
            began = time.monotonic()
            self.publisher.tell("go")
            results = [sub.read(FIRST_WAIT + 300) for sub in self.subscribers]
            if self.on_done:
                self.on_done(self.publisher)
            try:
                # The subscribers are done, so the publisher should be too.
                published = self.publisher.read(PUBLISHER_GRACE)
            except PeerError as exc:
                got = [result["received"] for result in results]
                raise PeerError(f"{exc} (subscribers received {got} of {self.count})") from None
            if broker_cpu is not None:
                broker_cpu = cpu_seconds(self.broker_pid) - broker_cpu
        finally:
            self.close()
        last = max(result["last"] for result in results)
        subscriber_cpu = [result.get("cpu") for result in results]
        cpu = {"publisher": published.get("cpu"), "broker": broker_cpu,
               "subscriber": None if None in subscriber_cpu
               else sum(subscriber_cpu) / len(subscriber_cpu)}
        return Run(self.count, last - began, [result["received"] for result in results],
                   [result.get("dropped", 0) for result in results],
                   {who: seconds for who, seconds in cpu.items() if seconds is not None})

    def close(self) -> None:
        for peer in [self.publisher, *self.subscribers]:
            peer.finish()


def busx_transfer(url: str, count: int, size: int = 100, subscribers: int = 1,
                  many: bool = False, broker_pid: int | None = None) -> Transfer:
    subs = [Peer("busx-sub", url, count, *(["--many"] if many else []))
            for _ in range(subscribers)]
    return Transfer(Peer("busx-pub", url, count, size), subs, count, broker_pid=broker_pid)


def zmq_transfer(endpoint: str, count: int, size: int = 100, subscribers: int = 1) -> Transfer:
    publisher = Peer("zmq-pub", endpoint, count, size, subscribers)
    subs = [Peer("zmq-sub", publisher.info["bound"]) for _ in range(subscribers)]
    publisher.read()    # every subscription has reached the publisher
    return Transfer(publisher, subs, count, on_done=lambda pub: pub.tell("stop"))


def raw_transfer(address: str, count: int, size: int = 100, subscribers: int = 1,
                 batch: int = 0) -> Transfer:
    """address: 'unix:/dir' (one socket file per subscriber is made in it) or 'tcp'."""
    if address == "tcp":
        addresses = ["tcp:127.0.0.1:0"] * subscribers
    else:
        addresses = [f"{address}/raw-{i}.sock" for i in range(subscribers)]
    subs = [Peer("raw-sub", where) for where in addresses]
    publisher = Peer("raw-pub", count, size, *[s.info["address"] for s in subs],
                     "--batch", batch)
    return Transfer(publisher, subs, count)


def zmq_available() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


class BrokerProcess(Peer):
    """A busx.Broker in its own process, with a UNIX socket and TCP on
    loopback; with tls, TLS on that TCP, trusted by this process's workers
    (TLS_CA_VARIABLE)."""

    def __init__(self, directory: str, tls: bool = False) -> None:
        name = "tls.sock" if tls else "bus.sock"
        super().__init__("broker", os.path.join(directory, name),
                         *(["--tls", directory] if tls else []))
        self.unix_url, self.tcp_url = self.info["unix"], self.info["tcp"]
        self.pid = self.process.pid
        if tls:
            os.environ[TLS_CA_VARIABLE] = self.info["ca"]

    def url(self, transport: str) -> str:
        return self.unix_url if transport == "unix" else self.tcp_url


# ---- round trips: the parent is the pinger, one request in flight ----

class BusxPinger:
    def __init__(self, url: str, topic: str = "bench.echo") -> None:
        self.echo = Peer("busx-echo", url, topic)
        self.bus = connect(url)
        self.topic = topic

    def ping(self) -> None:
        self.bus.request(self.topic, SMALL_DICT, timeout=10).data

    def close(self) -> None:
        self.bus.publish(self.topic, "stop")
        self.bus.close()
        self.echo.finish()


class ZmqPinger:
    def __init__(self, endpoint: str) -> None:
        import zmq
        self.echo = Peer("zmq-echo", endpoint)
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.REQ)
        self.sock.connect(self.echo.info["endpoint"])

    def ping(self) -> None:
        self.sock.send(msgpack.packb(SMALL_DICT))
        msgpack.unpackb(self.sock.recv())

    def close(self) -> None:
        self.sock.send(END)
        self.sock.recv()
        self.sock.close(linger=0)
        self.context.term()
        self.echo.finish()


class RawPinger:
    def __init__(self, address: str) -> None:
        self.echo = Peer("raw-echo", address)
        self.sock = connect_to(self.echo.info["address"])

    def ping(self) -> None:
        payload = msgpack.packb(SMALL_DICT)
        self.sock.sendall(LENGTH.pack(len(payload)) + payload)
        size = LENGTH.unpack(recv_exactly(self.sock, 4))[0]
        msgpack.unpackb(recv_exactly(self.sock, size))

    def close(self) -> None:
        self.sock.close()
        self.echo.finish()


def percentile(samples: list, fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


if __name__ == "__main__":
    worker_main(sys.argv[1:])
