"""busx across hosts: two brokers as leaf nodes of one nats-server, beside nats-py.

    python benchmarks/backbone.py [--count N] [--pings N] [--rounds N] [--quick]
                                  [--nats-buffer BYTES] [--json FILE]

About 45 s (--quick: 50,000 messages, 1,000 requests, 3 rounds, about 15 s).

One nats-server (tests/nats_servers.py) and three `python -m busx serve`
processes: A and B are leaf nodes of the server (`--nats`, BUSX_HOST_ID
"bench-a" and "bench-b", so each is a host of its own), C is the same
broker without the link. Every client is a process of its own as well
(benchmarks/peers.py for the busx ones, this file's `worker` roles for
nats-py and the busx requester). Three measurements:

1. Across hosts: a busx publisher on A -> a busx subscriber on B (recv
   loop, decoding every message), beside a nats-py publisher -> a nats-py
   subscriber (callback, msgpack.unpackb) on the server's client port.
   Payload: peers.SMALL_DICT, which msgpack packs to 100 bytes. msgs/s at
   the subscriber, and every drop: messages that never arrived, those the
   subscriber was told of, the link's dropped_* counters on A and B, and
   the server's slow_consumers.
2. Request/reply across hosts: a busx requester on A, a busx echo service
   on B; beside a nats-py requester and a nats-py echo service on the
   server. One request in flight, p50/p99 after a warm-up.
3. The link's cost to local traffic: local 1 -> 1 throughput and a local
   round trip on A (linked, nobody across the link interested) beside C.

Measurements alternate (busx, or the linked broker, first in rounds 1, 3,
5, ..., the baseline first in the others) and every figure is the median
of its rounds; ratios are median over median. With messages lost, msgs/s
counts those delivered. Readiness is
polled (the link's state and remote interest in broker stats, nats-py
flushes), never slept for. Every process is started with
PR_SET_PDEATHSIG and stopped by its pid at exit, Ctrl-C included; the
temporary directory goes with them.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peers  # noqa: E402
from peers import FIRST_WAIT, QUIET, SMALL_DICT, TOPIC, say, wait_for_line  # noqa: E402

SELF = os.path.abspath(__file__)
PEERS = os.path.join(HERE, "peers.py")
ECHO_TOPIC = "bench.echo"
REQUEST_TIMEOUT = 10.0
READY_TIMEOUT = 20.0      # seconds to wait for a link, interest, a worker's first line


# ================================================================ worker side
# `python backbone.py worker ROLE ARGS...`, the same line protocol as peers.py.

def run_busx_req(args) -> None:
    """One request in flight: `warmup` untimed, then `count` timed; the
    echo service is told "stop" at the end."""
    import busx
    with peers.connect(args.url) as bus:
        say(ready=True)
        wait_for_line("go")
        request, perf = bus.request, time.perf_counter
        try:
            for _ in range(args.warmup):
                request(args.topic, SMALL_DICT, timeout=REQUEST_TIMEOUT).data
            samples = []
            for _ in range(args.count):
                began = perf()
                request(args.topic, SMALL_DICT, timeout=REQUEST_TIMEOUT).data
                samples.append(perf() - began)
        except busx.BusError as exc:     # Timeout and NoResponders among them
            say(error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            bus.publish(args.topic, "stop")
            bus.flush()
        say(**latency_summary(samples))


def latency_summary(samples: list) -> dict:
    return {"p50_us": peers.percentile(samples, 0.5) * 1e6,
            "p99_us": peers.percentile(samples, 0.99) * 1e6,
            "mean_us": statistics.fmean(samples) * 1e6, "count": len(samples)}


async def nats_connect(url: str, **options):
    import nats
    return await nats.connect(url, allow_reconnect=False, connect_timeout=5, **options)


def run_nats_sub(args) -> None:
    async def main() -> None:
        slow = []

        async def on_error(exc: Exception) -> None:
            slow.append(repr(exc))
        nc = await nats_connect(args.url, error_cb=on_error)
        received, last = 0, 0.0
        done = asyncio.Event()
        unpackb = msgpack.unpackb

        async def on_message(msg) -> None:
            nonlocal received, last
            unpackb(msg.data)           # decodes, as the busx subscriber does
            received += 1
            if received == args.count:
                last = time.monotonic()
                done.set()
        await nc.subscribe(TOPIC, cb=on_message)
        await nc.flush()                # the server holds the subscription
        say(ready=True)
        cpu = time.process_time()
        timeout, seen = FIRST_WAIT, 0
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except TimeoutError:
                if received == seen:     # quiet for `timeout`: the rest is lost
                    last = time.monotonic() - timeout
                    break
                seen, timeout = received, QUIET
        cpu = time.process_time() - cpu
        say(received=received, dropped=0, last=last, cpu=cpu, errors=slow[:3])
        await nc.close()
    asyncio.run(main())


def run_nats_pub(args) -> None:
    async def main() -> None:
        nc = await nats_connect(args.url)
        say(ready=True)
        wait_for_line("go")
        publish, packb, data = nc.publish, msgpack.packb, SMALL_DICT
        start, cpu = time.monotonic(), time.process_time()
        for _ in range(args.count):
            await publish(TOPIC, packb(data))
        await nc.flush()
        say(sent=args.count, seconds=time.monotonic() - start, cpu=time.process_time() - cpu)
        await nc.close()
    asyncio.run(main())


def run_nats_echo(args) -> None:
    async def main() -> None:
        nc = await nats_connect(args.url)
        stop = asyncio.Event()

        async def on_request(msg) -> None:
            data = msgpack.unpackb(msg.data)
            if data == "stop":
                stop.set()
                return
            await msg.respond(msgpack.packb(data))
        await nc.subscribe(args.topic, cb=on_request)
        await nc.flush()
        say(ready=True)
        await stop.wait()
        await nc.close()
    asyncio.run(main())


def run_nats_req(args) -> None:
    async def main() -> None:
        nc = await nats_connect(args.url)
        say(ready=True)
        wait_for_line("go")
        request, packb, unpackb, perf = nc.request, msgpack.packb, msgpack.unpackb, time.perf_counter
        try:
            for _ in range(args.warmup):
                unpackb((await request(args.topic, packb(SMALL_DICT), timeout=REQUEST_TIMEOUT)).data)
            samples = []
            for _ in range(args.count):
                began = perf()
                unpackb((await request(args.topic, packb(SMALL_DICT), timeout=REQUEST_TIMEOUT)).data)
                samples.append(perf() - began)
        except Exception as exc:     # nats.errors.TimeoutError, NoRespondersError
            say(error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            await nc.publish(args.topic, packb("stop"))
            await nc.flush()
            await nc.close()
        say(**latency_summary(samples))
    asyncio.run(main())


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="backbone.py worker")
    roles = parser.add_subparsers(dest="role", required=True)
    for name, run in (("busx-req", run_busx_req), ("nats-req", run_nats_req)):
        role = roles.add_parser(name)
        role.add_argument("url")
        role.add_argument("topic")
        role.add_argument("count", type=int)
        role.add_argument("warmup", type=int)
        role.set_defaults(run=run)
    for name, run in (("nats-sub", run_nats_sub), ("nats-pub", run_nats_pub)):
        role = roles.add_parser(name)
        role.add_argument("url")
        role.add_argument("count", type=int)
        role.set_defaults(run=run)
    role = roles.add_parser("nats-echo")
    role.add_argument("url")
    role.add_argument("topic")
    role.set_defaults(run=run_nats_echo)
    args = parser.parse_args(argv)
    args.run(args)


# ================================================================ parent side

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
_live: dict = {}        # pid -> every Worker and BrokerProcess not yet reaped


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Worker(peers.Peer):
    """One worker process (a peers.py role or one of this file's), with the
    interface peers.Transfer expects: read(), tell(), finish(), kill().
    stderr goes to a file in the run's directory (a chatty broker must not
    fill a pipe nobody reads); its tail is shown when the worker fails."""

    directory = ""

    # Starts its process its own way (stderr to a file, its environment), so
    # peers.Peer.__init__ is not called; read() and tell() are Peer's.
    def __init__(self, role: str, *args, script: str = SELF, env: dict | None = None,
                 timeout: float = READY_TIMEOUT) -> None:
        self.role = role
        command = [sys.executable, script, *(["worker"] if script == SELF else []),
                   role, *map(str, args)]
        self.stderr_path = os.path.join(Worker.directory, f"{role}-{time.monotonic_ns()}.err")
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                bufsize=0, env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        self.pid = self.process.pid
        _live[self.pid] = self
        self.info = self.read(timeout)

    def stderr_tail(self) -> str:
        return file_tail(self.stderr_path)

    def finish(self, timeout: float = 10.0) -> None:
        super().finish(timeout)
        _live.pop(self.pid, None)

    def kill(self) -> None:
        super().kill()
        _live.pop(self.pid, None)


def file_tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-size:].decode(errors="replace").strip()
    except OSError:
        return ""


def kill_all() -> None:
    for worker in list(_live.values()):
        worker.kill()


class BrokerProcess:
    """`python -m busx serve --unix PATH [--nats URL]`, BUSX_HOST_ID
    bench-<name>. The parent holds one idle client on it to read its stats
    (`bus.stats()`, what `busx stat` shows, the link's counters included)."""

    def __init__(self, directory: str, name: str, nats: str | None,
                 nats_buffer: str | None = None) -> None:
        self.name, self.linked = name, bool(nats)
        path = os.path.join(directory, f"{name}.sock")
        self.url = f"unix://{path}"
        self.role = f"broker {name}"
        self.stderr_path = os.path.join(directory, f"broker-{name}.log")
        with open(self.stderr_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-P", "-m", "busx", "serve", "--unix", path,
                 *(["--nats", nats] if nats else []),
                 *(["--nats-buffer", nats_buffer] if nats and nats_buffer else [])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env={**os.environ, "BUSX_HOST_ID": f"bench-{name}"}, preexec_fn=_die_with_parent)
        self.pid = self.process.pid
        _live[self.pid] = self
        self.control = None

        def listening() -> bool:
            if self.process.poll() is not None:
                raise peers.PeerError(f"busx serve ({name}) exited with {self.process.returncode}: "
                                      f"{file_tail(self.stderr_path)}")
            return os.path.exists(path)
        wait_until(listening, f"broker {name}'s socket")
        import busx
        self.control = busx.connect(self.url, name=f"bench-control-{name}")

    def stats(self) -> dict:
        return self.control.stats(timeout=10)

    def link(self) -> dict:
        return self.stats()["nats"]

    def finish(self, timeout: float = 10.0) -> None:
        """Close the control client, SIGTERM (busx serve stops cleanly), reap."""
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        _live.pop(self.pid, None)


def wait_until(predicate, what: str, timeout: float = READY_TIMEOUT, interval: float = 0.002):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise peers.PeerError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Bench:
    """The run's processes; each method is one measurement, one variant."""

    def __init__(self, directory: str, count: int, pings: int, warmup: int,
                 nats_buffer: str | None = None) -> None:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        from nats_servers import nats_server_version, start_server
        self.count, self.pings, self.warmup = count, pings, warmup
        self.server = start_server(os.path.join(directory, "nats"))
        self.server_version = nats_server_version()
        self.a = BrokerProcess(directory, "a", self.server.leaf_url, nats_buffer)
        self.b = BrokerProcess(directory, "b", self.server.leaf_url, nats_buffer)
        self.c = BrokerProcess(directory, "c", None)
        for broker in (self.a, self.b):
            wait_until(lambda broker=broker: broker.link()["state"] == "up",
                       f"broker {broker.name}'s link up")

    def close(self) -> None:
        for broker in (self.a, self.b, self.c):
            broker.finish()
        self.server.stop()

    def quiet_links(self) -> None:
        """Nobody left interested across the link (the last run's clients gone)."""
        wait_until(lambda: self.a.link()["remote_interest"] == 0
                   and self.b.link()["remote_interest"] == 0, "remote interest to go away")

    def slow_consumers(self) -> int:
        return self.server.varz().get("slow_consumers", 0)

    # ---- 1: across hosts, throughput

    def cross_busx(self) -> dict:
        self.quiet_links()
        a0, b0, slow0 = self.a.link(), self.b.link(), self.slow_consumers()
        sub = Worker("busx-sub", self.b.url, self.count, script=PEERS)
        pub = Worker("busx-pub", self.a.url, self.count, 100, script=PEERS)
        wait_until(lambda: self.a.link()["remote_interest"] >= 1,
                   "broker a to see the subscription on b")
        run = peers.Transfer(pub, [sub], self.count).start()
        a1, b1 = self.a.link(), self.b.link()
        result = transfer_result(run)
        result["link"] = {"a_msgs_out": a1["msgs_out"] - a0["msgs_out"],
                          "b_msgs_in": b1["msgs_in"] - b0["msgs_in"],
                          **{f"a_{k}": a1[k] - a0[k] for k in a1 if k.startswith("dropped_")},
                          **{f"b_{k}": b1[k] - b0[k] for k in b1 if k.startswith("dropped_")},
                          "reconnects": a1["reconnects"] + b1["reconnects"]
                          - a0["reconnects"] - b0["reconnects"]}
        result["server_slow_consumers"] = self.slow_consumers() - slow0
        return result

    def cross_nats(self) -> dict:
        slow0 = self.slow_consumers()
        sub = Worker("nats-sub", self.server.client_url, self.count)
        pub = Worker("nats-pub", self.server.client_url, self.count)
        run = peers.Transfer(pub, [sub], self.count).start()
        result = transfer_result(run)
        result["server_slow_consumers"] = self.slow_consumers() - slow0
        return result

    # ---- 2: across hosts, round trips

    def rtt_busx_cross(self) -> dict:
        self.quiet_links()
        echo = Worker("busx-echo", self.b.url, ECHO_TOPIC, script=PEERS)
        requester = Worker("busx-req", self.a.url, ECHO_TOPIC, self.pings, self.warmup)
        wait_until(lambda: self.a.link()["remote_interest"] >= 1,
                   "broker a to see the echo service on b")
        return round_trips(requester, echo)

    def rtt_nats(self) -> dict:
        echo = Worker("nats-echo", self.server.client_url, ECHO_TOPIC)
        requester = Worker("nats-req", self.server.client_url, ECHO_TOPIC, self.pings, self.warmup)
        return round_trips(requester, echo)

    # ---- 3: local traffic, link on (a) and off (c)

    def local_throughput(self, broker: BrokerProcess) -> dict:
        before = broker.link() if broker.linked else None
        if before is not None:
            self.quiet_links()
        sub = Worker("busx-sub", broker.url, self.count, script=PEERS)
        pub = Worker("busx-pub", broker.url, self.count, 100, script=PEERS)
        run = peers.Transfer(pub, [sub], self.count, broker_pid=broker.pid).start()
        result = transfer_result(run)
        if before is not None:
            after = broker.link()
            result["link_msgs_out"] = after["msgs_out"] - before["msgs_out"]
        return result

    def local_rtt(self, broker: BrokerProcess) -> dict:
        if broker.linked:
            self.quiet_links()
        echo = Worker("busx-echo", broker.url, ECHO_TOPIC, script=PEERS)
        requester = Worker("busx-req", broker.url, ECHO_TOPIC, self.pings, self.warmup)
        return round_trips(requester, echo)


def transfer_result(run: peers.Run) -> dict:
    return {"msgs_per_s": run.msgs_per_s, "seconds": run.seconds, "sent": run.count,
            "received": sum(run.received), "lost": run.drops, "reported": sum(run.reported),
            "cpu_us_per_msg": {who: run.cpu_per_message(who) for who in run.cpu}}


def round_trips(requester: Worker, echo: Worker) -> dict:
    try:
        requester.tell("go")
        result = requester.read(REQUEST_TIMEOUT * 2 + 120)
    finally:
        requester.finish()
        echo.finish(5.0)
    if "error" in result:
        raise peers.PeerError(f"{requester.role}: {result['error']}")
    return result


# ---- the schedule and the report

MEASUREMENTS = [
    # key, label, [(variant, label, method)], metric
    ("cross", "across hosts, 1 -> 1, msgs/s",
     [("busx", "busx A -> NATS -> B", lambda b: b.cross_busx()),
      ("nats", "nats-py -> nats-py", lambda b: b.cross_nats())], "msgs_per_s"),
    ("cross_rtt", "across hosts, request/reply",
     [("busx", "busx A -> NATS -> B", lambda b: b.rtt_busx_cross()),
      ("nats", "nats-py -> nats-py", lambda b: b.rtt_nats())], "p50_us"),
    ("local", "local 1 -> 1 on one broker, msgs/s",
     [("linked", "linked to NATS", lambda b: b.local_throughput(b.a)),
      ("plain", "no link", lambda b: b.local_throughput(b.c))], "msgs_per_s"),
    ("local_rtt", "local request/reply on one broker",
     [("linked", "linked to NATS", lambda b: b.local_rtt(b.a)),
      ("plain", "no link", lambda b: b.local_rtt(b.c))], "p50_us"),
]


def run_rounds(bench: Bench, rounds: int) -> dict:
    """results[key][variant] = list of per-round dicts (or {"error": ...})."""
    results: dict = {key: {variant: [] for variant, _, _ in variants}
                     for key, _, variants, _ in MEASUREMENTS}
    for r in range(rounds):
        for key, _, variants, metric in MEASUREMENTS:
            order = variants if r % 2 == 0 else variants[::-1]
            for variant, _, method in order:
                try:
                    outcome = method(bench)
                except peers.PeerError as exc:
                    outcome = {"error": str(exc)[:500]}
                results[key][variant].append(outcome)
                shown = (f"{outcome[metric]:,.0f}" if metric in outcome
                         else f"FAILED: {outcome['error'][:200]}")
                print(f"  round {r + 1}: {key:<9} {variant:<6} {metric} {shown}",
                      file=sys.stderr, flush=True)
    return results


def median_of(runs: list, field: str) -> float | None:
    values = [run[field] for run in runs if field in run]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def drop_cell(runs: list) -> str:
    """Drops summed over rounds: lost (never received), reported to the
    subscriber, the link's dropped_* counters, the server's slow consumers."""
    ok = [run for run in runs if "error" not in run]
    if not ok:
        return "–"
    lost = sum(run["lost"] for run in ok)
    parts = [f"{lost:,}"]
    reported = sum(run["reported"] for run in ok)
    if reported:
        parts.append(f"{reported:,} reported")
    link = sum(sum(v for k, v in run.get("link", {}).items() if "dropped" in k) for run in ok)
    if link:
        parts.append(f"{link:,} in link counters")
    slow = sum(run.get("server_slow_consumers", 0) for run in ok)
    if slow:
        parts.append(f"{slow:,} server slow consumers")
    return ", ".join(parts)


def failures(runs: list) -> str:
    failed = [run["error"] for run in runs if "error" in run]
    return f" ({len(failed)} of {len(runs)} runs failed)" if failed else ""


def print_report(results: dict, rounds: int, count: int, pings: int) -> list[tuple]:
    """Prints the tables; returns the targets as (what, value, goal, met)."""
    targets = []
    print(f"\n### Throughput: {count:,} messages of 100 bytes, 1 publisher -> 1 subscriber "
          f"(median of {rounds})\n")
    print("| measurement | variant | msgs/s | ratio | drops (all rounds) | runs |")
    print("| --- | --- | ---: | ---: | --- | --- |")
    for key, label, variants, metric in MEASUREMENTS:
        if metric != "msgs_per_s":
            continue
        base = median_of(results[key][variants[1][0]], metric)
        for i, (variant, vlabel, _) in enumerate(variants):
            runs = results[key][variant]
            value = median_of(runs, metric)
            cell = fmt(value / base, ".2f") if value and base else "–"
            shown = ", ".join(fmt(run.get(metric)) for run in runs)
            print(f"| {label if i == 0 else ''} | {vlabel} | {fmt(value)} | "
                  f"{cell if i == 0 else '1.00' if base else '–'} | {drop_cell(runs)} | "
                  f"{shown}{failures(runs)} |")
    print(f"\n### Round trips: {pings:,} requests, one in flight, after a warm-up "
          f"(median of {rounds} p50s and p99s)\n")
    print("| measurement | variant | p50 µs | p99 µs | p50 ratio | p50 per run |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for key, label, variants, metric in MEASUREMENTS:
        if metric != "p50_us":
            continue
        base = median_of(results[key][variants[1][0]], "p50_us")
        for i, (variant, vlabel, _) in enumerate(variants):
            runs = results[key][variant]
            p50, p99 = median_of(runs, "p50_us"), median_of(runs, "p99_us")
            cell = fmt(p50 / base, ".2f") if p50 and base else "–"
            shown = ", ".join(fmt(run.get("p50_us")) for run in runs)
            print(f"| {label if i == 0 else ''} | {vlabel} | {fmt(p50)} | {fmt(p99)} | "
                  f"{cell if i == 0 else '1.00' if base else '–'} | {shown}{failures(runs)} |")

    def ratio(key: str, metric: str) -> float | None:
        variants = [variant for m_key, _, vs, _ in MEASUREMENTS if m_key == key
                    for variant, _, _ in vs]
        value = median_of(results[key][variants[0]], metric)
        base = median_of(results[key][variants[1]], metric)
        return value / base if value and base else None

    cross_runs = [run for run in results["cross"]["busx"] if "error" not in run]
    lost = sum(run["lost"] for run in cross_runs)
    targets.append(("across hosts throughput, busx / nats-py" + (
        " (msgs/s of those delivered: see the losses below)" if lost else ""),
        ratio("cross", "msgs_per_s"), "≥ 3", lambda v: v >= 3))
    targets.append(("across hosts, busx messages lost (all rounds)",
                    float(lost) if cross_runs else None, "0", lambda v: v == 0))
    targets.append(("across hosts round trip p50, busx / nats-py", ratio("cross_rtt", "p50_us"),
                    "≤ 1.0", lambda v: v <= 1.0))
    targets.append(("local throughput, linked / no link", ratio("local", "msgs_per_s"),
                    "≥ 0.90", lambda v: v >= 0.9))
    targets.append(("local round trip p50, linked / no link", ratio("local_rtt", "p50_us"),
                    "≤ 1.10", lambda v: v <= 1.1))
    print("\n### Targets (ratios from this run)\n")
    print("| target | measured | goal | |")
    print("| --- | ---: | ---: | --- |")
    verdicts = []
    for what, value, goal, met in targets:
        verdict = "–" if value is None else ("met" if met(value) else "NOT met")
        shown = "–" if value is None else (f"{value:,.0f}" if "lost" in what else f"{value:.2f}")
        print(f"| {what} | {shown} | {goal} | {verdict} |")
        verdicts.append({"target": what, "value": value, "goal": goal, "verdict": verdict})
    local_out = [run.get("link_msgs_out") for run in results["local"]["linked"]
                 if "error" not in run]
    print(f"\nMessages the linked broker sent to NATS during its local runs (nobody across "
          f"the link was interested, so 0 expected): {local_out}")
    for i, run in enumerate(cross_runs):
        link = run["link"]
        dropped = {k: v for k, v in link.items() if "dropped" in k and v}
        print(f"Across hosts, busx run {i + 1}: A sent {link['a_msgs_out']:,} to NATS, B took "
              f"{link['b_msgs_in']:,}, the subscriber got {run['received']:,} of {run['sent']:,} "
              f"({run['reported']:,} drops reported to it); link drops: {dropped or 'none'}; "
              f"link reconnects: {link['reconnects']}; server slow consumers: "
              f"{run['server_slow_consumers']}")
    return verdicts


def machine_lines(server_version: str) -> list[str]:
    return peers.machine_lines(f"nats-py {peers.package_version('nats-py')}; "
                               f"nats-server {server_version}")


def on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, help="messages per throughput run "
                        "(default 200,000; 50,000 with --quick)")
    parser.add_argument("--pings", type=int, help="timed requests per round-trip run "
                        "(default 2,000; 1,000 with --quick)")
    parser.add_argument("--rounds", type=int, help="rounds of every measurement, "
                        "alternating variants (default 5; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer messages and requests")
    parser.add_argument("--nats-buffer", metavar="BYTES",
                        help="the linked brokers' `busx serve --nats-buffer` (default: busx's, 8M)")
    parser.add_argument("--json", metavar="FILE", help="also write every run's numbers here")
    args = parser.parse_args()
    count = args.count or (50_000 if args.quick else 200_000)
    pings = args.pings or (1000 if args.quick else 2000)
    rounds = args.rounds or (3 if args.quick else 5)
    warmup = max(50, pings // 10)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, on_sigterm)
    directory = tempfile.mkdtemp(prefix="busx-backbone-")
    Worker.directory = directory
    bench = None
    try:
        bench = Bench(directory, count, pings, warmup, args.nats_buffer)
        print("\n".join(machine_lines(bench.server_version)))
        print(f"- brokers: `busx serve`, A and B leaf nodes of one nats-server "
              f"(nats_buffer {args.nats_buffer or 'default'}), C the same broker without a "
              f"link; every client a process of its own", flush=True)
        results = run_rounds(bench, rounds)
        verdicts = print_report(results, rounds, count, pings)
        seconds = time.monotonic() - began
        print(f"\n(run took {seconds:.0f} s)")
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"count": count, "pings": pings, "warmup": warmup,
                           "rounds": rounds, "nats_buffer": args.nats_buffer, "seconds": seconds,
                           "machine": machine_lines(bench.server_version),
                           "results": results, "targets": verdicts}, out, indent=1)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C cannot skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if bench is not None:
                bench.close()
        finally:
            kill_all()
            if bench is not None:
                bench.server.stop()
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        main()
