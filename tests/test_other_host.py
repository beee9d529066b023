"""The "other host" path for real: the broker listens on a veth address in
one network namespace; the client runs in another network namespace and a
mount namespace where the broker's socket directory is hidden, connects with
host:port, and must stay on TCP while talking to UNIX clients."""

import json
import os
import subprocess

import pytest
from netns import two_hosts

import busx

# Runs in the broker's namespace until the test closes its stdin.
BROKER = """
import json, sys, busx
unix_path, host, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
broker = busx.Broker(unix_path=unix_path, tcp=(host, 0), tokens=tokens or None,
                     allow_anonymous_tcp=not tokens)
broker.start()
print(json.dumps(broker.tcp_address), flush=True)
sys.stdin.read()
broker.stop()
"""

# Subscribes, says "ready", waits for the local client's message, answers,
# reads its own answer back, and reports what it saw as JSON.
CLIENT = """
import json, os, socket, sys
url, unix_path, hostname, token = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if hostname:
    socket.sethostname(hostname)  # in its own UTS namespace: a different host identity
import busx
report = {"pid": os.getpid(), "socket_visible": os.path.exists(unix_path)}
with busx.connect(url, token=token and tuple(token), name="remote", timeout=10) as bus:
    report["transport"] = bus.transport
    sub = bus.subscribe("oh.>")
    print("ready", flush=True)
    local = sub.recv(timeout=20)
    report["local"] = [local.topic, local.data, list(local.sender)]
    bus.publish("oh.remote", "hello from afar")
    own = sub.recv(timeout=20)
    report["own"] = [own.topic, own.data, list(own.sender)]
    report["seen_by_broker"] = [c for c in bus.stats()["connections"] if c["name"] == "remote"]
print(json.dumps(report))
"""

TOKEN = ("edge-1", "s3cret")
VARIANTS = {
    # same hostname and boot id, so the client tries the UNIX path and cannot reach it
    "hidden-socket": {"hide": True, "hostname": "", "token": None, "expected": "tcp"},
    # a different host identity, and a broker that requires tokens
    "other-hostname-token": {"hide": True, "hostname": "busx-elsewhere", "token": TOKEN,
                             "expected": "tcp"},
    # control: with the socket visible the same client moves to UNIX
    "visible-socket": {"hide": False, "hostname": "", "token": None, "expected": "unix"},
}


@pytest.fixture
def hosts():
    with two_hosts() as pair:
        yield pair


@pytest.fixture
def stop_later():
    """Processes to end after the test: close stdin (the broker's stop
    signal), then kill what is still running."""
    processes = []
    yield processes.append
    for proc in processes:
        if proc.returncode is None:
            proc.stdin.close()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_client_on_another_host_talks_through_tcp(hosts, tmp_path, stop_later, variant):
    config = VARIANTS[variant]
    socket_dir = str(tmp_path / "sockets")
    unix_path = os.path.join(socket_dir, "bus.sock")
    tokens = dict([config["token"]]) if config["token"] else {}
    broker = hosts.python(hosts.broker_ns, BROKER, unix_path, hosts.broker_addr,
                          json.dumps(tokens))
    stop_later(broker)
    ready = broker.stdout.readline()
    assert ready, broker.stderr.read()
    host, port = json.loads(ready)
    assert host == hosts.broker_addr

    # The client gets its own mount namespace; the tmpfs hides the socket
    # directory there only (unshare makes the new namespace's mounts private).
    prefix = ("unshare", "--mount", "--uts")
    if config["hide"]:
        prefix += ("sh", "-c", 'mount -t tmpfs busx-hidden "$0" && exec "$@"', socket_dir)
    with busx.connect(f"unix://{unix_path}") as local:
        watcher = local.subscribe("oh.>")
        client = hosts.python(hosts.client_ns, CLIENT, f"{host}:{port}", unix_path,
                              config["hostname"], json.dumps(config["token"]), prefix=prefix)
        stop_later(client)
        assert client.stdout.readline().strip() == "ready", client.stderr.read()
        local.publish("oh.local", "hello remote")
        out, errors = client.communicate(timeout=60)
        assert client.returncode == 0, errors
        from_remote = [m for m in (watcher.recv(timeout=10), watcher.recv(timeout=10))
                       if m.topic == "oh.remote"]

    report = json.loads(out)
    assert report["socket_visible"] is not config["hide"]
    assert report["transport"] == config["expected"]
    # The UNIX publisher is stamped with SO_PEERCRED, whichever way the client came.
    assert report["local"] == ["oh.local", "hello remote",
                               [os.getpid(), os.getuid(), os.getgid(), None, None, None]]
    [remote] = from_remote
    assert remote.data == "hello from afar"
    [seen] = report["seen_by_broker"]
    assert seen["transport"] == config["expected"]
    if config["expected"] == "tcp":
        identity = config["token"][0] if config["token"] else None
        own_sender = report["own"][2]
        assert own_sender[:4] == [None, None, None, identity]
        assert own_sender[4][0] == hosts.client_addr and own_sender[4][1] > 0
        assert remote.sender.pid is None and remote.sender.identity == identity
        assert tuple(remote.sender.address) == tuple(own_sender[4])
        assert seen["address"] == own_sender[4]
    else:
        assert remote.sender.pid == report["pid"] and remote.sender.address is None
