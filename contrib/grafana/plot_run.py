"""Draw what contrib/grafana/busx.json shows, from a real run, so a reader of
the docs sees what they will get: an embedded broker with `busx serve
--metrics`' exporter, scraped over HTTP twice a second while traffic
changes, each panel's series computed as its PromQL query would.

    pip install 'busx[metrics,plot]'
    python contrib/grafana/plot_run.py docs/metrics.png

The run: 30 s; a publisher at about 20,000 msgs/s to two subscribers; at
10 s a subscriber that never reads joins and its messages are dropped; a
client with a wrong token and one subscribing where the policy forbids try
their luck; at 20 s twenty idle clients connect.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request

import busx
from busx import metrics, protocol
from busx.handshake import pack

SECONDS = 30
SCRAPE_EVERY = 0.5
RATE_WINDOW = 2.0       # seconds, as [2s] in a query


def scrape(address: tuple[str, int]) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def never_reading_subscriber(path: str) -> socket.socket:
    """A raw client that subscribes and then never reads: a slow consumer."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    sock.sendall(protocol.PREAMBLE + protocol.encode_frame(protocol.CONNECT, payload=pack({}))
                 + protocol.encode_frame(protocol.SUB, b"plot.flow", id=1))
    return sock


def traffic(broker: busx.Broker, stop: threading.Event, started: float) -> list:
    """Runs the scenario until stop; returns what must be closed after."""
    keep = []
    pub = busx.connect(broker.url)
    subs = [busx.connect(broker.url) for _ in range(2)]
    keep += [pub, *subs]
    queues = [bus.subscribe("plot.flow") for bus in subs]
    readers = [threading.Thread(target=drain, args=(queue, stop), daemon=True) for queue in queues]
    for reader in readers:
        reader.start()
    phase = 0
    while not stop.is_set():
        for _ in range(200):
            pub.publish("plot.flow", {"reading": 21.5})
        time.sleep(0.01)        # pacing the demo's publisher, about 20,000 msgs/s
        elapsed = time.monotonic() - started
        if phase == 0 and elapsed > 10:
            phase = 1
            keep.append(never_reading_subscriber(broker.unix_path))
            host, port = broker.tcp_address
            try:
                busx.connect(f"tcp://{host}:{port}", token=("svc", "wrong"), reconnect=False)
            except busx.AuthenticationFailed:
                pass
            try:
                subs[0].subscribe("secret.plans")
            except busx.PermissionDenied:
                pass
        if phase == 1 and elapsed > 20:
            phase = 2
            keep += [busx.connect(broker.url) for _ in range(20)]
    return keep


def drain(queue, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            queue.recv_many(timeout=0.2)
    except busx.Closed:         # closed under it at the end of the run
        pass


def rate(samples: list, key: tuple) -> tuple[list, list]:
    """rate(key[RATE_WINDOW]) at each sample time."""
    times, values = [], []
    for at, scraped in samples:
        earlier = [(t, s) for t, s in samples if at - RATE_WINDOW - 1e-9 <= t < at]
        if earlier:
            t0, s0 = earlier[0]
            times.append(at)
            values.append((scraped.get(key, 0) - s0.get(key, 0)) / (at - t0))
    return times, values


def gauge(samples: list, key: tuple) -> tuple[list, list]:
    return [at for at, _ in samples], [scraped.get(key, 0) for _, scraped in samples]


def plot(samples: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [
        ("Messages per second", "msgs/s", [
            ("received", rate, ("busx_messages_received_total", ())),
            ("delivered", rate, ("busx_messages_delivered_total", ()))]),
        ("Bytes per second", "bytes/s", [
            ("received", rate, ("busx_received_bytes_total", ())),
            ("delivered", rate, ("busx_delivered_bytes_total", ()))]),
        ("Drops and slow consumers", "msgs/s", [
            ("dropped (slow_consumer)", rate,
             ("busx_messages_dropped_total", (("reason", "slow_consumer"),)))]),
        ("Connections and subscriptions", "count", [
            ("connections", gauge, ("busx_connections", ())),
            ("subscriptions", gauge, ("busx_subscriptions", ()))]),
        ("Security events (total)", "events", [
            ("auth failures", gauge, ("busx_auth_failures_total", ())),
            ("denied subscribe", gauge, ("busx_denials_total", (("action", "subscribe"),)))]),
        ("Queued for subscribers", "bytes", [
            ("pending", gauge, ("busx_pending_bytes", ()))]),
    ]
    figure, axes = plt.subplots(3, 2, figsize=(12, 9), sharex=True)
    start = samples[0][0]
    for ax, (title, unit, series) in zip(axes.flat, panels):
        for label, kind, key in series:
            times, values = kind(samples, key)
            ax.plot([t - start for t in times], values, label=label)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    figure.suptitle("busx broker metrics, scraped twice a second during a 30 s run "
                    "(contrib/grafana/busx.json plots the same series)")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "metrics.png"
    policy = {"rule": [{"uid": os.getuid(), "publish": ["plot.>"], "subscribe": ["plot.>"]}]}
    with tempfile.TemporaryDirectory() as directory:
        with busx.Broker(unix_path=os.path.join(directory, "bus.sock"), tcp=("127.0.0.1", 0),
                         tokens={"svc": "secret"}, policy=policy,
                         max_pending=1 << 20) as broker:
            exporter = metrics.serve(broker, "127.0.0.1", 0)
            stop = threading.Event()
            started = time.monotonic()
            closing: list = []
            runner = threading.Thread(target=lambda: closing.extend(traffic(broker, stop, started)))
            runner.start()
            samples = []
            while time.monotonic() - started < SECONDS:
                samples.append((time.monotonic(), scrape(exporter.address)))
                time.sleep(SCRAPE_EVERY)    # the scrape interval
            stop.set()
            runner.join()
            time.sleep(0.5)     # the drain threads notice `stop` within their 0.2 s timeout
            for thing in closing:
                thing.close()
            exporter.close()
    plot(samples, path)
    print(f"wrote {path} from {len(samples)} scrapes")


if __name__ == "__main__":
    main()
