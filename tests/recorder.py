"""
An L{IConnection} that records what the core hands it: the adapter stand-in
for unit tests of the core itself.
"""

from zope.interface import implementer

from broker.core.interfaces import IConnection


@implementer(IConnection)
class RecordingConnection:
    def __init__(self, connectionId, userId=None):
        self.connectionId = connectionId
        self.userId = userId
        self.deliveries = []
        self.closed = None

    def deliver(self, delivery):
        self.deliveries.append(delivery)

    def close(self, code, reason):
        self.closed = (code, reason)

    @property
    def payloads(self):
        return [d.message.data for d in self.deliveries]
