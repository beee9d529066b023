"""busx: a publish/subscribe message bus over UNIX sockets, with TCP for
peers on other hosts. See README.md and SPEC.md."""

__version__ = "0.1.0"

from .credentials import Credentials  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationFailed,
    BusError,
    Closed,
    ConnectError,
    Disconnected,
    FdError,
    InvalidTopic,
    LimitExceeded,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolError,
    Timeout,
)

try:
    from ._core import Message  # noqa: E402
except ModuleNotFoundError as exc:
    if exc.name != f"{__name__}._core":
        raise
    # The source tree, imported instead of the installed busx.
    raise ImportError(
        f"busx's compiled core (busx._core) is not in {__path__[0]}: build it there with "
        f"`pip install -e .`, or run `pytest` rather than `python -m pytest`, which puts "
        f"the source tree ahead of the installed busx") from exc
from . import aio  # noqa: E402
from .broker import Broker  # noqa: E402
from .client import Bus, Subscription, connect  # noqa: E402

__all__ = [
    "AuthenticationFailed", "aio", "Broker", "Bus", "BusError", "Closed", "ConnectError",
    "Credentials", "Disconnected", "FdError", "InvalidTopic", "LimitExceeded", "Message",
    "PayloadTooLarge",
    "PermissionDenied", "ProtocolError", "Subscription", "Timeout", "connect",
]
