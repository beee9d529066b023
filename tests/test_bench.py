"""`busx bench`, run as a real process: an embedded broker or one of ours,
a real publisher process and real subscriber processes."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import msgpack
import pytest
from support import wait_for

import busx
from busx import bench

CLI = [sys.executable, "-m", "busx.cli", "bench"]
COUNT = 20_000      # 2.6 MB on the wire: far below max_pending, so nothing may be dropped
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_bench(*args: str, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def bench_json(*args: str) -> dict:
    result = run_bench("--count", str(COUNT), "--json", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""      # not a terminal: no progress bar
    return json.loads(result.stdout)


def assert_plausible(run: dict, subscribers: int) -> None:
    """Rates above zero, every message delivered, percentiles in order."""
    assert run["publisher"]["msgs_per_s"] > 0 and run["publisher"]["mb_per_s"] > 0
    assert len(run["subscribers"]) == subscribers
    for result in [*run["subscribers"], run["aggregate"]]:
        assert result["msgs_per_s"] > 0 and result["mb_per_s"] > 0
        assert result["missing"] == 0 and result["dropped"] == 0
        latency = result["latency_ns"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert run["aggregate"]["received"] == COUNT * subscribers


@pytest.mark.parametrize("transport, expected", [("unix", ["unix"]), ("tcp", ["tcp"]),
                                                 ("both", ["unix", "tcp"])])
def test_bench_reports_plausible_numbers(transport, expected):
    document = bench_json("--transport", transport)
    assert (document["count"], document["size"], document["subscribers"]) == (COUNT, 100, 1)
    assert document["broker"] == "embedded"
    assert [run["transport"] for run in document["runs"]] == expected
    for run in document["runs"]:
        assert_plausible(run, subscribers=1)
        assert run["subscribers"][0]["received"] == COUNT
        publisher = run["publisher"]
        assert publisher["mb_per_s"] == pytest.approx(publisher["msgs_per_s"] * 100 / 1e6,
                                                      rel=1e-3)


@pytest.mark.timeout(90)
def test_bench_with_two_subscribers():
    document = bench_json("--transport", "unix", "--subscribers", "2")
    run, = document["runs"]
    assert_plausible(run, subscribers=2)
    assert [sub["received"] for sub in run["subscribers"]] == [COUNT, COUNT]
    # The aggregate's percentiles are those of all latencies together, so
    # each lies between the subscribers' own.
    for name in ("p50", "p90", "p99", "max"):
        own = [sub["latency_ns"][name] for sub in run["subscribers"]]
        assert min(own) <= run["aggregate"]["latency_ns"][name] <= max(own)


def test_bench_table_names_every_role_and_explains_latency():
    result = run_bench("--count", str(COUNT), "--transport", "unix", "--subscribers", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("busx bench: 1 publisher, 2 subscribers, 20,000 messages of 100 B")
    header = lines[2].split()
    assert header == ["transport", "role", "msgs/s", "MB/s", "p50", "p90", "p99", "max",
                      "dropped", "missing"]
    rows = {}
    for line in lines[3:7]:
        transport, role, cells = re.fullmatch(
            r"(\w+)\s+(publisher|subscriber \d|all subscribers)\s+(.*)", line).groups()
        assert transport == "unix"
        rows[role] = cells.split()
    assert list(rows) == ["publisher", "subscriber 1", "subscriber 2", "all subscribers"]
    assert len(rows["publisher"]) == 2      # msgs/s and MB/s only
    for role in ("subscriber 1", "subscriber 2", "all subscribers"):
        assert len(rows[role]) == 8 and rows[role][-2:] == ["0", "0"]   # dropped, missing
    assert lines[7] == "" and "queueing latency" in lines[9]


@pytest.mark.parametrize("size", [21, 277, 1000])
def test_messages_are_exactly_size_bytes_of_stamped_msgpack(broker, size):
    """Watch the bench's own topic: every message is --size bytes of msgpack
    carrying a 16-byte stamp (sequence number, send time) in order. 277 needs
    a nil: a lone bin cannot pack to that size."""
    with busx.connect(broker.url, name="observer") as observer:
        sub = observer.subscribe("bench.>")
        result = run_bench("--url", broker.url, "--count", "2000", "--size", str(size), "--json")
        assert result.returncode == 0, result.stderr
        messages: list = []
        deadline = time.monotonic() + 10
        while len(messages) < 2000 and time.monotonic() < deadline:
            messages += sub.recv_many(max_count=4000, timeout=1)
    stamps = [msg.data[0] for msg in messages[:2000]]
    assert {len(msg.raw) for msg in messages[:2000]} == {size}
    assert all(msgpack.unpackb(msg.raw) == msg.data for msg in messages[:2000])
    assert [int.from_bytes(stamp[:8], "little") for stamp in stamps] == list(range(2000))


def test_bench_uses_a_broker_given_by_url(broker, tcp_url):
    """HOST:PORT names both transports of one broker: tcp:// for tcp, the
    automatic move to its UNIX socket for unix."""
    host_port = tcp_url.removeprefix("tcp://")
    document = bench_json("--url", host_port, "--transport", "both")
    assert document["broker"] == host_port
    assert [(run["transport"], run["url"]) for run in document["runs"]] == [
        ("unix", host_port), ("tcp", tcp_url)]
    for run in document["runs"]:
        assert_plausible(run, subscribers=1)
    # The runs went through this broker.
    assert broker.stats()["msgs_in"] >= 2 * COUNT


def test_bench_over_a_unix_url_runs_unix_only(broker):
    document = bench_json("--url", broker.url)
    assert [(run["transport"], run["url"]) for run in document["runs"]] == [("unix", broker.url)]


@pytest.mark.parametrize("args, status, message", [
    (["--size", "20"], 1, "--size 20 is too small: a message needs at least 21 bytes"),
    (["--size", "lots"], 2, "is not a byte count"),
    (["--count", "0"], 2, "--count: 0 must be greater than 0"),
    (["--subscribers", "0"], 2, "--subscribers: 0 must be greater than 0"),
    (["--transport", "udp"], 2, "invalid choice: 'udp'"),
    (["--url", "unix:///nowhere/bus.sock", "--transport", "tcp"], 1,
     "--transport tcp cannot run over unix:///nowhere/bus.sock: it is a unix URL"),
    (["--url", "unix:///nowhere/bus.sock"], 1, "no broker at unix:///nowhere/bus.sock"),
])
def test_bad_arguments_exit_non_zero_with_a_clear_message(args, status, message):
    result = run_bench(*args)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_size_beyond_max_frame_is_reported_as_payload_too_large(socket_path):
    """The publisher's PayloadTooLarge reaches the user, not a hang or a
    misleading Timeout (which `busx bench --size 100M` once reported)."""
    with busx.Broker(unix_path=socket_path, max_frame=4096) as small:
        result = run_bench("--url", small.url, "--size", "8K", "--count", "10")
    assert result.returncode == 1
    assert "the bench publisher stopped: PayloadTooLarge" in result.stderr, result.stderr


def test_publish_beyond_max_frame_raises_payload_too_large(socket_path):
    """SPEC.md: a payload that cannot fit max_frame raises PayloadTooLarge and
    sends nothing. (Regression: _client.pxi returned PARSE_TOO_LARGE, which
    shared the value -2 with APPEND_TIMEOUT, so callers got Timeout.)"""
    with busx.Broker(unix_path=socket_path, max_frame=4096) as small, \
            busx.connect(small.url) as bus:
        with pytest.raises(busx.PayloadTooLarge):
            bus.publish("big", bytes(8192))
        with pytest.raises(busx.PayloadTooLarge):
            bus.publish_many([("big", bytes(8192))])
        bus.flush(timeout=5)        # nothing was sent; the bus is still usable


def test_progress_bar_on_a_terminal():
    """With stderr on a terminal, a bar redrawn in place, erased at the end."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen([*CLI, "--count", "300000", "--transport", "unix"],
                                   stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        shown = b""
        while True:     # until the pty reports the child closed it (EIO)
            if not select.select([controller], [], [], 60)[0]:
                pytest.fail(f"no output for 60s; so far: {shown!r}")
            try:
                chunk = os.read(controller, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=60) == 0
        assert b"busx bench:" in process.stdout.read()
        process.stdout.close()
    finally:
        os.close(controller)
    assert b"\runix [" in shown and b"300,000 msgs" in shown, shown
    assert shown.endswith(b"\r\x1b[K")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_bench_stops_its_children_and_cleans_up(stop_signal):
    scratch = tempfile.mkdtemp(prefix="bx-", dir="/tmp")
    try:
        process = subprocess.Popen([*CLI, "--count", "100000000", "--transport", "unix"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "TMPDIR": scratch})
        children_file = f"/proc/{process.pid}/task/{process.pid}/children"
        children = wait_for(lambda: len(read_pids(children_file)) >= 2 and read_pids(children_file),
                            timeout=30, message="the bench never started its publisher")
        process.send_signal(stop_signal)
        assert process.wait(timeout=30) == 130
        assert "Traceback" not in process.stderr.read()
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert os.listdir(scratch) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
        shutil.rmtree(scratch)


def read_pids(path: str) -> list[int]:
    try:
        with open(path) as file:
            return [int(pid) for pid in file.read().split()]
    except FileNotFoundError:
        return []


def png_text(path) -> dict[str, str]:
    """The tEXt chunks of a PNG file (where save_plot writes its panel titles)."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    text, at = {}, len(PNG_SIGNATURE)
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"tEXt":
            key, _, value = data[at + 8:at + 8 + length].partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        at += 12 + length
    return text


def test_plot_of_a_short_run_shows_latency_percentiles_and_throughput_bars(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    result = run_bench("--count", str(COUNT), "--subscribers", "2", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    # A run of a fraction of a second has no shape over time: no such panel.
    text = png_text(plot)
    assert text["Description"] == "Latency by percentile; Throughput by role"
    # pyzmq beside busx, over the same transports, when it is installed.
    assert text["Comment"] == ("unix, tcp, pyzmq ipc, pyzmq tcp" if bench.zmq_available()
                               else "unix, tcp")


def test_plot_of_a_long_run_adds_throughput_over_time_at_a_resolution_that_suits_it(tmp_path):
    """save_plot given a 6-second run's data: 50 points over the run, not
    one per 20 ms sample."""
    pytest.importorskip("matplotlib")
    step = bench.SAMPLE_INTERVAL_NS
    samples = [(at, at // 10_000) for at in range(step, 6_000_000_000 + 1, step)]
    latencies = [sorted(range(1000, 101_000, 100))]
    summary = {"transport": "unix", "publisher": {"msgs_per_s": 100_000.0},
               "subscribers": [{"msgs_per_s": 99_000.0, "missing": 0}], "aggregate": {"seconds": 6.0}}
    document = {"count": 600_000, "size": 100, "subscribers": 1, "broker": "embedded"}
    plot = tmp_path / "long.png"
    titles = bench.save_plot(str(plot), document,
                             [bench.Run(summary, latencies, samples, [samples])])
    assert titles == ["Latency by percentile", "Throughput by role", "Throughput over time"]
    assert png_text(plot)["Description"] == "; ".join(titles)
    assert 45 <= len(bench.rebin(samples, int(6e9 / bench.TIMELINE_POINTS))) <= 51


def test_plot_with_an_unknown_format_fails_before_running(tmp_path):
    pytest.importorskip("matplotlib")
    started = time.monotonic()
    result = run_bench("--plot", str(tmp_path / "bench.nope"))      # 1,000,000 messages if run
    assert result.returncode == 1
    assert "--plot" in result.stderr and ".png" in result.stderr and result.stdout == ""
    assert time.monotonic() - started < 20


def test_plot_without_matplotlib_says_what_to_install(tmp_path):
    """A matplotlib that cannot be imported stands in for an absent one."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    result = run_bench("--plot", str(tmp_path / "bench.png"),
                       env={**os.environ, "PYTHONPATH": str(shadow.parent)})
    assert result.returncode == 1
    assert result.stderr == "busx bench: --plot needs matplotlib: pip install busx[plot]\n"
    assert not (tmp_path / "bench.png").exists()
