"""Transport selection: unix://, tcp://, automatic host:port, URL lists,
default URLs from the environment, and the errors a client gets when there
is no broker, a non-busx server, or a socket that keeps its user out."""

import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
from support import run_python, wait_for

import busx

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as uid 65534")

# Child prologue: import what it needs as root (the interpreter may live under
# /root, unreadable to nobody; getaddrinfo imports the idna codec lazily), then
# drop to nobody, so only the connection itself meets the lower privileges.
AS_NOBODY = f"""
import encodings.idna, json, os, sys, busx
os.setgroups([])
os.setgid({NOBODY})
os.setuid({NOBODY})
"""


def auto_url(broker):
    host, port = broker.tcp_address
    return f"{host}:{port}"


def round_trip(bus, topic="t.ping"):
    sub = bus.subscribe(topic)
    bus.publish(topic, {"via": bus.transport})
    assert sub.recv(timeout=5).data == {"via": bus.transport}
    sub.unsubscribe()


@pytest.fixture
def shared_dir():
    """A socket directory every user may search, so only socket_mode decides."""
    path = tempfile.mkdtemp(prefix="busx-transport-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def reserved_port():
    """A TCP port bound but not listening: connecting to it is refused."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


# ---- explicit transports ----

def test_unix_url_uses_unix(broker):
    with busx.connect(broker.url) as bus:
        assert bus.transport == "unix"
        round_trip(bus)


def test_tcp_url_uses_tcp_even_on_the_same_host(broker, tcp_url):
    with busx.connect(tcp_url) as bus:
        assert bus.transport == "tcp"
        round_trip(bus)


def test_plain_path_is_a_unix_url(broker):
    with busx.connect(broker.unix_path) as bus:
        assert bus.transport == "unix"


# ---- automatic host:port ----

def wait_for_connections(broker, name, count):
    def named():
        found = [c for c in broker.stats()["connections"] if c["name"] == name]
        return found if len(found) == count else None
    return wait_for(named, message=f"broker never showed {count} connection(s) named {name!r}")


def test_host_port_moves_to_the_unix_socket_on_the_same_host(broker):
    with busx.connect(auto_url(broker), name="auto") as bus:
        assert bus.transport == "unix"
        sub = bus.subscribe("auto.x")
        bus.publish("auto.x", 1)
        sender = sub.recv(timeout=5).sender
        assert sender.pid == os.getpid() and sender.address is None
        # The broker sees exactly one connection for it, on UNIX: the TCP one
        # used for the handshake was closed.
        mine = wait_for_connections(broker, "auto", 1)
        assert mine[0]["transport"] == "unix"


def test_host_port_stays_on_tcp_when_the_unix_path_is_gone(broker):
    os.unlink(broker.unix_path)  # the broker still listens; its path no longer leads there
    with busx.connect(auto_url(broker)) as bus:
        assert bus.transport == "tcp"
        round_trip(bus)


def test_host_port_stays_on_tcp_when_the_path_leads_to_another_broker(broker, tmp_path):
    # Move the first broker's socket away and start a second broker at the
    # announced path: the client must notice the instance differs.
    os.rename(broker.unix_path, str(tmp_path / "moved.sock"))
    with busx.Broker(unix_path=broker.unix_path) as impostor:
        with busx.connect(auto_url(broker)) as bus:
            assert bus.transport == "tcp"
            round_trip(bus)
        # The client's probe of the path connected and left: the impostor
        # sees it go when its loop reads the EOF.
        wait_for(lambda: impostor.stats()["connections"] == [],
                 message="the probe connection to close at the impostor")


PUBLISH_TRANSPORT_AS_NOBODY = AS_NOBODY + """
with busx.connect(sys.argv[1]) as bus:
    bus.publish("nobody.hello", bus.transport)
    print(bus.transport)
"""


@needs_root
@pytest.mark.parametrize("socket_mode, expected", [(0o600, "tcp"), (0o666, "unix")],
                         ids=["refused-stays-on-tcp", "admitted-moves-to-unix"])
def test_host_port_moves_to_unix_only_when_the_socket_admits_the_user(
        shared_dir, socket_mode, expected):
    path = os.path.join(shared_dir, "bus.sock")
    with busx.Broker(unix_path=path, tcp=("127.0.0.1", 0), socket_mode=socket_mode) as broker, \
            busx.connect(broker.url) as local:
        sub = local.subscribe("nobody.>")
        result = run_python(PUBLISH_TRANSPORT_AS_NOBODY, auto_url(broker), timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
        msg = sub.recv(timeout=5)
        assert msg.data == expected
        if expected == "tcp":
            assert msg.sender.pid is None and msg.sender.address[0] == "127.0.0.1"
        else:
            assert (msg.sender.uid, msg.sender.gid) == (NOBODY, NOBODY)


@needs_root
def test_connect_raises_permission_denied_when_the_socket_refuses_the_user(shared_dir):
    path = os.path.join(shared_dir, "bus.sock")
    with busx.Broker(unix_path=path, socket_mode=0o600) as broker:
        result = run_python(AS_NOBODY + """
try:
    busx.connect(sys.argv[1], timeout=5)
except busx.PermissionDenied as exc:
    print(json.dumps({"builtin": isinstance(exc, PermissionError), "message": str(exc)}))
else:
    print(json.dumps({"connected": True}))
""", broker.url, timeout=30)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        assert outcome.get("builtin") is True, outcome
        assert path in outcome["message"]
        with busx.connect(broker.url) as bus:  # root still gets in
            round_trip(bus)


# ---- URL lists ----

def test_url_list_is_tried_in_order(broker, tmp_path, reserved_port):
    dead = [f"unix://{tmp_path}/nobody-here.sock", f"tcp://127.0.0.1:{reserved_port}"]
    with busx.connect(dead + [broker.url]) as bus:
        assert bus.transport == "unix"
        round_trip(bus)
    host, port = broker.tcp_address
    with busx.connect([dead[0], f"tcp://{host}:{port}", broker.url]) as bus:
        assert bus.transport == "tcp"  # the first live URL wins, not the best one


def test_url_list_all_dead_names_every_url(tmp_path, reserved_port):
    urls = [f"unix://{tmp_path}/a.sock", f"tcp://127.0.0.1:{reserved_port}"]
    with pytest.raises(busx.ConnectError) as caught:
        busx.connect(urls, timeout=2)
    for url in urls:
        assert url in str(caught.value)


# ---- no broker, or not a broker ----

@pytest.mark.parametrize("kind", ["unix", "tcp", "auto"])
def test_connect_without_broker_raises_connect_error_promptly(kind, tmp_path, reserved_port):
    url = {"unix": f"unix://{tmp_path}/bus.sock", "tcp": f"tcp://127.0.0.1:{reserved_port}",
           "auto": f"127.0.0.1:{reserved_port}"}[kind]
    started = time.monotonic()
    with pytest.raises(busx.ConnectError) as caught:
        busx.connect(url, timeout=5)
    assert time.monotonic() - started < 1.0, "a refused connect must not wait for the timeout"
    assert isinstance(caught.value, ConnectionError)
    assert url in str(caught.value) and "busx serve" in str(caught.value)


class FakeServer:
    """A TCP server that is not a busx broker: it sends `greeting` to each
    client (or nothing) and then closes it or leaves it open."""

    def __init__(self, greeting: bytes, close: bool):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.greeting, self.close_after = greeting, close
        self.clients = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def port(self):
        return self.listener.getsockname()[1]

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.clients.append(client)
            if self.greeting:
                client.sendall(self.greeting)
            if self.close_after:
                client.close()

    def stop(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)
        for client in self.clients:
            client.close()


@pytest.mark.parametrize("greeting, close", [
    (b"", False),                                   # silent: a black hole
    (b"", True),                                    # accepts and hangs up
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", False),   # another protocol
    (b"SSH-2.0-OpenSSH_9.6\r\n", True),
    (b"BUSX\x02\x00\x00\x00", False),               # a future protocol version
    (b"BUSX\x01\x00\x00\x00", False),               # preamble, then silence
], ids=["silent", "hangs-up", "http", "ssh", "version-2", "preamble-only"])
@pytest.mark.parametrize("scheme", ["tcp://", ""])
def test_a_server_that_is_not_a_broker_raises_connect_error_within_the_timeout(
        greeting, close, scheme):
    server = FakeServer(greeting, close)
    try:
        url = f"{scheme}127.0.0.1:{server.port}"
        started = time.monotonic()
        with pytest.raises(busx.ConnectError) as caught:
            busx.connect(url, timeout=1.0)
        assert time.monotonic() - started < 2.0
        assert url in str(caught.value)
    finally:
        server.stop()


def test_a_unix_socket_that_is_not_a_broker_raises_connect_error(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(path)
        silent.listen()
        started = time.monotonic()
        with pytest.raises(busx.ConnectError):
            busx.connect(f"unix://{path}", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 2.0


@pytest.mark.parametrize("url", [
    "", "http://127.0.0.1:7555", "unix://relative/bus.sock", "localhost", "localhost:",
    ":7555", "localhost:port", "localhost:0", "localhost:65536", "tcp://localhost", [],
])
def test_bad_urls_raise_bus_error(url):
    with pytest.raises(busx.BusError):
        busx.connect(url, timeout=1)


# ---- default URL from the environment ----

def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("BUSX_URL", "BUSX_SOCKET", "XDG_RUNTIME_DIR")}
    env.update(extra)
    return env


CONNECT_DEFAULT = """
import busx
with busx.connect() as bus:
    bus.publish("env.hello", bus.transport)
    print(bus.transport)
"""


@pytest.mark.parametrize("variable, expected", [
    ("BUSX_URL=unix", "unix"), ("BUSX_URL=tcp", "tcp"), ("BUSX_URL=auto", "unix"),
    ("BUSX_SOCKET", "unix"), ("BUSX_URL=tcp+BUSX_SOCKET", "tcp"),
])
def test_default_url_comes_from_the_environment(broker, tmp_path, variable, expected):
    host, port = broker.tcp_address
    env = {
        "BUSX_URL=unix": clean_env(BUSX_URL=broker.url),
        "BUSX_URL=tcp": clean_env(BUSX_URL=f"tcp://{host}:{port}"),
        "BUSX_URL=auto": clean_env(BUSX_URL=f"{host}:{port}"),
        "BUSX_SOCKET": clean_env(BUSX_SOCKET=broker.unix_path),
        # BUSX_URL wins over BUSX_SOCKET (which here leads nowhere)
        "BUSX_URL=tcp+BUSX_SOCKET": clean_env(BUSX_URL=f"tcp://{host}:{port}",
                                              BUSX_SOCKET=str(tmp_path / "nothing.sock")),
    }[variable]
    with busx.connect(broker.url) as local:
        sub = local.subscribe("env.hello")
        result = run_python(CONNECT_DEFAULT, env=env, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
        assert sub.recv(timeout=5).data == expected


def test_default_path_under_xdg_runtime_dir(tmp_path):
    # Broker and client both resolve the default path in the same environment.
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = run_python("""
import busx, json
with busx.Broker() as broker, busx.connect() as bus:
    sub = bus.subscribe("x")
    bus.publish("x", 1)
    print(json.dumps([broker.url, bus.transport, sub.recv(timeout=5).data]))
""", env=clean_env(XDG_RUNTIME_DIR=str(runtime)), timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [f"unix://{runtime}/busx/bus.sock", "unix", 1]


def test_no_broker_at_the_default_path_names_it(tmp_path):
    result = run_python("""
import busx
try:
    busx.connect(timeout=2)
except busx.ConnectError as exc:
    print(exc)
""", env=clean_env(BUSX_SOCKET=str(tmp_path / "none.sock")), timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"unix://{tmp_path}/none.sock" in result.stdout and "busx serve" in result.stdout


# ---- TCP_NODELAY ----

def nodelay_of_tcp_sockets(port):
    """TCP_NODELAY of every connected TCP socket in this process with `port`
    at either end (the broker and the clients both run in this process)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ends = (sock.getsockname()[1], sock.getpeername()[1])
            except OSError:
                continue  # a listener
            if port in ends:
                found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    return found


def test_tcp_round_trips_are_not_delayed_by_nagle(broker, tcp_url):
    with busx.connect(tcp_url) as server, busx.connect(tcp_url) as client:
        requests = server.subscribe("echo")
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                try:
                    msg = requests.recv(timeout=0.1)
                except busx.Timeout:
                    continue
                msg.respond(msg.data)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            client.request("echo", -1, timeout=5)  # warm up (creates the inbox)
            started = time.monotonic()
            for i in range(50):
                assert client.request("echo", i, timeout=5).data == i
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            thread.join(5)
        # With Nagle + delayed ACKs each round trip costs ~40 ms (2 s for 50).
        assert elapsed < 1.0, f"50 TCP round trips took {elapsed:.2f}s"
        flags = nodelay_of_tcp_sockets(broker.tcp_address[1])
        assert len(flags) == 4, flags  # both ends of both connections
        assert all(flags), f"TCP_NODELAY missing on some sockets: {flags}"
