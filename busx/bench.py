"""`busx bench`: throughput and latency of the bus as its users see them.

One publisher process and K subscriber processes talk through a broker,
embedded in this process unless --url names one. Each message carries its
sequence number and its send time on CLOCK_MONOTONIC (`time.monotonic_ns()`,
one clock for every process on a Linux host), so subscribers measure one-way
latency. This process coordinates: it spawns the subscribers
(`python -m busx.bench subscriber ...`), waits until each has subscribed,
spawns the publisher, draws a progress bar, ends the run with an end marker,
then reads each child's summary (JSON) and latencies (a file of int64 ns) and
prints a table, a JSON document or a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from itertools import chain, pairwise
from typing import NamedTuple

import msgpack

import busx

from .children import Child, failure_reason, spawn, stop_all

# Every message's data is [stamp, padding, None...]: the stamp is a fixed-size
# bin (so its msgpack size does not vary with its values), the padding and up
# to two nils make the packed payload exactly --size bytes.
STAMP = struct.Struct("<QQ")            # sequence number, send time (CLOCK_MONOTONIC ns)
END_SEQ = (1 << 64) - 1                 # the stamp of the end marker
HEAD_SIZE = len(msgpack.packb([bytes(STAMP.size)]))    # array header and stamp: 19 bytes
MIN_SIZE = HEAD_SIZE + len(msgpack.packb(b""))          # and empty padding: 21 bytes

PUBLISH_BATCH = 1000                    # messages per publish_many call...
PUBLISH_BATCH_BYTES = 1 << 20           # ...and at most this many payload bytes (large --size)
RECV_BATCH = 8192                       # max_count of each recv_many
RECV_SLICE = 0.2                        # seconds a child waits in recv before checking its parent
SAMPLE_INTERVAL_NS = 20_000_000         # throughput-over-time resolution (the plot re-bins)
PROGRESS_INTERVAL = 0.1                 # seconds between the coordinator's checks
END_MARKER_INTERVAL = 0.2               # resend the end marker: a slow subscriber may drop one
START_TIMEOUT = 30.0                    # for a child process to start and subscribe
STALL_TIMEOUT = 30.0                    # no message moved this long: the run is stuck
MEGABYTE = 1_000_000                    # MB/s counts payload bytes, in units of 10**6
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0))
LATENCY_NOTE = ("Latency is one-way, from the publisher stamping a message to recv_many "
                "returning it (CLOCK_MONOTONIC).\nUnder full-throughput load it is queueing "
                "latency: time spent behind earlier messages in buffers, not an idle bus's "
                "latency.")
DROPPED_NOTE = ("dropped: a subscriber fell more than the broker's max_pending behind, so the "
                "broker dropped\nthe newest messages for it (slow consumer); missing counts what "
                "never arrived.")


class BenchError(Exception):
    """The benchmark could not run as asked: the message says why (exit 1)."""


class Target(NamedTuple):
    transport: str | None    # the transport the run must use; None: whatever url gives
    url: str


class Run(NamedTuple):
    """One transport's results: the JSON-ready summary and the raw data for plots."""
    summary: dict
    latencies: list             # per subscriber: sorted latencies in ns
    publisher_samples: list     # [(ns since start, messages published)]
    subscriber_samples: list    # per subscriber: [(ns since start, messages received)]


# ---- payloads ----

def payload_tail(size: int) -> list:
    """What follows the stamp in every message so that msgpack packs it to
    exactly size bytes: [padding] plus at most two nils, which fill the sizes
    a bin's growing header would skip."""
    if size < MIN_SIZE:
        raise BenchError(f"--size {size} is too small: a message needs at least {MIN_SIZE} bytes "
                         f"for its sequence number and send time")
    for nils in range(3):
        for bin_header in (2, 3, 5):
            padding = size - HEAD_SIZE - bin_header - nils
            if padding >= 0 and len(msgpack.packb(bytes(padding))) == padding + bin_header:
                return [bytes(padding)] + [None] * nils
    raise AssertionError(f"no message layout packs to {size} bytes")


# ---- the child processes ----

def run_publisher(url: str, topic: str, size: int, count: int, result_prefix: str) -> None:
    """Publish count stamped messages in batches, flush, write the summary."""
    tail = payload_tail(size)
    pack, clock = STAMP.pack, time.monotonic_ns
    parent = os.getppid()
    with busx.connect(url, name=f"busx bench {topic} publisher", reconnect=False) as bus:
        start = clock()
        samples, next_sample = [], start + SAMPLE_INTERVAL_NS
        batch = max(1, min(PUBLISH_BATCH, PUBLISH_BATCH_BYTES // size))
        for first in range(0, count, batch):
            last = min(first + batch, count)
            bus.publish_many([(topic, [pack(seq, clock())] + tail) for seq in range(first, last)])
            now = clock()
            if now >= next_sample:
                samples.append((now - start, last))
                next_sample = now + SAMPLE_INTERVAL_NS
                if os.getppid() != parent:
                    raise BenchError("the busx bench coordinator went away")
        bus.flush()     # the broker has routed every message: publishing is done
        end = clock()
    samples.append((end - start, count))
    write_json(result_prefix, {"start_ns": start, "end_ns": end, "samples": samples})


def run_subscriber(url: str, topic: str, result_prefix: str) -> None:
    """Subscribe, say "ready" on stdout, then receive until the end marker,
    recording each message's latency; write the summary and latencies."""
    unpack, clock = STAMP.unpack, time.monotonic_ns
    latencies = array("q")
    record = latencies.append
    parent = os.getppid()
    samples: list = []
    last_received = next_sample = 0
    with busx.connect(url, name=f"busx bench {topic} subscriber", reconnect=False) as bus:
        sub = bus.subscribe(topic)
        print("ready", flush=True)
        ended = False
        while not ended:
            batch = sub.recv_many(max_count=RECV_BATCH, timeout=RECV_SLICE)
            now = clock()   # when the application has the messages in hand
            if not batch and os.getppid() != parent:
                raise BenchError("the busx bench coordinator went away")
            for msg in batch:
                seq, sent = unpack(msg.data[0])
                if seq == END_SEQ:
                    ended = True
                    break
                record(now - sent)
                last_received = now
            if now >= next_sample and latencies:
                samples.append((now, len(latencies)))
                next_sample = now + SAMPLE_INTERVAL_NS
        dropped = sub.dropped
    if latencies:
        samples.append((last_received, len(latencies)))
    with open(result_prefix + ".latency", "wb") as file:
        latencies.tofile(file)
    write_json(result_prefix, {"received": len(latencies), "dropped": dropped,
                               "last_received_ns": last_received or None, "samples": samples})


# ---- pyzmq beside busx (the plot's comparison; pip install pyzmq) ----

ZMQ_QUIET_SECONDS = 2.0     # a pyzmq subscriber gives up this long after its last message
ZMQ_END = b"end"            # pyzmq's end marker: PUB drops at its HWM, so it is repeated


def zmq_available() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


def run_zmq_publisher(endpoint: str, size: int, count: int, subscribers: int,
                      result_prefix: str) -> None:
    """The busx publisher's workload over pyzmq PUB/SUB, without a broker:
    bind, print the endpoint, wait until every subscriber is attached (XPUB
    shows the subscriptions, so no sleeping for the "slow joiner"), send
    count stamped messages (PUB drops at its high-water mark, as pyzmq does),
    write the summary, then repeat the end marker until stopped."""
    import zmq
    tail = payload_tail(size)
    pack, packb, clock = STAMP.pack, msgpack.packb, time.monotonic_ns
    context = zmq.Context()
    sock = context.socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.bind(endpoint)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    for _ in range(subscribers):
        sock.recv()
    start = clock()
    samples, next_sample = [], start + SAMPLE_INTERVAL_NS
    for seq in range(count):
        sock.send(packb([pack(seq, clock())] + tail))
        if seq & 1023 == 0 and clock() >= next_sample:
            samples.append((clock() - start, seq))
            next_sample = clock() + SAMPLE_INTERVAL_NS
    end = clock()
    samples.append((end - start, count))
    write_json(result_prefix, {"start_ns": start, "end_ns": end, "samples": samples})
    while True:         # until the coordinator stops this process
        sock.send(ZMQ_END)
        time.sleep(0.005)


def run_zmq_subscriber(endpoint: str, result_prefix: str) -> None:
    """Receive and stamp like run_subscriber, until the end marker or
    ZMQ_QUIET_SECONDS without a message; pyzmq reports no drops."""
    import zmq
    unpack, unpackb, clock = STAMP.unpack, msgpack.unpackb, time.monotonic_ns
    latencies = array("q")
    samples: list = []
    last_received = next_sample = 0
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVTIMEO, int(ZMQ_QUIET_SECONDS * 1000))
    sock.connect(endpoint)
    print("ready", flush=True)
    try:
        while (payload := sock.recv()) != ZMQ_END:
            now = clock()
            latencies.append(now - unpack(unpackb(payload)[0])[1])
            last_received = now
            if now >= next_sample:
                samples.append((now, len(latencies)))
                next_sample = now + SAMPLE_INTERVAL_NS
    except zmq.Again:
        pass
    if latencies:
        samples.append((last_received, len(latencies)))
    with open(result_prefix + ".latency", "wb") as file:
        latencies.tofile(file)
    write_json(result_prefix, {"received": len(latencies), "dropped": 0,
                               "last_received_ns": last_received or None, "samples": samples})
    sock.close(linger=0)
    context.term()


def write_json(result_prefix: str, summary: dict) -> None:
    # Written whole under another name, then renamed: the coordinator never
    # reads half a file.
    with open(result_prefix + ".json.part", "w") as file:
        json.dump(summary, file)
    os.rename(result_prefix + ".json.part", result_prefix + ".json")


# ---- the coordinator ----

def run(url: str | None, transport: str | None, size: int, count: int, subscribers: int,
        as_json: bool, plot_path: str | None) -> int:
    """`busx bench`: run the benchmark and print the results; returns the exit status."""
    payload_tail(size)              # a bad size fails before anything starts
    if plot_path is not None:
        check_plot_path(plot_path)
    # SIGTERM stops the bench as Ctrl-C does: children, broker, files cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = tempfile.mkdtemp(prefix="busx-bench-")
    try:
        if url is None:
            wanted = ("unix", "tcp") if transport in (None, "both") else (transport,)
            with busx.Broker(unix_path=os.path.join(workdir, "bus.sock"),
                             tcp=("127.0.0.1", 0) if "tcp" in wanted else None) as broker:
                runs = [run_one(target, size, count, subscribers, workdir)
                        for target in embedded_targets(broker, wanted)]
        else:
            runs = [run_one(target, size, count, subscribers, workdir)
                    for target in url_targets(url, transport)]
        document = {"broker": url or "embedded", "size": size, "count": count,
                    "subscribers": subscribers, "runs": [one.summary for one in runs]}
        print(json.dumps(document) if as_json else format_table(document), flush=True)
        if plot_path is not None:
            # pyzmq beside busx in the picture, over the same transports, when installed.
            beside = ([run_zmq_one(one.summary["transport"], size, count, subscribers, workdir)
                       for one in runs] if zmq_available() else [])
            save_plot(plot_path, document, runs + beside)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def embedded_targets(broker: busx.Broker, wanted: Sequence[str]) -> list[Target]:
    targets = []
    for transport in wanted:
        if transport == "unix":
            targets.append(Target("unix", broker.url))
        else:
            assert broker.tcp_address is not None      # the broker was started with tcp
            host, port = broker.tcp_address
            targets.append(Target("tcp", f"tcp://{host}:{port}"))
    return targets


def url_targets(url: str, transport: str | None) -> list[Target]:
    """A unix:// or tcp:// URL runs over its own transport only; HOST:PORT
    runs over TCP (as tcp://HOST:PORT) or UNIX (the automatic move to the
    broker's socket, which must happen) or, by default, whatever it gives."""
    scheme = url.partition("://")[0] if "://" in url else None
    if scheme is not None:
        if transport not in (None, scheme):
            raise BenchError(f"--transport {transport} cannot run over {url}: it is a {scheme} URL "
                             f"(give a HOST:PORT URL to bench both transports of one broker)")
        return [Target(scheme, url)]
    targets = {"unix": Target("unix", url), "tcp": Target("tcp", f"tcp://{url}")}
    if transport is None:
        return [Target(None, url)]
    return list(targets.values()) if transport == "both" else [targets[transport]]


def run_one(target: Target, size: int, count: int, subscribers: int, workdir: str) -> Run:
    """One benchmark over one transport: spawn, watch, collect."""
    with busx.connect(target.url, name="busx bench", reconnect=False) as control:
        if target.transport not in (None, control.transport):
            raise BenchError(f"{target.url} connects over {control.transport} here, not "
                             f"{target.transport}: is the broker on this host and its socket "
                             f"open to this user?")
        label = control.transport
        # Unique, so that benches sharing a broker never see each other's messages.
        topic = f"bench.{os.getpid()}-{secrets.token_hex(4)}.{label}"
        children: list[Child] = []
        try:
            for number in range(1, subscribers + 1):
                spawn_child(children, f"subscriber {number}", workdir,
                            "subscriber", target.url, topic)
            wait_ready(children)
            publisher = spawn_child(children, "publisher", workdir, "publisher", target.url,
                                    topic, str(size), str(count))
            watch(control, topic, label, children, publisher, count * subscribers)
        finally:
            stop_all(children)
    return collect(label, target.url, size, count, publisher, children[:-1])


def run_zmq_one(transport: str, size: int, count: int, subscribers: int, workdir: str) -> Run:
    """The same workload over pyzmq PUB/SUB, publisher straight to the
    subscribers: ipc:// beside busx's unix, tcp:// beside its tcp."""
    endpoint = f"ipc://{workdir}/zmq.ipc" if transport == "unix" else "tcp://127.0.0.1:*"
    label = f"pyzmq {'ipc' if transport == 'unix' else 'tcp'}"
    children: list[Child] = []
    try:
        publisher = spawn_child(children, f"{label} publisher", workdir, "zmq-publisher",
                                endpoint, str(size), str(count), str(subscribers))
        assert publisher.output is not None
        bound = publisher.output.readline().decode().strip()
        if not bound:
            publisher.process.wait()
            raise BenchError(f"the bench {publisher.role} stopped: {failure_reason(publisher)}")
        for number in range(1, subscribers + 1):
            spawn_child(children, f"{label} subscriber {number}", workdir, "zmq-subscriber",
                        bound)
        wait_ready(children[1:])
        deadline = time.monotonic() + STALL_TIMEOUT + count / 10_000
        for child in children[1:]:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            if child.process.returncode != 0:
                raise BenchError(f"the bench {child.role} stopped: {failure_reason(child)}")
    except subprocess.TimeoutExpired:
        raise BenchError(f"the {label} comparison did not finish") from None
    finally:
        stop_all(children)
    return collect(label, endpoint, size, count, publisher, children[1:])


def spawn_child(children: list[Child], role: str, workdir: str, command: str,
                *args: str) -> Child:
    """A bench worker (`python -m busx.bench command args result_prefix`),
    added to children."""
    return spawn(children, role, "busx.bench", [command, *args, result_prefix(workdir, role)],
                 workdir, read_output=True)


def result_prefix(workdir: str, role: str) -> str:
    """Where a worker writes its summary (+ ".json") and latencies (+ ".latency"):
    beside its log (children.spawn)."""
    return os.path.join(workdir, role.replace(" ", "-"))


def results_of(child: Child) -> str:
    return child.log_path.removesuffix(".log")


def wait_ready(children: list[Child]) -> None:
    """Wait until every subscriber has printed "ready" (it has subscribed)."""
    deadline = time.monotonic() + START_TIMEOUT
    waiting = {child.output: child for child in children if child.output is not None}
    while waiting:
        remaining = deadline - time.monotonic()
        readable = select.select(list(waiting), [], [], max(0.0, remaining))[0]
        if not readable:
            raise BenchError(f"the bench {next(iter(waiting.values())).role} did not subscribe "
                             f"within {START_TIMEOUT:.0f}s")
        for stream in readable:
            child = waiting.pop(stream)
            if stream.readline().strip() != b"ready":
                child.process.wait()
                raise BenchError(f"the bench {child.role} stopped: {failure_reason(child)}")


def watch(control: busx.Bus, topic: str, label: str, children: list[Child], publisher: Child,
          expected: int) -> None:
    """Until every child has finished: fail if one fails or the run stalls,
    send end markers once the publisher is done, draw the progress bar."""
    progress = ProgressBar(label, expected) if sys.stderr.isatty() else None
    end_marker = [STAMP.pack(END_SEQ, 0)]
    moved, last_move = None, time.monotonic()
    next_end_marker = 0.0
    try:
        while any(child.process.poll() is None for child in children):
            for child in children:
                if child.process.poll() not in (None, 0):
                    raise BenchError(f"the bench {child.role} stopped: {failure_reason(child)}")
            now = time.monotonic()
            if publisher.process.poll() == 0 and now >= next_end_marker:
                # After the publisher's flush, the broker queues this behind
                # every message it published.
                control.publish(topic, end_marker)
                next_end_marker = now + END_MARKER_INTERVAL
            counts = bench_counts(control.stats(), topic)
            if counts != moved:
                moved, last_move = counts, now
            elif now - last_move > STALL_TIMEOUT:
                raise BenchError(f"no message moved for {STALL_TIMEOUT:.0f}s: the run is stuck")
            if progress is not None:
                progress.draw(min(counts[1], expected))
            time.sleep(PROGRESS_INTERVAL)
    finally:
        if progress is not None:
            progress.clear()


def bench_counts(stats: dict, topic: str) -> tuple[int, int]:
    """(published, delivered to or dropped for subscribers) by this run's connections."""
    published = handled = 0
    for conn in stats["connections"]:
        if conn.get("name") == f"busx bench {topic} publisher":
            published += conn["msgs_in"]
        elif conn.get("name") == f"busx bench {topic} subscriber":
            handled += conn["msgs_out"] + conn["dropped"]
    return published, handled


class ProgressBar:
    """A one-line text bar on stderr, redrawn in place."""

    WIDTH = 30

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total

    def draw(self, done: int) -> None:
        filled = self.WIDTH * done // self.total
        sys.stderr.write(f"\r{self.label:<4} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                         f"{100 * done / self.total:5.1f}%  {done:,}/{self.total:,} msgs")
        sys.stderr.flush()

    def clear(self) -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


# ---- results ----

def collect(label: str, url: str, size: int, count: int, publisher_child: Child,
            subscriber_children: list[Child]) -> Run:
    publisher = read_json(publisher_child)
    start = publisher["start_ns"]
    subscribers, latencies, sub_samples = [], [], []
    for child in subscriber_children:
        summary = read_json(child)
        with open(results_of(child) + ".latency", "rb") as file:
            latency = sorted(array("q", file.read()))
        latencies.append(latency)
        elapsed = (summary["last_received_ns"] or start) - start
        subscribers.append({**throughput(summary["received"], elapsed, size),
                            "received": summary["received"], "dropped": summary["dropped"],
                            "missing": count - summary["received"],
                            "latency_ns": percentiles(latency)})
        sub_samples.append([(at - start, received) for at, received in summary["samples"]])
    slowest = max(sub["seconds"] for sub in subscribers)
    # Each list is sorted already: timsort merges such runs in linear time.
    everything = latencies[0] if len(latencies) == 1 else sorted(chain.from_iterable(latencies))
    aggregate = {**throughput(sum(sub["received"] for sub in subscribers), slowest * 1e9, size),
                 **{key: sum(sub[key] for sub in subscribers)
                    for key in ("received", "dropped", "missing")},
                 "latency_ns": percentiles(everything)}
    summary = {"transport": label, "url": url,
               "publisher": throughput(count, publisher["end_ns"] - start, size),
               "subscribers": subscribers, "aggregate": aggregate}
    return Run(summary, latencies, publisher["samples"], sub_samples)


def read_json(child: Child) -> dict:
    try:
        with open(results_of(child) + ".json") as file:
            return json.load(file)
    except FileNotFoundError:
        raise BenchError(f"the bench {child.role} left no results: "
                         f"{failure_reason(child)}") from None


def throughput(messages: int, elapsed_ns: float, size: int) -> dict:
    seconds = elapsed_ns / 1e9
    rate = messages / seconds if seconds > 0 else 0.0
    return {"seconds": round(seconds, 6), "msgs_per_s": round(rate, 1),
            "mb_per_s": round(rate * size / MEGABYTE, 3)}


def percentiles(ordered: Sequence[int]) -> dict | None:
    """Nearest-rank percentiles of sorted latencies; None without any."""
    if not ordered:
        return None
    return {name: ordered[max(0, math.ceil(share * len(ordered)) - 1)]
            for name, share in PERCENTILES}


def format_table(document: dict) -> str:
    subscribers = document["subscribers"]
    header = (f"busx bench: 1 publisher, {subscribers} subscriber{'s' * (subscribers > 1)}, "
              f"{document['count']:,} messages of {document['size']:,} B, "
              f"{broker_name(document)}")
    rows: list[tuple[str, ...]] = [("transport", "role", "msgs/s", "MB/s", "p50", "p90", "p99",
                                    "max", "dropped", "missing")]
    for one in document["runs"]:
        rows.append(table_row(one["transport"], "publisher", one["publisher"]))
        for number, sub in enumerate(one["subscribers"], 1):
            rows.append(table_row(one["transport"], f"subscriber {number}", sub))
        if subscribers > 1:
            rows.append(table_row(one["transport"], "all subscribers", one["aggregate"]))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    # Names left-aligned, numbers right-aligned.
    lines = ["  ".join(cell.ljust(widths[column]) if column < 2 else cell.rjust(widths[column])
                       for column, cell in enumerate(row)).rstrip()
             for row in rows]
    notes = [LATENCY_NOTE]
    if any(one["aggregate"]["dropped"] or one["aggregate"]["missing"] for one in document["runs"]):
        notes.append(DROPPED_NOTE)
    return "\n".join([header, ""] + lines + [""] + [footnote(note) for note in notes])


def footnote(note: str) -> str:
    return "* " + note.replace("\n", "\n  ")


def broker_name(document: dict) -> str:
    broker = document["broker"]
    return "embedded broker" if broker == "embedded" else f"broker at {broker}"


def table_row(transport: str, role: str, result: dict) -> tuple[str, ...]:
    cells = [transport, role, f"{result['msgs_per_s']:,.0f}", f"{result['mb_per_s']:,.1f}"]
    if "latency_ns" not in result:      # the publisher's row
        return tuple(cells + [""] * 6)
    latency = result["latency_ns"]
    cells += [format_ns(latency[name]) if latency else "-" for name, _ in PERCENTILES]
    return tuple(cells + [f"{result['dropped']:,}", f"{result['missing']:,}"])


def format_ns(ns: int) -> str:
    """Three significant digits or more: 950ns, 12.3µs, 4.56ms, 123ms."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            value = ns / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}{unit}"
    return f"{ns}ns"


# ---- the plot (matplotlib: pip install busx[plot]) ----

def check_plot_path(path: str) -> None:
    """Fail before the run, not after it: matplotlib present, format known."""
    try:
        import matplotlib
        matplotlib.use("Agg")       # files only: no display needed
        from matplotlib.figure import Figure
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install busx[plot]") from None
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if extension not in supported:
        raise BenchError(f"--plot {path}: name a file ending in one of "
                         f"{', '.join('.' + name for name in sorted(supported))} (such as .png)")


def save_plot(path: str, document: dict, runs: list[Run]) -> list[str]:
    """Each panel answers one question: how slow are the slowest messages
    (latency by percentile, per transport), how fast does each role go
    (throughput bars), and - only for a run long enough to have a shape -
    does the rate hold (throughput over time). The panel titles and the
    series (busx's transports, then pyzmq's beside them) are written into
    the PNG's metadata; the titles are returned."""
    from matplotlib.figure import Figure

    seconds = max(one.summary["aggregate"]["seconds"] for one in runs)
    timeline = seconds >= TIMELINE_MIN_SECONDS
    figure = Figure(figsize=(18 if timeline else 12, 4.8), layout="constrained")
    panels = figure.subplots(1, 3 if timeline else 2)
    plot_latency_percentiles(panels[0], runs)
    plot_throughput_bars(panels[1], runs)
    if timeline:
        plot_timeline(panels[2], runs, seconds)
    else:
        panels[1].annotate(f"The run took {seconds:.2f} s: throughput over time is drawn for "
                           f"runs of {TIMELINE_MIN_SECONDS:.0f} s or more (raise --count).",
                           (0.5, -0.2), xycoords="axes fraction", ha="center",
                           fontsize="small")
    for axes in panels:
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.suptitle(f"busx bench: {document['count']:,} messages of {document['size']:,} B, "
                    f"{document['subscribers']} subscriber(s), {broker_name(document)}")
    titles = [axes.get_title() for axes in panels]
    try:
        figure.savefig(path, dpi=100, metadata={
            "Title": "busx bench", "Description": "; ".join(titles),
            "Comment": ", ".join(one.summary["transport"] for one in runs)})
    except OSError as exc:
        raise BenchError(f"cannot write the plot {path}: {exc.strerror}") from None
    return titles


# Percentiles on the latency plot: the x axis is "nines", -log10(1 - p).
PLOT_PERCENTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999)
TIMELINE_MIN_SECONDS = 2.0      # shorter runs have no shape worth a line
TIMELINE_POINTS = 50            # rate samples drawn over a run, whatever its length


def plot_latency_percentiles(axes, runs: list[Run]) -> None:
    """Latency at each percentile, per transport, up to the slowest message."""
    for one in runs:
        ordered = sorted(chain.from_iterable(one.latencies))
        if not ordered:
            continue
        shares = [share for share in PLOT_PERCENTILES if share < 1 - 1 / len(ordered)]
        shares.append(1 - 1 / (2 * len(ordered)))      # the maximum, placed past the rest
        nines = [-math.log10(1 - share) for share in shares]
        values = [ordered[max(0, math.ceil(share * len(ordered)) - 1)] / 1e3
                  for share in shares[:-1]] + [ordered[-1] / 1e3]
        axes.plot(nines, values, marker="o", label=f"{one.summary['transport']}")
    ticks = [share for share in PLOT_PERCENTILES if share in (0.5, 0.9, 0.99, 0.999, 0.9999)]
    axes.set_xticks([-math.log10(1 - share) for share in ticks],
                    [f"{share * 100:g}%" for share in ticks])
    axes.set(yscale="log", xlabel="percentile (the last point of a line: the slowest message)",
             ylabel="one-way latency (µs)", title="Latency by percentile")


def plot_throughput_bars(axes, runs: list[Run]) -> None:
    """msgs/s of the publisher and each subscriber, grouped by transport."""
    roles = ["publisher"] + [f"subscriber {number}"
                             for number in range(1, len(runs[0].summary["subscribers"]) + 1)]
    width = 0.8 / len(runs)
    for index, one in enumerate(runs):
        rates = [one.summary["publisher"]["msgs_per_s"]] + [
            sub["msgs_per_s"] for sub in one.summary["subscribers"]]
        # What never arrived is part of the answer: pyzmq's PUB drops at its HWM.
        lost = [0] + [sub["missing"] for sub in one.summary["subscribers"]]
        positions = [role + index * width for role in range(len(roles))]
        bars = axes.bar(positions, rates, width, label=one.summary["transport"])
        axes.bar_label(bars, fontsize="x-small", labels=[
            f"{rate:,.0f}" + (f"\n{missing:,} lost" if missing else "")
            for rate, missing in zip(rates, lost)])
    axes.set_xticks([role + width * (len(runs) - 1) / 2 for role in range(len(roles))], roles)
    axes.set(ylabel="messages/s", title="Throughput by role")
    axes.yaxis.set_major_formatter(thousands())


def thousands():
    """A tick formatter writing 1,234,567 (matplotlib is imported only to plot)."""
    from matplotlib.ticker import StrMethodFormatter
    return StrMethodFormatter("{x:,.0f}")


def plot_timeline(axes, runs: list[Run], seconds: float) -> None:
    """Rates over time, each point averaged over 1/TIMELINE_POINTS of the run."""
    step_ns = max(SAMPLE_INTERVAL_NS, int(seconds * 1e9 / TIMELINE_POINTS))
    for one in runs:
        label = one.summary["transport"]
        plot_rates(axes, rebin(one.publisher_samples, step_ns), f"{label} publisher", "--")
        for number, samples in enumerate(one.subscriber_samples, 1):
            plot_rates(axes, rebin(samples, step_ns), f"{label} subscriber {number}", "-")
    axes.set(xlabel="seconds since the first publish", ylabel="messages/s",
             title="Throughput over time")
    axes.yaxis.set_major_formatter(thousands())


def rebin(samples: list, step_ns: int) -> list:
    """The (ns, cumulative count) samples at least step_ns apart, and the last."""
    kept, next_at = [], step_ns
    for sample in samples:
        if sample[0] >= next_at:
            kept.append(sample)
            next_at = sample[0] + step_ns
    if samples and (not kept or kept[-1] != samples[-1]):
        kept.append(samples[-1])
    return kept


def plot_rates(axes, samples: list, label: str, style: str) -> None:
    """Rates between consecutive (ns since start, cumulative count) samples."""
    points = [(0, 0)] + [tuple(sample) for sample in samples]
    times, rates = [], []
    for (before, count_before), (after, count_after) in pairwise(points):
        if after > before:
            times.append(after / 1e9)
            rates.append((count_after - count_before) * 1e9 / (after - before))
    if times:
        axes.plot(times, rates, style, label=label, marker=".")


# ---- the child processes' command line ----

def child_main(argv: Sequence[str] | None = None) -> int:
    """`python -m busx.bench publisher|subscriber ...`: what `busx bench` spawns."""
    parser = argparse.ArgumentParser(prog="python -m busx.bench")
    roles = parser.add_subparsers(dest="role", required=True)
    publisher = roles.add_parser("publisher")
    publisher.add_argument("url")
    publisher.add_argument("topic")
    publisher.add_argument("size", type=int)
    publisher.add_argument("count", type=int)
    publisher.add_argument("result_prefix")
    subscriber = roles.add_parser("subscriber")
    subscriber.add_argument("url")
    subscriber.add_argument("topic")
    subscriber.add_argument("result_prefix")
    zmq_publisher = roles.add_parser("zmq-publisher")
    for name, kind in (("endpoint", str), ("size", int), ("count", int), ("subscribers", int),
                       ("result_prefix", str)):
        zmq_publisher.add_argument(name, type=kind)
    zmq_subscriber = roles.add_parser("zmq-subscriber")
    zmq_subscriber.add_argument("endpoint")
    zmq_subscriber.add_argument("result_prefix")
    args = parser.parse_args(argv)
    try:
        if args.role == "publisher":
            run_publisher(args.url, args.topic, args.size, args.count, args.result_prefix)
        elif args.role == "subscriber":
            run_subscriber(args.url, args.topic, args.result_prefix)
        elif args.role == "zmq-publisher":
            run_zmq_publisher(args.endpoint, args.size, args.count, args.subscribers,
                              args.result_prefix)
        else:
            run_zmq_subscriber(args.endpoint, args.result_prefix)
    except (busx.BusError, BenchError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
