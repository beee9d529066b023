"""The `busx` command line: serve, pub, sub, stat, bench, demo (SPEC.md, Command line).

Every command is a thin layer over the public API (busx.Broker, busx.connect),
so what the command line does, a program can do too."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgpack

import busx

from . import bench, events, metrics, protocol, systemd
from .broker import (
    DEFAULT_BUSY_POLL_US,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_FDS,
    DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_NATS_BUFFER,
)
from .children import Child, failure_reason, spawn, stop_all
from .errors import BusError
from .topics import pattern_bytes, topic_bytes

# Commands that wait for messages wait in slices this long, so they can
# notice a --count reached elsewhere or a closed bus promptly.
RECV_SLICE = 0.2
WATCH_INTERVAL = 1.0
PACER_SLACK = 0.01      # seconds of lag `pub --rate` may make up in a burst
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

DEMO_DATA, DEMO_STATS, DEMO_PROGRESS = "demo.data", "demo.stats", "demo.progress"
# The publisher stays at most this many messages ahead of what the subscriber
# has reported receiving: well under what the broker queues for a subscriber
# (max_pending), so the demo shows what busx sustains without dropping.
DEMO_WINDOW = 200_000
DEMO_PROGRESS_EVERY = 20_000
DEMO_MESSAGE = {"pad": bytes(93)}       # msgpack-encodes to exactly 100 bytes
DEMO_BATCH = 1000                       # messages per publish_many call
DEMO_REPORT_INTERVAL = 0.5              # how often the demo subscriber reports its count
DEMO_START_TIMEOUT = 30.0               # for the subscriber process to start and subscribe


class CommandError(Exception):
    """A mistake in what the user asked for (bad file, bad JSON): message, exit 1."""


# ---- argument types ----

def byte_count(text: str) -> int:
    """65536, 64K, 64M, 1G (also 64MiB, 64MB): powers of 1024."""
    match = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte count (such as 65536, 64K, 64M, 1G)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (such as 127.0.0.1:7555)")
    return host, int(port)


def octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal permission mode (such as 0660)")
    return mode


def group_name_or_id(text: str):
    return int(text) if text.isdigit() else text


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
        return value
    return parse


# ---- files ----

def read_toml(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise CommandError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CommandError(f"the {what} {path} is not valid TOML: {exc}") from None


def read_tokens(path: str, what: str = "tokens file") -> dict[str, str]:
    """{identity: secret} from `identity = "secret"` lines."""
    tokens = read_toml(path, what)
    bad = [name for name, secret in tokens.items() if not isinstance(secret, str) or not secret]
    if bad or not tokens:
        check = f" (check {', '.join(bad)})" if bad else ""
        raise CommandError(f'the {what} {path} must hold identity = "secret" lines '
                           f"with non-empty string secrets{check}")
    return tokens


def read_token(path: str) -> tuple[str, str]:
    """(identity, secret) from a file with exactly one `identity = "secret"` line."""
    tokens = read_tokens(path, "token file")
    if len(tokens) != 1:
        raise CommandError(f'the token file {path} must hold exactly one identity = "secret" '
                           f"line, not {len(tokens)}")
    return next(iter(tokens.items()))


def open_bus(args: argparse.Namespace, name: str, **options: Any) -> busx.Bus:
    token_file = getattr(args, "token_file", None)
    token = read_token(token_file) if token_file else None
    return busx.connect(args.url, token=token, name=name, tls_ca=args.tls_ca,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, **options)


# ---- serve ----

def cmd_serve(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(events.JsonFormatter() if args.log_format == "json"
                         else logging.Formatter("busx serve: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    broker = busx.Broker(
        unix_path=args.unix, tcp=args.tcp, socket_mode=args.socket_mode,
        socket_group=args.socket_group, policy=args.policy,
        tokens=read_tokens(args.tokens) if args.tokens else None,
        allow_anonymous_tcp=args.allow_anonymous_tcp, max_pending=args.max_pending,
        slow_consumer=args.slow_consumer, max_frame=args.max_frame,
        max_connections=args.max_connections, max_subscriptions=args.max_subscriptions,
        max_pending_fds=args.max_pending_fds, handshake_timeout=args.handshake_timeout,
        heartbeat=args.heartbeat, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        busy_poll_us=args.busy_poll_us, sockets=systemd.listen_fds(), **nats_options(args))
    # start() (not serve_forever()) so that the line below can name the TCP
    # port actually bound. The stop signals are blocked before the broker's
    # thread exists, so it inherits the mask and they wait for sigwait().
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    exporter = None
    try:
        broker.start()
        try:
            if args.metrics is not None:
                exporter = metrics.serve(broker, *args.metrics)
                host, port = exporter.address
                print(f"busx serve: metrics at http://{host}:{port}/metrics", file=sys.stderr)
            print(f"busx serve: listening on {listen_addresses(broker)} (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)
            systemd.notify("READY=1")
            signal.sigwait(STOP_SIGNALS)
        finally:
            systemd.notify("STOPPING=1")
            if exporter is not None:
                exporter.close()
            broker.stop()
        # A second Ctrl-C pressed while stopping must not turn into a traceback.
        while signal.sigtimedwait(STOP_SIGNALS, 0) is not None:
            pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
    return 0


def nats_options(args: argparse.Namespace) -> dict[str, Any]:
    """busx.Broker's nats* parameters from `busx serve --nats ...`."""
    if not args.nats:
        return {}
    options: dict[str, Any] = {"nats": [url.strip() for url in args.nats.split(",") if url.strip()],
                               "nats_user": args.nats_user, "nats_buffer": args.nats_buffer}
    if args.nats_export:
        options["nats_export"] = args.nats_export
    if args.nats_import:
        options["nats_import"] = args.nats_import
    if args.nats_password_file:
        options["nats_password"] = read_secret(args.nats_password_file, "NATS password file")
    if args.nats_token_file:
        options["nats_token"] = read_secret(args.nats_token_file, "NATS token file")
    options.update(nats_tls_ca=args.nats_tls_ca, nats_tls_cert=args.nats_tls_cert,
                   nats_tls_key=args.nats_tls_key, nats_creds=args.nats_creds)
    return options


def read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise busx.BusError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def listen_addresses(broker: busx.Broker) -> str:
    addresses = [broker.url]
    if broker.tcp_address is not None:
        host, port = broker.tcp_address
        scheme = "tls" if broker.tls else "tcp"
        addresses.append(f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}")
    return " and ".join(addresses)


# ---- pub ----

def cmd_pub(args: argparse.Namespace) -> int:
    topic_bytes(args.topic)     # a bad topic fails before anything is read or sent
    if args.json is not None:
        values: Iterable[Any] = [parse_json(args.json, "the JSON argument")]
    else:
        values = stdin_values()
    pacer = Pacer(args.rate)
    with open_bus(args, "busx pub") as bus:
        for value in values:
            for _ in range(args.count):
                pacer.wait()
                try:
                    bus.publish(args.topic, value)
                except (TypeError, OverflowError) as exc:
                    raise CommandError(f"cannot encode {value!r}: {exc}") from None
        bus.flush()
    return 0


def parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{where} is not valid JSON: {exc}") from None


def stdin_values() -> Iterator[Any]:
    """One JSON value per line of stdin; blank lines are skipped."""
    for number, line in enumerate(sys.stdin, 1):
        if line.strip():
            yield parse_json(line, f"line {number} of stdin")


class Pacer:
    """Keeps calls to `rate` a second (None: no limit) on a fixed schedule, so
    that sleep()'s overshoot at high rates is made up by the next calls. After
    a pause (slow stdin) it catches up by at most PACER_SLACK seconds' worth."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_time = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self.next_time > now:
            time.sleep(self.next_time - now)
        self.next_time = max(self.next_time, now - PACER_SLACK) + self.interval


# ---- sub ----

def cmd_sub(args: argparse.Namespace) -> int:
    pattern_bytes(args.pattern)
    with open_bus(args, "busx sub") as bus:
        sub = bus.subscribe(args.pattern)
        received = reported_drops = 0
        try:
            while args.count is None or received < args.count:
                wanted = 1024 if args.count is None else min(1024, args.count - received)
                for msg in sub.recv_many(max_count=wanted, timeout=RECV_SLICE):
                    print(format_message(msg, args.json, args.sender), flush=True)
                    for fd in msg.fds:      # we own them and have no use for them
                        os.close(fd)
                    received += 1
                if sub.dropped != reported_drops:
                    print(f"busx sub: the broker dropped {sub.dropped - reported_drops} messages "
                          f"for this slow subscriber", file=sys.stderr, flush=True)
                    reported_drops = sub.dropped
        except KeyboardInterrupt:
            pass
    return 0


def format_message(msg: busx.Message, as_json: bool, with_sender: bool) -> str:
    if as_json:
        return dumps({"topic": msg.topic, "data": message_data(msg),
                      "sender": msg.sender._asdict()})
    line = f"{msg.topic} {dumps(message_data(msg))}"
    return f"{line}  [{describe_sender(msg.sender)}]" if with_sender else line


def message_data(msg: busx.Message) -> Any:
    try:
        return jsonable(msg.data)
    except ValueError:      # not msgpack: a foreign client wrote raw bytes
        return {"$undecodable": base64.b64encode(msg.raw).decode()}


def jsonable(value: Any) -> Any:
    """msgpack data in JSON terms: bytes become {"$bytes": base64}, ext types
    {"$ext": code, "$bytes": base64}, keys that are not text their JSON text."""
    if isinstance(value, msgpack.ExtType):
        return {"$ext": value.code, "$bytes": base64.b64encode(value.data).decode()}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {key if isinstance(key, str) else dumps(jsonable(key)): jsonable(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def describe_sender(sender: busx.Credentials) -> str:
    fields = sender._asdict()
    if fields["address"] is not None:
        fields["address"] = "{}:{}".format(*fields["address"])
    return " ".join(f"{name}={value}" for name, value in fields.items() if value is not None)


# ---- stat ----

TABLE_COLUMNS = ("id", "name", "transport", "pid", "uid", "subscriptions", "pending_bytes",
                 "msgs_in", "msgs_out", "dropped", "peer")


def cmd_stat(args: argparse.Namespace) -> int:
    with open_bus(args, "busx stat", reconnect=False) as bus:
        if not args.watch:
            stats = bus.stats()
            print(dumps(stats) if args.json else format_stats(stats))
            return 0
        previous: tuple[float, dict] | None = None
        clear_screen = sys.stdout.isatty() and not args.json
        try:
            while True:
                now, stats = time.monotonic(), bus.stats()
                if args.json:
                    print(dumps(stats), flush=True)
                else:
                    text = format_stats(stats, rates(previous, (now, stats)))
                    print(("\x1b[H\x1b[2J" if clear_screen else "") + text + "\n", flush=True)
                previous = (now, stats)
                time.sleep(WATCH_INTERVAL)      # the refresh period
        except KeyboardInterrupt:
            return 0


RATE_KEYS = ("msgs_in", "msgs_out", "bytes_in", "bytes_out")


def rates(previous: tuple[float, dict] | None, current: tuple[float, dict]) -> dict:
    """Per second since the previous snapshot, msgs and bytes in and out
    (RATE_KEYS): per connection id, and under the key None for the broker as
    a whole. Empty for the first snapshot."""
    if previous is None:
        return {}
    elapsed = max(current[0] - previous[0], 1e-9)

    def per_second(new: dict, old: dict) -> tuple:
        return tuple((new[key] - old[key]) / elapsed for key in RATE_KEYS)

    before = {conn["id"]: conn for conn in previous[1]["connections"]}
    result = {None: per_second(current[1], previous[1])}
    for conn in current[1]["connections"]:
        if conn["id"] in before:
            result[conn["id"]] = per_second(conn, before[conn["id"]])
    return result


def format_stats(stats: dict, rate_table: dict | None = None) -> str:
    rate_columns = ("in/s", "out/s", "B in/s", "B out/s")
    columns = TABLE_COLUMNS + (rate_columns if rate_table is not None else ())
    rows = [columns]
    for conn in stats["connections"]:
        row = [conn.get(name) for name in TABLE_COLUMNS[:-1]] + [peer_of(conn)]
        if rate_table is not None:
            row += ([f"{rate:.0f}" for rate in rate_table.get(conn["id"], ())]
                    or ["-"] * len(rate_columns))
        rows.append(tuple("-" if cell is None else str(cell) for cell in row))
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in rows]
    totals = (f"{len(stats['connections'])} connections, {stats['subscriptions']} subscriptions, "
              f"msgs in {stats['msgs_in']}, out {stats['msgs_out']}, bytes in {stats['bytes_in']}, "
              f"out {stats['bytes_out']}, dropped {stats['dropped']}")
    if rate_table and None in rate_table:
        totals += (", {:.0f} msgs/s in, {:.0f} msgs/s out, {:.0f} B/s in, {:.0f} B/s out"
                   .format(*rate_table[None]))
    return "\n".join(lines + [totals] + ([format_nats(stats["nats"])] if stats.get("nats") else []))


def format_nats(link: dict) -> str:
    """One line on the NATS link (SPEC.md, Across hosts)."""
    where = f"to {link['server']}" if link.get("server") else "(no server)"
    drops = sum(link[f"dropped_{why}"] for why in ("too_large", "buffer_full", "invalid", "denied"))
    line = (f"NATS link {link['state']} {where} as {link['origin']}: msgs out {link['msgs_out']}, "
            f"in {link['msgs_in']}, dropped {drops} (too large {link['dropped_too_large']}, "
            f"buffer full {link['dropped_buffer_full']}, invalid {link['dropped_invalid']}, "
            f"denied {link['dropped_denied']}), "
            f"buffered {link['buffered_bytes']} B, reconnects {link['reconnects']}, "
            f"interest {link['local_interest']} out / {link['remote_interest']} in")
    if link.get("last_error") and link["state"] != "up":
        line += f"; last error: {link['last_error']}"
    return line


def peer_of(conn: dict) -> str | None:
    """For TCP connections: identity@host:port (UNIX ones are told by pid/uid)."""
    if not conn.get("address"):
        return None
    host, port = conn["address"]
    return f"{conn['identity']}@{host}:{port}" if conn.get("identity") else f"{host}:{port}"


# ---- bench (busx/bench.py) ----

def cmd_bench(args: argparse.Namespace) -> int:
    return bench.run(args.url, args.transport, args.size, args.count, args.subscribers,
                     args.json, args.plot)


# ---- demo ----

def cmd_demo(args: argparse.Namespace) -> int:
    # SIGTERM (`timeout`, a service manager) stops the demo as Ctrl-C does:
    # children stopped, broker stopped, temporary directory removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = tempfile.mkdtemp(prefix="busx-demo-")
    try:
        with busx.Broker(unix_path=os.path.join(workdir, "bus.sock")) as broker:
            children: list[Child] = []
            try:
                with busx.connect(broker.url, name="busx demo") as bus:
                    reports = bus.subscribe(DEMO_STATS)
                    spawn(children, "subscriber", "busx.cli", ["_demo-sub", broker.url], workdir)
                    first = read_reports(reports, children, time.monotonic() + DEMO_START_TIMEOUT,
                                         stop_at_first=True)
                    if first is None:
                        raise CommandError(f"the demo subscriber did not start within "
                                           f"{DEMO_START_TIMEOUT:.0f}s")
                    spawn(children, "publisher", "busx.cli", ["_demo-pub", broker.url], workdir)
                    print(f"busx demo: 1 publisher -> broker at {broker.url} -> 1 subscriber, "
                          f"{len(msgpack.packb(DEMO_MESSAGE))}-byte messages (Ctrl-C to stop)",
                          flush=True)
                    show_demo(reports, children, first, args.seconds)
            except KeyboardInterrupt:
                print()
            finally:
                stop_all(children)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def read_reports(reports: busx.Subscription, children: list[Child], until: float,
                 stop_at_first: bool = False) -> dict | None:
    """The newest count report from the subscriber by `until` (None if none
    came); raises CommandError if a child process died."""
    latest = None
    while time.monotonic() < until and not (stop_at_first and latest):
        for msg in reports.recv_many(timeout=min(RECV_SLICE, max(0.0, until - time.monotonic()))):
            latest = msg.data
        for child in children:
            if child.process.poll() is not None:
                raise CommandError(f"the demo {child.role} stopped: {failure_reason(child)}")
    return latest


def show_demo(reports: busx.Subscription, children: list[Child], first: dict,
              seconds: float | None) -> None:
    """A line a second with the subscriber's receive rate, from its own
    reports (counts with CLOCK_MONOTONIC times, comparable across processes)."""
    start = time.monotonic()
    end = math.inf if seconds is None else start + seconds
    shown = latest = first
    while time.monotonic() < end:
        latest = read_reports(reports, children, min(time.monotonic() + 1.0, end)) or latest
        rate = (latest["received"] - shown["received"]) / max(latest["time"] - shown["time"], 1e-9)
        print(f"{time.monotonic() - start:6.1f}s  {rate:>12,.0f} msgs/s received  "
              f"total {latest['received']:,}  dropped {latest['dropped']:,}", flush=True)
        shown = latest
    elapsed = latest["time"] - first["time"]
    print(f"average {(latest['received'] - first['received']) / max(elapsed, 1e-9):,.0f} msgs/s "
          f"over {elapsed:.1f}s", flush=True)


def cmd_demo_publisher(args: argparse.Namespace) -> int:
    with busx.connect(args.url, name="demo publisher", reconnect=False) as bus:
        batch = [(DEMO_DATA, DEMO_MESSAGE)] * DEMO_BATCH
        progress = bus.subscribe(DEMO_PROGRESS)
        sent = received = 0
        while True:     # until the parent terminates this process
            wait = 1.0 if sent - received >= DEMO_WINDOW else 0.0
            for report in progress.recv_many(timeout=wait):
                received = max(received, report.data)
            if sent - received < DEMO_WINDOW:
                bus.publish_many(batch)
                sent += DEMO_BATCH


def cmd_demo_subscriber(args: argparse.Namespace) -> int:
    with busx.connect(args.url, name="demo subscriber", reconnect=False) as bus:
        sub = bus.subscribe(DEMO_DATA)
        received, next_report_time = 0, 0.0
        while True:     # until the parent terminates this process
            now = time.monotonic()
            if now >= next_report_time:
                bus.publish(DEMO_STATS, {"received": received, "dropped": sub.dropped, "time": now})
                next_report_time = now + DEMO_REPORT_INTERVAL
            before = received
            received += len(sub.recv_many(max_count=8192, timeout=next_report_time - now))
            if received // DEMO_PROGRESS_EVERY != before // DEMO_PROGRESS_EVERY:
                bus.publish(DEMO_PROGRESS, received)


# ---- the parser ----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="busx", description="A publish/subscribe message bus over UNIX sockets and TCP.")
    parser.add_argument("--version", action="version", version=f"busx {busx.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve(commands)
    add_client_options(add_pub(commands), add_sub(commands), add_stat(commands))
    add_bench(commands)
    add_demo(commands)
    return parser


def add_serve(commands: Any) -> None:
    """`busx serve` and its limits (defaults from busx.broker)."""
    serve = commands.add_parser("serve", help="run a broker until Ctrl-C or SIGTERM")
    serve.set_defaults(run=cmd_serve)
    serve.add_argument("--unix", metavar="PATH", help="socket path (default: $BUSX_SOCKET, "
                       "else $XDG_RUNTIME_DIR/busx/bus.sock, else /tmp/busx-<uid>/bus.sock)")
    serve.add_argument("--tcp", metavar="HOST:PORT", type=host_port,
                       help="also accept TCP clients here (port 0 picks a free one)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="how log lines (security events among them) are written: "
                            "text, or one JSON object per line (default text)")
    serve.add_argument("--metrics", metavar="HOST:PORT", type=host_port,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(needs busx[metrics])")
    serve.add_argument("--socket-mode", metavar="MODE", type=octal_mode, default=0o600,
                       help="permissions of the socket file, octal (default 0600)")
    serve.add_argument("--socket-group", metavar="GROUP",
                       type=group_name_or_id,
                       help="group name or gid to give the socket to")
    serve.add_argument("--policy", metavar="FILE",
                       help="TOML policy file: who may publish and subscribe to what")
    serve.add_argument("--tokens", metavar="FILE",
                       help='TOML file of identity = "secret" lines; TCP clients must prove one')
    serve.add_argument("--tls-cert", metavar="F",
                       help="certificate chain (PEM): the TCP listener speaks TLS only")
    serve.add_argument("--tls-key", metavar="F", help="the certificate's private key (PEM)")
    serve.add_argument("--tls-client-ca", metavar="F",
                       help="require client certificates signed by this CA (PEM); their "
                            "common name is the client's identity")
    serve.add_argument("--allow-anonymous-tcp", action="store_true",
                       help="accept TCP clients without tokens on a non-loopback address")
    serve.add_argument("--max-pending", metavar="BYTES", type=byte_count,
                       default=DEFAULT_MAX_PENDING,
                       help="bytes queued per subscriber before the slow-consumer policy "
                            f"(default {DEFAULT_MAX_PENDING >> 20}M)")
    serve.add_argument("--slow-consumer", choices=("drop", "disconnect"), default="drop",
                       help="what happens past --max-pending (default drop)")
    serve.add_argument("--max-frame", metavar="BYTES", type=byte_count,
                       default=protocol.DEFAULT_MAX_FRAME,
                       help=f"largest frame accepted (default {protocol.DEFAULT_MAX_FRAME >> 20}M)")
    serve.add_argument("--max-connections", metavar="N", type=int,
                       default=DEFAULT_MAX_CONNECTIONS,
                       help="clients served at once; more are refused (default %(default)s)")
    serve.add_argument("--max-subscriptions", metavar="N", type=int,
                       default=DEFAULT_MAX_SUBSCRIPTIONS,
                       help="subscriptions one connection may hold (default %(default)s)")
    serve.add_argument("--max-pending-fds", metavar="N", type=int,
                       default=DEFAULT_MAX_PENDING_FDS,
                       help="fds queued per subscriber before the slow-consumer policy "
                            "(default %(default)s)")
    serve.add_argument("--handshake-timeout", metavar="S", type=float,
                       default=DEFAULT_HANDSHAKE_TIMEOUT,
                       help="seconds a new connection has to complete its handshake "
                            "(default %(default)g)")
    serve.add_argument("--heartbeat", metavar="S", type=float, default=DEFAULT_HEARTBEAT,
                       help="PING clients idle this long; close those silent three times "
                            "as long (default %(default)g, 0 = off)")
    serve.add_argument("--nats", metavar="URL[,URL...]",
                       help="join a NATS deployment as a leaf node: the leafnodes listeners "
                            "of its servers, nats://host:port (docs/backbone.md)")
    serve.add_argument("--nats-export", metavar="P", action="append",
                       help="send to NATS only topics matching P (repeatable; default >)")
    serve.add_argument("--nats-import", metavar="P", action="append",
                       help="take from NATS only topics matching P (repeatable; default >)")
    serve.add_argument("--nats-user", metavar="USER", help="user name for the NATS server")
    serve.add_argument("--nats-password-file", metavar="F", help="file holding its password")
    serve.add_argument("--nats-creds", metavar="FILE",
                       help="NATS credentials: a creds file (JWT and nkey seed) or an "
                            "nkey seed file, for servers that ask for an nkey")
    serve.add_argument("--nats-token-file", metavar="F",
                       help="file holding the NATS server's authorization token")
    serve.add_argument("--nats-tls-ca", metavar="F",
                       help="CA certificates (PEM) that vouch for the NATS servers "
                            "(tls:// URLs; default: the system's)")
    serve.add_argument("--nats-tls-cert", metavar="F",
                       help="this broker's certificate, for servers that verify leafs")
    serve.add_argument("--nats-tls-key", metavar="F", help="its private key")
    serve.add_argument("--nats-buffer", metavar="BYTES", type=byte_count,
                       default=DEFAULT_NATS_BUFFER,
                       help="bytes for NATS held while the link is down or slow; past it "
                            "they are dropped and counted (default 8M)")
    serve.add_argument("--busy-poll-us", metavar="US", type=int,
                       default=DEFAULT_BUSY_POLL_US,
                       help="poll up to this long after a trickle of traffic before "
                            "sleeping, adapting to the traffic: faster round trips for "
                            "some CPU (default %(default)s, 0 = off)")


def add_pub(commands: Any) -> argparse.ArgumentParser:
    """`busx pub`."""
    pub = commands.add_parser("pub", help="publish JSON values")
    pub.set_defaults(run=cmd_pub)
    pub.add_argument("topic", metavar="TOPIC")
    pub.add_argument("json", metavar="JSON", nargs="?",
                     help="the value to publish; without it, one JSON value per line of stdin")
    pub.add_argument("--count", metavar="N", type=positive(int), default=1,
                     help="publish each value N times (default 1)")
    pub.add_argument("--rate", metavar="R", type=positive(float),
                     help="publish at most R messages a second")
    return pub


def add_sub(commands: Any) -> argparse.ArgumentParser:
    """`busx sub`."""
    sub = commands.add_parser("sub", help="print messages matching a pattern")
    sub.set_defaults(run=cmd_sub)
    sub.add_argument("pattern", metavar="PATTERN", help="such as orders.*.created or orders.>")
    sub.add_argument("--count", metavar="N", type=positive(int), help="exit after N messages")
    sub.add_argument("--json", action="store_true",
                     help='one JSON object a line: {"topic", "data", "sender"}')
    sub.add_argument("--sender", action="store_true", help="show who sent each message")
    return sub


def add_stat(commands: Any) -> argparse.ArgumentParser:
    """`busx stat`."""
    stat = commands.add_parser("stat", help="show the broker's connections and counters")
    stat.set_defaults(run=cmd_stat)
    stat.add_argument("--watch", action="store_true", help="refresh every second, with rates")
    stat.add_argument("--json", action="store_true", help="print the stats as JSON")
    return stat


def add_client_options(pub: argparse.ArgumentParser, sub: argparse.ArgumentParser,
                       stat: argparse.ArgumentParser) -> None:
    """Where the client commands find their broker, and their token."""
    for command in (pub, sub, stat):
        command.add_argument("--url", metavar="URL", help="unix:///path, tcp://host:port, "
                             "tls://host:port or host:port (default: $BUSX_URL, else the "
                             "local broker)")
        command.add_argument("--tls-ca", metavar="F", help="CA certificates (PEM) that vouch "
                             "for the broker over TLS (default: the system's); host:port "
                             "then uses TLS")
        command.add_argument("--tls-cert", metavar="F",
                             help="this client's certificate (PEM), for brokers that ask")
        command.add_argument("--tls-key", metavar="F",
                             help="its private key (PEM; default: in --tls-cert's file)")
    for command in (pub, sub):
        command.add_argument("--token-file", metavar="FILE",
                             help='TOML file with one identity = "secret" line, for TCP')


def add_bench(commands: Any) -> None:
    """`busx bench`."""
    bench_command = commands.add_parser(
        "bench", help="measure throughput and latency: 1 publisher, K subscriber processes")
    bench_command.set_defaults(run=cmd_bench)
    bench_command.add_argument(
        "--url", metavar="URL",
        help="the broker to measure (default: an embedded one on a temporary socket, with TCP "
             "on 127.0.0.1); HOST:PORT allows --transport unix, tcp or both")
    bench_command.add_argument(
        "--transport", choices=("unix", "tcp", "both"),
        help="what to measure, one after the other (default: both, or what --url names)")
    bench_command.add_argument(
        "--size", metavar="B", type=byte_count, default=100,
        help=f"bytes of msgpack payload per message, at least {bench.MIN_SIZE} (default 100)")
    bench_command.add_argument("--count", metavar="N", type=positive(int), default=1_000_000,
                               help="messages to publish (default 1000000)")
    bench_command.add_argument("--subscribers", metavar="K", type=positive(int), default=1,
                               help="subscriber processes, each receiving every message "
                                    "(default 1)")
    bench_command.add_argument("--json", action="store_true",
                               help="print the results as one JSON document")
    bench_command.add_argument("--plot", metavar="FILE.png",
                               help="also save a latency histogram and throughput over time "
                                    "(needs matplotlib: pip install busx[plot])")


def add_demo(commands: Any) -> None:
    """`busx demo`, and its hidden child commands."""
    demo = commands.add_parser(
        "demo", help="embedded broker, one publisher, one subscriber: live msgs/s")
    demo.set_defaults(run=cmd_demo)
    demo.add_argument("--seconds", metavar="N", type=positive(float), help="stop after N seconds")

    # Hidden: the demo's child processes.
    for name, run in (("_demo-pub", cmd_demo_publisher), ("_demo-sub", cmd_demo_subscriber)):
        child = commands.add_parser(name)
        child.set_defaults(run=run)
        child.add_argument("url")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the busx command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (BusError, CommandError, bench.BenchError) as exc:
        print(f"busx {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`busx sub ... | head`): stop quietly, with
        # stdout on /dev/null so the interpreter's last flush does not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
