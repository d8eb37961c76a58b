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

    The count starts when the transport first pauses its producer and only
    a resume (the transport's buffer drained to empty) resets it.  Twisted
    calls C{pauseProducing} again on I{every} write made while its buffer
    is over its high-water mark, so a reset there would let a flood of
    small frames grow the buffer without ever reaching the limit.
    """

    _paused = False
    _pausedBytes = 0
    #: Set once the peer has been dropped as a slow consumer.
    slow = False

    def pauseProducing(self):
        if not self._paused:
            self._paused = True
            self._pausedBytes = 0

    def resumeProducing(self):
        self._paused = False
        self._pausedBytes = 0

    def stopProducing(self):
        self._paused = True

    def connectionLost(self, reason):
        releaseBuffers(self.transport)
        if self.slow:
            releaser = self.memoryReleaser()
            if releaser is not None:
                releaser.soon(collect=True)
        super().connectionLost(reason)

    def memoryReleaser(self):
        """
        The core's L{broker.core.memory.MemoryReleaser}, asked to collect
        and trim once a slow consumer has gone; C{None}: do not.
        """
        return None

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
        C{limit} have been written since the peer stopped reading, and for
        every write after that.  The first time, L{slowConsumer} is called
        (once per connection) to drop the peer; the caller just discards
        what it was about to write.
        """
        if self.slow:
            return True
        if not self._paused:
            return False
        self._pausedBytes += size
        if self._pausedBytes <= limit:
            return False
        self.slow = True
        self.slowConsumer()
        return True

    def slowConsumer(self):
        """
        The peer has let more than the limit wait: count it, tell it if the
        protocol can, and drop it.  Called once.
        """
        raise NotImplementedError


def releaseBuffers(transport):
    """
    Drop what a lost connection's transports still hold for the peer.

    Nothing can send it any more, but a dropped slow consumer's transport
    holds up to its whole bound (C{max_output_buffer} and Twisted's 64 KiB)
    and is often kept alive by reference cycles through its protocol and
    session until Python's next full collection, tens of seconds later under
    load: twenty consumers dropped every few seconds then held a gigabyte.
    The chain is walked down through wrapping transports (a connection cap's
    L{twisted.protocols.policies.ProtocolWrapper}, TLS) to the socket's.
    """
    for _ in range(4):
        if transport is None:
            return
        if hasattr(transport, "_appSendBuffer"):        # TLSMemoryBIOProtocol
            transport._appSendBuffer = []
        if hasattr(transport, "_tempDataBuffer"):       # a FileDescriptor
            transport.dataBuffer = b""
            transport.offset = 0
            transport._tempDataBuffer = []
            transport._tempDataLen = 0
            return
        transport = getattr(transport, "transport", None)
