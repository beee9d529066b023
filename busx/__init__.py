"""busx: a publish/subscribe message bus over UNIX sockets, with TCP for
peers on other hosts. See README.md and SPEC.md."""

__version__ = "0.1.0"

from .errors import (AuthenticationFailed, BusError, Closed, ConnectError, Disconnected,  # noqa: E402
                     FdError, InvalidTopic, LimitExceeded, PayloadTooLarge, PermissionDenied,
                     ProtocolError, Timeout)
from .credentials import Credentials  # noqa: E402
from ._core import Message  # noqa: E402
from .broker import Broker  # noqa: E402
from .client import Bus, Subscription, connect  # noqa: E402
from . import aio  # noqa: E402

__all__ = [
    "AuthenticationFailed", "aio", "Broker", "Bus", "BusError", "Closed", "ConnectError",
    "Credentials", "Disconnected", "FdError", "InvalidTopic", "LimitExceeded", "Message",
    "PayloadTooLarge",
    "PermissionDenied", "ProtocolError", "Subscription", "Timeout", "connect",
]
