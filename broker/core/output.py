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
