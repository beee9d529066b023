"""busx beside pyzmq, a plain socket and C, on one workload, in one run.

    python benchmarks/compare.py [--count N] [--pings N] [--quick] [--table-only]

Workload: 100-byte msgpack dicts from one publisher process to one
subscriber process, which decodes every message. busx goes through a
busx.Broker running in its own process; pyzmq PUB/SUB (default HWM) and the
plain sockets go straight from publisher to subscriber; the C program
(benchmarks/c/pipe_limit.c, built with `cc -O2` at run time) shows what the
socket itself carries when the program costs nothing. Round trips: one
request in flight, ping -> echo process -> pong, every side decoding and
re-encoding; benchmarks/c/ping_pong.c gives the machine's own round trip,
direct and through a relay process that stands where the broker does.
After its own tables it runs scale.py (routing at scale) and backbone.py
(across hosts), with --quick when given it. Prints Markdown tables for
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

C_SOURCE = os.path.join(peers.HERE, "c", "pipe_limit.c")
C_BUSX_PEER = os.path.join(peers.HERE, "c", "busx_blast.c")
C_PING_PONG = os.path.join(peers.HERE, "c", "ping_pong.c")
LARGE = 1 << 20          # bytes per message in the large-payload rows
C_RELAYED = "C, UNIX socketpairs, through a relay process (a broker's four wake-ups)"
C_COUNT_FACTOR = 10      # the C program is ~50x faster: give it more messages to time


@dataclass
class Row:
    system: str
    msgs_per_s: float | None = None
    drops: int | None = None
    note: str = ""
    cpu: dict | None = None      # CPU µs per message: publisher, broker, subscriber


def machine_lines() -> list[str]:
    libzmq = "not installed"
    if peers.zmq_available():
        import zmq
        libzmq = zmq.zmq_version()
    return peers.machine_lines(f"pyzmq {peers.package_version('pyzmq')} (libzmq {libzmq})")


def build_c(directory: str, source: str) -> tuple[str | None, str]:
    """Compile a C program; (path, "") or (None, why not)."""
    compiler = shutil.which("cc")
    if compiler is None:
        return None, "no C compiler (cc) on PATH"
    binary = os.path.join(directory, os.path.basename(source)[:-2])
    built = subprocess.run([compiler, "-O2", "-o", binary, source],
                           capture_output=True, text=True)
    if built.returncode != 0:
        return None, f"cc failed: {built.stderr.strip()[:200]}"
    return binary, ""


def run_c(binary: str | None, why_not: str, name: str, count: int, batch: int) -> Row:
    if binary is None:
        return Row(name, note=f"skipped: {why_not}")
    done = subprocess.run([binary, str(count * C_COUNT_FACTOR), "100", str(batch)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return Row(name, note=f"failed: {done.stderr.strip()[:200]}")
    return Row(name, json.loads(done.stdout)["msgs_per_s"], 0)


def median_row(repeat: int, make_row: Callable[[], Row]) -> Row:
    """The median of `repeat` rows of one measurement (a failed one only when all fail)."""
    rows = [make_row() for _ in range(repeat)]
    measured = sorted((row for row in rows if row.msgs_per_s is not None),
                      key=lambda row: row.msgs_per_s)
    return measured[len(measured) // 2] if measured else rows[0]


def measure(name: str, start_processes: Callable[[], peers.Transfer], repeat: int) -> Row:
    """Median of `repeat` transfers; a failure becomes the row's note."""
    runs = []
    try:
        for _ in range(repeat):
            runs.append(start_processes().start())
    except peers.PeerError as exc:
        return Row(name, note=f"FAILED: {str(exc)[:300]}")
    runs.sort(key=lambda run: run.msgs_per_s)
    middle = runs[len(runs) // 2]
    return Row(name, middle.msgs_per_s, middle.drops,
               cpu={who: middle.cpu_per_message(who) for who in middle.cpu})


def throughput_rows(broker: peers.BrokerProcess, directory: str, count: int,
                    repeat: int) -> list[Row]:
    rows = [
        measure("busx unix", lambda: peers.busx_transfer(
            broker.unix_url, count, broker_pid=broker.pid), repeat),
        measure("busx tcp", lambda: peers.busx_transfer(
            broker.tcp_url, count, broker_pid=broker.pid), repeat),
        measure("busx unix, recv_many", lambda: peers.busx_transfer(
            broker.unix_url, count, many=True, broker_pid=broker.pid), repeat),
    ]
    if peers.zmq_available():
        rows += [
            measure("pyzmq PUB/SUB ipc://",
                    lambda: peers.zmq_transfer(f"ipc://{directory}/compare.ipc", count), repeat),
            measure("pyzmq PUB/SUB tcp://",
                    lambda: peers.zmq_transfer("tcp://127.0.0.1:*", count), repeat),
        ]
    else:
        rows += [Row("pyzmq PUB/SUB ipc://", note="skipped: pyzmq not installed"),
                 Row("pyzmq PUB/SUB tcp://", note="skipped: pyzmq not installed")]
    rows += [
        measure("plain UNIX socket, one sendall per frame",
                lambda: peers.raw_transfer(f"unix:{directory}", count), repeat),
        measure("plain UNIX socket, 64 KiB writes",
                lambda: peers.raw_transfer(f"unix:{directory}", count, batch=peers.RAW_BATCH),
                repeat),
    ]
    binary, why_not = build_c(directory, C_SOURCE)
    rows += [
        median_row(repeat, lambda: run_c(
            binary, why_not, "C, UNIX socketpair, 64 KiB writes, no decode (the limit)",
            count, peers.RAW_BATCH)),
        median_row(repeat, lambda: run_c(
            binary, why_not, "C, UNIX socketpair, one write per frame, no decode", count, 0)),
    ]
    return rows


def fanout_rows(broker: peers.BrokerProcess, directory: str, count: int,
                repeat: int) -> list[Row]:
    return [
        measure("busx unix, 1 -> 4 subscribers",
                lambda: peers.busx_transfer(broker.unix_url, count, subscribers=4), repeat),
        measure("plain UNIX sockets, 64 KiB writes, 1 -> 4 subscribers",
                lambda: peers.raw_transfer(f"unix:{directory}", count, subscribers=4,
                                           batch=peers.RAW_BATCH), repeat),
    ]


def broker_capacity_row(broker: peers.BrokerProcess, directory: str, count: int,
                        size: int = 100) -> Row:
    """The broker alone: C peers publish and consume pre-encoded frames in
    64 KiB batches through it (benchmarks/c/busx_blast.c), payloads inline."""
    name = ("busx broker routing, C publisher -> broker -> C subscriber" if size == 100 else
            "busx broker, C peers, payload inline through both sockets")
    binary, why_not = build_c(directory, C_BUSX_PEER)
    if binary is None:
        return Row(name, note=f"skipped: {why_not}")
    path = broker.unix_url[len("unix://"):]
    subscriber = subprocess.Popen([binary, "sub", path, str(count)], stdout=subprocess.PIPE,
                                  text=True)
    try:
        if subscriber.stdout.readline().strip() != "ready":
            return Row(name, note="failed: the C subscriber did not subscribe")
        subprocess.run([binary, "pub", path, str(count), str(size)], check=True, timeout=300)
        rate, _, dropped = subscriber.stdout.readline().split()
    finally:
        subscriber.wait(timeout=60)
    return Row(name, float(rate), int(dropped))


def large_rows(broker: peers.BrokerProcess, directory: str, count: int, repeat: int) -> list[Row]:
    """1 MiB payloads: rows of msgs/s; print_rows turns them into MB/s. The C
    peers' row is what any broker forwarding the bytes through its sockets
    can reach; busx's memfds go around it."""
    rows = [measure("busx unix (payloads in memfds)",
                    lambda: peers.busx_transfer(broker.unix_url, count, size=LARGE), repeat),
            measure("busx tcp (payloads inline)",
                    lambda: peers.busx_transfer(broker.tcp_url, count, size=LARGE), repeat),
            median_row(repeat, lambda: broker_capacity_row(broker, directory, count * 4,
                                                           size=LARGE)),
            measure("plain UNIX socket", lambda: peers.raw_transfer(
                f"unix:{directory}", count, size=LARGE, batch=peers.RAW_BATCH), repeat)]
    binary, why_not = build_c(directory, C_SOURCE)
    if binary is None:
        return rows + [Row("C, UNIX socketpair (the limit)", note=f"skipped: {why_not}")]

    def c_limit() -> Row:
        done = subprocess.run([binary, str(count * 4), str(LARGE), str(peers.RAW_BATCH)],
                              capture_output=True, text=True, timeout=300)
        return Row("C, UNIX socketpair (the limit)", json.loads(done.stdout)["msgs_per_s"], 0)
    return rows + [median_row(repeat, c_limit)]


def tls_rows(tls_broker: peers.BrokerProcess, count: int, repeat: int) -> list[Row]:
    """TLS beside plain TCP (throughput_rows' "busx tcp"): same peers, same sizes."""
    return [measure("busx tls", lambda: peers.busx_transfer(
        tls_broker.tcp_url, count, broker_pid=tls_broker.pid), repeat)]


def latency_rows(broker: peers.BrokerProcess, tls_broker: peers.BrokerProcess,
                 directory: str, pings: int) -> list[tuple]:
    systems = [("busx unix (via broker)", lambda: peers.BusxPinger(broker.unix_url)),
               ("busx tcp (via broker)", lambda: peers.BusxPinger(broker.tcp_url)),
               ("busx tls (via broker)", lambda: peers.BusxPinger(tls_broker.tcp_url))]
    if peers.zmq_available():
        systems += [("pyzmq REQ/REP ipc:// (direct)",
                     lambda: peers.ZmqPinger(f"ipc://{directory}/echo.ipc")),
                    ("pyzmq REQ/REP tcp:// (direct)",
                     lambda: peers.ZmqPinger("tcp://127.0.0.1:*"))]
    systems += [("plain UNIX socket (direct)",
                 lambda: peers.RawPinger(f"unix:{directory}/echo.sock")),
                ("plain TCP socket (direct)", lambda: peers.RawPinger("tcp:127.0.0.1:0"))]
    rows = []
    for name, make in systems:
        try:
            pinger = make()
        except peers.PeerError as exc:
            rows.append((name, None, None, f"FAILED: {str(exc)[:200]}"))
            continue
        try:
            for _ in range(pings // 10):
                pinger.ping()          # warm-up: connections, inboxes, caches
            samples = []
            for _ in range(pings):
                began = time.perf_counter()
                pinger.ping()
                samples.append(time.perf_counter() - began)
        finally:
            pinger.close()
        rows.append((name, peers.percentile(samples, 0.5) * 1e6,
                     peers.percentile(samples, 0.99) * 1e6, ""))
    return rows + c_round_trip_rows(directory, pings)


def c_round_trip_rows(directory: str, pings: int) -> list[tuple]:
    """What this machine's wake-ups allow: C programs that do nothing but pass the frame."""
    binary, why_not = build_c(directory, C_PING_PONG)
    rows = []
    for name, relays in (("C, UNIX socketpair (direct)", "0"),
                         (C_RELAYED, "1")):
        if binary is None:
            rows.append((name, None, None, f"skipped: {why_not}"))
            continue
        done = subprocess.run([binary, str(pings), "100", relays],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            rows.append((name, None, None, f"failed: {done.stderr.strip()[:200]}"))
            continue
        result = json.loads(done.stdout)
        rows.append((name, result["p50_us"], result["p99_us"], ""))
    return rows


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value and base else "–"


def print_throughput(rows: list[Row]) -> None:
    by_name = {row.system: row.msgs_per_s for row in rows}
    zmq_ipc = by_name.get("pyzmq PUB/SUB ipc://")
    plain_batched = by_name.get("plain UNIX socket, 64 KiB writes")
    print("| system | msgs/s | vs pyzmq ipc | vs plain pipe, batched | drops "
          "| CPU µs/msg: pub + broker + sub |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        if row.msgs_per_s is None:
            print(f"| {row.system} | {row.note} | | | | |")
            continue
        print(f"| {row.system} | {row.msgs_per_s:,.0f} | {ratio(row.msgs_per_s, zmq_ipc)} | "
              f"{ratio(row.msgs_per_s, plain_batched)} | {row.drops:,} | {cpu_cell(row.cpu)} |")


def cpu_cell(cpu: dict | None) -> str:
    """'0.41 + 0.12 + 0.55 = 1.08': where a message's CPU time goes."""
    if not cpu:
        return ""
    parts = [cpu[who] for who in ("publisher", "broker", "subscriber") if who in cpu]
    return " + ".join(f"{part:.2f}" for part in parts) + f" = {sum(parts):.2f}"


def print_rows(rows: list[Row], unit: str = "msgs/s", scale: float = 1.0) -> None:
    base = rows[-1].msgs_per_s
    print(f"| system | {unit} | vs last row | drops |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        if row.msgs_per_s is None:
            print(f"| {row.system} | {row.note} | | |")
        else:
            print(f"| {row.system} | {row.msgs_per_s * scale:,.0f} | "
                  f"{ratio(row.msgs_per_s, base)} | {row.drops:,} |")


def print_targets(throughput: list[Row], fanout: list[Row], capacity: Row, large: list[Row],
                  latency: list[tuple]) -> None:
    """The performance issue's targets, each as a ratio from this run."""
    rate = {row.system: row.msgs_per_s for row in throughput}
    rtt = {name: (p50, p99) for name, p50, p99, _ in latency}

    def target(what: str, value: float | None, goal: float) -> None:
        verdict = "–" if value is None else ("met" if value >= goal else "not met")
        shown = "–" if value is None else f"{value:.2f}"
        print(f"| {what} | {shown} | ≥ {goal} | {verdict} |")

    def share(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    zmq_rtt = rtt.get("pyzmq REQ/REP ipc:// (direct)", (None, None))[0]
    busx_rtt = rtt.get("busx unix (via broker)", (None, None))
    print("| target | measured | goal | |\n| --- | ---: | ---: | --- |")
    target("busx unix recv loop / pyzmq ipc", share(rate.get("busx unix"),
           rate.get("pyzmq PUB/SUB ipc://")), 3)
    target("busx unix recv loop / plain pipe, batched", share(rate.get("busx unix"),
           rate.get("plain UNIX socket, 64 KiB writes")), 1)
    target("busx unix recv_many / plain pipe, batched", share(
        rate.get("busx unix, recv_many"), rate.get("plain UNIX socket, 64 KiB writes")), 1.5)
    target("busx tcp / pyzmq tcp", share(rate.get("busx tcp"), rate.get("pyzmq PUB/SUB tcp://")), 3)
    target("fan-out 1->4, busx per subscriber / plain per subscriber",
           share(fanout[0].msgs_per_s, fanout[1].msgs_per_s), 1)
    target("broker routing (C peers) / C socket limit", share(
        capacity.msgs_per_s,
        rate.get("C, UNIX socketpair, 64 KiB writes, no decode (the limit)")), 0.2)
    target("1 MiB payloads, busx MB/s / C limit MB/s",
           share(large[0].msgs_per_s, large[-1].msgs_per_s), 0.5)
    target("round trip: pyzmq ipc p50 / busx unix p50", share(zmq_rtt, busx_rtt[0]), 1)
    target("round trip: 2 x busx p50 / busx p99", share(
        2 * busx_rtt[0] if busx_rtt[0] else None, busx_rtt[1]), 1)
    target("TLS throughput / plain TCP", share(rate.get("busx tls"), rate.get("busx tcp")), 0.5)
    tcp_p50 = rtt.get("busx tcp (via broker)", (None, None))[0]
    tls_p50 = rtt.get("busx tls (via broker)", (None, None))[0]
    target("round trip: 1.3 x tcp p50 / tls p50", share(
        1.3 * tcp_p50 if tcp_p50 else None, tls_p50), 1)
    c_rtt = rtt.get(C_RELAYED, (None, None))
    c_spread = share(2 * c_rtt[0] if c_rtt[0] else None, c_rtt[1])
    print(f"| the machine's own: 2 x p50 / p99 of C through a relay | "
          f"{'–' if c_spread is None else f'{c_spread:.2f}'} | | |")
    print("\n(`bus.publish` cost against `msgpack.packb` is measured by "
          "`pytest benchmarks/test_publish.py --benchmark-only`.)")


def print_latency(rows: list[tuple], pings: int) -> None:
    print(f"| round trip ({pings:,} pings, one in flight) | p50 µs | p99 µs |")
    print("| --- | ---: | ---: |")
    for name, p50, p99, note in rows:
        if p50 is None:
            print(f"| {name} | {note} | |")
        else:
            print(f"| {name} | {p50:.0f} | {p99:.0f} |")


def run_section(script: str, quick: bool) -> None:
    """Another benchmark script of this directory, in its own process (it
    starts and stops servers of its own), printing its own Markdown."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    done = subprocess.run([sys.executable, path] + (["--quick"] if quick else []))
    if done.returncode != 0:
        print(f"{script} failed: status {done.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500_000,
                        help="messages per system (default 500,000; 100,000 with --quick)")
    parser.add_argument("--pings", type=int, default=5000,
                        help="round trips per system (default 5,000; 1,000 with --quick)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="transfers per system, median shown (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer messages, for a smoke test")
    parser.add_argument("--table-only", action="store_true",
                        help="leave out the scale.py and backbone.py sections")
    args = parser.parse_args()
    if args.quick:
        args.count = min(args.count, 100_000)
        args.pings = min(args.pings, 1000)
        args.repeat = 1
    began = time.monotonic()
    print("\n".join(machine_lines()))
    directory = tempfile.mkdtemp(prefix="busx-compare-")
    broker = peers.BrokerProcess(directory)
    tls_broker = peers.BrokerProcess(directory, tls=True)
    try:
        print(f"\n### Throughput: {args.count:,} messages of 100 bytes, "
              f"1 publisher process -> 1 subscriber process\n")
        throughput = throughput_rows(broker, directory, args.count, args.repeat)
        throughput += tls_rows(tls_broker, args.count, args.repeat)
        print_throughput(throughput)
        print(f"\nmsgs/s: messages the subscriber received and decoded per second (every "
              f"row the median of {args.repeat}); drops: published but never received. The C "
              f"rows send {C_COUNT_FACTOR}x the messages and do not decode.")
        print("\n### Fan-out: 1 publisher -> 4 subscriber processes, msgs/s per subscriber\n")
        fanout = fanout_rows(broker, directory, args.count // 4, args.repeat)
        print_rows(fanout)
        print("\n### Broker capacity: C peers, pre-encoded frames in 64 KiB batches\n")
        capacity = median_row(args.repeat, lambda: broker_capacity_row(
            broker, directory, args.count * C_COUNT_FACTOR))
        print_rows([capacity, throughput[-2]])
        print(f"\n### Large payloads: {LARGE >> 20} MiB messages, MB/s\n")
        large = large_rows(broker, directory, max(50, args.count // 2000), args.repeat)
        print_rows(large, "MB/s", LARGE / 1e6)
        print("\n### Latency\n")
        latency = latency_rows(broker, tls_broker, directory, args.pings)
        print_latency(latency, args.pings)
        print("\n### Targets (ratios from this run)\n")
        print_targets(throughput, fanout, capacity, large, latency)
        if not args.table_only:
            print("\n## Routing at scale, C peers (benchmarks/scale.py)\n", flush=True)
            run_section("scale.py", args.quick)
            # busx across two brokers linked by a nats-server beside nats-py,
            # and a broker's local traffic with the link on and off.
            print("\n## Across hosts: the NATS backbone (benchmarks/backbone.py)\n", flush=True)
            run_section("backbone.py", args.quick)
    finally:
        broker.finish()
        tls_broker.finish()
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n(run took {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
