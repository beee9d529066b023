"""Two network namespaces joined by a veth pair: a stand-in for two hosts.
The links are created directly inside the namespaces and the addresses
exist only there, so no test traffic can reach a real network."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from support import wait_for

SUBNET_BITS = 24


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)


class NamespacePair:
    """`broker_ns` and `client_ns`, linked by a veth pair with addresses
    `broker_addr` and `client_addr`. Call create(), and destroy() always."""

    def __init__(self, broker_addr: str = "10.213.7.1", client_addr: str = "10.213.7.2") -> None:
        tag = os.urandom(3).hex()
        self.broker_ns, self.client_ns = f"busxtest-{tag}-b", f"busxtest-{tag}-c"
        self.broker_if, self.client_if = f"bxb{tag}", f"bxc{tag}"  # at most 15 chars
        self.broker_addr, self.client_addr = broker_addr, client_addr
        self.made: list[str] = []

    def add_namespaces(self) -> str:
        """Make both namespaces; returns an error text, "" on success."""
        for name in (self.broker_ns, self.client_ns):
            result = ip("netns", "add", name)
            if result.returncode != 0:
                return result.stderr.strip()
            self.made.append(name)
        return ""

    def link(self) -> None:
        check(ip("link", "add", self.broker_if, "netns", self.broker_ns, "type", "veth",
                 "peer", "name", self.client_if, "netns", self.client_ns))
        for ns, interface, address in ((self.broker_ns, self.broker_if, self.broker_addr),
                                       (self.client_ns, self.client_if, self.client_addr)):
            check(ip("-n", ns, "addr", "add", f"{address}/{SUBNET_BITS}", "dev", interface))
            check(ip("-n", ns, "link", "set", "lo", "up"))
            check(ip("-n", ns, "link", "set", interface, "up"))
        for ns, interface in ((self.broker_ns, self.broker_if), (self.client_ns, self.client_if)):
            wait_for(lambda ns=ns, interface=interface: is_up(ns, interface),
                     message=f"{interface} in {ns} did not come up")

    def destroy(self) -> None:
        # Deleting a namespace destroys the veth end inside it, and with it the pair.
        for name in self.made:
            ip("netns", "delete", name)
        self.made = []

    def python(self, ns: str, code: str, *args: str, prefix: tuple[str, ...] = (),
               **popen_args) -> subprocess.Popen:
        """Start python -c code inside namespace ns (after prefix, a command
        such as unshare that then runs the interpreter)."""
        argv = ["ip", "netns", "exec", ns, *prefix, sys.executable, "-c",
                textwrap.dedent(code), *args]
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen_args)


def is_up(ns: str, interface: str) -> bool:
    return " UP " in ip("-n", ns, "-br", "link", "show", "dev", interface).stdout


def check(result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(result.args)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def two_hosts() -> Iterator[NamespacePair]:
    """A linked NamespacePair for one test, destroyed after it; the test is
    skipped where namespaces cannot be made (not root, no `ip netns`)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    pair = NamespacePair()
    try:
        error = pair.add_namespaces()
        if error:
            pytest.skip(f"cannot create a network namespace: {error}")
        pair.link()
        yield pair
    finally:
        pair.destroy()
