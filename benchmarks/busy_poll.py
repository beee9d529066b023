"""What the broker's busy polling buys and costs, measured side by side.

    python benchmarks/busy_poll.py [--pings N] [--rounds R] [--values 0,50,200] [--pause-us P]

For each busy_poll_us value, in turn and R times over: a broker process, an
echo process answering with msg.respond(), and this process sending
bus.request() with one in flight (the round trip of compare.py), pausing
--pause-us between requests to model a slower client. Prints
p50/p99 and the CPU time each process spent per round trip (user + system,
from /proc), so the latency gained can be set against the CPU it costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import busx

BROKER = """
import sys, busx
broker = busx.Broker(unix_path=sys.argv[1], busy_poll_us=int(sys.argv[2]))
broker.start()
print("ready", flush=True)
sys.stdin.readline()
broker.stop()
"""

ECHO = """
import sys, busx
bus = busx.connect(sys.argv[1])
requests = bus.subscribe("bench.echo")
print("ready", flush=True)
for msg in requests:
    msg.respond(msg.data)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(code: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-P", "-c", code, *args], text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("a benchmark process did not start")
    return process


def measure(busy_poll_us: int, pings: int, pause: float) -> dict:
    directory = tempfile.mkdtemp(prefix="busx-poll-")
    path = os.path.join(directory, "bus.sock")
    broker = spawn(BROKER, path, str(busy_poll_us))
    echo = spawn(ECHO, f"unix://{path}")
    try:
        with busx.connect(f"unix://{path}") as bus:
            payload = {"ping": "x" * 80}
            for _ in range(200):                    # warm up
                bus.request("bench.echo", payload)
            pids = {"requester": os.getpid(), "broker": broker.pid, "echo": echo.pid}
            before = {who: cpu_seconds(pid) for who, pid in pids.items()}
            samples = []
            for _ in range(pings):
                if pause:
                    time.sleep(pause)
                began = time.perf_counter()
                bus.request("bench.echo", payload)
                samples.append(time.perf_counter() - began)
            cpu = {who: (cpu_seconds(pid) - before[who]) / pings * 1e6
                   for who, pid in pids.items()}
    finally:
        echo.kill()
        echo.communicate()
        broker.communicate("\n", timeout=30)
    samples.sort()
    return {"p50": samples[pings // 2] * 1e6, "p99": samples[int(pings * 0.99)] * 1e6, **cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--values", default="0,50,200", help="busy_poll_us values, comma-separated")
    parser.add_argument("--pause-us", type=int, default=0, help="pause between requests")
    args = parser.parse_args()
    if args.pause_us < 0:
        parser.error("--pause-us must be 0 or more")
    values = [int(value) for value in args.values.split(",")]
    results: dict[int, list[dict]] = {value: [] for value in values}
    for _ in range(args.rounds):
        for value in values:                        # interleaved: noise hits each alike
            results[value].append(measure(value, args.pings, args.pause_us / 1e6))
    print("| busy_poll_us | p50 µs | p99 µs | CPU µs per round trip: requester + broker + echo |")
    print("| ---: | ---: | ---: | ---: |")
    for value, runs in results.items():
        def median(key: str, runs: list = runs) -> float:
            return statistics.median(run[key] for run in runs)
        total = median("requester") + median("broker") + median("echo")
        print(f"| {value} | {median('p50'):.0f} | {median('p99'):.0f} | "
              f"{median('requester'):.0f} + {median('broker'):.0f} + {median('echo'):.0f} "
              f"= {total:.0f} |")
    print(f"\n(medians of {args.rounds} rounds of {args.pings:,} round trips each, "
          f"{args.pause_us} µs pause between them)")


if __name__ == "__main__":
    main()
