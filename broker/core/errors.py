# -*- test-case-name: tests.test_core -*-
"""
Errors the core raises and the close codes it uses, named once so every face
reports them the same way (see docs/webpubsub.md for the table).
"""


class BrokerError(Exception):
    """
    A request the core refuses.  C{name} is the error name clients see (the
    Web PubSub ack error names where one exists).
    """

    name = "InternalServerError"

    def __init__(self, message=""):
        super().__init__(message)
        self.message = message


class BadRequest(BrokerError):
    """
    The request is malformed: a missing field, a wrong type, bad base64.
    """

    name = "BadRequest"


class Forbidden(BrokerError):
    """
    The connection lacks the permission the request needs.
    """

    name = "Forbidden"


class Duplicate(BrokerError):
    """
    A request with this ackId was already processed on this connection.
    """

    name = "Duplicate"


class NotFound(BrokerError):
    """
    The connection, user or group named does not exist.
    """

    name = "NotFound"


class Unavailable(BrokerError):
    """
    The request needs the cluster (Redis) and it cannot be reached now: the
    request is refused, never parked and never dropped silently.
    """

    name = "ServiceUnavailable"


class LimitExceeded(BrokerError):
    """
    A configured limit is reached: too many groups for this connection,
    user or hub, or a group name longer than the hub allows.  Retrying
    does not help until something is freed (a group left).
    """

    name = "LimitExceeded"


class Throttled(BrokerError):
    """
    The connection sends faster than its inbound rate limit; the request
    was dropped, not executed.
    """

    name = "TooManyRequests"


class CloseCode:
    """
    WebSocket close codes the broker sends, with their meaning here.
    """

    NORMAL = 1000
    # The broker is shutting down.
    GOING_AWAY = 1001
    # A binary frame on a JSON-only subprotocol.
    UNSUPPORTED_DATA = 1003
    # A frame that is not valid JSON / UTF-8 where that is required.
    INVALID_PAYLOAD = 1007
    # The session may not do this at all (for example: sendEvent mode with no
    # upstream event handler, or closed by the server API).
    POLICY_VIOLATION = 1008
    # A frame or message over the configured size limit.
    MESSAGE_TOO_BIG = 1009
    # Unexpected failure inside the broker.
    INTERNAL_ERROR = 1011
    # The session's output buffer overflowed: it did not read fast enough.
    SLOW_CONSUMER = 1013
