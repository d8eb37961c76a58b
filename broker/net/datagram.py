# -*- test-case-name: tests.test_workers -*-
"""
A UDP socket as a server endpoint: what the IoT telemetry listener opens
with, so that a supervisor of workers opens it (and reports a failure by
key) like every stream listener.
"""

from twisted.internet import defer


class DatagramEndpoint:
    """
    C{listen(protocol)} opens a UDP port with C{reactor.listenUDP}.
    """

    def __init__(self, reactor, port, interface, maxPacketSize):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._maxPacketSize = maxPacketSize

    def listen(self, protocol):
        return defer.execute(self._reactor.listenUDP, self._port, protocol,
                             interface=self._interface, maxPacketSize=self._maxPacketSize)
