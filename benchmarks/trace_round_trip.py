"""Where a round trip's time goes: busx's tracer stamps every stage of one
request and its reply, in all three processes, and this prints the median
time between consecutive stages.

    python benchmarks/trace_round_trip.py [--pings 5000] [--transport unix|tcp|tls]

The pinger (this process) sends `bus.request` to an echo process (peers.py
`busx-echo`, answering with `msg.respond`) through a broker process (peers.py
`broker`), one request in flight, as compare.py's latency rows do. With
BUSX_TRACE_DIR set, the workers turn the tracer on (busx._core.trace) and
write their stamps at exit; every process on the host shares
CLOCK_MONOTONIC, so one timeline holds them all. Each stage is labelled
with its process and, for clients, its thread: "main" is the thread that
takes messages into Python, "I/O" the client's I/O thread. Prints Markdown
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import tempfile

import peers

from busx import _core


def label_events(events: list, role: str) -> list[tuple[int, str]]:
    """(ns, "role: stage") per event; a client's stages say which thread ran
    them: the thread that takes messages into Python is "main"."""
    takers = collections.Counter(thread for _, thread, stage in events if stage == "taken")
    main = takers.most_common(1)[0][0] if takers else None
    labelled = []
    for ns, thread, stage in events:
        where = role if role == "broker" else f"{role} {'main' if thread == main else 'I/O'}"
        labelled.append((ns, f"{where}: {stage}"))
    return labelled


def round_trips(pinger_events: list) -> list[tuple[int, int]]:
    """(start, end) of each ping: the pinger's pairs of marks."""
    marks = [ns for ns, _, stage in pinger_events if stage == "mark"]
    return list(zip(marks[0::2], marks[1::2]))


def breakdown(windows: list[tuple[int, int]], timeline: list[tuple[int, str]]) -> tuple:
    """The commonest sequence of stages within a round trip, the median time
    of each step of it, and how many round trips followed it."""
    sequences = collections.defaultdict(list)
    at = 0
    for start, end in windows:
        while at < len(timeline) and timeline[at][0] < start:
            at += 1
        inside = []
        while at < len(timeline) and timeline[at][0] <= end:
            inside.append(timeline[at])
            at += 1
        labels = tuple(label for _, label in inside)
        sequences[labels].append([b[0] - a[0] for a, b in zip(inside, inside[1:])])
    labels, samples = max(sequences.items(), key=lambda item: len(item[1]))
    steps = [statistics.median(sample[i] for sample in samples) / 1000
             for i in range(len(labels) - 1)]
    return labels, steps, len(samples)


def trace(pings: int, transport: str) -> str:
    with tempfile.TemporaryDirectory(prefix="busx-trace-") as directory:
        os.environ["BUSX_TRACE_DIR"] = directory
        try:
            broker = peers.BrokerProcess(directory, tls=transport == "tls")
            pinger = peers.BusxPinger(broker.url(transport))
        finally:
            del os.environ["BUSX_TRACE_DIR"]
        try:
            for _ in range(pings // 10):
                pinger.ping()       # warm-up, untraced
            _core.trace(True)
            for _ in range(pings):
                _core.trace_mark()
                pinger.ping()
                _core.trace_mark()
            _core.trace(False)
        finally:
            pinger.close()
            broker.finish()
        ours = _core.trace_events()
        timeline = label_events(ours, "pinger")
        for path in glob.glob(os.path.join(directory, "*.json")):
            role = "echo" if os.path.basename(path).startswith("busx-echo") else "broker"
            with open(path) as dumped:
                timeline += label_events(json.load(dumped), role)
    timeline.sort()
    labels, steps, followed = breakdown(round_trips(ours), timeline)
    return format_breakdown(labels, steps, followed, pings, transport)


def format_breakdown(labels: tuple, steps: list[float], followed: int, pings: int,
                     transport: str) -> str:
    total = sum(steps)
    lines = [f"Round trip over {transport}, {pings:,} pings, one in flight: {followed:,} "
             f"followed the sequence below; medians of each step.", "",
             "| step | from | to | µs | share |", "| ---: | --- | --- | ---: | ---: |"]
    for i, step in enumerate(steps):
        lines.append(f"| {i + 1} | {labels[i]} | {labels[i + 1]} | {step:.1f} | "
                     f"{step / total:.0%} |")
    lines.append(f"| | first stamp | last stamp | {total:.1f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=5000)
    parser.add_argument("--transport", choices=["unix", "tcp", "tls"], default="unix")
    args = parser.parse_args()
    print(trace(args.pings, args.transport))


if __name__ == "__main__":
    main()
