"""What heartbeats cost a broker holding many idle clients.

    python benchmarks/idle_heartbeats.py [--clients 10000] [--seconds 20]

Starts `busx serve` once per heartbeat setting (off, 5 s, 1 s), connects
--clients raw clients that complete the handshake and then only answer the
broker's PINGs (as busx clients do from their I/O thread), and reports the
broker's CPU time over --seconds of idleness, read from /proc. The clients
live in this process (one selector), so their own cost is not counted.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time

import busx
from busx import protocol
from busx._core import encode_frame
from busx.handshake import client_handshake

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS      # utime + stime


def start_broker(directory: str, heartbeat: float) -> tuple[subprocess.Popen, str]:
    path = os.path.join(directory, f"hb-{heartbeat}.sock")
    broker = subprocess.Popen(
        [sys.executable, "-m", "busx", "serve", "--unix", path, "--heartbeat", str(heartbeat),
         "--max-connections", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline or broker.poll() is not None:
            raise SystemExit(f"broker did not start: {broker.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    return broker, path


def connect_idle(path: str, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        client_handshake(sock, path, time.monotonic() + 30, "idle", None, "unix")
        sock.setblocking(False)
        clients.append(sock)
    return clients


def stay_idle(clients: list[socket.socket], seconds: float) -> int:
    """Answer PINGs for `seconds`; returns how many were answered."""
    selector = selectors.DefaultSelector()
    decoders = {}
    for sock in clients:
        selector.register(sock, selectors.EVENT_READ)
        decoders[sock] = protocol.FrameDecoder()
    pong = encode_frame(protocol.PONG)
    answered = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            sock = key.fileobj
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the broker closed an idle client that answered its PINGs")
            for frame in decoders[sock].feed(data):
                if frame.kind == protocol.PING:
                    sock.send(pong)
                    answered += 1
    selector.close()
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients * 2 + 1000), hard))
    directory = tempfile.mkdtemp(prefix="busx-idle-")
    print(f"busx {busx.__version__}: {args.clients:,} idle UNIX clients, "
          f"{args.seconds:g} s, broker CPU from /proc\n")
    print("| heartbeat | broker CPU | CPU share of one core | PINGs answered / s |")
    print("| --- | ---: | ---: | ---: |")
    for heartbeat in (0.0, 5.0, 1.0):
        broker, path = start_broker(directory, heartbeat)
        try:
            clients = connect_idle(path, args.clients)
            settle = stay_idle(clients, 2.0)     # connecting is over: measure from here
            del settle
            before = cpu_seconds(broker.pid)
            answered = stay_idle(clients, args.seconds)
            used = cpu_seconds(broker.pid) - before
            print(f"| {'off' if heartbeat == 0 else f'{heartbeat:g} s'} | {used * 1000:.0f} ms | "
                  f"{used / args.seconds * 100:.2f} % | {answered / args.seconds:,.0f} |")
            for sock in clients:
                sock.close()
        finally:
            broker.terminate()
            broker.wait(30)


if __name__ == "__main__":
    main()
