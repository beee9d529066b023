"""Where a 1 MiB payload's time goes: each step a busx message takes over
UNIX, timed on its own, beside the C limit's two copies.

    python benchmarks/payload_copies.py [--rounds 400]

A large payload travels in a sealed memfd (docs/protocol.md): the publisher
makes one and writes the payload into it (fresh pages: the seals forbid
reusing a file), the broker passes the fd on, and the subscriber maps it
and copies the payload out for msg.data. The C limit in compare.py writes
into a socketpair and reads out of it. Each row here is the median time of
one step, in this process, so the steps can be added up and set against the
end-to-end figures of compare.py.
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import time

SIZE = 1 << 20
SEALS = getattr(os, "F_SEAL_SHRINK", 2) | getattr(os, "F_SEAL_GROW", 4) | getattr(
    os, "F_SEAL_WRITE", 8) | getattr(os, "F_SEAL_SEAL", 1)
F_ADD_SEALS = 1033


def median_us(step, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    import fcntl
    payload = os.urandom(SIZE)
    made: list[int] = []

    def make_memfd():
        fd = os.memfd_create("busx-payload", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, payload)
        fcntl.fcntl(fd, F_ADD_SEALS, SEALS)
        made.append(fd)

    def copy_out():
        fd = made.pop()
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            bytes(mapped)
        os.close(fd)

    left, right = socket.socketpair()
    for sock in (left, right):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    into = bytearray(SIZE)

    def through_socket():
        view = memoryview(payload)
        sent = got = 0
        while got < SIZE:
            if sent < SIZE:
                sent += left.send(view[sent:sent + (256 << 10)])
            got += right.recv_into(memoryview(into)[got:], SIZE - got)

    def plain_copy():
        bytes(bytearray(payload))

    rows = []
    make = median_us(make_memfd, args.rounds)
    out = median_us(copy_out, args.rounds)
    rows.append(("publisher: memfd_create, write 1 MiB into fresh pages, seal", make))
    rows.append(("subscriber: mmap, copy 1 MiB out (msg.data), munmap, close", out))
    rows.append(("busx's two steps together", make + out))
    rows.append(("the C limit's path: 1 MiB through a socketpair (write + read)",
                 median_us(through_socket, args.rounds)))
    rows.append(("one plain copy of 1 MiB in user space (for scale)",
                 median_us(plain_copy, args.rounds) / 2))
    print(f"1 MiB payloads, median of {args.rounds} rounds each, µs per payload\n")
    print("| step | µs | MB/s if alone |\n| --- | ---: | ---: |")
    for name, micros in rows:
        print(f"| {name} | {micros:,.0f} | {SIZE / micros:,.0f} |")


if __name__ == "__main__":
    main()
