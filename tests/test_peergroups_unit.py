"""
Unit tests for the pure parts of the peer-groups face: certificates and
chains, passwords, attribute XML, the search language, the conflict rule,
the HRESULT table and the length-prefixed framing.
"""

import json
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups import records as rec
from broker.peergroups.errors import HRESULTS, PeerError
from broker.peergroups.records import Record

HOUR = 3600 * C.TICKS


def makeGroup(now):
    """
    A group key, its GRC and a creator identity with its GMC.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    gpn = cred.peerName(pub, "team")
    grc = cred.Certificate.make(key, "GRC", gpn, pub, gpn, [C.ROLE_ADMIN], now,
                                now + C.INFINITE_TICKS)
    creator = cred.Identity.generate("creator")
    gmc = cred.Certificate.make(key, "GMC", gpn, creator.publicKey, creator.peerName,
                                [C.ROLE_ADMIN], now, now + C.INFINITE_TICKS)
    return gpn, pub, [grc, gmc], creator


class ChainTests(TestCase):
    def setUp(self):
        self.now = C.filetimeFromUnix(1.7e9)
        self.gpn, self.key, self.chain, self.creator = makeGroup(self.now)

    def issue(self, issuer, subject, roles, notAfter=None, chain=None):
        cert = cred.Certificate.make(issuer, "GMC", self.gpn, subject.publicKey,
                                     subject.peerName, roles, self.now,
                                     notAfter or self.now + HOUR)
        return (chain or self.chain) + [cert]

    def test_valid(self):
        bob = cred.Identity.generate("bob")
        chain = self.issue(self.creator, bob, [C.ROLE_MEMBER])
        leaf = cred.validateChain(chain, self.gpn, self.key)
        self.assertEqual((leaf.subject, leaf.role), (bob.publicKey, C.ROLE_MEMBER))

    def test_roundTripJSON(self):
        chain = cred.chainFromJSON(json.loads(json.dumps(cred.chainToJSON(self.chain))))
        self.assertEqual([c.raw for c in chain], [c.raw for c in self.chain])

    def test_wrongSigner(self):
        bob = cred.Identity.generate("bob")
        mallory = cred.Identity.generate("mallory")
        chain = self.issue(mallory, bob, [C.ROLE_MEMBER])
        e = self.assertRaises(PeerError, cred.validateChain, chain, self.gpn, self.key)
        self.assertEqual(e.name, "PEER_E_INVITATION_NOT_TRUSTED")

    def test_roleEscalation(self):
        """
        A member cannot issue; an inviting member cannot issue admin.
        """
        bob = cred.Identity.generate("bob")
        carol = cred.Identity.generate("carol")
        member = self.issue(self.creator, bob, [C.ROLE_MEMBER])
        e = self.assertRaises(PeerError, cred.validateChain,
                              self.issue(bob, carol, [C.ROLE_MEMBER], chain=member),
                              self.gpn, self.key)
        self.assertEqual(e.name, "PEER_E_INVITATION_NOT_TRUSTED")
        inviting = self.issue(self.creator, bob, [C.ROLE_INVITING_MEMBER])
        cred.validateChain(self.issue(bob, carol, [C.ROLE_INVITING_MEMBER], chain=inviting),
                           self.gpn, self.key)
        self.assertRaises(PeerError, cred.validateChain,
                          self.issue(bob, carol, [C.ROLE_ADMIN], chain=inviting),
                          self.gpn, self.key)

    def test_outlivesParent(self):
        bob = cred.Identity.generate("bob")
        carol = cred.Identity.generate("carol")
        short = self.issue(self.creator, bob, [C.ROLE_ADMIN], notAfter=self.now + HOUR)
        chain = self.issue(bob, carol, [C.ROLE_MEMBER], notAfter=self.now + 2 * HOUR,
                           chain=short)
        self.assertRaises(PeerError, cred.validateChain, chain, self.gpn, self.key)

    def test_circularAndLength(self):
        bob = cred.Identity.generate("bob")
        admin = self.issue(self.creator, bob, [C.ROLE_ADMIN])
        circular = self.issue(bob, self.creator, [C.ROLE_ADMIN], chain=admin)
        e = self.assertRaises(PeerError, cred.validateChain, circular, self.gpn, self.key)
        self.assertEqual(e.name, "PEER_E_CIRCULAR_CHAIN_DETECTED")
        chain, issuer = self.chain, self.creator
        for i in range(C.MAX_CHAIN_LENGTH):
            nxt = cred.Identity.generate(f"a{i}")
            chain = self.issue(issuer, nxt, [C.ROLE_ADMIN], chain=chain)
            issuer = nxt
        e = self.assertRaises(PeerError, cred.validateChain, chain, self.gpn, self.key)
        self.assertEqual(e.name, "PEER_E_CHAIN_TOO_LONG")
        cred.validateChain(chain[:-1], self.gpn, self.key)

    def test_otherGroupRoot(self):
        gpn, key, chain, creator = makeGroup(self.now)
        e = self.assertRaises(PeerError, cred.validateChain, chain, self.gpn, self.key)
        self.assertEqual(e.name, "PEER_E_INVITATION_NOT_TRUSTED")

    def test_validNow(self):
        leaf = self.issue(self.creator, cred.Identity.generate("b"), [C.ROLE_MEMBER])[-1]
        for t in (self.now - 1, self.now + HOUR):
            e = self.assertRaises(PeerError, cred.checkValidNow, leaf, t)
            self.assertEqual(e.name, "PEER_E_INVALID_TIME_PERIOD")
        cred.checkValidNow(leaf, self.now)

    def test_identityInfo(self):
        alice = cred.Identity.generate("alice", "Alice")
        info = cred.parseIdentityInfo(alice.identityInfo())
        self.assertEqual((info["publicKey"], info["peerName"], info["friendlyName"]),
                         (alice.publicKey, alice.peerName, "Alice"))
        outer = json.loads(alice.identityInfo())
        body = json.loads(cred.unb64(outer["PEERIDENTITYINFO"]["body"]))
        body["friendlyName"] = "Mallory"
        outer["PEERIDENTITYINFO"]["body"] = cred.b64(cred.canonical(body))
        e = self.assertRaises(PeerError, cred.parseIdentityInfo, json.dumps(outer))
        self.assertEqual(e.name, "PEER_E_INVALID_CREDENTIAL_INFO")
        again = cred.Identity.fromPEM(alice.toPEM(), "alice")
        self.assertEqual(again.peerName, alice.peerName)


class PasswordTests(TestCase):
    def test_proof(self):
        """
        A proof from the right password verifies against the verifier, one
        from another password or for another challenge does not; the
        verifier holds nothing the password can be read from.
        """
        verifier = cred.makeVerifier("correct horse", iterations=1000)
        salt = cred.unb64(verifier["salt"])
        message = cred.passwordAuthMessage(b"c" * 32, "g.team", "p.bob")
        proof = cred.passwordProof("correct horse", salt, 1000, message)
        self.assertTrue(cred.checkPasswordProof(verifier, message, proof))
        wrong = cred.passwordProof("battery", salt, 1000, message)
        self.assertFalse(cred.checkPasswordProof(verifier, message, wrong))
        other = cred.passwordAuthMessage(b"d" * 32, "g.team", "p.bob")
        self.assertFalse(cred.checkPasswordProof(verifier, other, proof))
        self.assertNotIn("correct", json.dumps(verifier))
        self.assertRaises(PeerError, cred.makeVerifier, "")


class AttributeTests(TestCase):
    def test_valid(self):
        parsed = rec.parseAttributes(
            '<attributes><attribute name="a1" type="int">42</attribute>'
            '<attribute name="when" type="date">2024-05-01T10:00:00Z</attribute>'
            '<attribute name="a1">again</attribute></attributes>')
        self.assertEqual([(n, t) for n, t, _ in parsed],
                         [("a1", "int"), ("when", "date"), ("a1", "string")])
        self.assertEqual(rec.parseAttributes(""), [])

    def test_invalid(self):
        bad = [
            "<attributes><attribute name='a-b'>x</attribute></attributes>",
            "<attributes><attribute name='a_b'>x</attribute></attributes>",
            "<attributes><attribute name='%s'>x</attribute></attributes>" % ("a" * 41),
            "<attributes><attribute name='n' type='int'>4x</attribute></attributes>",
            "<attributes><attribute name='n' type='date'>yesterday</attribute></attributes>",
            "<attributes><attribute name='n' type='float'>1</attribute></attributes>",
            "<attributes><attribute name='peercreatorid'>x</attribute></attributes>",
            "<attrs/>", "<attributes>", '<!DOCTYPE x [<!ENTITY a "b">]><attributes/>',
        ]
        for text in bad:
            e = self.assertRaises(PeerError, rec.parseAttributes, text)
            self.assertEqual(e.name, "PEER_E_INVALID_ATTRIBUTES", text)
        many = "<attributes>%s</attributes>" % ("<attribute name='a'>x</attribute>" * 65)
        e = self.assertRaises(PeerError, rec.parseAttributes, many)
        self.assertEqual(e.name, "PEER_E_TOO_MANY_ATTRIBUTES")


def record(attributes, **kw):
    fields = dict(id="id", type="t", version=1, flags=0, creatorId="c", modifiedById="",
                  attributes=attributes, creation=C.filetimeFromUnix(1.7e9),
                  lastModified=C.filetimeFromUnix(1.7e9), expiration=0, data=b"")
    fields.update(kw)
    return Record(**fields)


class SearchTests(TestCase):
    def setUp(self):
        self.records = [
            record('<attributes><attribute name="s">hello</attribute>'
                   '<attribute name="n" type="int">5</attribute>'
                   '<attribute name="d" type="date">2024-01-01T00:00:00Z</attribute>'
                   '</attributes>', id="r1"),
            record('<attributes><attribute name="s">h*llo?</attribute>'
                   '<attribute name="n" type="int">10</attribute></attributes>', id="r2",
                   creatorId="bob"),
            record('<attributes><attribute name="s">back\\slash</attribute></attributes>',
                   id="r3"),
        ]

    def ids(self, query):
        return [r.id for r in rec.search(rec.parseSearch(f"<peersearch>{query}</peersearch>"),
                                         self.records)]

    def test_comparisons(self):
        c = '<clause attrib="n" type="int" compare="{}">5</clause>'
        self.assertEqual(self.ids(c.format("equal")), ["r1"])
        self.assertEqual(self.ids(c.format("notequal")), ["r2"])
        self.assertEqual(self.ids(c.format("less")), [])
        self.assertEqual(self.ids(c.format("greater")), ["r2"])
        self.assertEqual(self.ids(c.format("lessorequal")), ["r1"])
        self.assertEqual(self.ids(c.format("greaterorequal")), ["r1", "r2"])
        self.assertEqual(self.ids('<clause attrib="d" type="date" compare="less">'
                                  '2024-06-01T00:00:00+00:00</clause>'), ["r1"])

    def test_wildcards(self):
        self.assertEqual(self.ids('<clause attrib="s">h*</clause>'), ["r1", "r2"])
        self.assertEqual(self.ids('<clause attrib="s">h?llo</clause>'), ["r1"])
        self.assertEqual(self.ids('<clause attrib="s">h\\*llo\\?</clause>'), ["r2"])
        self.assertEqual(self.ids('<clause attrib="s">back\\\\slash</clause>'), ["r3"])
        self.assertEqual(self.ids('<clause attrib="s" compare="notequal">h*</clause>'), ["r3"])

    def test_logic(self):
        self.assertEqual(self.ids('<and><clause attrib="s">h*</clause>'
                                  '<clause attrib="n" type="int" compare="greater">6</clause>'
                                  '</and>'), ["r2"])
        self.assertEqual(self.ids('<or><clause attrib="s">back*</clause>'
                                  '<and><clause attrib="n" type="int">5</clause></and></or>'),
                         ["r1", "r3"])
        self.assertEqual(self.ids('<clause attrib="peercreatorid">bob</clause>'), ["r2"])

    def test_errors(self):
        invalid = ["<peersearch/>",
                   "<peersearch><clause attrib='s'>a</clause><clause attrib='s'>b</clause>"
                   "</peersearch>",
                   "<peersearch><and/></peersearch>",
                   "<peersearch><nand><clause attrib='s'>a</clause></nand></peersearch>",
                   "<peersearch><clause attrib='s' compare='like'>a</clause></peersearch>",
                   "<peersearch><clause attrib='n' type='int'>five</clause></peersearch>",
                   "<peersearch><clause>a</clause></peersearch>",
                   "<search><clause attrib='s'>a</clause></search>", "not xml"]
        for text in invalid:
            e = self.assertRaises(PeerError, rec.parseSearch, text)
            self.assertEqual(e.name, "PEER_E_INVALID_SEARCH", text)
        e = self.assertRaises(PeerError, rec.parseSearch,
                              "<peersearch><clause attrib='s'>a\\b</clause></peersearch>")
        self.assertEqual(e.name, "E_INVALIDARG")


class ConflictRuleTests(TestCase):
    def test_rules(self):
        """
        The six-step rule: version, updated beats never-updated, higher
        modifier, later modification, larger then higher security data.
        """
        base = record("", version=2, modifiedById="m", lastModified=10, data=b"bb")
        self.assertTrue(rec.beats(record("", version=3), base))
        self.assertFalse(rec.beats(record("", version=1, modifiedById="z"), base))
        self.assertTrue(rec.beats(base, record("", version=2, modifiedById="")))
        self.assertTrue(rec.beats(record("", version=2, modifiedById="n", lastModified=1), base))
        self.assertTrue(rec.beats(record("", version=2, modifiedById="m", lastModified=11), base))
        self.assertTrue(rec.beats(record("", version=2, modifiedById="m", lastModified=10,
                                         data=b"aaa"), base))
        self.assertTrue(rec.beats(record("", version=2, modifiedById="m", lastModified=10,
                                         data=b"bc"), base))
        self.assertFalse(rec.beats(base.copy(), base))


class ConstantsTests(TestCase):
    def test_hresults(self):
        """
        The values of spec section 10.
        """
        self.assertEqual(HRESULTS["PEER_E_NOT_AUTHORIZED"], 0x80632020)
        self.assertEqual(HRESULTS["PEER_E_INVALID_TIME_PERIOD"], 0x80630705)
        self.assertEqual(HRESULTS["PEER_E_GROUP_NOT_READY"], 0x80632091)
        self.assertEqual(HRESULTS["PEER_E_CHAIN_TOO_LONG"], 0x80630703)
        self.assertEqual(HRESULTS["PEER_S_ALREADY_A_MEMBER"], 0x00630006)
        self.assertEqual(HRESULTS["PEER_S_NO_EVENT_DATA"], 0x00630002)
        error = PeerError("PEER_E_NOT_AUTHORIZED", "why")
        self.assertEqual(error.toJSON()["hex"], "0x80632020")
        self.assertEqual(PeerError.fromJSON(error.toJSON()).name, "PEER_E_NOT_AUTHORIZED")

    def test_filetime(self):
        self.assertEqual(C.filetimeFromUnix(0), 116444736000000000)
        self.assertEqual(C.unixFromFiletime(C.filetimeFromUnix(1.7e9)), 1.7e9)

    def test_guid(self):
        self.assertEqual(C.normGUID("{F12DC4C7-0857-4CA0-93FC-B1BB19A3D8C2}"), C.ROLE_MEMBER)
        self.assertIsNone(C.normGUID("not-a-guid"))


class StreamFramingTests(TestCase):
    """
    The length-prefixed protocol with a StringTransport and a Clock: the
    session's hello, a request's answer, and the keepalive.
    """

    def setUp(self):
        from broker.peergroups.core import PeerGroups
        from broker.peergroups.protocol import PeerStreamFactory
        from broker.peergroups.store import SQLitePeerGroupStore
        self.clock = Clock()
        self.clock.advance(1.7e9)
        self.store = SQLitePeerGroupStore(self.clock, ":memory:")
        self.pg = PeerGroups(self.clock, self.store, keepaliveInterval=10,
                             keepaliveTimeout=30, sweepInterval=1)
        self.pg.loaded = True
        self.proto = PeerStreamFactory(self.pg, 4096).buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def frames(self):
        data, out = self.transport.value(), []
        self.transport.clear()
        while data:
            (n,) = struct.unpack("!I", data[:4])
            out.append(json.loads(data[4:4 + n]))
            data = data[4 + n:]
        return out

    def send(self, obj):
        payload = json.dumps(obj).encode()
        self.proto.dataReceived(struct.pack("!I", len(payload)) + payload)

    def test_helloAndAnswer(self):
        hello = self.frames()[0]["hello"]
        self.assertEqual(hello["protocol"], "peergroup.v1")
        self.assertEqual(len(cred.unb64(hello["challenge"])), 32)
        self.send({"id": 1, "method": "startup", "params": {"version": 0x0101}})
        self.assertEqual(self.frames(), [{"id": 1, "hr": 0, "result": {
            "version": 0x0101, "highestVersion": 0x0101, "issuerKey": None}}])

    def test_keepalive(self):
        """
        A quiet session is pinged; one silent past the timeout is dropped.
        """
        self.frames()
        self.pg.sweep()
        self.assertEqual(self.frames(), [])
        self.clock.advance(10)
        self.pg.sweep()
        self.assertIn("ping", self.frames()[0])
        self.send({"pong": 1})
        self.clock.advance(25)
        self.pg.sweep()
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(31)
        self.pg.sweep()
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.assertNotIn(self.proto.session, self.pg.sessions)
