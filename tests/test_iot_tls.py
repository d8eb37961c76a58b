"""
Tests for L{broker.iot.tlscert}: the generated development certificate
(mode 0600, never replaced), the TLS listener of devices and centrals with
that certificate pinned by the client, in process and in a real C{twistd
broker} configured with C{iot.tls.listen} and no certificate.
"""

import os
import stat

import treq
from cryptography import x509
from twisted.internet import defer, reactor
from twisted.internet.endpoints import (TCP4ClientEndpoint, connectProtocol, serverFromString,
                                        wrapClientTLS)
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from broker.iot import tlscert
from broker.iot.client import IoTClient, pinnedTLS
from broker.iot.frames import Payload
from tests.iotharness import SECRETS, IoTHarness, waitUntil
from tests.test_iot_face import writeConfig
from tests.test_tap import TwistdTestsMixin


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class DevelopmentCertificateTests(TestCase):

    def test_createdPrivateOnce(self):
        """
        The certificate and its key are created mode 0600 whatever the
        umask, self-signed for localhost and 127.0.0.1; an existing
        certificate is kept.
        """
        directory = self.mktemp()
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        old = os.umask(0)
        try:
            self.assertTrue(tlscert.writeDevelopmentCertificate(cert, key))
        finally:
            os.umask(old)
        self.assertEqual((mode(cert), mode(key)), (0o600, 0o600))
        with open(cert, "rb") as f:
            pem = f.read()
        parsed = x509.load_pem_x509_certificate(pem)
        self.assertEqual(parsed.issuer, parsed.subject)
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("localhost", names.get_values_for_type(x509.DNSName))
        self.assertIn("127.0.0.1", [str(a) for a in names.get_values_for_type(x509.IPAddress)])
        self.assertFalse(tlscert.writeDevelopmentCertificate(cert, key))
        with open(cert, "rb") as f:
            self.assertEqual(f.read(), pem)

    def test_configuredCertificateUsed(self):
        """
        With iot.tls.certificate set, nothing is generated; the key may
        be in the certificate's file.
        """
        state = self.mktemp()
        cfg = {"tls": {"certificate": "/etc/x/cert.pem", "private_key": ""}}
        self.assertEqual(tlscert.certificatePaths(cfg, state),
                         ("/etc/x/cert.pem", "/etc/x/cert.pem", False))
        self.assertFalse(os.path.exists(state))


class TLSListenerTests(TestCase):
    """
    The sessions of C{iot.tls.listen}: the face's factory behind TLS with
    the development certificate, which the client pins.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield IoTHarness(self, reactor, tokenBatch=4).start()
        state = self.mktemp()
        self.cert, key, generated = tlscert.certificatePaths(
            {"tls": {"certificate": "", "private_key": ""}}, state)
        self.assertTrue(generated)
        options = tlscert.serverOptions(self.cert, key)
        self.port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            tlscert.wrap(self.h.factory, options))
        self.addCleanup(self.port.stopListening)

    def connect(self, client, pem):
        endpoint = wrapClientTLS(pinnedTLS(pem), TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port.getHost().port))
        self.h.clients.append(client)
        return connectProtocol(endpoint, client)

    @defer.inlineCallbacks
    def test_pinnedDevice(self):
        """
        A device pinning the development certificate authenticates over
        TLS and its UDP datagrams (MAC made with the key derived in that
        session) are accepted.
        """
        with open(self.cert, "rb") as f:
            pem = f.read()
        d = IoTClient("device", "acme", "d1", SECRETS[("acme", "d1")])
        yield self.connect(d, pem)
        welcome = yield d.authenticated
        self.assertEqual(welcome["udp"], 2)
        tokens = yield d.waitTokens(4)
        sender = DatagramProtocol()
        port = reactor.listenUDP(0, sender, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sender.transport.write(d.datagram(Payload.json({"tls": True}), tokens[0]),
                               self.h.udpAddress)
        yield waitUntil(reactor, lambda: self.h.udp.counts["accepted"] == 1)

    @defer.inlineCallbacks
    def test_otherCertificateRefused(self):
        """
        A client pinning another certificate refuses the connection: the
        TLS handshake fails and it never authenticates.
        """
        other = self.mktemp()
        os.makedirs(other)
        otherCert = os.path.join(other, "c.pem")
        tlscert.writeDevelopmentCertificate(otherCert, os.path.join(other, "k.pem"))
        with open(otherCert, "rb") as f:
            pem = f.read()
        d = IoTClient("device", "acme", "d1", SECRETS[("acme", "d1")])
        yield self.connect(d, pem)
        e = yield self.assertFailure(d.authenticated, Exception)
        self.assertEqual(e.code, "CLOSED")
        self.assertFalse(self.h.concentrator.isOnline("acme", "d1"))


class DefaultTLSListenerProcessTests(TwistdTestsMixin, TestCase):
    """
    A real C{twistd broker} with C{iot.tls.listen} and no certificate:
    it generates the development certificate (0600) in its state
    directory, and a device pinning it connects over TLS.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_generatedCertificatePinned(self):
        directory, path = writeConfig(
            self, extra='[iot.tls]\nlisten = ["tcp:0:interface=127.0.0.1"]\n')
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], directory,
                          ["iot.tls.listen[0]", "admin.listen[0]"])
        ports = yield proc.listening
        state = directory.child("state")
        cert = state.child(tlscert.CERT_FILE).path
        key = state.child(tlscert.KEY_FILE).path
        self.assertEqual((mode(cert), mode(key)), (0o600, 0o600))
        with open(cert, "rb") as f:
            pem = f.read()
        c = IoTClient("device", "acme", "d1", "d1-secret")
        endpoint = wrapClientTLS(pinnedTLS(pem), TCP4ClientEndpoint(
            reactor, "127.0.0.1", ports["iot.tls.listen[0]"]))
        yield connectProtocol(endpoint, c)
        self.addCleanup(lambda: c.transport.abortConnection() if c.transport.connected
                        else None)
        welcome = yield c.authenticated
        self.assertEqual(welcome["udp"], 2)
        response = yield treq.get(f"http://127.0.0.1:{ports['admin.listen[0]']}/healthz",
                                  reactor=reactor, persistent=False)
        self.assertEqual(response.code, 200)
        yield treq.content(response)
