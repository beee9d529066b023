"""Prometheus metrics for a broker (`busx serve --metrics HOST:PORT`).

Nothing is counted for this: at each scrape the collector reads the
counters the broker keeps anyway (`Broker.stats()`, one snapshot taken
under the loop's lock) and turns them into metric families, so metrics add
no work to the message path. Needs the optional extra `busx[metrics]`
(prometheus-client).

    server = busx.metrics.serve(broker, "127.0.0.1", 9464)
    ...                       # http://127.0.0.1:9464/metrics
    server.close()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import BusError

if TYPE_CHECKING:
    from .broker import Broker

MISSING = ("metrics need prometheus-client, the Prometheus client library: "
           "pip install 'busx[metrics]'")


class BrokerCollector:
    """A prometheus_client collector over one broker's stats()."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        stats = self.broker.stats()
        gauges = [("busx_connections", "Clients connected now.", len(stats["connections"])),
                  ("busx_subscriptions", "Subscriptions held now.", stats["subscriptions"]),
                  ("busx_pending_bytes", "Bytes queued for subscribers, not yet taken.",
                   sum(conn["pending_bytes"] for conn in stats["connections"]))]
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        counters = [
            ("busx_messages_received", "Messages published to the broker.", "msgs_in"),
            ("busx_messages_delivered", "Messages delivered to subscribers.", "msgs_out"),
            ("busx_received_bytes", "Bytes published to the broker.", "bytes_in"),
            ("busx_delivered_bytes", "Bytes delivered to subscribers.", "bytes_out"),
            ("busx_slow_consumer_disconnects", "Subscribers cut off as slow consumers.",
             "slow_consumer_cuts"),
            ("busx_auth_failures", "TCP clients that failed to prove a token.",
             "auth_failures"),
        ]
        for name, text, key in counters:
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        dropped = CounterMetricFamily("busx_messages_dropped", "Messages dropped, by reason.",
                                      labels=["reason"])
        dropped.add_metric(["slow_consumer"], stats["dropped"])
        yield dropped
        denied = CounterMetricFamily("busx_denials", "Requests the policy refused, by action.",
                                     labels=["action"])
        denied.add_metric(["publish"], stats.get("publishes_denied", 0))
        denied.add_metric(["subscribe"], stats.get("subscribes_denied", 0))
        yield denied
        limits = CounterMetricFamily("busx_limits_hit", "Requests refused at a limit, by limit.",
                                     labels=["limit"])
        limits.add_metric(["max_connections"], stats.get("connections_refused", 0))
        limits.add_metric(["max_subscriptions"], stats.get("subscriptions_refused", 0))
        limits.add_metric(["handshake_timeout"], stats.get("handshake_timeouts", 0))
        limits.add_metric(["heartbeat"], stats.get("heartbeat_timeouts", 0))
        yield limits
        if stats.get("nats"):
            yield from nats_families(stats["nats"])


def nats_families(link: dict) -> Iterator[Any]:
    """The NATS link: its state, traffic and drops (SPEC.md, Across hosts)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    yield GaugeMetricFamily("busx_nats_link_up", "1 while the NATS link is up, else 0.",
                            value=1 if link["state"] == "up" else 0)
    yield GaugeMetricFamily("busx_nats_buffered_bytes",
                            "Bytes waiting for the NATS server (outage or slow link).",
                            value=link["buffered_bytes"])
    yield CounterMetricFamily("busx_nats_reconnects", "Times the NATS link was lost.",
                              value=link["reconnects"])
    for direction in ("out", "in"):
        yield CounterMetricFamily(f"busx_nats_messages_{direction}",
                                  f"Messages {'sent to' if direction == 'out' else 'taken from'} "
                                  f"NATS.", value=link[f"msgs_{direction}"])
    dropped = CounterMetricFamily("busx_nats_dropped", "Messages the NATS link dropped, by reason.",
                                  labels=["reason"])
    for reason in ("too_large", "buffer_full", "invalid", "denied"):
        dropped.add_metric([reason], link[f"dropped_{reason}"])
    yield dropped


class MetricsServer:
    """The HTTP endpoint serve() started: `address` is (host, port); close()
    stops it."""

    def __init__(self, httpd: Any, thread: Any) -> None:
        self._httpd, self._thread = httpd, thread
        self.address: tuple[str, int] = httpd.server_address[:2]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def serve(broker: Broker, host: str, port: int) -> MetricsServer:
    """Serve broker's metrics at http://host:port/metrics on a daemon thread
    (port 0 picks a free one). Raises BusError without prometheus-client."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise BusError(MISSING) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(broker))
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise BusError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(httpd, thread)
