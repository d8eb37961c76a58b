# -*- test-case-name: tests.test_wsread -*-
"""
Server WebSocket frames built without autobahn's C{PreparedMessage}.

A server frame is unmasked: a two-, four- or ten-byte header and the
payload.  autobahn's C{PreparedMessage} builds it through C{struct}, byte
conversions and a join (about 2 µs), once per message of a fan-out and once
per write of the MQTT and peer-group WebSockets; L{serverFrame} is one
concatenation.
"""


def serverFrame(payload, binary=False):
    """
    C{payload} as one final, unmasked server frame (text, or binary when
    C{binary}).
    """
    n = len(payload)
    b0 = 0x82 if binary else 0x81
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 0x10000:
        return bytes((b0, 126, n >> 8, n & 0xFF)) + payload
    return bytes((b0, 127)) + n.to_bytes(8, "big") + payload


class PreparedFrame:
    """
    What autobahn's C{sendPreparedMessage} reads of a prepared message: the
    frame (C{payloadHybi}), and the payload for a connection that compresses.
    """

    __slots__ = ("payload", "binary", "doNotCompress", "payloadHybi")

    def __init__(self, payload, binary, doNotCompress=False):
        self.payload = payload
        self.binary = binary
        self.doNotCompress = doNotCompress
        self.payloadHybi = serverFrame(payload, binary)
