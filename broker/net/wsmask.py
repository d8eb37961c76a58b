# -*- test-case-name: tests.test_wsmask -*-
"""
Unmasking small client frames without a C object per frame.

Every frame a WebSocket client sends is masked, and autobahn builds a
masker for each: with its native (NVX, cffi) extension installed, that is a
C object allocated and freed through cffi, about 15 µs, more than a whole
publish costs the broker besides.  For the small frames that publishes and
requests are, one big-integer XOR does the same work in about a
microsecond; larger frames keep autobahn's SIMD masker.

L{install} swaps the factory autobahn's protocol module calls; it is
idempotent and called by the broker's WebSocket factories
(L{broker.net.wscompact.CompactFactory}).
"""

import autobahn.websocket.protocol as _protocol

#: Frames at least this long keep autobahn's masker.
SMALL = 4096

_original = _protocol.create_xor_masker


def unmask(mask, data):
    """
    C{data} XORed with the 4-byte C{mask} repeated, as one integer
    operation.
    """
    n = len(data)
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        n, "little")


class SmallMasker:
    """
    autobahn's masker interface (C{pointer}, C{reset}, C{process}) for one
    frame, by integer XOR: C{process} may be called with the payload in
    pieces, the mask continuing where the last piece ended.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask):
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self):
        return self._ptr

    def reset(self):
        self._ptr = 0

    def process(self, data):
        n = len(data)
        if not n:
            return b""
        off = self._ptr & 3
        self._ptr += n
        return unmask(self._mask[off:] + self._mask[:off] if off else self._mask, data)


def createMasker(mask, length=None):
    if length is not None and length < SMALL:
        return SmallMasker(mask)
    return _original(mask, length)


def install():
    _protocol.create_xor_masker = createMasker
