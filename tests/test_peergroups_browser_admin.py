# -*- test-case-name: tests.test_peergroups_browser_admin -*-
"""
A browser peer does everything a Python peer does and keeps its identity:
headless Chromium pages (broker's own C{/peergroups/peergroup.js}) create a
group, invite a Python peer and a second browser, re-issue credentials from
an C{enumMembers} entry, exchange records and direct data, and, after the
browser is restarted on the same profile, reopen the group with the same
IndexedDB identity and no new invitation. Every error path of the browser
calls is checked by name and HRESULT, as the Python client reports them.
"""

import json
import os
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from broker.peergroups import constants as C
from broker.peergroups import credentials as cred
from broker.peergroups.client import Identity
from broker.peergroups.errors import HRESULTS
from tests.pgbrowser import Pages, pageOrValue
from tests.test_peergroups import DATA, T1, Base
from tests.tools import startChromium

ALICE = """
  const me = await Identity.generate("browser", "Alice");
  const known = await lib.enumIdentities();
  const refused = await failure(lib.exportIdentity(me.peerName));
  const pg = await PeerGroupClient.connect(config.ws);
  await pg.startup("default");
  const peerName = await pg.registerIdentity(me);
  const h = await pg.create("Browser team");
  const gpn = pg.groupPeerName(h);
  const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED, EVENT.RECORD_CHANGED,
                                         EVENT.MEMBER_CHANGED, EVENT.DIRECT_CONNECTION,
                                         EVENT.INCOMING_DATA]);
  await pg.connect(h);
  const status = (await pg.nextEvent(reg, EVENT.STATUS_CHANGED)).status;
  await put("gpn", gpn);
  await put("pyinv", await pg.createInvitation(h, await get("pyinfo")));
  await put("binv", await pg.createInvitation(h, await get("binfo")));
  const bob = await get("bjoined");
  const members = await pg.enumMembers(h);
  const entry = members.find((m) => m.identity === bob);
  await pg.issueCredentials(h, entry, {roles: [ROLE.INVITING_MEMBER],
                                       flags: lib.STORE_CREDENTIALS});
  await put("reissued", "yes");
  const rid = await pg.addRecord(h, config.recordType, "from alice", {
    attributes: '<attributes><attribute name="origin">alice</attribute></attributes>'});
  const first = await pg.getRecord(h, rid);
  const updated = await pg.updateRecord(h, {...first, data: new TextEncoder().encode("alice v2")});
  const pyrec = await pg.getRecord(h, await get("pyrecord"));
  const brid = await get("brecord");
  const all = await pg.enumRecords(h, config.recordType);
  const found = await pg.searchRecords(
    h, '<peersearch><clause attrib="origin">alice</clause></peersearch>');
  const tmp = await pg.addRecord(h, config.recordType, "short-lived");
  await pg.deleteRecord(h, tmp);
  const deleted = await failure(pg.getRecord(h, tmp));
  const pyName = await get("pyname");
  const cid = await pg.openDirectConnection(h, pyName);
  const opened = await pg.nextEvent(reg, EVENT.DIRECT_CONNECTION, {connectionId: cid});
  await pg.sendData(h, cid, config.dataType, "hello from alice");
  const reply = await pg.nextEvent(reg, EVENT.INCOMING_DATA);
  const connections = await pg.enumConnections(h);
  await pg.closeDirectConnection(h, cid);
  await pg.setProperties(h, {comment: "made in a browser"});
  const properties = await pg.getProperties(h);
  const creds = await pg.getCredentials(h);
  const database = await pg.exportDatabase(h);
  const stored = await lib.enumGroups(me.peerName);
  await report({
    peerName, computed: me.peerName, known: known.map((i) => i.peerName), refused, status, gpn,
    bobRole: entry && entry.credentialInfo.roles, rid, firstData: text(first.data),
    updatedVersion: updated.version, pyrecData: text(pyrec.data), pyrecCreator: pyrec.creatorId,
    listed: all.map((r) => r.id), found: found.map((r) => r.id), brid, deleted,
    opened: opened.connectionChangeData.status, cid,
    reply: text(lib.unb64(reply.incomingData.data)),
    connections: connections.map((c) => c.connectionId), comment: properties.comment,
    role: creds.credentialInfo.roles, database: database.length,
    stored: stored.map((g) => [g.groupPeerName, g.role, g.friendlyName, g.chain.length,
                               g.groupKey instanceof CryptoKey && !g.groupKey.extractable])});
  await pg.disconnect();
"""

# The same browser profile after a restart: no invitation, no new key.
ALICE_AGAIN = """
  const known = await lib.enumIdentities();
  const me = await Identity.load(known[0].peerName);
  const groups = await lib.enumGroups(me.peerName);
  const pg = await PeerGroupClient.connect(config.ws);
  await pg.startup("default");
  const peerName = await pg.registerIdentity(me);
  const h = await pg.open(groups[0].groupPeerName);
  const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED]);
  await pg.connect(h);
  const status = (await pg.nextEvent(reg, EVENT.STATUS_CHANGED)).status;
  const before = await pg.getRecord(h, new URLSearchParams(location.search).get("rid"));
  const rid = await pg.addRecord(h, config.recordType, "after the restart");
  await report({known: known.map((i) => [i.peerName, i.friendlyName, i.extractable]),
                peerName, groups: groups.map((g) => g.groupPeerName), status,
                before: text(before.data), rid,
                keyKept: me.privateKey instanceof CryptoKey && !me.privateKey.extractable});
  await pg.disconnect();
"""

BOB = """
  const me = await Identity.generate("browser", "Bob", {extractable: true});
  const pem = await me.toPEM();
  const pg = await PeerGroupClient.connect(config.ws);
  await pg.startup("default");
  await pg.registerIdentity(me);
  await put("binfo", await me.identityInfo());
  let h = await pg.join(await get("binv"));
  let reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED]);
  await pg.connect(h);
  await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
  const gpn = pg.groupPeerName(h);
  const pyinfo = await get("pyinfo");
  const inviteRefused = await failure(pg.createInvitation(h, pyinfo));
  const issueRefused = await failure(pg.issueCredentials(h, pyinfo));
  const before = (await pg.getCredentials(h)).credentialInfo.roles;
  await put("brecord", await pg.addRecord(h, config.recordType, "from bob"));
  await put("bjoined", me.peerName);
  await get("reissued");
  // Stored credentials take effect at the next connect.
  await pg.close(h);
  h = await pg.open(gpn);
  reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED]);
  await pg.connect(h);
  await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
  const after = (await pg.getCredentials(h)).credentialInfo.roles;
  await report({pem, peerName: me.peerName, inviteRefused, issueRefused, before, after});
  await pg.disconnect();
"""

ERRORS = """
  const E = {};
  const session = async (identity) => {
    const pg = await PeerGroupClient.connect(config.ws);
    await pg.startup("default");
    await pg.registerIdentity(identity);
    return pg;
  };
  const admin = await Identity.generate("errors", "Admin");
  const pg = await session(admin);
  E.emptyPassword = await failure(pg.create("Pw", {password: ""}));
  const h = await pg.create("Pw", {password: "right"});
  const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED]);
  await pg.connect(h);
  await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
  const gpn = pg.groupPeerName(h);
  const pwInvitation = await pg.createPasswordInvitation(h);

  // Wrong password, then the right one.
  const joiner = await Identity.generate("errors", "Joiner");
  const pj = await session(joiner);
  let {handle: hj} = await pj.passwordJoin(pwInvitation, "wrong");
  let rj = await pj.registerEvent(hj, [EVENT.STATUS_CHANGED, EVENT.CONNECTION_FAILED]);
  await pj.connect(hj);
  const failed = await pj.nextEvent(rj, EVENT.CONNECTION_FAILED);
  E.wrongPassword = [lib.PeerError.fromJSON({hr: failed.hrConnectionFailedReason}).name,
                     failed.hrConnectionFailedReason];
  await pj.close(hj);
  ({handle: hj} = await pj.passwordJoin(pwInvitation, "right"));
  rj = await pj.registerEvent(hj, [EVENT.STATUS_CHANGED, EVENT.CONNECTION_FAILED]);
  await pj.connect(hj);
  const joined = await pj.nextEvent(rj);

  // A member (the password role) may not invite nor issue.
  const other = await Identity.generate("errors", "Other", {persist: false});
  const otherInfo = await other.identityInfo();
  E.memberInvites = await failure(pj.createInvitation(hj, otherInfo));
  E.memberIssues = await failure(pj.issueCredentials(hj, otherInfo));

  // Expired and not yet valid invitations.
  const po = await session(other);
  const soon = await pg.createInvitation(h, otherInfo, {
    expiration: pg.peerTime() + 2n * 10000000n});
  const later = await pg.createInvitation(h, otherInfo, {
    validityStart: pg.peerTime() + 3600n * 10000000n});
  await new Promise((resolve) => setTimeout(resolve, 2500));
  E.expiredInvitation = await failure(po.join(soon));
  E.notYetValidInvitation = await failure(po.join(later));
  E.pastExpiration = await failure(pg.createInvitation(h, otherInfo, {
    expiration: pg.peerTime() - 3600n * 10000000n}));
  const inv = JSON.parse(await pg.createInvitation(h, otherInfo));
  inv.PEERINVITATION.groupPeerName = "0".repeat(40) + ".group";
  E.tamperedInvitation = await failure(po.join(JSON.stringify(inv)));
  E.badIdentityInfo = await failure(pg.createInvitation(h, "{\\"PEERIDENTITYINFO\\": 1}"));
  E.notAnEntry = await failure(pg.issueCredentials(h, {identity: "x"}));

  // Re-issuing needs a later validity start than the credentials in effect.
  const entry = (await pg.enumMembers(h)).find((m) => m.identity === joiner.peerName);
  E.reissueNotLater = await failure(pg.issueCredentials(h, entry, {
    validityStart: entry.credentialInfo.validityStart}));

  // Unknown group, unknown handle, unknown identity, key not extractable.
  E.unknownGroup = await failure(po.open("0".repeat(40) + ".group"));
  E.unknownHandle = await failure(pg.getStatus(9999));
  E.unknownLocalHandle = await failure((async () => pg.groupPeerName(9999))());
  E.unknownIdentity = await failure(Identity.load("0".repeat(40) + ".nobody"));
  E.notExtractable = await failure(admin.toPEM());
  E.notExtractableByName = await failure(lib.exportIdentity(admin.peerName));
  E.badPEM = await failure(Identity.fromPEM("not a key", "errors"));
  E.badClassifier = await failure(Identity.generate("has space"));

  // Records: missing, and an import while connected.
  E.noRecord = await failure(pg.getRecord(h, "00000000-0000-0000-0000-000000000001"));
  E.importConnected = await failure(pg.importDatabase(h, await pg.exportDatabase(h)));

  // Delete: the group is gone for that identity, here and at the broker.
  await pj.close(hj);
  await pj.delete(gpn);
  E.openDeleted = await failure(pj.open(gpn));
  const kept = (await lib.enumGroups(joiner.peerName)).map((g) => g.groupPeerName);

  // A call on a closed session.
  await po.disconnect();
  E.closedSession = await failure(po.getStatus(1));
  // The signed formats, for Python to compare byte for byte.
  const signed = await lib.Certificate.make(
    admin.privateKey, admin.publicKey, "GMC", gpn, other.publicKey, other.peerName,
    [ROLE.MEMBER], pg.peerTime(), lib.parseJSON(config.sample).big, {friendlyName: "Ünï \u2028 😀"});
  const formats = {canonical: lib.canonicalText(lib.parseJSON(config.sample)),
                   identityInfo: await other.identityInfo(), certificate: signed.toJSON()};
  await report({errors: E, joined: [joined.eventType, joined.status], kept, formats});
  await pj.disconnect();
  await pg.disconnect();
"""

PERF = """
  const me = await Identity.generate("perf", "Perf", {persist: false});
  const pg = await PeerGroupClient.connect(config.ws);
  await pg.startup("default");
  await pg.registerIdentity(me);
  await put("perfinfo", await me.identityInfo());
  const h = await pg.join(await get("perfinv"));
  const reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED]);
  await pg.connect(h);
  await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
  await get("filled");
  const times = [];
  let n = 0;
  for (let i = 0; i < 3; i++) {
    const started = performance.now();
    n = (await pg.enumRecords(h)).length;
    times.push(performance.now() - started);
  }
  await report({n, times, paged: Boolean(pg.hello.limits)});
  await pg.disconnect();
"""


# What canonical JSON must encode as Python does: escapes, non-ASCII, keys
# ordered by code point (an astral key after U+FFFF), integers past 2**53
# (one whose nearest double prints as the same digits, yet is another value).
SAMPLE = (r'{"z": "\u00e9\u0001\n\"\\\u2028", "a": [1, -2, "x", true, null], '
          r'"\ud83d\ude00": 1, "\uffff": 2, "big": 315569520000000000001, '
          r'"round": 315569523456789000000}')


class BrowserAdminTests(Base, TestCase):
    timeout = 150

    def pages(self):
        port = self.broker.wsPort.getHost().port
        config = {"library": f"http://127.0.0.1:{port}/peergroups/peergroup.js",
                  "ws": self.broker.wsURL, "recordType": T1, "dataType": DATA,
                  "sample": SAMPLE}
        pages = Pages(config, {"alice": ALICE, "alice-again": ALICE_AGAIN, "bob": BOB,
                               "errors": ERRORS, "perf": PERF})
        listening = reactor.listenTCP(0, Site(pages), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        pages.port = listening.getHost().port
        return pages

    @defer.inlineCallbacks
    def test_administerAndReopenAfterRestart(self):
        """
        A browser creates a group, invites a Python peer and another
        browser, re-issues that browser's credentials from its member
        entry, exchanges records and direct data; restarted on the same
        profile it is the same identity and reopens its group.
        """
        py = yield self.peer("python")
        pages = self.pages()
        pages.put("pyinfo", py.identity.identityInfo())
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        alice = startChromium(self, reactor, pages.url("alice"), profile=profile)
        bob = startChromium(self, reactor, pages.url("bob"))

        invitation = yield pageOrValue(self, pages.get("pyinv"), pages, "alice")
        py.handle = yield py.client.join(invitation)
        yield self.register(py)
        yield self.online(py)
        pyrid = yield py.client.addRecord(py.handle, T1, b"from python")
        pages.put("pyrecord", pyrid)
        pages.put("pyname", py.name)
        incoming = yield pageOrValue(self, py.next(C.EVENT_INCOMING_DATA), pages, "alice")
        self.assertEqual(cred.unb64(incoming["incomingData"]["data"]), b"hello from alice")
        yield py.client.sendData(py.handle, incoming["incomingData"]["connectionId"], DATA,
                                 b"hello from python")

        a = yield pages.report("alice")
        self.assertNotIn("error", a, alice.tail())
        b = yield pages.report("bob")
        self.assertNotIn("error", b, bob.tail())

        # Alice: identity kept and listed, not exportable, an administrator.
        self.assertEqual(a["peerName"], a["computed"])
        self.assertEqual(a["known"], [a["peerName"]])
        self.assertEqual(a["refused"][:2], ["PEER_E_NO_KEY_ACCESS",
                                            HRESULTS["PEER_E_NO_KEY_ACCESS"]])
        self.assertEqual(a["status"], C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS)
        self.assertEqual(a["role"], [C.ROLE_ADMIN])
        self.assertEqual(a["stored"], [[a["gpn"], C.ROLE_ADMIN, "Browser team", 2, True]])
        # Bob's entry listed him as a member; the re-issued, stored
        # credentials made him an inviting member at his next connect.
        self.assertEqual(a["bobRole"], [C.ROLE_MEMBER])
        self.assertEqual(b["before"], [C.ROLE_MEMBER])
        self.assertEqual(b["after"], [C.ROLE_INVITING_MEMBER])
        for refused in (b["inviteRefused"], b["issueRefused"]):
            self.assertEqual(refused[:2], ["PEER_E_NOT_AUTHORIZED",
                                           HRESULTS["PEER_E_NOT_AUTHORIZED"]])
        # Bob's extractable key, exported as PEM, is the same identity in Python.
        self.assertEqual(Identity.fromPEM(b["pem"].encode(), "browser", "Bob").peerName,
                         b["peerName"])

        # Records both ways.
        self.assertEqual(a["firstData"], "from alice")
        self.assertEqual(a["updatedVersion"], 2)
        self.assertEqual((a["pyrecData"], a["pyrecCreator"]), ("from python", py.name))
        self.assertEqual(sorted(a["listed"]), sorted([a["rid"], pyrid, a["brid"]]))
        self.assertEqual(a["found"], [a["rid"]])
        self.assertEqual(a["deleted"][:2], ["PEER_E_RECORD_NOT_FOUND",
                                            HRESULTS["PEER_E_RECORD_NOT_FOUND"]])
        record = yield py.client.getRecord(py.handle, a["rid"])
        self.assertEqual((cred.unb64(record["data"]), record["creatorId"], record["version"]),
                         (b"alice v2", a["peerName"], 2))
        bobs = yield py.client.getRecord(py.handle, a["brid"])
        self.assertEqual(bobs["creatorId"], b["peerName"])
        # Direct data, properties, export.
        self.assertEqual(a["opened"], C.PEER_CONNECTED)
        self.assertEqual(a["reply"], "hello from python")
        self.assertEqual(a["connections"], [a["cid"]])
        self.assertEqual(a["comment"], "made in a browser")
        props = yield py.client.getProperties(py.handle)
        self.assertEqual(props["comment"], "made in a browser")
        self.assertGreater(a["database"], 100)

        # Restart the browser on the same profile.
        alice.transport.signalProcess("TERM")
        yield alice.ended
        again = startChromium(self, reactor, pages.url("alice-again", f"?rid={a['rid']}"),
                              profile=profile)
        r = yield pages.report("alice-again")
        self.assertNotIn("error", r, again.tail())
        self.assertEqual(r["known"], [[a["peerName"], "Alice", False]])
        self.assertEqual(r["peerName"], a["peerName"])
        self.assertEqual(r["groups"], [a["gpn"]])
        self.assertEqual(r["status"], C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS)
        self.assertEqual(r["before"], "alice v2")
        self.assertTrue(r["keyKept"])
        after = yield py.client.getRecord(py.handle, r["rid"])
        self.assertEqual((cred.unb64(after["data"]), after["creatorId"]),
                         (b"after the restart", a["peerName"]))

    @defer.inlineCallbacks
    def test_errors(self):
        """
        Each failure of the browser calls has the name and HRESULT the
        Python client gives for it.
        """
        pages = self.pages()
        browser = startChromium(self, reactor, pages.url("errors"))
        r = yield pages.report("errors")
        self.assertNotIn("error", r, browser.tail())
        expected = {
            "emptyPassword": "PEER_E_PASSWORD_DOES_NOT_MEET_POLICY",
            "wrongPassword": "PEER_E_NOT_AUTHORIZED",
            "memberInvites": "PEER_E_NOT_AUTHORIZED",
            "memberIssues": "PEER_E_NOT_AUTHORIZED",
            "expiredInvitation": "PEER_E_INVALID_TIME_PERIOD",
            "notYetValidInvitation": "PEER_E_INVALID_TIME_PERIOD",
            "pastExpiration": "PEER_E_INVALID_TIME_PERIOD",
            "tamperedInvitation": "PEER_E_INVITATION_NOT_TRUSTED",
            "badIdentityInfo": "PEER_E_INVALID_CREDENTIAL_INFO",
            "notAnEntry": "PEER_E_INVALID_CREDENTIAL_INFO",
            "reissueNotLater": "PEER_E_INVALID_TIME_PERIOD",
            "unknownGroup": "PEER_E_NOT_FOUND",
            "unknownHandle": "PEER_E_INVALID_GROUP",
            "unknownLocalHandle": "PEER_E_INVALID_GROUP",
            "unknownIdentity": "PEER_E_IDENTITY_NOT_FOUND",
            "notExtractable": "PEER_E_NO_KEY_ACCESS",
            "notExtractableByName": "PEER_E_NO_KEY_ACCESS",
            "badPEM": "E_INVALIDARG",
            "badClassifier": "PEER_E_INVALID_CLASSIFIER",
            "noRecord": "PEER_E_RECORD_NOT_FOUND",
            "importConnected": "PEER_E_GROUP_IN_USE",
            "openDeleted": "PEER_E_NOT_FOUND",
            "closedSession": "PEER_E_CONNECTION_FAILED",
        }
        got = {k: tuple(v[:2]) if isinstance(v, list) else v for k, v in r["errors"].items()}
        self.assertEqual(got, {k: (name, HRESULTS[name]) for k, name in expected.items()})
        self.assertEqual(r["joined"], [C.EVENT_STATUS_CHANGED,
                                       C.STATUS_LISTENING | C.STATUS_HAS_CONNECTIONS])
        self.assertEqual(r["kept"], [])

        # Byte for byte: canonical JSON, identity info and a certificate
        # made in the browser are what credentials.py makes and checks.
        formats = r["formats"]
        self.assertEqual(formats["canonical"].encode("utf-8"),
                         cred.canonical(json.loads(SAMPLE)))
        info = cred.parseIdentityInfo(formats["identityInfo"])
        self.assertEqual(info["friendlyName"], "Other")
        cert = cred.Certificate.fromJSON(formats["certificate"])
        self.assertTrue(cert.signedBy(cert.issuer))
        self.assertEqual(cert.raw, cred.canonical(json.loads(cert.raw)))
        self.assertEqual((cert.notAfter, cert.subjectName, cert.friendlyName),
                         (315569520000000000001, info["peerName"], "Ünï \u2028 😀"))

    @defer.inlineCallbacks
    def test_enumRecordsTenThousand(self):
        """
        How long a browser takes to list 10,000 records (all pages, when the
        broker pages). Reported on stdout; asserted only to list them all.
        """
        admin = yield self.group()
        pages = self.pages()
        browser = startChromium(self, reactor, pages.url("perf"))
        info = yield pageOrValue(self, pages.get("perfinfo"), pages, "perf")
        pages.put("perfinv", (yield admin.client.createInvitation(admin.handle, info)))
        started = time.monotonic()
        for batch in range(20):
            yield defer.gatherResults([
                admin.client.addRecord(admin.handle, T1, b"x" * 16,
                                       attributes=f'<attributes><attribute name="n" type="int">'
                                                  f'{batch * 500 + i}</attribute></attributes>')
                for i in range(500)])
        filled = time.monotonic() - started
        pages.put("filled", "yes")
        r = yield pages.report("perf")
        self.assertNotIn("error", r, browser.tail())
        self.assertEqual(r["n"], 10000)
        print(f"\n10,000 records added from Python in {filled:.1f} s; enumRecords from "
              f"Chromium: {', '.join(f'{t:.0f} ms' for t in r['times'])} "
              f"({'paged' if r['paged'] else 'one answer: this broker does not page'})")
