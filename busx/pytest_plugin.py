"""pytest fixtures for testing services that use busx, each test against its
own throwaway broker. See docs/testing.md.

    def test_orders_are_announced(busx_client):
        sub = busx_client.subscribe("orders.>")
        place_order(busx_client, 42)            # the code under test
        assert sub.recv(timeout=5).data == {"id": 42}

Fixtures: busx_broker, busx_url, busx_tcp_url, busx_client, busx_connect.
The broker is per test; set the ini option `busx_broker_scope` (for example
to "session") to share one.

Enable with `-p busx.pytest_plugin` or `pytest_plugins = ["busx.pytest_plugin"]`
in a conftest.py (automatic once the package registers its pytest11 entry point).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

# busx is imported inside the fixtures, not here: an installed plugin is
# imported at pytest start-up, before coverage tools begin measuring busx.
if TYPE_CHECKING:
    import busx

SCOPE_OPTION = "busx_broker_scope"


class BusFactory(Protocol):
    """The type of busx_connect: busx.connect's parameters, url defaulting to
    the test broker's."""

    def __call__(self, url: str | None = None, **options: Any) -> busx.Bus: ...


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(SCOPE_OPTION, "pytest scope of the busx_broker fixture "
                  "(function, module, package or session)", default="function")


def _broker_scope(fixture_name: str, config: pytest.Config) -> Any:
    return config.getini(SCOPE_OPTION)


@pytest.fixture(scope=_broker_scope)
def busx_broker() -> Iterator[busx.Broker]:
    """A busx.Broker running on a background thread, on a UNIX socket in a
    fresh private directory and on TCP 127.0.0.1 (a free port). Stopped, its
    socket file and directory removed, at teardown."""
    import busx

    # tempfile rather than pytest's tmp_path: a UNIX socket path must fit in
    # 107 bytes, and tmp_path grows with the test's name.
    directory = tempfile.mkdtemp(prefix="busx-test-")
    try:
        with busx.Broker(unix_path=os.path.join(directory, "bus.sock"),
                         tcp=("127.0.0.1", 0)) as broker:
            yield broker
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def busx_url(busx_broker: busx.Broker) -> str:
    """The test broker's UNIX URL, "unix:///tmp/busx-test-.../bus.sock"."""
    return busx_broker.url


@pytest.fixture
def busx_tcp_url(busx_broker: busx.Broker) -> str:
    """The test broker's TCP URL, "tcp://127.0.0.1:<port>"."""
    assert busx_broker.tcp_address is not None
    host, port = busx_broker.tcp_address
    return f"tcp://{host}:{port}"


@pytest.fixture
def busx_connect(busx_url: str) -> Iterator[BusFactory]:
    """A function that opens clients: busx_connect(url=None, **options) takes
    busx.connect's parameters and connects to the test broker unless given
    another url. Every client it opened is closed at teardown."""
    import busx

    opened: list[busx.Bus] = []

    def connect(url: str | None = None, **options: Any) -> busx.Bus:
        client = busx.connect(busx_url if url is None else url, **options)
        opened.append(client)
        return client

    yield connect
    for client in reversed(opened):
        client.close()      # idempotent: the test may have closed it already


@pytest.fixture
def busx_client(busx_connect: BusFactory) -> busx.Bus:
    """A busx.Bus connected to the test broker over UNIX; closed at teardown."""
    return busx_connect(name="busx_client")
