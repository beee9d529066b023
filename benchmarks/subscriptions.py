"""One connection subscribing to many distinct topics: how long it takes, what
it costs the broker in memory, and what it does to everyone else's round
trip meanwhile.

    python benchmarks/subscriptions.py [--count 1000000] [--batch 10000]

A `busx serve` process; a raw client (this process, speaking the wire
protocol) pipelines SUB frames for `dev.<i>.temp`, `--batch` at a time, and
reads the OKs; between batches, and on a thread all along, a second client
measures flush() round trips. Then the same raw client unsubscribes them
all. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import busx
from busx import protocol
from busx.handshake import pack


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RawClient:
    """Just enough of the protocol to pipeline SUB/UNSUB and count OKs."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.decoder = protocol.FrameDecoder()
        self.frames: list[protocol.Frame] = []
        preamble = b""
        while len(preamble) < len(protocol.PREAMBLE):
            preamble += self.sock.recv(len(protocol.PREAMBLE) - len(preamble))
        self.sock.sendall(protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT,
                                                                    payload=pack({})))
        self.expect(protocol.HELLO, 1)
        self.expect(protocol.READY, 1)

    def expect(self, kind: int, count: int) -> None:
        while count:
            while not self.frames:
                self.frames += self.decoder.feed(self.sock.recv(1 << 20))
            frame = self.frames.pop(0)
            if frame.kind != kind:
                raise RuntimeError(f"expected kind {kind}, got {frame}")
            count -= 1


class Prober(threading.Thread):
    """Measures another client's flush() round trips for as long as it runs."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.bus = busx.connect(url, name="prober")
        self.samples: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            start = time.perf_counter()
            self.bus.flush(timeout=30)
            self.samples.append(time.perf_counter() - start)
            self.done.wait(0.002)

    def stop(self) -> list[float]:
        self.done.set()
        self.join()
        self.bus.close()
        samples, self.samples = self.samples, []
        return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="busx-subs-")
    path = os.path.join(workdir, "bus.sock")
    log = open(os.path.join(workdir, "broker.log"), "w")
    broker = subprocess.Popen([sys.executable, "-P", "-m", "busx.cli", "serve", "--unix", path,
                               "--max-subscriptions", str(max(args.count, 1))],
                              stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        url = f"unix://{path}"
        idle = Prober(url)
        idle.start()
        time.sleep(1.0)
        idle_samples = idle.stop()
        rss_before = rss_bytes(broker.pid)

        raw = RawClient(path)
        prober = Prober(url)
        prober.start()
        start = time.perf_counter()
        for first in range(1, args.count + 1, args.batch):
            last = min(first + args.batch, args.count + 1)
            raw.sock.sendall(b"".join(
                protocol.encode_frame(protocol.SUB, f"dev.{i}.temp".encode(), id=i)
                for i in range(first, last)))
            raw.expect(protocol.OK, last - first)
        subscribe_s = time.perf_counter() - start
        busy_samples = prober.stop()
        rss_after = rss_bytes(broker.pid)

        start = time.perf_counter()
        for first in range(1, args.count + 1, args.batch):
            last = min(first + args.batch, args.count + 1)
            raw.sock.sendall(b"".join(protocol.encode_frame(protocol.UNSUB, id=i)
                                      for i in range(first, last)))
            raw.expect(protocol.OK, last - first)
        unsubscribe_s = time.perf_counter() - start
        raw.sock.close()
    finally:
        broker.terminate()
        broker.wait(timeout=30)
        log.close()

    ms = 1000
    print(f"| subscriptions | {args.count:,} |")
    print("| --- | --- |")
    print(f"| subscribe all (pipelined, {args.batch:,} a batch) | {subscribe_s:.2f} s "
          f"({args.count / subscribe_s / 1e3:.0f} k/s) |")
    print(f"| unsubscribe all | {unsubscribe_s:.2f} s ({args.count / unsubscribe_s / 1e3:.0f} k/s) |")
    print(f"| broker memory per subscription (RSS growth / count, pattern included) | "
          f"{(rss_after - rss_before) / args.count:.0f} bytes |")
    print(f"| another client's flush() round trip, idle broker: p50 / p99 | "
          f"{statistics.median(idle_samples) * ms:.2f} / {percentile(idle_samples, 0.99) * ms:.2f} ms |")
    print(f"| ... while the subscriptions are made: p50 / p99 / max ({len(busy_samples)} samples) | "
          f"{statistics.median(busy_samples) * ms:.2f} / {percentile(busy_samples, 0.99) * ms:.2f}"
          f" / {max(busy_samples) * ms:.2f} ms |")


if __name__ == "__main__":
    main()
