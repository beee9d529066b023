"""Soak test: a broker process under steady load for a long time, watched
every second for growth in memory or file descriptors. Not run in CI.

    python benchmarks/soak.py [--seconds 600] [--publishers 2] [--subscribers 4]
                              [--rate 20000] [--size 200] [--csv soak.csv]

N publisher processes each publish --rate messages a second (0: as fast as
they can) of --size bytes to soak.<n>; M subscriber processes receive them
all (soak.>) and check each publisher's sequence; --churners processes
connect, pass an fd and disconnect in a loop. Every second the broker's
RSS, open fds and message rates go to the CSV; at the end a summary says
whether anything grew or was dropped. The broker's stats come through a
monitor client, as `busx stat` would get them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import busx

# Children stop on SIGINT even when the soak itself was started in the
# background (where the shell makes SIGINT ignored, and Python keeps that).
RESTORE_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"

PUBLISHER = RESTORE_SIGINT + """
import sys, time, busx
url, number, rate, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
filler, topic = b"x" * size, f"soak.{number}"
tick = 0.01                             # publish in 10 ms batches to hold the rate
batch = max(1, rate // 100) if rate else 1000
with busx.connect(url, name=f"soak-pub-{number}") as bus:
    sequence, next_tick = 0, time.monotonic()
    try:
        while True:
            bus.publish_many((topic, [sequence + i, filler]) for i in range(batch))
            sequence += batch
            if rate:
                next_tick += tick
                time.sleep(max(0.0, next_tick - time.monotonic()))
    except KeyboardInterrupt:
        pass
print(sequence, flush=True)
"""

# Counts what arrives until soak.end (or 10 s of silence, were it dropped)
# and checks each publisher's numbers only go up (gaps are drops, which the
# broker counts and reports).
SUBSCRIBER = """
import json, sys, busx
with busx.connect(sys.argv[1], name=f"soak-sub-{sys.argv[2]}") as bus:
    sub = bus.subscribe("soak.>")
    print("ready", flush=True)
    received, out_of_order, expected, ended = 0, 0, {}, False
    while not ended and (batch := sub.recv_many(max_count=8192, timeout=10)):
        for msg in batch:
            if msg.topic == "soak.end":
                ended = True
                break
            number = msg.data[0]
            if number < expected.get(msg.topic, 0):
                out_of_order += 1
            expected[msg.topic] = number + 1
            received += 1
    print(json.dumps({"received": received, "out_of_order": out_of_order,
                      "dropped": sub.dropped}), flush=True)
"""


# Connects, subscribes, passes a pipe to itself, disconnects: over and over,
# so that anything a connection leaks in the broker adds up.
CHURNER = RESTORE_SIGINT + """
import os, sys, busx
cycles = 0
read_end, write_end = os.pipe()
try:
    while True:
        with busx.connect(sys.argv[1], name="soak-churn") as bus:
            sub = bus.subscribe("churn.x")
            bus.publish("churn.x", cycles, fds=[read_end])
            for fd in sub.recv(timeout=10).fds:
                os.close(fd)
        cycles += 1
except KeyboardInterrupt:
    pass
print(cycles, flush=True)
"""


def broker_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def broker_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_broker(directory: str, max_pending: int) -> tuple[subprocess.Popen, str]:
    path = os.path.join(directory, "bus.sock")
    broker = subprocess.Popen([sys.executable, "-P", "-m", "busx.cli", "serve", "--unix", path,
                               "--max-pending", str(max_pending)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = broker.stderr.readline()
    if "listening" not in line:
        sys.exit(f"the broker did not start: {line}{broker.stderr.read()}")
    return broker, f"unix://{path}"


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True)


def watch(broker: subprocess.Popen, url: str, seconds: float, csv_path: str) -> list[dict]:
    """One row a second until seconds have passed: written to csv_path and returned."""
    rows: list[dict] = []
    with busx.connect(url, name="soak-monitor") as monitor, open(csv_path, "w", newline="") as out:
        writer = csv.DictWriter(out, ["second", "rss_bytes", "fds", "connections", "msgs_in_per_s",
                                      "msgs_out_per_s", "dropped"])
        writer.writeheader()
        started = time.monotonic()
        previous = monitor.stats()
        for second in range(1, int(seconds) + 1):
            time.sleep(max(0.0, started + second - time.monotonic()))
            stats = monitor.stats()
            row = {"second": second, "rss_bytes": broker_rss(broker.pid),
                   "fds": broker_fds(broker.pid), "connections": len(stats["connections"]),
                   "msgs_in_per_s": stats["msgs_in"] - previous["msgs_in"],
                   "msgs_out_per_s": stats["msgs_out"] - previous["msgs_out"],
                   "dropped": stats["dropped"]}
            writer.writerow(row)
            out.flush()
            rows.append(row)
            previous = stats
    return rows


def summary(rows: list[dict], published: int, reports: list[dict]) -> str:
    rss = [row["rss_bytes"] for row in rows]
    fds = [row["fds"] for row in rows]
    rates = [row["msgs_in_per_s"] for row in rows]
    settled = rss[len(rss) // 10:]      # after the first tenth, when buffers have grown
    lines = [
        f"seconds: {len(rows)}",
        (f"broker RSS: min {min(rss) / 2**20:.1f} MiB, max {max(rss) / 2**20:.1f} MiB; "
         f"after warm-up first {settled[0] / 2**20:.1f} MiB, last {settled[-1] / 2**20:.1f} MiB"),
        f"broker fds: min {min(fds)}, max {max(fds)}",
        (f"messages published: {published} (broker: {min(rates)}..{max(rates)} msgs/s in, "
         f"mean {sum(rates) / len(rates):.0f})"),
        f"deliveries: {sum(row['msgs_out_per_s'] for row in rows)}",
        f"dropped by the broker: {rows[-1]['dropped']}",
        (f"subscribers: received {[r['received'] for r in reports]}, "
         f"told dropped {[r['dropped'] for r in reports]}, "
         f"out of order {sum(r['out_of_order'] for r in reports)}"),
        (f"unaccounted for (published - received - told dropped): "
         f"{[published - r['received'] - r['dropped'] for r in reports]}"),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--churners", type=int, default=1,
                        help="processes that connect, pass an fd and disconnect in a loop")
    parser.add_argument("--rate", type=int, default=20_000,
                        help="messages a second per publisher; 0 for as fast as possible")
    parser.add_argument("--size", type=int, default=200, help="filler bytes per message")
    parser.add_argument("--max-pending", type=int, default=64 << 20)
    parser.add_argument("--csv", default="soak.csv")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="busx-soak-") as directory:
        broker, url = start_broker(directory, args.max_pending)
        subscribers, publishers, churners = [], [], []
        try:
            subscribers = [spawn(SUBSCRIBER, url, str(n)) for n in range(args.subscribers)]
            for process in subscribers:
                if process.stdout.readline().strip() != "ready":
                    sys.exit("a subscriber did not start")
            publishers = [spawn(PUBLISHER, url, str(n), str(args.rate), str(args.size))
                          for n in range(args.publishers)]
            churners = [spawn(CHURNER, url) for _ in range(args.churners)]
            rows = watch(broker, url, args.seconds, args.csv)
            for process in publishers + churners:
                process.send_signal(signal.SIGINT)
            # Each publisher flushes as it exits: soak.end follows all they sent.
            published, churned = (sum(int(process.communicate(timeout=60)[0]) for process in group)
                                  for group in (publishers, churners))
            with busx.connect(url) as closer:
                closer.publish("soak.end", None)
            reports = [json.loads(process.communicate(timeout=60)[0]) for process in subscribers]
        finally:
            for process in publishers + churners + subscribers:
                if process.poll() is None:
                    process.kill()
                process.wait(30)
            broker.send_signal(signal.SIGTERM)
            broker.wait(30)
    print(summary(rows, published, reports))
    print(f"connections churned (connect, subscribe, pass an fd, close): {churned}")
    print(f"per-second samples: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
