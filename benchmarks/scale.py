"""Routing at scale: what the broker alone can route as subscriptions, hot
topics, wildcards and subscription churn grow, measured with C peers so no
Python client hides the broker's cost.

    python benchmarks/scale.py [--count 3000000] [--quick]

For each cell a C subscriber (benchmarks/c/busx_blast.c `subs`) holds NSUBS
patterns `dev.<i>.temp` (a tenth of them wildcards in the wildcard cells),
and a C publisher (`topics`) sends COUNT 100-byte messages cycling over
NTOPICS topics that each match exactly one pattern. The publisher times
from its first write to the PONG after its last frame: by then the broker
has routed every message. In the churn cells a third C peer subscribes and
unsubscribes 10,000 hot topics a second each way meanwhile. Every group of
cells with the same subscriptions gets a fresh `busx serve`, whose memory
growth per subscription is reported too. Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from subscriptions import rss_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "c", "busx_blast.c")
CHURN_RATE = 10_000     # SUBs a second, and as many UNSUBs

# (subscriptions, percent wildcards, hot topic counts, churn): one subscriber per group.
FULL = [(1, 0, [1], False), (10_000, 0, [1, 1_000, 10_000], False),
        (100_000, 0, [1, 1_000, 100_000], False), (1_000_000, 0, [1, 1_000, 100_000], False),
        (1_000_000, 0, [100_000], True),
        (10_000, 10, [1_000], False), (1_000_000, 10, [1_000, 100_000], False)]
QUICK = [(1, 0, [1], False), (10_000, 0, [1_000], False), (100_000, 0, [100_000], False),
         (100_000, 0, [100_000], True), (100_000, 10, [100_000], False)]


class Cell(NamedTuple):
    subscriptions: int
    wildcards: int          # percent of the subscriptions
    topics: int
    churn: float | None     # subscription changes a second during the run, None: none
    msgs_per_s: float
    dropped: int


class Group(NamedTuple):
    cells: list[Cell]
    bytes_per_subscription: float | None
    subscribe_seconds: float


def build(directory: str) -> str:
    compiler = shutil.which("cc")
    if compiler is None:
        raise SystemExit("scale.py needs a C compiler (cc) on PATH")
    binary = os.path.join(directory, "busx_blast")
    subprocess.run([compiler, "-O2", "-o", binary, SOURCE], check=True)
    return binary


def start_broker(directory: str) -> tuple[subprocess.Popen, str]:
    path = os.path.join(directory, "scale.sock")
    log = os.path.join(directory, "broker.log")
    with open(log, "w") as stderr:     # -P: the installed busx, not a checkout's source tree
        broker = subprocess.Popen([sys.executable, "-P", "-m", "busx.cli", "serve", "--unix", path],
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 30
    while not accepts(path):
        if broker.poll() is not None or time.monotonic() > deadline:
            with open(log) as why:
                raise RuntimeError(f"busx serve did not start: {why.read()}")
        time.sleep(0.01)    # polling for the listening socket, with a deadline
    return broker, path


def accepts(path: str) -> bool:
    """Whether a broker listens at path (the probe connects and leaves)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def expect_ready(process: subprocess.Popen, what: str) -> None:
    line = process.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"{what} did not get ready: {line!r}")


class Scene:
    """A fresh `busx serve` with a C subscriber holding `subscriptions`
    patterns (and, with churn, a C peer changing subscriptions all along),
    ready for publish() runs; finish() stops them all."""

    def __init__(self, binary: str, directory: str, subscriptions: int, wildcards: int,
                 churn: bool, messages: int) -> None:
        """messages: how many the subscriber waits for in all, before finish()."""
        self.binary, self.subscriptions, self.wildcards = binary, subscriptions, wildcards
        self.broker, self.path = start_broker(directory)
        self.subscriber = self.churner = None
        try:
            before = rss_bytes(self.broker.pid)
            started = time.monotonic()
            self.subscriber = subprocess.Popen(
                [binary, "subs", self.path, str(messages), str(subscriptions), str(wildcards)],
                stdout=subprocess.PIPE, text=True)
            expect_ready(self.subscriber, "the C subscriber")
            self.subscribe_seconds = time.monotonic() - started
            self.grown = rss_bytes(self.broker.pid) - before
            if churn:
                self.churner = subprocess.Popen(
                    [binary, "churn", self.path, str(CHURN_RATE), str(subscriptions)],
                    stdout=subprocess.PIPE, text=True)
                expect_ready(self.churner, "the churn peer")
        except BaseException:
            self.stop()
            raise

    def publish(self, topics: int, count: int) -> float:
        """Publish count messages over `topics` hot topics; msgs/s routed."""
        done = subprocess.run([self.binary, "topics", self.path, str(count), "100", str(topics),
                               str(self.subscriptions)], capture_output=True, text=True,
                              check=True, timeout=600)
        return float(done.stdout.split()[0])

    def finish(self) -> tuple[int, float | None]:
        """(messages the broker dropped for the subscriber, subscription
        changes a second the churn peer made, or None)."""
        churn_rate = None
        try:
            if self.churner is not None:
                self.churner.send_signal(signal.SIGTERM)
                churn_rate = float(self.churner.stdout.readline())    # SUBs and UNSUBs
            _, _, dropped = self.subscriber.stdout.readline().split()
        finally:
            self.stop()
        return int(dropped), churn_rate

    def stop(self) -> None:
        for process in (self.churner, self.subscriber, self.broker):
            if process is not None and process.poll() is None:
                process.terminate()
            if process is not None:
                process.wait(timeout=30)


def run_group(binary: str, directory: str, subscriptions: int, wildcards: int,
              topic_counts: list[int], churn: bool, count: int, repeat: int = 1) -> Group:
    """One scene's cells, each run repeat times (the cells taking turns) and
    its median kept: on a shared 2-vCPU VM one run of a cell can move by a
    third from the next."""
    scene = Scene(binary, directory, subscriptions, wildcards, churn,
                  count * len(topic_counts) * repeat)
    runs: list[list[float]] = [[] for _ in topic_counts]
    for _ in range(repeat):
        for topics, rates in zip(topic_counts, runs):
            rates.append(scene.publish(topics, count))
    dropped, churn_rate = scene.finish()
    cells = [Cell(subscriptions, wildcards, topics, churn_rate, statistics.median(rates), dropped)
             for topics, rates in zip(topic_counts, runs)]
    per_subscription = scene.grown / subscriptions if subscriptions >= 100_000 else None
    return Group(cells, per_subscription, scene.subscribe_seconds)


def run_matrix(count: int, quick: bool, largest: int, repeat: int) -> list[Group]:
    with tempfile.TemporaryDirectory(prefix="busx-scale-") as directory:
        binary = build(directory)
        return [run_group(binary, directory, subs, wild, topics, churn, count, repeat)
                for subs, wild, topics, churn in (QUICK if quick else FULL) if subs <= largest]


def format_matrix(groups: list[Group], repeat: int = 1) -> str:
    cells = [cell for group in groups for cell in group.cells]
    base = cells[0].msgs_per_s
    lines = [f"msgs/s: the median of {repeat} run{'s' if repeat > 1 else ''} of each cell.", "",
             "| subscriptions | wildcards | hot topics | churn, changes/s | msgs/s | vs 1 sub, 1 topic"
             " | drops |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in cells:
        churn = f"{cell.churn:,.0f}" if cell.churn is not None else "—"
        lines.append(f"| {cell.subscriptions:,} | {cell.wildcards}% | {cell.topics:,} | {churn} "
                     f"| {cell.msgs_per_s:,.0f} | {cell.msgs_per_s / base:.2f} | {cell.dropped:,} |")
    lines.append("")
    for group in groups:
        head = group.cells[0]
        memory = (f", broker memory {group.bytes_per_subscription:,.0f} bytes per subscription"
                  if group.bytes_per_subscription else "")
        lines.append(f"- {head.subscriptions:,} subscriptions ({head.wildcards}% wildcards): "
                     f"subscribed in {group.subscribe_seconds:.2f} s{memory}")
    lines += ["", *format_targets(cells)]
    return "\n".join(lines)


def format_targets(cells: list[Cell]) -> list[str]:
    """The issue's two routing targets, as ratios of this run's cells."""
    def find(subs: int, topics: int, churn: bool) -> Cell | None:
        return next((c for c in cells if c.subscriptions == subs and c.topics == topics
                     and c.wildcards == 0 and (c.churn is not None) == churn), None)
    base = cells[0]
    largest = max((c for c in cells if c.wildcards == 0 and c.churn is None),
                  key=lambda c: (c.subscriptions, c.topics))
    lines = ["| target | measured | goal | |", "| --- | ---: | ---: | --- |"]
    ratio = largest.msgs_per_s / base.msgs_per_s
    lines.append(f"| {largest.subscriptions:,} subscriptions, {largest.topics:,} hot topics / "
                 f"1 subscription, 1 topic | {ratio:.2f} | ≥ 0.5 | "
                 f"{'met' if ratio >= 0.5 else 'not met'} |")
    churned = next((c for c in cells if c.churn is not None), None)
    still = churned and find(churned.subscriptions, churned.topics, False)
    if churned and still:
        ratio = churned.msgs_per_s / still.msgs_per_s
        lines.append(f"| with {churned.churn:,.0f} subscription changes/s / without | "
                     f"{ratio:.2f} | ≥ 0.5 | {'met' if ratio >= 0.5 else 'not met'} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, help="messages per cell (default 3,000,000; "
                        "300,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smaller matrix, for a smoke test")
    parser.add_argument("--largest", type=int, default=1_000_000,
                        help="leave out groups with more subscriptions (older code, whose "
                             "SUB cost grew with their number, cannot set the large ones up)")
    parser.add_argument("--repeat", type=int, help="runs of each cell, median shown "
                        "(default 3; 1 with --quick)")
    args = parser.parse_args()
    count = args.count or (300_000 if args.quick else 3_000_000)
    repeat = args.repeat or (1 if args.quick else 3)
    print(format_matrix(run_matrix(count, args.quick, args.largest, repeat), repeat))


if __name__ == "__main__":
    main()
