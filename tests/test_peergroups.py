"""
Tests for the peer-groups face over real WebSocket and TCP connections with
real Ed25519 keys generated in each test: one test per applicable line of
the spec's section 11 checklist (each run over both wires), an end-to-end
scenario, restart durability and bad input.
"""

import json
import os
import shutil

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.client import Identity, PeerError, nowFiletime
from broker.peergroups.errors import HRESULTS
from tests.pgharness import PeerBroker

T1 = "11111111-2222-3333-4444-555555555555"
T2 = "66666666-7777-8888-9999-aaaaaaaaaaaa"
DATA = "0f0e0d0c-0b0a-0908-0706-050403020100"
ALL_EVENTS = [C.EVENT_STATUS_CHANGED, C.EVENT_PROPERTY_CHANGED, C.EVENT_RECORD_CHANGED,
              C.EVENT_DIRECT_CONNECTION, C.EVENT_INCOMING_DATA, C.EVENT_MEMBER_CHANGED,
              C.EVENT_CONNECTION_FAILED]
HOUR = 3600 * C.TICKS


class Member:
    """
    One peer in a test: its client, identity, group handle and event
    registration.
    """

    def __init__(self, client, identity, handle=None, reg=None):
        self.client = client
        self.identity = identity
        self.handle = handle
        self.reg = reg

    @property
    def name(self):
        return self.identity.peerName

    def call(self, method, **params):
        return self.client.call(method, handle=self.handle, **params)

    def next(self, eventType=None, **fields):
        return self.client.nextEvent(self.reg, eventType, **fields)

    @defer.inlineCallbacks
    def drain(self):
        """
        Every event queued for the registration once the broker has written
        all it had (a round trip first).
        """
        yield self.client.sync()
        events = []
        while True:
            hr, event = self.client.getEventData(self.reg)
            if event is None:
                return events
            events.append(event)


class Base:
    """
    Mixed into a TestCase with C{transport} = C{"ws"} or C{"tcp"}.
    """

    transport = "ws"
    toml = ""
    useClock = False

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = Clock() if self.useClock else None
        self.broker = yield PeerBroker(self, reactor, toml=self.toml, clock=self.clock).start()

    @defer.inlineCallbacks
    def failsWith(self, d, name):
        try:
            yield d
        except PeerError as e:
            self.assertEqual((e.name, e.hr), (name, HRESULTS[name]), e.message)
            return e
        self.fail(f"expected {name}")

    @defer.inlineCallbacks
    def peer(self, name, transport=None, identity=None, application="default"):
        identity = identity or Identity.generate(name, name.title())
        client = yield self.broker.peer(transport or self.transport, application=application,
                                        identity=identity)
        return Member(client, identity)

    @defer.inlineCallbacks
    def register(self, m, events=ALL_EVENTS):
        m.reg = yield m.client.registerEvent(m.handle, events)
        return m.reg

    @defer.inlineCallbacks
    def online(self, m):
        hr, _ = yield m.client.connect(m.handle)
        event = yield m.next(C.EVENT_STATUS_CHANGED)
        self.assertEqual(event["status"], C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS)
        return hr

    @defer.inlineCallbacks
    def group(self, name="admin", **props):
        admin = yield self.peer(name)
        admin.handle = yield admin.client.create(friendlyName="Team", **props)
        yield self.register(admin)
        yield self.online(admin)
        return admin

    @defer.inlineCallbacks
    def invite(self, admin, name, roles=(C.ROLE_MEMBER,), connect=True, transport=None,
               **kw):
        m = yield self.peer(name, transport)
        invitation = yield admin.client.createInvitation(
            admin.handle, m.identity.identityInfo(), roles=roles, **kw)
        m.handle = yield m.client.join(invitation)
        yield self.register(m)
        if connect:
            yield self.online(m)
        return m


def _transports(cls):
    """
    Make C{WS} and C{TCP} test cases of a scenario class.
    """
    # Named in the scenario's own module, where trial (-j) looks them up.
    ws = type(cls.__name__ + "WS", (cls, TestCase),
              {"transport": "ws", "__module__": cls.__module__})
    tcp = type(cls.__name__ + "TCP", (cls, TestCase),
               {"transport": "tcp", "__module__": cls.__module__})
    return ws, tcp


# -- startup and lifecycle ----------------------------------------------------

class Lifecycle(Base):
    @defer.inlineCallbacks
    def test_startupFirst(self):
        """
        Any call before startup is PEER_E_NOT_INITIALIZED; a version above
        1.1 is PEER_E_UNSUPPORTED_VERSION; startup returns the versions.
        """
        client = yield self.broker.connect(self.transport)
        yield client.helloReceived
        yield self.failsWith(client.call("open", groupPeerName="x.y"), "PEER_E_NOT_INITIALIZED")
        yield self.failsWith(client.call("startup", version=0x0201),
                             "PEER_E_UNSUPPORTED_VERSION")
        result = yield client.startup("default", version=0x0101)
        self.assertEqual((result["version"], result["highestVersion"]), (0x0101, 0x0101))
        yield self.failsWith(client.call("open", groupPeerName="x.y"),
                             "PEER_E_IDENTITY_NOT_FOUND")

    @defer.inlineCallbacks
    def test_identityProof(self):
        """
        The broker admits an identity only with a signature of its one-time
        challenge by that identity's key: a signature by another key, or
        one replayed from another session, is PEER_E_NO_KEY_ACCESS.
        """
        alice = Identity.generate("alice")
        mallory = Identity.generate("mallory")
        client = yield self.broker.connect(self.transport)
        yield client.startup("default")
        challenge = cred.unb64(client.hello["challenge"])
        forged = mallory.sign(cred.authMessage(challenge, "default", alice.publicKey))
        yield self.failsWith(client.call("registerIdentity", identityInfo=alice.identityInfo(),
                                         signature=cred.b64(forged)), "PEER_E_NO_KEY_ACCESS")
        # A genuine proof from another session does not work here.
        other = yield self.broker.connect(self.transport)
        yield other.startup("default")
        stolen = alice.sign(cred.authMessage(cred.unb64(other.hello["challenge"]), "default",
                                             alice.publicKey))
        yield self.failsWith(client.call("registerIdentity", identityInfo=alice.identityInfo(),
                                         signature=cred.b64(stolen)), "PEER_E_NO_KEY_ACCESS")
        name = yield client.registerIdentity(alice)
        self.assertEqual(name, alice.peerName)
        self.assertEqual(name.split(".")[0], cred.authority(alice.publicKey))

    @defer.inlineCallbacks
    def test_create(self):
        """
        Create returns an offline handle; the creator is an administrator
        with a 1000-year GMC; the group peer name is generated from the
        group key and cannot be supplied.
        """
        admin = yield self.peer("admin")
        yield self.failsWith(admin.client.call("create", properties={"groupPeerName": "a.b"},
                                               chain=[]), "PEER_E_INVALID_GROUP_PROPERTIES")
        h = yield admin.client.create(friendlyName="Team", classifier="team")
        self.assertEqual((yield admin.client.getStatus(h)), 0)
        gpn = admin.client.groupPeerName(h)
        groupKey = admin.client.groupKeys[gpn]
        from cryptography.hazmat.primitives import serialization
        raw = groupKey.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
        self.assertEqual(gpn, cred.authority(raw) + ".team")
        admin.handle = h
        yield self.register(admin)
        yield self.online(admin)
        creds = yield admin.call("getCredentials")
        info = creds["credentialInfo"]
        self.assertEqual(info["roles"], [C.ROLE_ADMIN])
        years = (info["validityEnd"] - info["validityStart"]) / C.TICKS / (365.25 * 86400)
        self.assertTrue(999.9 < years < 1000.1, years)

    @defer.inlineCallbacks
    def test_connectNeedsAnOnlineMember(self):
        """
        An invitee's first connect with nobody online fails with
        CONNECTION_FAILED / PEER_E_NO_MEMBERS_FOUND; once the creator is
        connected it succeeds with STATUS_CHANGED.
        """
        admin = yield self.peer("admin")
        admin.handle = yield admin.client.create()
        yield self.register(admin)
        bob = yield self.peer("bob")
        # The creator may invite only once connected...
        yield self.failsWith(admin.client.createInvitation(admin.handle,
                                                           bob.identity.identityInfo()),
                             "PEER_E_GROUP_NOT_READY")
        yield self.online(admin)
        invitation = yield admin.client.createInvitation(admin.handle,
                                                         bob.identity.identityInfo())
        yield admin.client.close(admin.handle)
        bob.handle = yield bob.client.join(invitation)
        yield self.register(bob)
        hr, _ = yield bob.client.connect(bob.handle)
        self.assertEqual(hr, 0)
        failed = yield bob.next(C.EVENT_CONNECTION_FAILED)
        self.assertEqual(failed["hrConnectionFailedReason"], HRESULTS["PEER_E_NO_MEMBERS_FOUND"])
        admin.handle = yield admin.client.open(admin.client.groupPeerName(1))
        yield self.register(admin)
        yield self.online(admin)
        yield self.online(bob)

    @defer.inlineCallbacks
    def test_notReadyUntilConnected(self):
        """
        Record, property, invitation and time calls between Join/Open and
        the end of synchronisation are PEER_E_GROUP_NOT_READY; they succeed
        after.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob", connect=False)
        calls = [
            lambda: bob.client.addRecord(bob.handle, T1, b"x"),
            lambda: bob.client.enumRecords(bob.handle),
            lambda: bob.client.getProperties(bob.handle),
            lambda: bob.call("universalTimeToPeerTime", time=1),
            lambda: bob.call("getCredentials"),
        ]
        for call in calls:
            yield self.failsWith(call(), "PEER_E_GROUP_NOT_READY")
        yield self.online(bob)
        rid = yield bob.client.addRecord(bob.handle, T1, b"x")
        self.assertEqual([r["id"] for r in (yield bob.client.enumRecords(bob.handle))], [rid])
        self.assertEqual((yield bob.client.getProperties(bob.handle))["friendlyName"], "Team")
        self.assertEqual((yield bob.call("universalTimeToPeerTime", time=5))["time"], 5)

    @defer.inlineCallbacks
    def test_closeInvalidatesOnlyThatHandle(self):
        """
        Close invalidates the handle (PEER_E_INVALID_GROUP after); another
        handle of the same identity stays connected, now at that session's
        address (the others see MEMBER_CHANGED/UPDATED); the last close
        disconnects the node and the others see MEMBER_CHANGED/DISCONNECTED.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        bob2 = yield self.peer("bob", identity=bob.identity)
        bob2.handle = yield bob2.client.open(admin.client.groupPeerName(admin.handle))
        self.assertEqual((yield bob2.client.getStatus(bob2.handle)), 3)
        (entry,) = yield admin.client.enumMembers(admin.handle, identity=bob.name)
        yield admin.drain()
        yield bob.client.close(bob.handle)
        yield self.failsWith(bob.client.getStatus(bob.handle), "PEER_E_INVALID_GROUP")
        self.assertEqual((yield bob2.client.getStatus(bob2.handle)), 3)
        self.assertEqual([e["memberChangeData"] for e in (yield admin.drain())],
                         [{"changeType": C.MEMBER_UPDATED, "identity": bob.name}])
        (moved,) = yield admin.client.enumMembers(admin.handle, identity=bob.name)
        self.assertEqual(moved["flags"], C.MEMBER_PRESENT)
        self.assertNotEqual(moved["addresses"], entry["addresses"])
        yield bob2.client.close(bob2.handle)
        event = yield admin.next(C.EVENT_MEMBER_CHANGED)
        self.assertEqual(event["memberChangeData"],
                         {"changeType": C.MEMBER_DISCONNECTED, "identity": bob.name})

    @defer.inlineCallbacks
    def test_storeFailureStartsAgain(self):
        """
        A change the store refuses (here a create) is answered E_UNEXPECTED;
        then every session is closed and the state reloaded from the store,
        so memory never keeps what a restart would lose: the refused group
        does not exist, the stored one does and its members reopen it.
        """
        admin = yield self.group()
        gpn = admin.client.groupPeerName(admin.handle)
        carol = yield self.peer("carol")
        store = self.broker.store
        real = store.apply

        def failOnce(changes):
            store.apply = real
            return defer.fail(OSError("disk full"))
        store.apply = failOnce
        e = yield self.failsWith(carol.client.create(friendlyName="Lost"), "E_UNEXPECTED")
        self.assertIn("starts again from its store", e.message)
        yield admin.client.closed
        yield carol.client.closed
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        yield self.broker.pg.whenLoaded()
        self.assertEqual(list(self.broker.pg.apps["default"].groups), [gpn])
        self.assertEqual(self.broker.pg.counters.dropped["store_failure"], 2)
        again = yield self.peer("admin", identity=admin.identity)
        again.handle = yield again.client.open(gpn)
        yield self.register(again)
        yield self.online(again)
        yield again.client.create(friendlyName="Now stored")

    @defer.inlineCallbacks
    def test_delete(self):
        """
        Delete of an unknown group is PEER_E_NOT_FOUND; afterwards every
        handle of every session is PEER_E_INVALID_GROUP and the group can
        be re-entered only with a new invitation.
        """
        admin = yield self.group()
        yield self.failsWith(admin.client.delete("0" * 40 + ".nothing"), "PEER_E_NOT_FOUND")
        bob = yield self.peer("bob")
        invitation = yield admin.client.createInvitation(admin.handle,
                                                         bob.identity.identityInfo())
        bob.handle = yield bob.client.join(invitation)
        yield self.register(bob)
        yield self.online(bob)
        bob2 = yield self.peer("bob", identity=bob.identity)
        gpn = admin.client.groupPeerName(admin.handle)
        bob2.handle = yield bob2.client.open(gpn)
        yield bob.client.delete(gpn)
        for m in (bob, bob2):
            yield self.failsWith(m.client.getStatus(m.handle), "PEER_E_INVALID_GROUP")
            yield self.failsWith(m.client.enumRecords(m.handle), "PEER_E_INVALID_GROUP")
        yield self.failsWith(bob.client.open(gpn), "PEER_E_NOT_FOUND")
        yield self.failsWith(bob.client.join(invitation), "PEER_E_INVALID_CREDENTIAL")
        fresh = yield admin.client.createInvitation(admin.handle, bob.identity.identityInfo())
        bob.handle = yield bob.client.join(fresh)
        yield self.register(bob)
        yield self.online(bob)


LifecycleWS, LifecycleTCP = _transports(Lifecycle)


# -- multiplexing ---------------------------------------------------------------

class Multiplexing(Base):
    @defer.inlineCallbacks
    def test_sameIdentityShares(self):
        """
        Two sessions of one identity share one membership, one view of the
        records and one online state: Connect in A brings B online; a record
        added in A is in B; Open in a third session while connected is
        online at once.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob", connect=False)
        bob2 = yield self.peer("bob", identity=bob.identity)
        gpn = admin.client.groupPeerName(admin.handle)
        bob2.handle = yield bob2.client.open(gpn)
        yield self.register(bob2)
        yield self.online(bob)
        event = yield bob2.next(C.EVENT_STATUS_CHANGED)
        self.assertEqual(event["status"], 3)
        rid = yield bob.client.addRecord(bob.handle, T1, b"shared")
        record = yield bob2.client.getRecord(bob2.handle, rid)
        self.assertEqual(record["creatorId"], bob.name)
        bob3 = yield self.peer("bob", identity=bob.identity)
        bob3.handle = yield bob3.client.open(gpn)
        self.assertEqual((yield bob3.client.getStatus(bob3.handle)), 3)
        self.assertEqual(len((yield bob3.client.enumRecords(bob3.handle))), 1)
        members = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual([m["identity"] for m in members], [admin.name, bob.name])

    @defer.inlineCallbacks
    def test_applicationsIsolated(self):
        """
        Applications share the port and the store but nothing else: a group
        of one is unknown to another, its invitation useless there.
        """
        admin = yield self.group()
        other = yield self.peer("bob", application="other")
        invitation = yield admin.client.createInvitation(admin.handle,
                                                         other.identity.identityInfo())
        yield self.failsWith(other.client.join(invitation), "PEER_E_INVITATION_NOT_TRUSTED")
        gpn = admin.client.groupPeerName(admin.handle)
        yield self.failsWith(other.client.open(gpn), "PEER_E_NOT_FOUND")
        otherAdmin = yield self.peer("carol", application="other")
        otherAdmin.handle = yield otherAdmin.client.create()
        yield self.register(otherAdmin)
        yield self.online(otherAdmin)
        yield admin.drain()
        yield otherAdmin.client.addRecord(otherAdmin.handle, T1, b"other")
        self.assertEqual((yield admin.client.enumRecords(admin.handle)), [])
        self.assertEqual((yield admin.drain()), [])
        self.assertEqual(sorted(self.broker.core.hubs), ["pg.default", "pg.other"])


MultiplexingWS, MultiplexingTCP = _transports(Multiplexing)


class Quotas(Base):
    toml = ('applications = ["default", "other"]\n'
            "max_groups_per_creator = 2\nmax_records_per_group = 3\n")

    @defer.inlineCallbacks
    def test_applicationsServed(self):
        """
        With an application list, startup for another is E_ACCESSDENIED.
        """
        client = yield self.broker.connect(self.transport)
        yield self.failsWith(client.startup("elsewhere"), "E_ACCESSDENIED")
        yield client.startup("other")

    @defer.inlineCallbacks
    def test_groupsPerCreator(self):
        """
        One identity creates at most max_groups_per_creator groups
        (E_OUTOFMEMORY beyond); another identity has its own quota.
        """
        admin = yield self.group()
        yield admin.client.create()
        yield self.failsWith(admin.client.create(), "E_OUTOFMEMORY")
        carol = yield self.peer("carol")
        yield carol.client.create()

    @defer.inlineCallbacks
    def test_recordsPerGroup(self):
        """
        A group holds at most max_records_per_group records, tombstones
        included: a delete frees nothing until the tombstone is purged.
        """
        admin = yield self.group()
        ids = []
        for i in range(3):
            ids.append((yield admin.client.addRecord(admin.handle, T1, b"%d" % i)))
        yield self.failsWith(admin.client.addRecord(admin.handle, T1, b"x"), "E_OUTOFMEMORY")
        yield admin.client.deleteRecord(admin.handle, ids[0])
        yield self.failsWith(admin.client.addRecord(admin.handle, T1, b"x"), "E_OUTOFMEMORY")
        yield admin.client.updateRecord(admin.handle, dict(
            (yield admin.client.getRecord(admin.handle, ids[1])), data=cred.b64(b"still")))

    @defer.inlineCallbacks
    def test_creators(self):
        """
        With a creators list, only those identities create groups; the
        others may still join the groups they are invited to.
        """
        alice = Identity.generate("alice", "Alice")
        self.broker = yield PeerBroker(
            self, reactor, toml=f'creators = ["{alice.peerName}"]\n').start()
        bob = yield self.peer("bob")
        yield self.failsWith(bob.client.create(), "PEER_E_NOT_AUTHORIZED")
        admin = yield self.peer("alice", identity=alice)
        admin.handle = yield admin.client.create()
        yield self.register(admin)
        yield self.online(admin)
        invitation = yield admin.client.createInvitation(admin.handle,
                                                         bob.identity.identityInfo())
        bob.handle = yield bob.client.join(invitation)


QuotasWS, QuotasTCP = _transports(Quotas)


# -- security -------------------------------------------------------------------

class Security(Base):
    @defer.inlineCallbacks
    def test_invitationBoundToInvitee(self):
        """
        An invitation names the invitee's key: anyone else joining with it
        is refused.
        """
        admin = yield self.group()
        bob = yield self.peer("bob")
        carol = yield self.peer("carol")
        invitation = yield admin.client.createInvitation(admin.handle,
                                                         bob.identity.identityInfo())
        yield self.failsWith(carol.client.join(invitation), "PEER_E_INVALID_CREDENTIAL")
        yield bob.client.join(invitation)

    @defer.inlineCallbacks
    def test_tamperedOrForgedInvitation(self):
        """
        An altered invitation (role raised without the signature) or one
        forged by a non-member (its own root) is PEER_E_INVITATION_NOT_TRUSTED.
        """
        admin = yield self.group()
        bob = yield self.peer("bob")
        invitation = yield admin.client.createInvitation(admin.handle,
                                                         bob.identity.identityInfo())
        inv = json.loads(invitation)
        leaf = inv["PEERINVITATION"]["gmc"][-1]
        body = json.loads(cred.unb64(leaf["body"]))
        body["roles"] = [C.ROLE_ADMIN]
        leaf["body"] = cred.b64(cred.canonical(body))
        yield self.failsWith(bob.client.join(json.dumps(inv)), "PEER_E_INVITATION_NOT_TRUSTED")
        # A forger signs a member certificate for bob with its own key.
        forger = Identity.generate("forger")
        gpn = admin.client.groupPeerName(admin.handle)
        chain = [cred.Certificate.fromJSON(c) for c in json.loads(invitation)
                 ["PEERINVITATION"]["gmc"]]
        forged = cred.Certificate.make(forger, "GMC", gpn, bob.identity.publicKey,
                                       bob.name, [C.ROLE_ADMIN], nowFiletime(),
                                       nowFiletime() + HOUR)
        text = cred.encodeInvitation("default", gpn, chain[:2] + [forged])
        yield self.failsWith(bob.client.join(text), "PEER_E_INVITATION_NOT_TRUSTED")
        yield self.failsWith(bob.client.join("not an invitation"),
                             "PEER_E_INVITATION_NOT_TRUSTED")
        yield bob.client.join(invitation)

    @defer.inlineCallbacks
    def test_roles(self):
        """
        A member cannot invite or issue credentials; an inviting member
        issues Member and Inviting Member but not Admin; a certificate a
        member signs itself is refused by the broker too.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        carol = yield self.peer("carol")
        info = carol.identity.identityInfo()
        yield self.failsWith(bob.client.createInvitation(bob.handle, info),
                             "PEER_E_NOT_AUTHORIZED")
        yield self.failsWith(bob.client.issueCredentials(bob.handle, info),
                             "PEER_E_NOT_AUTHORIZED")
        dave = yield self.invite(admin, "dave", roles=(C.ROLE_INVITING_MEMBER,))
        yield dave.client.createInvitation(dave.handle, info)
        yield dave.client.createInvitation(dave.handle, info, roles=(C.ROLE_INVITING_MEMBER,))
        yield self.failsWith(dave.client.createInvitation(dave.handle, info,
                                                          roles=(C.ROLE_ADMIN,)),
                             "PEER_E_NOT_AUTHORIZED")
        yield self.failsWith(dave.client.issueCredentials(dave.handle, info,
                                                          roles=(C.ROLE_ADMIN,)),
                             "PEER_E_NOT_AUTHORIZED")
        # An inviting member's invitee holds what it was given.
        invitation = yield dave.client.createInvitation(dave.handle, info)
        carol.handle = yield carol.client.join(invitation)
        yield self.register(carol)
        yield self.online(carol)
        creds = yield carol.call("getCredentials")
        self.assertEqual(creds["credentialInfo"]["roles"], [C.ROLE_MEMBER])
        self.assertEqual(len(creds["chain"]), 4)

    @defer.inlineCallbacks
    def test_expirationWithinIssuer(self):
        """
        An expiration beyond the issuer's remaining lifetime is
        PEER_E_INVALID_TIME_PERIOD; no expiration means the issuer's.
        """
        admin = yield self.group()
        end = nowFiletime() + 2 * HOUR
        dave = yield self.invite(admin, "dave", roles=(C.ROLE_INVITING_MEMBER,),
                                 expiration=end)
        carol = yield self.peer("carol")
        info = carol.identity.identityInfo()
        yield self.failsWith(dave.client.createInvitation(dave.handle, info,
                                                          expiration=end + HOUR),
                             "PEER_E_INVALID_TIME_PERIOD")
        invitation = yield dave.client.createInvitation(dave.handle, info)
        leaf = json.loads(invitation)["PEERINVITATION"]["gmc"][-1]
        self.assertEqual(json.loads(cred.unb64(leaf["body"]))["notAfter"], end)

    @defer.inlineCallbacks
    def test_chainLimits(self):
        """
        After 24 issuers the next issuance is PEER_E_CHAIN_TOO_LONG; an
        issuer cannot re-issue to a key already in its own chain
        (PEER_E_CIRCULAR_CHAIN_DETECTED).
        """
        admin = yield self.group()
        last = admin
        for i in range(C.MAX_CHAIN_LENGTH - 1):
            last = yield self.invite(last, f"admin{i}", roles=(C.ROLE_ADMIN,))
            if i == 0:
                second = last
        creds = yield last.call("getCredentials")
        self.assertEqual(len(creds["chain"]) - 1, C.MAX_CHAIN_LENGTH)
        extra = yield self.peer("extra")
        yield self.failsWith(last.client.createInvitation(last.handle,
                                                          extra.identity.identityInfo()),
                             "PEER_E_CHAIN_TOO_LONG")
        yield self.failsWith(second.client.createInvitation(second.handle,
                                                            admin.identity.identityInfo(),
                                                            roles=(C.ROLE_ADMIN,)),
                             "PEER_E_CIRCULAR_CHAIN_DETECTED")

    @defer.inlineCallbacks
    def test_issueCredentialsStore(self):
        """
        IssueCredentials with STORE_CREDENTIALS publishes the membership
        (MEMBER_CHANGED/JOINED everywhere); a connected subject keeps its
        old role until it reconnects; without the flag nothing is published.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        carol = yield self.invite(admin, "carol")
        for m in (admin, bob, carol):
            yield m.drain()
        info = bob.identity.identityInfo()
        yield admin.client.issueCredentials(admin.handle, info, roles=(C.ROLE_INVITING_MEMBER,))
        for m in (admin, bob, carol):
            self.assertEqual((yield m.drain()), [])
        yield admin.client.issueCredentials(admin.handle, info, roles=(C.ROLE_ADMIN,),
                                            flags=C.STORE_CREDENTIALS)
        for m in (admin, bob, carol):
            events = yield m.drain()
            self.assertEqual([e["memberChangeData"] for e in events],
                             [{"changeType": C.MEMBER_JOINED, "identity": bob.name}])
        dave = yield self.peer("dave")
        yield self.failsWith(bob.client.createInvitation(bob.handle,
                                                         dave.identity.identityInfo()),
                             "PEER_E_NOT_AUTHORIZED")
        yield bob.client.close(bob.handle)
        bob.handle = yield bob.client.open(admin.client.groupPeerName(admin.handle))
        yield self.register(bob)
        yield self.online(bob)
        invitation = yield bob.client.createInvitation(bob.handle, dave.identity.identityInfo(),
                                                       roles=(C.ROLE_ADMIN,))
        self.assertIn("gmc", invitation)

    @defer.inlineCallbacks
    def test_validityStartMustIncrease(self):
        """
        New credentials whose ValidityStart is not after the current
        ones' are PEER_E_INVALID_TIME_PERIOD.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        creds = yield bob.call("getCredentials")
        start = creds["credentialInfo"]["validityStart"]
        yield self.failsWith(admin.client.issueCredentials(
            admin.handle, bob.identity.identityInfo(), validityStart=start,
            flags=C.STORE_CREDENTIALS), "PEER_E_INVALID_TIME_PERIOD")
        yield admin.client.issueCredentials(admin.handle, bob.identity.identityInfo(),
                                            validityStart=start + C.TICKS,
                                            flags=C.STORE_CREDENTIALS)

    @defer.inlineCallbacks
    def test_recordsBoundByCredentials(self):
        """
        A record whose expiration is beyond the publisher's GMC is
        refused.
        """
        admin = yield self.group()
        end = nowFiletime() + HOUR
        bob = yield self.invite(admin, "bob", expiration=end)
        yield self.failsWith(bob.client.addRecord(bob.handle, T1, expiration=end + C.TICKS),
                             "PEER_E_INVALID_RECORD_EXPIRATION")
        yield bob.client.addRecord(bob.handle, T1, expiration=end)


SecurityWS, SecurityTCP = _transports(Security)


class PasswordGroups(Base):
    @defer.inlineCallbacks
    def test_passwordJoin(self):
        """
        The right password gives a GMC with the group's password role,
        valid to the issuer's end; a wrong one fails the connect with
        PEER_E_NOT_AUTHORIZED; a second join is PEER_S_ALREADY_A_MEMBER; the
        password invitation binds nobody and the password never travels.
        """
        admin = yield self.group(password="s3cret p4ss", passwordRole=C.ROLE_INVITING_MEMBER)
        sent = []
        invitation = yield admin.client.createPasswordInvitation(admin.handle)
        body = json.loads(invitation)["PEERINVITATION"]
        self.assertEqual(body["version"], "1.1")
        self.assertNotIn("gmc", body)
        bob = yield self.peer("bob")
        original = bob.client._sendObject
        bob.client._sendObject = lambda obj: (sent.append(json.dumps(obj)), original(obj))
        hr, bob.handle = yield bob.client.passwordJoin(invitation, "wrong")
        yield self.register(bob)
        yield bob.client.connect(bob.handle)
        failed = yield bob.next(C.EVENT_CONNECTION_FAILED)
        self.assertEqual(failed["hrConnectionFailedReason"], HRESULTS["PEER_E_NOT_AUTHORIZED"])
        bob.client._handles[bob.handle]["password"] = "s3cret p4ss"
        yield self.online(bob)
        creds = yield bob.call("getCredentials")
        info = creds["credentialInfo"]
        self.assertEqual(info["roles"], [C.ROLE_INVITING_MEMBER])
        adminCreds = yield admin.call("getCredentials")
        self.assertEqual(info["validityEnd"], adminCreds["credentialInfo"]["validityEnd"])
        members = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertIn(bob.name, [m["identity"] for m in members])
        yield bob.client.close(bob.handle)
        hr, bob.handle = yield bob.client.passwordJoin(invitation, "s3cret p4ss")
        self.assertEqual(hr, HRESULTS["PEER_S_ALREADY_A_MEMBER"])
        for frame in sent:
            self.assertNotIn("s3cret", frame)
            self.assertNotIn("wrong", frame)
        # Re-opening needs no password.
        yield bob.client.close(bob.handle)
        bob.handle = yield bob.client.open(admin.client.groupPeerName(admin.handle))
        yield self.register(bob)
        yield self.online(bob)


PasswordGroupsWS, PasswordGroupsTCP = _transports(PasswordGroups)


class ClockedSecurity(Base):
    useClock = True
    toml = "keepalive_interval = 250.0\nkeepalive_timeout = 299.0\n"

    @defer.inlineCallbacks
    def test_invitationTimes(self):
        """
        An invitation that is not yet valid, or has expired, is
        PEER_E_INVALID_TIME_PERIOD.
        """
        admin = yield self.group()
        bob = yield self.peer("bob")
        now = self.broker.pg.now()
        info = bob.identity.identityInfo()
        early = yield admin.client.createInvitation(admin.handle, info,
                                                    validityStart=now + HOUR)
        yield self.failsWith(bob.client.join(early), "PEER_E_INVALID_TIME_PERIOD")
        late = yield admin.client.createInvitation(admin.handle, info,
                                                   expiration=now + 30 * C.TICKS)
        self.clock.advance(60)
        yield self.failsWith(bob.client.join(late), "PEER_E_INVALID_TIME_PERIOD")

    @defer.inlineCallbacks
    def test_noRecordsAfterCredentialsExpire(self):
        """
        After a member's GMC has expired it can publish nothing.
        """
        admin = yield self.group()
        end = self.broker.pg.now() + 100 * C.TICKS
        bob = yield self.invite(admin, "bob", expiration=end)
        yield bob.client.addRecord(bob.handle, T1, expiration=end)
        self.clock.advance(150)
        yield self.failsWith(bob.client.addRecord(bob.handle, T1, expiration=end + HOUR),
                             "PEER_E_INVALID_TIME_PERIOD")


ClockedSecurityWS, ClockedSecurityTCP = _transports(ClockedSecurity)


class PasswordGuessing(Base):
    useClock = True
    toml = ("keepalive_interval = 250.0\nkeepalive_timeout = 299.0\n"
            "password_failures_per_minute = 3\n")

    @defer.inlineCallbacks
    def tryPassword(self, invitation, password, name):
        peer = yield self.peer(name)
        _, peer.handle = yield peer.client.passwordJoin(invitation, password)
        yield self.register(peer)
        yield peer.client.connect(peer.handle)
        event = yield peer.next()
        return peer, event

    @defer.inlineCallbacks
    def test_guessingCapped(self):
        """
        A group checks a bounded number of wrong password proofs a minute,
        whichever identities and connections send them: beyond, even the
        right password is refused unchecked until the minute has passed.
        """
        admin = yield self.group(password="s3cret p4ss")
        invitation = yield admin.client.createPasswordInvitation(admin.handle)
        for i in range(3):
            _, event = yield self.tryPassword(invitation, f"guess{i}", f"guesser{i}")
            self.assertEqual(event["hrConnectionFailedReason"],
                             HRESULTS["PEER_E_NOT_AUTHORIZED"])
        bob, event = yield self.tryPassword(invitation, "s3cret p4ss", "bob")
        self.assertEqual((event["eventType"], event["hrConnectionFailedReason"]),
                         (C.EVENT_CONNECTION_FAILED, HRESULTS["PEER_E_NOT_AUTHORIZED"]))
        self.assertIn("too many wrong passwords", event["message"])
        self.assertEqual(self.broker.pg.counters.passwordFailures, 3)
        self.clock.advance(61)
        yield self.online(bob)


PasswordGuessingWS, PasswordGuessingTCP = _transports(PasswordGuessing)


# -- records --------------------------------------------------------------------

class Records(Base):
    toml = "max_record_size = 4096\n"

    @defer.inlineCallbacks
    def test_addSetsInfrastructureFields(self):
        """
        Add sets id, creator, creation = last-modified and version 1,
        ignoring what the client sent for them; reserved types are
        PEER_E_NOT_AUTHORIZED; oversized records are refused.
        """
        admin = yield self.group()
        before = nowFiletime() - C.TICKS
        rid = yield admin.client.addRecord(
            admin.handle, T1, b"payload", id="00000000-0000-0000-0000-000000000001",
            version=7, creatorId="someone", creation=1, lastModified=2)
        r = yield admin.client.getRecord(admin.handle, rid)
        self.assertNotEqual(rid, "00000000-0000-0000-0000-000000000001")
        self.assertEqual((r["version"], r["creatorId"], r["modifiedById"]), (1, admin.name, ""))
        self.assertEqual(r["creation"], r["lastModified"])
        self.assertGreater(r["creation"], before)
        self.assertEqual(cred.unb64(r["data"]), b"payload")
        for reserved in C.RESERVED_RECORD_TYPES:
            yield self.failsWith(admin.client.addRecord(admin.handle, reserved),
                                 "PEER_E_NOT_AUTHORIZED")
        yield self.failsWith(admin.client.addRecord(admin.handle, T1, b"x" * 4097),
                             "PEER_E_MAX_RECORD_SIZE_EXCEEDED")
        yield self.failsWith(admin.client.addRecord(admin.handle, T1, attributes="<a"),
                             "PEER_E_INVALID_ATTRIBUTES")

    @defer.inlineCallbacks
    def test_updateRules(self):
        """
        The creator or an administrator updates (version + 1); another
        member is PEER_E_NOT_AUTHORIZED; type and flags cannot change; the
        expiration cannot decrease.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        carol = yield self.invite(admin, "carol")
        rid = yield bob.client.addRecord(bob.handle, T1, b"v1")
        r = yield bob.client.getRecord(bob.handle, rid)
        r["data"] = cred.b64(b"v2")
        r2 = yield bob.client.updateRecord(bob.handle, r)
        self.assertEqual((r2["version"], r2["modifiedById"]), (2, bob.name))
        self.assertGreater(r2["lastModified"], r2["creation"])
        r2["data"] = cred.b64(b"v3")
        r3 = yield admin.client.updateRecord(admin.handle, r2)
        self.assertEqual((r3["version"], r3["modifiedById"]), (3, admin.name))
        yield self.failsWith(carol.client.updateRecord(carol.handle, r3),
                             "PEER_E_NOT_AUTHORIZED")
        yield self.failsWith(bob.client.updateRecord(bob.handle, dict(r3, type=T2)),
                             "E_INVALIDARG")
        yield self.failsWith(bob.client.updateRecord(bob.handle, dict(r3, flags=1)),
                             "E_INVALIDARG")
        yield self.failsWith(bob.client.updateRecord(
            bob.handle, dict(r3, expiration=r3["expiration"] - C.TICKS)),
            "PEER_E_INVALID_RECORD_EXPIRATION")
        final = yield bob.client.getRecord(bob.handle, rid)
        self.assertEqual((final["version"], cred.unb64(final["data"])), (3, b"v3"))

    @defer.inlineCallbacks
    def test_deleteRules(self):
        """
        The creator or an administrator deletes; another member is
        PEER_E_NOT_AUTHORIZED; afterwards Get is PEER_E_RECORD_NOT_FOUND,
        Enum and Search omit it, Update is not found.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        carol = yield self.invite(admin, "carol")
        attrs = '<attributes><attribute name="k">v</attribute></attributes>'
        rid = yield bob.client.addRecord(bob.handle, T1, b"x", attributes=attrs)
        other = yield carol.client.addRecord(carol.handle, T1, b"y", attributes=attrs)
        yield self.failsWith(carol.client.deleteRecord(carol.handle, rid),
                             "PEER_E_NOT_AUTHORIZED")
        record = yield bob.client.getRecord(bob.handle, rid)
        yield bob.client.deleteRecord(bob.handle, rid)
        yield admin.client.deleteRecord(admin.handle, other)
        for m in (admin, bob, carol):
            yield self.failsWith(m.client.getRecord(m.handle, rid), "PEER_E_RECORD_NOT_FOUND")
            self.assertEqual((yield m.client.enumRecords(m.handle)), [])
            found = yield m.client.searchRecords(
                m.handle, '<peersearch><clause attrib="k">v</clause></peersearch>')
            self.assertEqual(found, [])
        yield self.failsWith(bob.client.updateRecord(bob.handle, record),
                             "PEER_E_RECORD_NOT_FOUND")
        yield self.failsWith(bob.client.deleteRecord(bob.handle, rid),
                             "PEER_E_RECORD_NOT_FOUND")

    @defer.inlineCallbacks
    def test_storeFailureUndoes(self):
        """
        When the store cannot save an add, update or delete, the peer gets
        E_UNEXPECTED, nobody is told of a change, and the database reads as
        before (memory agrees with what a restart would load).
        """
        admin = yield self.group()
        rid = yield admin.client.addRecord(admin.handle, T1, b"kept")
        before = yield admin.client.getRecord(admin.handle, rid)
        yield admin.drain()
        store = self.broker.store
        real = store.apply

        def failOnce(changes):
            store.apply = real
            return defer.fail(OSError("disk full"))
        for call in (lambda: admin.client.addRecord(admin.handle, T1, b"lost"),
                     lambda: admin.client.updateRecord(admin.handle, dict(
                         before, data=cred.b64(b"changed"))),
                     lambda: admin.client.deleteRecord(admin.handle, rid)):
            store.apply = failOnce
            e = yield self.failsWith(call(), "E_UNEXPECTED")
            self.assertIn("nothing changed", e.message)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)
        self.assertEqual((yield admin.client.enumRecords(admin.handle)), [before])
        self.assertEqual((yield admin.drain()), [])

    @defer.inlineCallbacks
    def test_eventsExactlyOnceWithFilters(self):
        """
        Every online member gets exactly one RECORD_CHANGED per change with
        the right change type, id and type; a registration filtered on a
        type gets only that type.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        carol = yield self.invite(admin, "carol")
        filtered = yield carol.client.registerEvent(carol.handle,
                                                    [(C.EVENT_RECORD_CHANGED, T2)])
        for m in (admin, bob, carol):
            yield m.drain()
        r1 = yield bob.client.addRecord(bob.handle, T1, b"1")
        r2 = yield bob.client.addRecord(bob.handle, T2, b"2")
        rec = yield bob.client.getRecord(bob.handle, r2)
        yield bob.client.updateRecord(bob.handle, dict(rec, data=cred.b64(b"22")))
        yield bob.client.deleteRecord(bob.handle, r1)
        expected = [(1, r1, T1), (1, r2, T2), (2, r2, T2), (3, r1, T1)]
        for m in (admin, bob, carol):
            events = yield m.drain()
            seen = [(e["recordChangeData"]["changeType"], e["recordChangeData"]["recordId"],
                     e["recordChangeData"]["recordType"]) for e in events]
            self.assertEqual(seen, expected)
        only = []
        while True:
            hr, event = carol.client.getEventData(filtered)
            if event is None:
                self.assertEqual(hr, HRESULTS["PEER_S_NO_EVENT_DATA"])
                break
            only.append((event["recordChangeData"]["changeType"],
                         event["recordChangeData"]["recordId"]))
        self.assertEqual(only, [(1, r2), (2, r2)])

    @defer.inlineCallbacks
    def test_offlineMemberConverges(self):
        """
        A member offline during an add, an update and a delete is told of
        each once when it reconnects (the delete through its tombstone), and
        of nothing it never saw.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        kept = yield admin.client.addRecord(admin.handle, T1, b"kept")
        doomed = yield admin.client.addRecord(admin.handle, T1, b"doomed")
        yield bob.drain()
        yield bob.client.close(bob.handle)
        added = yield admin.client.addRecord(admin.handle, T1, b"added")
        record = yield admin.client.getRecord(admin.handle, kept)
        yield admin.client.updateRecord(admin.handle, dict(record, data=cred.b64(b"changed")))
        yield admin.client.deleteRecord(admin.handle, doomed)
        transient = yield admin.client.addRecord(admin.handle, T1, b"transient")
        yield admin.client.deleteRecord(admin.handle, transient)
        bob.handle = yield bob.client.open(admin.client.groupPeerName(admin.handle))
        yield self.register(bob, [C.EVENT_RECORD_CHANGED, C.EVENT_STATUS_CHANGED])
        yield bob.client.connect(bob.handle)
        events = yield bob.drain()
        changes = sorted((e["recordChangeData"]["changeType"], e["recordChangeData"]["recordId"])
                         for e in events if e["eventType"] == C.EVENT_RECORD_CHANGED)
        self.assertEqual(changes, sorted([(C.RECORD_UPDATED, kept), (C.RECORD_DELETED, doomed),
                                          (C.RECORD_ADDED, added)]))
        mine = sorted(r["id"] for r in (yield bob.client.enumRecords(bob.handle)))
        theirs = sorted(r["id"] for r in (yield admin.client.enumRecords(admin.handle)))
        self.assertEqual(mine, theirs)
        self.assertEqual(mine, sorted([kept, added]))

    @defer.inlineCallbacks
    def test_search(self):
        """
        Search over the protocol: and/or/clause, comparisons, wildcards;
        schema errors are PEER_E_INVALID_SEARCH and a bad escape
        E_INVALIDARG.
        """
        admin = yield self.group()

        def attrs(name, n):
            return (f'<attributes><attribute name="name">{name}</attribute>'
                    f'<attribute name="n" type="int">{n}</attribute></attributes>')
        a = yield admin.client.addRecord(admin.handle, T1, attributes=attrs("alpha", 1))
        b = yield admin.client.addRecord(admin.handle, T1, attributes=attrs("beta", 5))
        c = yield admin.client.addRecord(admin.handle, T2, attributes=attrs("a*b", 9))

        @defer.inlineCallbacks
        def ids(query):
            found = yield admin.client.searchRecords(admin.handle, f"<peersearch>{query}</peersearch>")
            return sorted(r["id"] for r in found)
        self.assertEqual((yield ids('<clause attrib="name">a*</clause>')), sorted([a, c]))
        self.assertEqual((yield ids('<clause attrib="name">a\\*b</clause>')), [c])
        self.assertEqual((yield ids('<clause attrib="name">b?ta</clause>')), [b])
        self.assertEqual((yield ids(
            '<and><clause attrib="n" type="int" compare="greaterorequal">5</clause>'
            f'<clause attrib="peerrecordtype">{T1}</clause></and>')), [b])
        self.assertEqual((yield ids(
            '<or><clause attrib="n" type="int" compare="less">2</clause>'
            '<clause attrib="n" type="int" compare="greater">8</clause></or>')),
            sorted([a, c]))
        yield self.failsWith(admin.client.searchRecords(
            admin.handle, '<peersearch><clause attrib="n">x</clause><clause attrib="n">y</clause>'
                          '</peersearch>'), "PEER_E_INVALID_SEARCH")
        yield self.failsWith(admin.client.searchRecords(
            admin.handle, '<peersearch><clause attrib="name">a\\b</clause></peersearch>'),
            "E_INVALIDARG")

    @defer.inlineCallbacks
    def test_exportImport(self):
        """
        Export writes a sealed file; import is refused once connected
        (PEER_E_GROUP_IN_USE), for an altered file or another identity's.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        yield admin.client.addRecord(admin.handle, T1, b"one")
        path = self.mktemp()
        yield admin.client.exportDatabase(admin.handle, path)
        yield self.failsWith(admin.client.importDatabase(admin.handle, path=path),
                             "PEER_E_GROUP_IN_USE")
        yield bob.client.close(bob.handle)
        bob.handle = yield bob.client.open(admin.client.groupPeerName(admin.handle))
        yield self.failsWith(bob.client.importDatabase(bob.handle, path=path), "E_INVALIDARG")
        with open(path) as f:
            text = f.read()
        outer = json.loads(text)
        payload = cred.unb64(outer["PEERGROUPDATABASE"]["payload"]).replace(
            b'"version":1', b'"version":9')
        outer["PEERGROUPDATABASE"]["payload"] = cred.b64(payload)
        yield admin.client.close(admin.handle)
        admin.handle = yield admin.client.open(admin.client.groupPeerName(1))
        yield self.failsWith(admin.client.importDatabase(admin.handle, json.dumps(outer)),
                             "E_INVALIDARG")
        result = yield admin.client.importDatabase(admin.handle, path=path)
        self.assertEqual(result["imported"], 0)


RecordsWS, RecordsTCP = _transports(Records)


class ClockedRecords(Base):
    useClock = True
    toml = "keepalive_interval = 30.0\nkeepalive_timeout = 90.0\nsweep_interval = 5.0\n"

    @defer.inlineCallbacks
    def test_expiry(self):
        """
        A record past its expiration raises RECORD_CHANGED/EXPIRED and is
        gone; a tombstone is purged at its expiration.
        """
        admin = yield self.group()
        now = self.broker.pg.now()
        rid = yield admin.client.addRecord(admin.handle, T1, expiration=now + 20 * C.TICKS)
        tomb = yield admin.client.addRecord(admin.handle, T1, expiration=now + 20 * C.TICKS)
        yield admin.client.deleteRecord(admin.handle, tomb)
        yield admin.drain()
        group = self.broker.pg.apps["default"].groups[admin.client.groupPeerName(admin.handle)]
        self.assertIn(tomb, group.records)
        self.clock.pump([5] * 5)
        event = yield admin.next(C.EVENT_RECORD_CHANGED)
        self.assertEqual(event["recordChangeData"]["changeType"], C.RECORD_EXPIRED)
        self.assertEqual(event["recordChangeData"]["recordId"], rid)
        self.assertEqual((yield admin.drain()), [])
        yield self.failsWith(admin.client.getRecord(admin.handle, rid),
                             "PEER_E_RECORD_NOT_FOUND")
        self.assertEqual(group.records, {})

    @defer.inlineCallbacks
    def test_deferExpiration(self):
        """
        With PEER_DEFER_EXPIRATION nothing expires while nobody is
        connected; it expires right after the next connect.
        """
        admin = yield self.group(flags=C.DEFER_EXPIRATION)
        now = self.broker.pg.now()
        rid = yield admin.client.addRecord(admin.handle, T1, expiration=now + 20 * C.TICKS)
        gpn = admin.client.groupPeerName(admin.handle)
        yield admin.client.close(admin.handle)
        self.clock.pump([5] * 10)
        group = self.broker.pg.apps["default"].groups[gpn]
        self.assertIn(rid, group.records)
        admin.handle = yield admin.client.open(gpn)
        yield self.register(admin)
        yield admin.client.connect(admin.handle)
        event = yield admin.next(C.EVENT_RECORD_CHANGED)
        self.assertEqual((event["recordChangeData"]["changeType"],
                          event["recordChangeData"]["recordId"]), (C.RECORD_EXPIRED, rid))
        self.assertNotIn(rid, group.records)

    @defer.inlineCallbacks
    def test_vanishedMemberLeavesPresence(self):
        """
        A member that vanishes without closing (its connection silent)
        leaves the present list, and the others see it disconnect, within
        the presence lifetime.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        present = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual(len(present), 2)
        yield admin.drain()
        # Bob's machine falls off the network: it reads nothing more, so
        # it never answers the broker's pings, and it closes nothing.
        bob.client._abort.__self__.pauseProducing()
        properties = yield admin.client.getProperties(admin.handle)
        lifetime = properties["presenceLifetime"]
        self.assertEqual(lifetime, 300)
        elapsed = 0
        while elapsed < lifetime:
            # Admin stays alive: it answers the broker's pings.
            self.clock.advance(5)
            elapsed += 5
            yield admin.client.sync()
            present = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
            if len(present) == 1:
                break
        self.assertLess(elapsed, lifetime)
        self.assertEqual([m["identity"] for m in present], [admin.name])
        events = yield admin.drain()
        self.assertIn({"changeType": C.MEMBER_DISCONNECTED, "identity": bob.name},
                      [e.get("memberChangeData") for e in events])


ClockedRecordsWS, ClockedRecordsTCP = _transports(ClockedRecords)


# -- properties and members -------------------------------------------------------

class PropertiesAndMembers(Base):
    @defer.inlineCallbacks
    def test_setProperties(self):
        """
        Only the creator sets properties; immutable ones are refused; every
        member gets PROPERTY_CHANGED and reads the new values.
        """
        admin = yield self.group()
        other = yield self.invite(admin, "other", roles=(C.ROLE_ADMIN,))
        bob = yield self.invite(admin, "bob")
        for m in (admin, other, bob):
            yield m.drain()
        yield self.failsWith(other.client.setProperties(other.handle, comment="x"),
                             "PEER_E_NOT_AUTHORIZED")
        yield self.failsWith(admin.client.setProperties(admin.handle, classifier="new"),
                             "PEER_E_INVALID_GROUP_PROPERTIES")
        yield self.failsWith(admin.client.setProperties(admin.handle, presenceLifetime=900),
                             "PEER_E_INVALID_GROUP_PROPERTIES")
        yield admin.client.setProperties(admin.handle, friendlyName="Renamed", comment="hi")
        for m in (admin, other, bob):
            events = yield m.drain()
            self.assertEqual([e["eventType"] for e in events], [C.EVENT_PROPERTY_CHANGED])
            props = yield m.client.getProperties(m.handle)
            self.assertEqual((props["friendlyName"], props["comment"]), ("Renamed", "hi"))

    @defer.inlineCallbacks
    def test_defaults(self):
        """
        Presence lifetime defaults to 300 s (smaller values are clamped),
        member data lifetime to 2,419,200 s.
        """
        admin = yield self.peer("admin")
        admin.handle = yield admin.client.create(presenceLifetime=100)
        yield self.register(admin)
        yield self.online(admin)
        props = yield admin.client.getProperties(admin.handle)
        self.assertEqual((props["presenceLifetime"], props["memberDataLifetime"]),
                         (300, 2419200))

    @defer.inlineCallbacks
    def test_enumMembers(self):
        """
        EnumMembers lists the local node first; PRESENT lists only online
        members with node ids and addresses; MEMBER_CHANGED JOINED,
        CONNECTED and DISCONNECTED are raised.
        """
        admin = yield self.group()
        yield admin.drain()
        bob = yield self.invite(admin, "bob")
        events = yield admin.drain()
        self.assertEqual([e["memberChangeData"] for e in events],
                         [{"changeType": C.MEMBER_JOINED, "identity": bob.name},
                          {"changeType": C.MEMBER_CONNECTED, "identity": bob.name}])
        members = yield bob.client.enumMembers(bob.handle)
        self.assertEqual([m["identity"] for m in members], [bob.name, admin.name])
        for m in members:
            self.assertEqual(m["flags"], C.MEMBER_PRESENT)
            self.assertNotEqual(m["nodeId"], "0")
            self.assertTrue(m["addresses"][0].startswith("127.0.0.1:"))
        yield bob.client.close(bob.handle)
        events = yield admin.drain()
        self.assertEqual([e["memberChangeData"] for e in events],
                         [{"changeType": C.MEMBER_DISCONNECTED, "identity": bob.name}])
        everyone = yield admin.client.enumMembers(admin.handle)
        self.assertEqual([(m["identity"], m["flags"]) for m in everyone],
                         [(admin.name, 1), (bob.name, 0)])
        present = yield admin.client.enumMembers(admin.handle, C.MEMBER_PRESENT)
        self.assertEqual([m["identity"] for m in present], [admin.name])

    @defer.inlineCallbacks
    def test_memberDataOptional(self):
        """
        With PEER_MEMBER_DATA_OPTIONAL a member is listed (and JOINED raised)
        only once it acts.
        """
        admin = yield self.group(flags=C.MEMBER_DATA_OPTIONAL)
        bob = yield self.invite(admin, "bob")
        listed = yield admin.client.enumMembers(admin.handle)
        self.assertEqual([m["identity"] for m in listed], [admin.name])
        yield admin.drain()
        yield bob.client.addRecord(bob.handle, T1, b"hello")
        events = yield admin.drain()
        self.assertIn({"changeType": C.MEMBER_JOINED, "identity": bob.name},
                      [e.get("memberChangeData") for e in events])
        listed = yield admin.client.enumMembers(admin.handle)
        self.assertEqual([m["identity"] for m in listed], [admin.name, bob.name])


PropertiesAndMembersWS, PropertiesAndMembersTCP = _transports(PropertiesAndMembers)


# -- direct connections and events ----------------------------------------------------

class DirectConnections(Base):
    @defer.inlineCallbacks
    def test_openSendClose(self):
        """
        Open returns a non-zero 64-bit id at once; both ends get
        DIRECT_CONNECTION/CONNECTED; data arrives intact, in order, with its
        type; close tells both ends; EnumConnections honours its flags.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        self.assertTrue(0 < int(cid) < 2 ** 64)
        for m, other in ((admin, bob), (bob, admin)):
            event = yield m.next(C.EVENT_DIRECT_CONNECTION)
            change = event["connectionChangeData"]
            self.assertEqual((change["status"], change["connectionId"], change["identity"]),
                             (C.PEER_CONNECTED, cid, other.name))
        second = yield bob.client.openDirectConnection(bob.handle, admin.name)
        self.assertNotEqual(second, cid)
        payloads = [os.urandom(n) for n in (0, 1, 100, 70000)] + [bytes([i]) * 10
                                                                  for i in range(50)]
        for p in payloads:
            yield admin.client.sendData(admin.handle, cid, DATA, p)
        for p in payloads:
            event = yield bob.next(C.EVENT_INCOMING_DATA)
            data = event["incomingData"]
            self.assertEqual((data["connectionId"], data["type"], cred.unb64(data["data"])),
                             (cid, DATA, p))
        yield bob.client.sendData(bob.handle, cid, DATA, b"back")
        event = yield admin.next(C.EVENT_INCOMING_DATA)
        self.assertEqual(cred.unb64(event["incomingData"]["data"]), b"back")
        connections = yield admin.client.enumConnections(admin.handle, C.CONNECTION_DIRECT)
        self.assertEqual(sorted(c["connectionId"] for c in connections), sorted([cid, second]))
        self.assertEqual((yield admin.client.enumConnections(admin.handle,
                                                             C.CONNECTION_NEIGHBOR)), [])
        yield admin.drain()
        yield bob.drain()
        yield admin.client.closeDirectConnection(admin.handle, cid)
        for m in (admin, bob):
            event = yield m.next(C.EVENT_DIRECT_CONNECTION)
            self.assertEqual((event["connectionChangeData"]["status"],
                              event["connectionChangeData"]["connectionId"]),
                             (C.PEER_DISCONNECTED, cid))
        yield self.failsWith(admin.client.sendData(admin.handle, cid, DATA, b"x"),
                             "PEER_E_CONNECTION_NOT_FOUND")
        yield self.failsWith(admin.client.closeDirectConnection(admin.handle, cid),
                             "PEER_E_CONNECTION_NOT_FOUND")

    @defer.inlineCallbacks
    def test_metrics(self):
        """
        The admin /metrics families count answers by method and result,
        events by type, relayed data, and show the live groups, members,
        records and direct connections.
        """
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.parser import text_string_to_metric_families
        from broker.peergroups.metrics import PeerGroupsCollector
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        yield admin.client.addRecord(admin.handle, T1, b"r")
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield bob.next(C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        for size in (0, 10, 1000):
            yield admin.client.sendData(admin.handle, cid, DATA, b"x" * size)
        for _ in range(3):
            yield bob.next(C.EVENT_INCOMING_DATA)
        yield self.failsWith(admin.client.sendData(admin.handle, "7", DATA, b"x"),
                             "PEER_E_CONNECTION_NOT_FOUND")
        registry = CollectorRegistry()
        registry.register(PeerGroupsCollector(self.broker.pg))
        samples = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))), 0)
        self.assertEqual(value("broker_peergroups_requests_total",
                               method="sendData", result="S_OK"), 3)
        self.assertEqual(value("broker_peergroups_requests_total", method="sendData",
                               result="PEER_E_CONNECTION_NOT_FOUND"), 1)
        self.assertEqual(value("broker_peergroups_data_messages_total"), 3)
        self.assertEqual(value("broker_peergroups_data_bytes_total"), 1010)
        self.assertEqual(value("broker_peergroups_events_total", type="incoming_data"), 3)
        self.assertGreaterEqual(value("broker_peergroups_events_total",
                                      type="record_changed"), 2)
        self.assertEqual(value("broker_peergroups_groups"), 1)
        self.assertEqual(value("broker_peergroups_online_members"), 2)
        self.assertEqual(value("broker_peergroups_records"), 1)
        self.assertEqual(value("broker_peergroups_direct_connections"), 1)
        self.assertEqual(value("broker_peergroups_sessions"), 2)

    @defer.inlineCallbacks
    def test_refusedAndSelf(self):
        """
        A target not registered for DIRECT_CONNECTION makes the initiator's
        connection fail (Open itself succeeded); a connection to oneself is
        PEER_E_CONNECT_SELF; the reserved ping type is refused.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        yield bob.client.unregisterEvent(bob.reg)
        bob.reg = yield bob.client.registerEvent(bob.handle, [C.EVENT_INCOMING_DATA])
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        event = yield admin.next(C.EVENT_DIRECT_CONNECTION)
        change = event["connectionChangeData"]
        self.assertEqual((change["status"], change["connectionId"]),
                         (C.PEER_CONNECTION_FAILED, cid))
        self.assertEqual(change["hrConnectionFailedReason"],
                         HRESULTS["PEER_E_CONNECTION_REFUSED"])
        yield self.failsWith(admin.client.openDirectConnection(admin.handle, admin.name),
                             "PEER_E_CONNECT_SELF")
        yield bob.client.registerEvent(bob.handle, [C.EVENT_DIRECT_CONNECTION])
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        event = yield admin.next(C.EVENT_DIRECT_CONNECTION)
        self.assertEqual(event["connectionChangeData"]["status"], C.PEER_CONNECTED)
        yield self.failsWith(admin.client.sendData(admin.handle, cid, C.RESERVED_DATA_TYPE,
                                                   b"ping"), "E_INVALIDARG")
        self.assertEqual((yield bob.drain()), [])

    @defer.inlineCallbacks
    def test_dataTypeFilterAndUnregister(self):
        """
        An INCOMING_DATA registration with a type gets only that type;
        GetEventData drains the queue then returns PEER_S_NO_EVENT_DATA;
        Unregister stops delivery; event numbers match the spec.
        """
        self.assertEqual([C.EVENT_STATUS_CHANGED, C.EVENT_PROPERTY_CHANGED,
                          C.EVENT_RECORD_CHANGED, C.EVENT_DIRECT_CONNECTION,
                          C.EVENT_NEIGHBOR_CONNECTION, C.EVENT_INCOMING_DATA,
                          C.EVENT_MEMBER_CHANGED, C.EVENT_CONNECTION_FAILED,
                          C.EVENT_AUTHENTICATION_FAILED], [1, 2, 3, 4, 5, 6, 8, 10, 11])
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        only = yield bob.client.registerEvent(bob.handle, [(C.EVENT_INCOMING_DATA, DATA)])
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield admin.next(C.EVENT_DIRECT_CONNECTION)
        yield admin.client.sendData(admin.handle, cid, T1, b"other type")
        yield admin.client.sendData(admin.handle, cid, DATA, b"wanted")
        yield bob.client.sync()
        hr, event = bob.client.getEventData(only)
        self.assertEqual((hr, cred.unb64(event["incomingData"]["data"])), (0, b"wanted"))
        self.assertEqual(bob.client.getEventData(only), (HRESULTS["PEER_S_NO_EVENT_DATA"], None))
        yield bob.client.unregisterEvent(only)
        yield admin.client.sendData(admin.handle, cid, DATA, b"unheard")
        yield bob.client.sync()
        self.assertEqual(bob.client.getEventData(only), (HRESULTS["PEER_S_NO_EVENT_DATA"], None))
        yield self.failsWith(bob.client.unregisterEvent(only), "E_INVALIDARG")
        everything = [e["incomingData"]["data"] for e in (yield bob.drain())
                      if e["eventType"] == C.EVENT_INCOMING_DATA]
        self.assertEqual([cred.unb64(d) for d in everything],
                         [b"other type", b"wanted", b"unheard"])

    @defer.inlineCallbacks
    def test_timeConversions(self):
        """
        Universal and peer time convert into each other (the broker is the
        time authority); record times are peer time (FILETIME).
        """
        admin = yield self.group()
        t = nowFiletime()
        peer = (yield admin.call("universalTimeToPeerTime", time=t))["time"]
        back = (yield admin.call("peerTimeToUniversalTime", time=peer))["time"]
        self.assertEqual(back, t)
        rid = yield admin.client.addRecord(admin.handle, T1)
        record = yield admin.client.getRecord(admin.handle, rid)
        self.assertLess(abs(record["creation"] - t), 60 * C.TICKS)


DirectConnectionsWS, DirectConnectionsTCP = _transports(DirectConnections)


class SlowPeers(Base):
    toml = "max_output_buffer = 262144\n"

    @defer.inlineCallbacks
    def test_neverReadingPeerDropped(self):
        """
        A peer that stops reading while many small direct-data messages are
        sent to it is dropped as a slow consumer once more than
        C{max_output_buffer} bytes wait for it (not only when one large
        message crosses it); another peer sent the same stream meanwhile
        gets every message, in order.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        carol = yield self.invite(admin, "carol")
        toBob = yield admin.client.openDirectConnection(admin.handle, bob.name)
        toCarol = yield admin.client.openDirectConnection(admin.handle, carol.name)
        yield bob.next(C.EVENT_DIRECT_CONNECTION)
        yield carol.next(C.EVENT_DIRECT_CONNECTION)
        bob.client.transport.pauseProducing()
        counters = self.broker.pg.counters.dropped
        chunk, sent = b"x" * 1024, 0
        while not counters["slow_consumer"] and sent < 65536:
            sends = []
            for _ in range(32):
                sent += 1
                sends.append(admin.client.sendData(admin.handle, toCarol, DATA,
                                                   b"%d" % sent))
                sends.append(admin.client.sendData(admin.handle, toBob, DATA, chunk)
                             .addErrback(lambda f: f.trap(PeerError)))
            yield defer.gatherResults(sends)
            for _ in range(32):
                event = yield carol.next(C.EVENT_INCOMING_DATA)
                self.assertEqual(cred.unb64(event["incomingData"]["data"]),
                                 b"%d" % (sent - 31 + _))
        self.assertEqual(counters["slow_consumer"], 1, f"no drop after {sent} messages")
        bob.client.transport.resumeProducing()
        yield bob.client.closed

SlowPeersWS, SlowPeersTCP = _transports(SlowPeers)


# -- end to end ------------------------------------------------------------------

class EndToEnd(TestCase):
    @defer.inlineCallbacks
    def test_scenario(self):
        """
        An administrator (WebSocket) creates a group and invites Bob (TCP)
        and Carol (WebSocket); they join, exchange records and direct data;
        Carol drops off, changes happen, she comes back and converges;
        Mallory, never invited, is refused at every step.
        """
        broker = yield PeerBroker(self, reactor).start()
        base = Base()
        base.broker = broker
        base.transport = "ws"
        base.fail = self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.group()
        bob = yield base.invite(admin, "bob", transport="tcp")
        carol = yield base.invite(admin, "carol", transport="ws")
        gpn = admin.client.groupPeerName(admin.handle)

        # Records flow both ways.
        note = yield bob.client.addRecord(bob.handle, T1, b"from bob",
                                          attributes='<attributes><attribute name="topic">'
                                                     'plans</attribute></attributes>')
        for m in (admin, carol):
            event = yield m.next(C.EVENT_RECORD_CHANGED, recordId=note)
            self.assertEqual(event["recordChangeData"]["changeType"], C.RECORD_ADDED)
        record = yield carol.client.getRecord(carol.handle, note)
        self.assertEqual(cred.unb64(record["data"]), b"from bob")
        reply = yield carol.client.addRecord(carol.handle, T1, b"from carol")

        # Direct data between Bob and Carol.
        cid = yield bob.client.openDirectConnection(bob.handle, carol.name)
        yield carol.next(C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        yield bob.next(C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
        yield bob.client.sendData(bob.handle, cid, DATA, b"hi carol")
        event = yield carol.next(C.EVENT_INCOMING_DATA)
        self.assertEqual(cred.unb64(event["incomingData"]["data"]), b"hi carol")

        # Carol vanishes (no close); Bob sees the direct connection end.
        yield carol.client.disconnect()
        yield bob.next(C.EVENT_DIRECT_CONNECTION, status=C.PEER_DISCONNECTED)
        yield admin.next(C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_DISCONNECTED,
                         identity=carol.name)
        yield bob.client.deleteRecord(bob.handle, note)
        yield admin.client.updateRecord(admin.handle, dict(
            (yield admin.client.getRecord(admin.handle, reply)), data=cred.b64(b"edited")))
        fresh = yield bob.client.addRecord(bob.handle, T2, b"while away")

        # Carol comes back on a new connection and converges.
        carol2 = yield base.peer("carol", identity=carol.identity)
        carol2.handle = yield carol2.client.open(gpn)
        yield base.register(carol2)
        yield base.online(carol2)
        events = yield carol2.drain()
        changes = sorted((e["recordChangeData"]["changeType"], e["recordChangeData"]["recordId"])
                         for e in events if e["eventType"] == C.EVENT_RECORD_CHANGED)
        self.assertEqual(changes, sorted([(C.RECORD_DELETED, note), (C.RECORD_UPDATED, reply),
                                          (C.RECORD_ADDED, fresh)]))
        views = []
        for m in (admin, bob, carol2):
            views.append(sorted((r["id"], r["version"], r["data"])
                                for r in (yield m.client.enumRecords(m.handle))))
        self.assertEqual(views[0], views[1])
        self.assertEqual(views[0], views[2])

        # Mallory, never invited, gets nowhere.
        mallory = yield base.peer("mallory", transport="tcp")
        stolen = yield admin.client.createInvitation(admin.handle, bob.identity.identityInfo())
        yield base.failsWith(mallory.client.join(stolen), "PEER_E_INVALID_CREDENTIAL")
        yield base.failsWith(mallory.client.open(gpn), "PEER_E_NOT_FOUND")
        selfMade = cred.Certificate.make(mallory.identity, "GMC", gpn, mallory.identity.publicKey,
                                         mallory.name, [C.ROLE_ADMIN], nowFiletime(),
                                         nowFiletime() + HOUR)
        grc = json.loads(stolen)["PEERINVITATION"]["gmc"][0]
        forged = cred.encodeInvitation("default", gpn,
                                       [cred.Certificate.fromJSON(grc), selfMade])
        yield base.failsWith(mallory.client.join(forged), "PEER_E_INVITATION_NOT_TRUSTED")
        yield base.failsWith(mallory.client.passwordJoin(
            cred.encodeInvitation("default", gpn, None, password={}), "guess"),
            "PEER_E_INVITATION_NOT_TRUSTED")
        for call in (lambda: mallory.client.getRecord(1, note),
                     lambda: mallory.client.enumRecords(1),
                     lambda: mallory.client.addRecord(1, T1, b"spam"),
                     lambda: mallory.client.openDirectConnection(1, bob.name),
                     lambda: mallory.client.connect(1)):
            yield base.failsWith(call(), "PEER_E_INVALID_GROUP")
        yield base.failsWith(mallory.client.delete(gpn), "PEER_E_NOT_FOUND")
        members = yield admin.client.enumMembers(admin.handle)
        self.assertNotIn(mallory.name, [m["identity"] for m in members])


class TLSTransport(Base, TestCase):
    transport = "tcp"

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = None
        self.broker = yield PeerBroker(self, reactor, tls=True).start()

    @defer.inlineCallbacks
    def test_overTLS(self):
        """
        The length-prefixed protocol over TLS: a group, an invitee, a record
        and direct data.
        """
        admin = yield self.group()
        bob = yield self.invite(admin, "bob")
        rid = yield bob.client.addRecord(bob.handle, T1, b"secure")
        event = yield admin.next(C.EVENT_RECORD_CHANGED)
        self.assertEqual(event["recordChangeData"]["recordId"], rid)
        cid = yield admin.client.openDirectConnection(admin.handle, bob.name)
        yield bob.next(C.EVENT_DIRECT_CONNECTION)
        yield admin.client.sendData(admin.handle, cid, DATA, b"over tls")
        event = yield bob.next(C.EVENT_INCOMING_DATA)
        self.assertEqual(cred.unb64(event["incomingData"]["data"]), b"over tls")


# -- durability --------------------------------------------------------------------

class Restart(TestCase):
    @defer.inlineCallbacks
    def test_recordsSurviveRestart(self):
        """
        A second broker on the same state directory (SQLite file and keys)
        has the groups, memberships and records of the first, versions and
        tombstones included; members reopen without an invitation.
        """
        state = self.mktemp()
        first = yield PeerBroker(self, reactor, stateDir=state).start()
        base = Base()
        base.broker, base.transport, base.fail = first, "tcp", self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.group()
        bob = yield base.invite(admin, "bob")
        gpn = admin.client.groupPeerName(admin.handle)
        rid = yield bob.client.addRecord(bob.handle, T1, b"durable")
        record = yield bob.client.getRecord(bob.handle, rid)
        yield bob.client.updateRecord(bob.handle, dict(record, data=cred.b64(b"durable v2")))
        gone = yield admin.client.addRecord(admin.handle, T1, b"gone")
        yield admin.client.deleteRecord(admin.handle, gone)
        yield first.stop()

        second = yield PeerBroker(self, reactor, stateDir=state).start()
        base.broker = second
        admin2 = yield base.peer("admin", identity=admin.identity)
        admin2.handle = yield admin2.client.open(gpn)
        yield base.register(admin2)
        yield base.online(admin2)
        bob2 = yield base.peer("bob", identity=bob.identity)
        bob2.handle = yield bob2.client.open(gpn)
        yield base.register(bob2)
        yield base.online(bob2)
        records = yield bob2.client.enumRecords(bob2.handle)
        self.assertEqual([(r["id"], r["version"], cred.unb64(r["data"])) for r in records],
                         [(rid, 2, b"durable v2")])
        yield base.failsWith(bob2.client.getRecord(bob2.handle, gone), "PEER_E_RECORD_NOT_FOUND")
        members = yield admin2.client.enumMembers(admin2.handle)
        self.assertEqual([m["identity"] for m in members], [admin.name, bob.name])
        # The same invitation cannot be replayed after the restart either.
        self.assertIn(rid, second.pg.apps["default"].groups[gpn].records)

    @defer.inlineCallbacks
    def test_pipelinedWritesDurable(self):
        """
        Record writes sent without waiting for answers are answered in
        order, committed together, and all there after a restart.
        """
        state = self.mktemp()
        first = yield PeerBroker(self, reactor, stateDir=state).start()
        base = Base()
        base.broker, base.transport, base.fail = first, "tcp", self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.group()
        gpn = admin.client.groupPeerName(admin.handle)
        answered = []
        ds = []
        for i in range(100):
            d = admin.client.addRecord(admin.handle, T1, str(i).encode())
            d.addCallback(lambda rid, i=i: answered.append((i, rid)))
            ds.append(d)
        yield defer.gatherResults(ds)
        self.assertEqual([i for i, _ in answered], list(range(100)))
        yield first.stop()
        second = yield PeerBroker(self, reactor, stateDir=state).start()
        base.broker = second
        admin2 = yield base.peer("admin", identity=admin.identity)
        admin2.handle = yield admin2.client.open(gpn)
        yield base.register(admin2)
        yield base.online(admin2)
        records = yield admin2.client.enumRecords(admin2.handle)
        self.assertEqual([(r["id"], cred.unb64(r["data"])) for r in records],
                         [(rid, str(i).encode()) for i, rid in answered])

    @defer.inlineCallbacks
    def test_importRestores(self):
        """
        A database exported before a loss is imported into a fresh Open of
        the same group and identity (before Connect) and restores the
        records, which then reach the other members.
        """
        state = self.mktemp()
        first = yield PeerBroker(self, reactor, stateDir=state).start()
        base = Base()
        base.broker, base.transport, base.fail = first, "ws", self.fail
        base.assertEqual = self.assertEqual
        admin = yield base.group()
        gpn = admin.client.groupPeerName(admin.handle)
        bob = yield base.invite(admin, "bob")
        # Copy the store once every write is committed (WAL included),
        # Bob's sync point too: it is written after his connect's answer.
        yield first.pg.whenWritten()
        snapshot = self.mktemp()
        shutil.copytree(state, snapshot)
        rid = yield admin.client.addRecord(admin.handle, T1, b"precious")
        exported = yield admin.client.exportDatabase(admin.handle)
        yield first.stop()

        # The broker comes back from the older snapshot: the record is lost.
        second = yield PeerBroker(self, reactor, stateDir=snapshot).start()
        base.broker = second
        bob2 = yield base.peer("bob", identity=bob.identity)
        bob2.handle = yield bob2.client.open(gpn)
        yield base.register(bob2)
        yield base.online(bob2)
        self.assertEqual((yield bob2.client.enumRecords(bob2.handle)), [])
        admin2 = yield base.peer("admin", identity=admin.identity)
        admin2.handle = yield admin2.client.open(gpn)
        result = yield admin2.client.importDatabase(admin2.handle, exported)
        self.assertEqual(result["imported"], 1)
        event = yield bob2.next(C.EVENT_RECORD_CHANGED)
        self.assertEqual((event["recordChangeData"]["changeType"],
                          event["recordChangeData"]["recordId"]), (C.RECORD_ADDED, rid))
        yield base.register(admin2)
        yield base.online(admin2)
        record = yield admin2.client.getRecord(admin2.handle, rid)
        self.assertEqual(cred.unb64(record["data"]), b"precious")


# -- bad input -------------------------------------------------------------------

class BadInput(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.broker = yield PeerBroker(self, reactor, toml="max_message_size = 4096\n").start()

    @defer.inlineCallbacks
    def test_subprotocolRequired(self):
        """
        The WebSocket handshake needs the peergroup.v1 subprotocol and the
        /peergroups/v1 path.
        """
        from broker.peergroups.client import connectWebSocket
        try:
            yield connectWebSocket(reactor, self.broker.wsURL, protocols=("other",))
        except PeerError as e:
            self.assertIn("400", e.message)
        else:
            self.fail("handshake without the subprotocol accepted")
        try:
            yield connectWebSocket(reactor, self.broker.wsURL.replace("v1", "v9"))
        except PeerError as e:
            self.assertIn("404", e.message)
        else:
            self.fail("handshake on a wrong path accepted")

    @defer.inlineCallbacks
    def test_malformedRequests(self):
        """
        Malformed frames get an E_INVALIDARG error and the session goes on;
        an unknown method is E_NOTIMPL.
        """
        for transport in ("ws", "tcp"):
            client = yield self.broker.connect(transport)
            answers = []
            original = client.received
            client.received = lambda obj: (answers.append(obj), original(obj))
            client._sendObject([1, 2, 3])
            client._sendObject({"method": "startup"})
            client._sendObject({"id": 5, "method": 7})
            yield client.sync()
            errors = [a["error"]["name"] for a in answers if "error" in a]
            self.assertEqual(errors, ["E_INVALIDARG"] * 3)
            yield client.startup("default")
            try:
                yield client.call("noSuchCall")
            except PeerError as e:
                self.assertEqual(e.name, "E_NOTIMPL")
            else:
                self.fail("unknown method accepted")

    @defer.inlineCallbacks
    def test_notJSON(self):
        """
        A frame that is not JSON is answered with E_INVALIDARG over both
        wires; the connection stays usable.
        """
        ws = yield self.broker.connect("ws")
        proto = [p for p in self.broker.pg.sessions][0]
        self.assertIsNotNone(proto)
        answers = []
        original = ws.received
        ws.received = lambda obj: (answers.append(obj), original(obj))
        # Reach under the client to send raw bytes.
        sender = ws._sendObject.__closure__[0].cell_contents
        sender.sendMessage(b"{not json", False)
        sender.sendMessage(b"\x00\x01", True)
        yield ws.sync()
        self.assertEqual([a["error"]["name"] for a in answers if "error" in a],
                         ["E_INVALIDARG", "E_INVALIDARG"])
        yield ws.startup("default")

    @defer.inlineCallbacks
    def test_oversizedStreamMessage(self):
        """
        A length prefix over max_message_size is answered with an error and
        the TCP connection is closed; the broker carries on.
        """
        from twisted.internet.protocol import Protocol
        import struct
        got = defer.Deferred()
        data = []

        class Raw(Protocol):
            def dataReceived(self, d):
                data.append(d)

            def connectionLost(self, reason):
                got.callback(b"".join(data))
        from twisted.internet.protocol import Factory
        proto = yield self.broker.tcpEndpoint().connect(Factory.forProtocol(Raw))
        proto.transport.write(struct.pack("!I", 100000) + b"{")
        received = yield got
        frames = []
        while received:
            (n,) = struct.unpack("!I", received[:4])
            frames.append(json.loads(received[4:4 + n]))
            received = received[4 + n:]
        self.assertIn("hello", frames[0])
        self.assertEqual(frames[-1]["error"]["name"], "E_INVALIDARG")
        client = yield self.broker.connect("tcp")
        yield client.startup("default")


# -- the face in the broker's service tree -------------------------------------------

class FaceTests(TestCase):
    def test_buildService(self):
        """
        With [peergroups] enabled the broker gets the store, the core
        service and one listener per endpoint, and generates its keys into
        state_dir with mode 0600.
        """
        from broker import config, tap
        state = self.mktemp()
        settings = config.parse(
            f'[broker]\nstate_dir = "{state}"\n'
            '[admin]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            '[webpubsub]\nenabled = false\n'
            '[peergroups]\nenabled = true\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            'tcp_listen = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"]\n')
        top = tap.buildService(settings, reactor)
        names = [s.name for s in top]
        for name in ("peergroups.store", "peergroups", "peergroups.listen[0]",
                     "peergroups.tcp_listen[0]", "peergroups.tcp_listen[1]"):
            self.assertIn(name, names)
        for key in ("peergroups-issuer.key", "peergroups-export.key"):
            self.assertEqual(os.stat(os.path.join(state, key)).st_mode & 0o777, 0o600)

    def test_keepaliveMustExceedInterval(self):
        from broker import config
        from broker.config import ConfigError
        from broker.peergroups.face import makePeerGroups
        settings = config.parse("[peergroups]\nkeepalive_interval = 60.0\n"
                                "keepalive_timeout = 30.0\n")
        e = self.assertRaises(ConfigError, makePeerGroups, reactor, None,
                              settings["peergroups"], self.mktemp())
        self.assertIn("peergroups.keepalive_timeout", str(e))


class DemoTests(TestCase):
    @defer.inlineCallbacks
    def test_demo(self):
        """
        C{python -m broker.peergroups.demo} runs its story against a broker
        over both wires.
        """
        import argparse

        from broker.peergroups import demo
        broker = yield PeerBroker(self, reactor).start()
        lines = []
        self.patch(demo, "say", lambda *a: lines.append(" ".join(map(str, a))))
        for tcp in (None, f"tcp:127.0.0.1:{broker.tcpPort.getHost().port}"):
            del lines[:]
            yield demo.run(reactor, argparse.Namespace(ws=broker.wsURL, tcp=tcp,
                                                       application="demo"))
            self.assertIn("Bob received over direct connection", "\n".join(lines))
            self.assertIn("Mallory tried to join with Bob's invitation: "
                          "PEER_E_INVALID_CREDENTIAL", "\n".join(lines))
            self.assertEqual(lines[-1], "done")
