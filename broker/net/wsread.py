# -*- test-case-name: tests.test_wsread -*-
"""
Reading a client's whole, small data frames without autobahn's per-frame
machinery.

autobahn reads a frame in four steps (header, a masker object, payload,
end), each a method call through its state machine, and then builds the
message from lists: about 15 µs of a publish's 40 in the broker's fixed
cost.  Almost every frame a publisher sends is a single, final, masked text
or binary frame of a few hundred bytes that arrives whole in one read, so
L{readWholeFrames} reads such frames itself and hands each payload to the
protocol's C{_onMessage}, as autobahn does at the end of a message.

Anything else stops it, and the rest of the read goes to autobahn in the
same call, so the two never interleave inside a frame: a control frame
(ping, pong, close), a fragment, a frame cut by the read, an unmasked
frame, reserved bits or opcodes, a frame over the size limits or over
L{broker.net.wsmask.SMALL} bytes, a non-minimal length, text that is not
UTF-8.  autobahn then refuses it exactly as before.  The fast path is only
taken on an open connection with nothing buffered, no compression, no
observers and no frame or octet logging; autobahn's traffic statistics are
not counted (nothing reads them: L{broker.net.wscompact} shares one object
per factory).
"""

from autobahn.websocket.protocol import WebSocketProtocol

from broker.net.wsmask import SMALL, unmask

STATE_OPEN = WebSocketProtocol.STATE_OPEN

_TEXT = 0x81        # FIN, text
_BINARY = 0x82      # FIN, binary


def canReadFast(protocol):
    """
    Whether C{protocol} (an autobahn protocol) is between frames on an open
    connection, with nothing of its own that the fast path would skip.
    """
    return (protocol.state == STATE_OPEN and protocol.current_frame is None
            and not protocol.data and protocol._perMessageCompress is None
            and protocol._listeners is None and not protocol.logOctets
            and not protocol.logFrames and not protocol.trackedTimings)


def readWholeFrames(protocol, data):
    """
    Deliver the whole small data frames at the start of C{data} to
    C{protocol._onMessage}.

    @return: the bytes not read (from the first frame the fast path leaves
        to autobahn), C{b""} when everything was read.
    """
    n = len(data)
    i = 0
    maxFrame = protocol.maxFramePayloadSize
    maxMessage = protocol.maxMessagePayloadSize
    validate = protocol.utf8validateIncoming
    while n - i >= 6:
        b0 = data[i]
        if b0 != _TEXT and b0 != _BINARY:
            break
        # The mask bit must be set: unmasked, the length reads as >= 128.
        length = data[i + 1] ^ 0x80
        if length < 126:
            start = i + 6
        elif length == 126:
            start = i + 8
            if start > n:
                break
            length = (data[i + 2] << 8) | data[i + 3]
            if length < 126 or length >= SMALL:
                break
        else:
            break
        end = start + length
        if end > n or 0 < maxFrame < length or 0 < maxMessage < length:
            break
        payload = unmask(data[start - 4:start], data[start:end])
        if validate and b0 == _TEXT:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break
        i = end
        if protocol.autoPingTimeoutCall and protocol.autoPingRestartOnAnyTraffic:
            protocol._cancelAutoPingTimeoutCall()
        protocol._onMessage(payload, b0 == _BINARY)
        if protocol.state != STATE_OPEN:
            # Closing: autobahn reads what follows in its own way.
            break
    return data[i:] if i else data
