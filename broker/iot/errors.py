# -*- test-case-name: tests.test_iot_protocol -*-
"""
The errors of the IoT face.  Each has the C{code} sent in an ERROR frame's
JSON payload (C{{"code": ..., "message": ...}}) and mapped to an HTTP
status by the HTTP API; docs/iot-protocol.md lists them.
"""


class IoTError(Exception):
    code = "INTERNAL"

    def __init__(self, message=""):
        super().__init__(message)
        self.message = message or self.code

    def toJSON(self):
        return {"code": self.code, "message": self.message}


class UnknownDevice(IoTError):
    """
    The fleet has no such device (or its key was revoked).
    """
    code = "UNKNOWN_DEVICE"


class DeviceOffline(IoTError):
    """
    The device has no authenticated session and the operation cannot wait.
    """
    code = "DEVICE_OFFLINE"


class RequestTimeout(IoTError):
    """
    The peer did not answer within the request's timeout.
    """
    code = "TIMEOUT"


class Refused(IoTError):
    """
    The peer answered the request with an ERROR frame; C{code} is the
    peer's own code.
    """
    code = "REFUSED"

    def __init__(self, message="", code=None):
        super().__init__(message)
        if code:
            self.code = code


class QueueFull(IoTError):
    """
    The device's store-and-forward queue holds C{max_queue_depth} unexpired
    messages.
    """
    code = "QUEUE_FULL"


class Forbidden(IoTError):
    """
    The session may not address this target (routing isolation).
    """
    code = "FORBIDDEN"


class NoCentral(IoTError):
    """
    No central session is connected and the fleet has no fallback link.
    """
    code = "NO_CENTRAL"


class Busy(IoTError):
    """
    The session already has the maximum number of requests in flight.
    """
    code = "BUSY"


class LimitReached(IoTError):
    """
    An admission or rate limit: too many unauthenticated sessions from one
    address, too many sessions of one fleet, or frames faster than the
    session's inbound rate (docs/iot-protocol.md, "Limits").
    """
    code = "LIMIT"


class BadRequest(IoTError):
    code = "BAD_REQUEST"


class Unavailable(IoTError):
    """
    Cluster mode: Redis, which holds the shared queues, presence and
    tokens, cannot be reached now.  A durable message is refused with this
    (never accepted and then lost); the caller may retry.
    """
    code = "UNAVAILABLE"


class NotQueued(IoTError):
    """
    The message is not (or no longer) queued for the device: it was
    delivered, expired, purged or never existed (API 404).
    """
    code = "NOT_QUEUED"


class NoValue(IoTError):
    """
    The device has reported no telemetry (GET .../telemetry/last).
    """
    code = "NO_VALUE"
