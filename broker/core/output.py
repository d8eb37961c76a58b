# -*- test-case-name: tests.test_webpubsub -*-
"""
The producer half of a connection with a bounded output buffer.
"""

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class BoundedOutput:
    """
    Registered as a streaming producer on its own transport, a connection
    learns when the peer stops reading: from then on it counts what it
    still writes (C{_pausedBytes}) and drops the peer as a slow consumer
    past its limit, instead of buffering without bound.
    """

    _paused = False
    _pausedBytes = 0

    def pauseProducing(self):
        self._paused = True
        self._pausedBytes = 0

    def resumeProducing(self):
        self._paused = False
        self._pausedBytes = 0

    def stopProducing(self):
        self._paused = True

    def registerAsProducer(self, transport):
        """
        Become C{transport}'s streaming producer, replacing any other (a
        WebSocket transport may hold autobahn's).
        """
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        transport.registerProducer(self, True)

    def overLimit(self, size, limit):
        """
        Count C{size} bytes about to be written: true once more than
        C{limit} have been written since the peer stopped reading.
        """
        if not self._paused:
            return False
        self._pausedBytes += size
        return self._pausedBytes > limit
