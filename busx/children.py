"""Child processes for `busx demo` and `busx bench`: each runs `python -m
<module> ...` in a session of its own (so Ctrl-C reaches only the parent,
which stops its children before its broker), with stderr kept in a log file
that says why it died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, NamedTuple

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Child(NamedTuple):
    role: str                   # "publisher", "subscriber 1", ...
    process: subprocess.Popen
    output: IO[bytes] | None    # its stdout, when the parent reads it
    log_path: str               # its stderr


def spawn(children: list[Child], role: str, module: str, args: Sequence[str], workdir: str,
          *, read_output: bool = False) -> Child:
    """Start `python -m module args` and add it to children (for stop_all);
    its stderr goes to workdir/<role>.log. Ctrl-C or SIGTERM meanwhile waits
    until it is in the list (then raises KeyboardInterrupt), so a child is
    never left running untracked."""
    log_path = os.path.join(workdir, role.replace(" ", "-") + ".log")
    with open(log_path, "wb") as log, interrupts_deferred():
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", module, *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if read_output else subprocess.DEVNULL, stderr=log,
            start_new_session=True)
        children.append(Child(role, process, process.stdout, log_path))
    return children[-1]


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (then raise
    KeyboardInterrupt)."""
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise KeyboardInterrupt


def failure_reason(child: Child) -> str:
    """The last line the child wrote to stderr, else its exit status."""
    with open(child.log_path, errors="replace") as log:
        lines = log.read().strip().splitlines()
    return lines[-1] if lines else f"exit status {child.process.returncode}"


def stop_all(children: Sequence[Child]) -> None:
    """Terminate every child still running; kill those that take over 5 s."""
    for child in children:
        if child.process.poll() is None:
            child.process.terminate()
    for child in children:
        try:
            child.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
        if child.output is not None:
            child.output.close()
