"""
Tests for L{broker.iot.frames}: the test vectors of docs/iot-protocol.md,
payload validation, and Hypothesis-generated frames and byte streams fed
to a session (L{StringTransport}, the one protocol under test).
"""

import os
import re

from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from broker.core.router import Core
from broker.iot import auth, frames
from broker.iot.auth import Registry
from broker.iot.client import IoTClient
from broker.iot.concentrator import Concentrator
from broker.iot.frames import Frame, FrameError, FrameReader, Payload
from broker.iot.protocol import IoTFactory
from broker.iot.store import MemoryMessageStore
from tests.iotharness import SECRETS, fleets

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "iot-protocol.md")
KIND_CODES = {v: k for k, v in frames.KINDS.items()}


def vectors(kind):
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    out = []
    for block in re.findall(r"```" + kind + r"\n(.*?)```", text, re.S):
        fields = {}
        for line in block.splitlines():
            k, _, v = line.partition(": ")
            fields[k.rstrip(":")] = v
        out.append(fields)
    return out


def unhex(s):
    return bytes.fromhex(s.replace(" ", ""))


class VectorTests(SynchronousTestCase):

    def test_frames(self):
        vs = vectors("iot-frame")
        self.assertGreaterEqual(len(vs), 6)
        for v in vs:
            data = (unhex(v["payloadHex"]) if "payloadHex" in v
                    else v["payload"].encode("utf-8"))
            frame = Frame(KIND_CODES[v["kind"]], int(v["requestId"]),
                          Payload(v["type"], data), v["address"])
            wire = unhex(v["bytes"])
            self.assertEqual(frames.encode(frame.kind, frame.requestId, frame.payload,
                                           frame.address), wire, v["name"])
            self.assertEqual(FrameReader().feed(wire), [frame], v["name"])

    def test_proof(self):
        (v,) = vectors("iot-proof")
        key = auth.keyBytes(v["key"])
        args = (v["role"], v["fleet"], v["id"], unhex(v["clientNonce"]),
                unhex(v["serverNonce"]))
        self.assertEqual(auth.proof(key, "client", *args).hex(), v["client"])
        self.assertEqual(auth.proof(key, "server", *args).hex(), v["server"])
        self.assertTrue(auth.checkProof(key, unhex(v["client"]), *args))

    def test_udpKey(self):
        """
        The session's UDP key is HKDF-SHA256 (checked against the
        cryptography package's HKDF) and the token key an HMAC of it.
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        (v,) = vectors("iot-udp-key")
        key = auth.keyBytes(v["key"])
        nonces = unhex(v["clientNonce"]), unhex(v["serverNonce"])
        udpKey = auth.udpKey(key, v["role"], v["fleet"], v["id"], *nonces)
        self.assertEqual(udpKey.hex(), v["udpKey"])
        info = "\0".join(["iot/2 udp", v["role"], v["fleet"], v["id"]]).encode()
        self.assertEqual(HKDF(hashes.SHA256(), 32, nonces[0] + nonces[1], info).derive(key),
                         udpKey)
        self.assertEqual(auth.tokenKey(udpKey, unhex(v["token"])).hex(), v["tokenKey"])

    def test_datagram(self):
        v1, v2 = sorted(vectors("iot-datagram"), key=lambda v: v["version"])
        for v in (v1, v2):
            wire = unhex(v["bytes"])
            token = unhex(v["token"])
            payload = Payload(v["type"], v["payload"].encode())
            key = unhex(v["tokenKey"]) if "tokenKey" in v else None
            self.assertEqual(frames.encodeDatagram(token, payload, key), wire)
            d = frames.decodeDatagram(wire, legacy=True)
            self.assertEqual((d.version, d.token, d.payload), (int(v["version"]), token,
                                                                payload))
            self.assertTrue(d.verify(key))
        self.assertEqual(unhex(v2["bytes"])[-16:].hex(), v2["mac"])
        # Version 1 is only decoded when legacy datagrams are accepted.
        e = self.assertRaises(FrameError, frames.decodeDatagram, unhex(v1["bytes"]))
        self.assertEqual(e.code, "UNSUPPORTED_VERSION")

    def test_datagramVerify(self):
        """
        A datagram verifies with its token's key only: not with another
        key, not with its payload changed, not stripped to version 1.
        """
        (v,) = [v for v in vectors("iot-datagram") if v["version"] == "2"]
        wire, key = unhex(v["bytes"]), unhex(v["tokenKey"])
        self.assertFalse(frames.decodeDatagram(wire).verify(b"\0" * 32))
        swapped = wire[:18] + b'{"t":99.9}' + wire[-16:]
        self.assertFalse(frames.decodeDatagram(swapped).verify(key))
        stripped = b"\x01" + wire[1:-16]
        self.assertFalse(frames.decodeDatagram(stripped, legacy=True).verify(key))
        # A keyless (legacy) token takes no version 2 datagram either.
        self.assertFalse(frames.decodeDatagram(wire).verify(None))

    def test_tokens(self):
        (v,) = vectors("iot-tokens")
        tokens = [unhex(t) for t in v["tokens"].split()]
        p = frames.encodeTokens(int(v["ttl"]), tokens)
        self.assertEqual(p.data, unhex(v["bytes"]))
        self.assertEqual(frames.decodeTokens(p), (int(v["ttl"]), tokens))


class PayloadTests(SynchronousTestCase):

    def test_validation(self):
        for ptype, data in [("ascii", b"\x80"), ("utf8", b"\xc3"), ("json", b"{"),
                            ("json", b""), ("none", b"x"), ("nope", b"")]:
            e = self.assertRaises(FrameError, Payload, ptype, data)
            self.assertEqual(e.code, "BAD_PAYLOAD")
        for ptype, data in [("ascii", b"\x00\x7f"), ("utf8", "\u20ac".encode()),
                            ("json", b" [1, {\"a\": null}] "), ("binary", b"\xff"),
                            ("none", b"")]:
            self.assertEqual(Payload(ptype, data).data, data)

    def test_toMessage(self):
        self.assertEqual(Payload.json({"a": 1}).toMessage().dataType, "json")
        self.assertEqual(Payload(frames.ASCII, b"a").toMessage().dataType, "text")
        self.assertEqual(Payload(frames.BINARY, b"a").toMessage().dataType, "binary")

    def test_splitStream(self):
        """
        Frames split anywhere across reads come out whole and in order.
        """
        wire = b"".join(frames.encode(frames.PING, i, Payload.json(i)) for i in range(20))
        reader = FrameReader()
        out = []
        for i in range(0, len(wire), 7):
            out.extend(reader.feed(wire[i:i + 7]))
        self.assertEqual([f.requestId for f in out], list(range(20)))

    def test_limits(self):
        e = self.assertRaises(FrameError, FrameReader(100).feed, frames.LENGTH.pack(101))
        self.assertEqual(e.code, "FRAME_TOO_LARGE")
        e = self.assertRaises(FrameError, FrameReader().feed, frames.LENGTH.pack(3) + b"abc")
        self.assertEqual(e.code, "BAD_FRAME")
        self.assertRaises(FrameError, frames.encode, frames.MESSAGE, 0, frames.EMPTY, "a" * 256)


payloads = st.one_of(
    st.binary(max_size=64).map(lambda b: Payload(frames.BINARY, b)),
    st.text(alphabet=st.characters(max_codepoint=127), max_size=32).map(
        lambda s: Payload(frames.ASCII, s.encode())),
    st.text(max_size=32).map(Payload.text),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                    max_size=3),
                 max_leaves=8).map(Payload.json),
    st.just(frames.EMPTY))
validFrames = st.builds(Frame, st.sampled_from(sorted(frames.KINDS)),
                        st.integers(0, 2 ** 64 - 1), payloads,
                        st.text(max_size=20).filter(lambda a: len(a.encode()) <= 255))


def rawFrame(version, kind, rid, ptype, address, payload):
    body = frames.HEADER.pack(version, kind, rid, ptype, len(address)) + address + payload
    return frames.LENGTH.pack(len(body)) + body


# Frames whose header fields are drawn freely: most are wrong somewhere.
fuzzFrames = st.builds(rawFrame, st.sampled_from([1, 1, 1, 0, 2]),
                       st.sampled_from(sorted(frames.KINDS) + [0, 0x7f, 0xff]),
                       st.integers(0, 2 ** 64 - 1), st.integers(0, 6),
                       st.binary(max_size=8), st.binary(max_size=40))


class RoundTripTests(SynchronousTestCase):

    @settings(max_examples=200, deadline=None)
    @given(validFrames)
    def test_roundTrip(self, frame):
        wire = frames.encode(frame.kind, frame.requestId, frame.payload, frame.address)
        self.assertEqual(FrameReader().feed(wire), [frame])


class SessionFuzzTests(SynchronousTestCase):
    """
    Arbitrary frames and bytes, before and after authentication: the
    session never raises, answers only with well-formed frames, and a bad
    frame it can delimit never ends an authenticated session.
    """

    def session(self, authenticate):
        clock = Clock()
        core = Core(clock)
        store = MemoryMessageStore()
        c = Concentrator(clock, core, Registry(fleets()), store, requestTimeout=1)
        factory = IoTFactory(clock, c, maxFrame=256)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        if authenticate:
            client = IoTClient(
                "device", "acme", "d1", SECRETS[("acme", "d1")])
            ct = StringTransport()
            client.makeConnection(ct)
            for _ in range(2):
                proto.dataReceived(ct.value())
                ct.clear()
                client.dataReceived(transport.value())
                transport.clear()
            self.assertTrue(client.open)
            self.assertTrue(c.isOnline("acme", "d1"))
        return proto, transport, factory, clock

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.one_of(fuzzFrames, st.binary(max_size=30)), max_size=6))
    def test_authenticated(self, chunks):
        proto, transport, factory, clock = self.session(True)
        for chunk in chunks:
            proto.dataReceived(chunk)
        clock.advance(5)
        out = FrameReader(1 << 20).feed(transport.value())
        self.assertTrue(all(isinstance(f, Frame) for f in out))
        self.assertTrue(all(f.kind in frames.KINDS for f in out))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.one_of(fuzzFrames, validFrames.map(
        lambda f: frames.encode(f.kind, f.requestId, f.payload, f.address)),
        st.binary(max_size=30)), max_size=4))
    def test_unauthenticated(self, chunks):
        proto, transport, factory, clock = self.session(False)
        for chunk in chunks:
            proto.dataReceived(chunk)
        clock.advance(60)
        # Never authenticated: it was refused (or timed out) and dropped.
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.counters.authOk, 0)
        out = FrameReader(1 << 20).feed(transport.value())
        self.assertTrue(all(isinstance(f, Frame) for f in out))
        self.assertEqual(out[-1].kind, frames.ERROR)


class AbortRecordingTransport(StringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True


class CloseGraceTests(SynchronousTestCase):

    def test_abortAfterGrace(self):
        """
        A refused session whose transport does not go (the peer reads
        nothing) is aborted C{closeGrace} seconds later.
        """
        clock = Clock()
        c = Concentrator(clock, Core(clock), Registry(fleets()), MemoryMessageStore())
        factory = IoTFactory(clock, c, authTimeout=1, closeGrace=5)
        proto = factory.buildProtocol(None)
        transport = AbortRecordingTransport()
        proto.makeConnection(transport)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(factory.counters.authFailures["AUTH_TIMEOUT"], 1)
        clock.advance(4.9)
        self.assertFalse(transport.aborted)
        clock.advance(0.2)
        self.assertTrue(transport.aborted)
