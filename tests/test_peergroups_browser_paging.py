# -*- test-case-name: tests.test_peergroups_browser_paging -*-
"""
AFTER THE MERGE OF BRANCH pg-paging: the browser library against a broker
that pages listings and chunks exports and imports
(docs/peergroups-protocol.md, "Answers of any size"). These tests are
written against that wire format and are skipped by a broker without it
(one whose HRESULTs lack E_MESSAGE_TOO_LARGE); once merged they run.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from broker.peergroups.errors import HRESULTS
from tests.pgbrowser import Pages, pageOrValue
from tests.test_peergroups import T1, T2, Base
from tests.tools import startChromium

PAGED = """
  const me = await Identity.generate("paging", "Pager", {persist: false});
  const pg = await PeerGroupClient.connect(config.ws);
  await pg.startup("default");
  await pg.registerIdentity(me);
  await put("info", await me.identityInfo());
  let h = await pg.join(await get("invitation"));
  const gpn = pg.groupPeerName(h);
  let reg = await pg.registerEvent(h, [EVENT.STATUS_CHANGED]);
  await pg.connect(h);
  await pg.nextEvent(reg, EVENT.STATUS_CHANGED);
  await get("filled");
  // Count the requests, to see the pages and parts.
  const calls = {};
  const call = pg.call.bind(pg);
  pg.call = (method, params) => {
    const key = method + (params && params.cursor ? "+cursor" : "");
    calls[key] = (calls[key] || 0) + 1;
    return call(method, params);
  };
  const all = await pg.enumRecords(h);
  const typed = await pg.enumRecords(h, config.recordType);
  const small = await pg.enumRecords(h, config.recordType, {count: 7});
  const found = await pg.searchRecords(
    h, '<peersearch><clause attrib="n" type="int" compare="less">50</clause></peersearch>');
  const groups = await pg.enumGroups({count: 1});
  const database = await pg.exportDatabase(h);
  await pg.close(h);
  h = await pg.open(gpn);      // not connected: an import may run
  const imported = await pg.importDatabase(h, database);
  await report({
    all: all.length, typed: typed.length, small: small.length, found: found.length,
    distinct: new Set(all.map((r) => r.id)).size, groups: groups.map((g) => g.groupPeerName),
    gpn, database: database.length, imported, calls,
    maxMessageSize: pg.hello.limits.maxMessageSize});
  await pg.disconnect();
"""


class BrowserPagingTests(Base, TestCase):
    timeout = 120
    toml = "max_message_size = 8192\n"

    def setUp(self):
        if "E_MESSAGE_TOO_LARGE" not in HRESULTS:
            raise SkipTest("needs the paging broker of branch pg-paging (runs after the merge)")
        return super().setUp()

    @defer.inlineCallbacks
    def test_pagesAndChunks(self):
        """
        With 8 KiB messages, enumRecords and searchRecords of 300 records
        follow the cursors to the whole list, enumGroups pages, and the
        database goes out and back in parts, each under the limit.
        """
        admin = yield self.group()
        port = self.broker.wsPort.getHost().port
        pages = Pages({"library": f"http://127.0.0.1:{port}/peergroups/peergroup.js",
                       "ws": self.broker.wsURL, "recordType": T1}, {"paged": PAGED})
        listening = reactor.listenTCP(0, Site(pages), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        pages.port = listening.getHost().port
        browser = startChromium(self, reactor, pages.url("paged"))
        info = yield pageOrValue(self, pages.get("info"), pages, "paged")
        pages.put("invitation", (yield admin.client.createInvitation(admin.handle, info)))
        for i in range(300):
            yield admin.client.addRecord(
                admin.handle, T1 if i % 3 else T2, b"d" * 32,
                attributes=f'<attributes><attribute name="n" type="int">{i}</attribute>'
                           f'</attributes>')
        pages.put("filled", "yes")
        r = yield pages.report("paged")
        self.assertNotIn("error", r, browser.tail())
        self.assertEqual(r["maxMessageSize"], 8192)
        self.assertEqual((r["all"], r["distinct"], r["typed"], r["small"], r["found"]),
                         (300, 300, 200, 200, 50))
        self.assertGreater(r["calls"].get("enumRecords+cursor", 0), 3)
        self.assertGreater(r["calls"].get("searchRecords+cursor", 0), 0)
        self.assertEqual(r["groups"], [r["gpn"]])
        self.assertGreater(r["database"], 8192)
        self.assertGreater(r["calls"].get("exportDatabase+cursor", 0), 0)
        self.assertGreater(r["calls"].get("importDatabase+cursor", 0), 0)
        self.assertIsInstance(r["imported"]["imported"], int)
