"""The busx exception hierarchy: every error is a BusError and, where one
fits, also the matching built-in, so `except TimeoutError` works too."""


class BusError(Exception):
    """Base of every busx error."""


class ConnectError(BusError, ConnectionError):
    """No broker could be reached, or the handshake did not complete."""


class Disconnected(BusError, ConnectionError):
    """The broker went away, or closed this connection; the message says why."""


class Closed(BusError):
    """The bus or subscription was closed by this process."""


class Timeout(BusError, TimeoutError):
    """The operation's timeout passed."""


class InvalidTopic(BusError, ValueError):
    """A topic or subscription pattern breaks the topic rules."""


class PermissionDenied(BusError, PermissionError):
    """The socket's permissions or the broker's policy refused the operation."""


class AuthenticationFailed(BusError):
    """The broker rejected this client's token."""


class PayloadTooLarge(BusError, ValueError):
    """A frame would exceed the broker's max_frame."""


class ProtocolError(BusError):
    """The peer broke the wire protocol."""


class LimitExceeded(BusError):
    """A broker limit refused the operation (max_subscriptions, ...); the
    connection stays usable."""


class FdError(BusError, ValueError):
    """File descriptors cannot be sent this way (too many, or not over TCP)."""
