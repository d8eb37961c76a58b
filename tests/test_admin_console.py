# -*- test-case-name: tests.test_admin_console -*-
"""
The admin console in a real browser (headless Chromium driven over the
DevTools protocol, L{tests.devtools}) against the broker's whole service
tree (L{broker.tap.buildService}, every face on loopback) with traffic on
every face: Web PubSub clients publishing, an IoT device sending
telemetry and a queue for an offline one, a peer group with a member
online, eCDN requests.

The browser is refused without the admin token, logs in with it, sees the
numbers change, closes a WebSocket client's connection and sees it gone
(the client sees its close), and purges a device queue.  Screenshots are
written to the test's directory, and into C{docs/admin/} when
C{BROKER_SCREENSHOTS} names that directory (how the documentation's
pictures are made).
"""

import json
import os
import shutil

import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import LoopingCall
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, tap
from broker.iot import frames
from broker.iot.client import IoTClient
from broker.peergroups.client import Identity, connectWebSocket
from tests.devtools import attach
from tests.test_iot_face import listeningPort
from tests.tools import startChromium
from tests.wsharness import KEY, BrokerHarness

TOKEN = "console-test-admin-token-0123456789"
LOOPBACK = "tcp:0:interface=127.0.0.1"

REGISTRY = """
[fleets.acme]
central_key = "central-secret"
[fleets.acme.devices.sensor1]
key = "sensor1-secret"
[fleets.acme.devices.valve7]
key = "valve7-secret"
"""

CONFIG = """
[broker]
state_dir = "{state}"
[admin]
listen = ["{lo}"]
token = "{token}"
[webpubsub]
listen = ["{lo}"]
access_keys = ["{key}"]
[webpubsub.hubs.chat]
[iot]
enabled = true
listen = ["{lo}"]
registry_file = "{registry}"
[iot.udp]
port = 0
[iot.http]
enabled = false
[ecdn]
enabled = true
listen = ["{lo}"]
policy = "subnet"
[peergroups]
enabled = true
listen = ["{lo}"]
tcp_listen = ["{lo}"]
"""


class _Clients(BrokerHarness):
    """
    Web PubSub clients of the broker under test (the harness's client
    side, on the service tree's listener).
    """

    def __init__(self, testCase, port):
        self.testCase = testCase
        self.tls = False
        self.reactor = reactor
        self.clients = []
        self.port = port

    def stop(self):
        for c in self.clients:
            if c.transport is not None and c.state != c.STATE_CLOSED:
                c.transport.abortConnection()
        return defer.DeferredList([c.closed for c in self.clients])


class ConsoleTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        directory = FilePath(self.mktemp())
        directory.makedirs()
        registry = directory.child("registry.toml")
        registry.setContent(REGISTRY.encode())
        path = directory.child("broker.toml")
        path.setContent(CONFIG.format(state=directory.child("state").path, lo=LOOPBACK,
                                      token=TOKEN, key=KEY, registry=registry.path).encode())
        self.top = tap.buildService(config.load(path.path), reactor)
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        self.ports = {}
        for key in ("admin.listen", "webpubsub.listen", "iot.listen", "ecdn.listen",
                    "peergroups.listen"):
            port = yield listeningPort(self.top.getServiceNamed(key + "[0]"))
            self.ports[key] = port.getHost().port
        self.admin = f"http://127.0.0.1:{self.ports['admin.listen']}"
        self.shots = self.mktemp()
        os.makedirs(self.shots)

    # -- traffic on every face ----------------------------------------------

    @defer.inlineCallbacks
    def traffic(self):
        wps = _Clients(self, _Port(self.ports["webpubsub.listen"]))
        self.addCleanup(wps.stop)
        self.wps = wps
        roles = ["webpubsub.sendToGroup", "webpubsub.joinLeaveGroup"]
        self.alice = yield wps.connectJSON(userId="alice", groups=["lobby", "ops"], roles=roles)
        self.bob = yield wps.connectJSON(userId="bob", groups=["lobby"], roles=roles)
        self.carol = yield wps.connectJSON(userId="carol", groups=["lobby"], roles=roles)
        sent = [0]

        def publish():
            sent[0] += 1
            self.alice.send({"type": "sendToGroup", "group": "lobby", "dataType": "text",
                             "data": f"tick {sent[0]}"})
        loop = LoopingCall(publish)
        loop.clock = reactor
        loop.start(0.2)
        self.addCleanup(loop.stop)

        device = IoTClient("device", "acme", "sensor1", "sensor1-secret")
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.ports["iot.listen"]), device)
        self.addCleanup(lambda: device.transport.abortConnection()
                        if device.transport.connected else None)
        yield device.authenticated
        readings = [20.0]

        def telemetry():
            readings[0] += 0.5
            device.write(frames.TELEMETRY, 0, frames.Payload.json({"celsius": readings[0]}))
        loop2 = LoopingCall(telemetry)
        loop2.clock = reactor
        loop2.start(0.5)
        self.addCleanup(loop2.stop)
        concentrator = self.top.adminSite.views["iot"].c
        for i in range(4):
            yield concentrator.send("acme", "valve7", frames.Payload.json({"open": i % 2 == 0}))

        peer = yield connectWebSocket(
            reactor, f"ws://127.0.0.1:{self.ports['peergroups.listen']}/peergroups/v1")
        self.addCleanup(peer.disconnect)
        yield peer.startup("default")
        yield peer.registerIdentity(Identity.generate("site-a", "Site A"))
        handle = yield peer.create(friendlyName="Field team")
        yield peer.connect(handle)

        body = json.dumps({"availableIPs": [{"format": "ipv4", "address": "10.1.2.3"}]})

        def ecdn():
            return treq.post(f"http://127.0.0.1:{self.ports['ecdn.listen']}"
                             "/v1/get-peering-group", data=body.encode(),
                             headers={"Content-Type": "application/json"},
                             reactor=reactor, persistent=False).addCallback(treq.content)
        loop3 = LoopingCall(ecdn)
        loop3.clock = reactor
        loop3.start(0.3)
        self.addCleanup(loop3.stop)

    @defer.inlineCallbacks
    def shot(self, page, name):
        path = yield page.screenshot(os.path.join(self.shots, name))
        target = os.environ.get("BROKER_SCREENSHOTS")
        if target:
            shutil.copy(path, os.path.join(target, name))

    # -- the test ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_console(self):
        yield self.traffic()
        profile = self.mktemp()
        os.makedirs(profile)
        browser = startChromium(self, reactor, self.admin + "/", profile=profile,
                                extraArgs=["--remote-debugging-port=0",
                                           "--window-size=1360,900"])
        page = yield attach(self, reactor, profile, self.admin)
        yield page.setViewport(1360, 900)
        # Refused without the credential: the page asks for it, the API
        # answers 401 without it or with a wrong one.
        yield page.waitFor("document.readyState === 'complete' && "
                           "!document.getElementById('login').hidden")
        status = yield page.evaluate("fetch('/api/overview').then(r => r.status)")
        self.assertEqual(status, 401)
        status = yield page.evaluate(
            "fetch('/api/hubs/chat/connections/x/close', {method: 'POST', "
            "headers: {Authorization: 'Bearer wrong'}}).then(r => r.status)")
        self.assertEqual(status, 401)
        yield page.evaluate("""(() => {
            document.getElementById('token').value = 'not-the-token';
            document.getElementById('login-form').requestSubmit(); return true; })()""")
        error = yield page.waitFor("document.getElementById('login-error').textContent")
        self.assertEqual(error, "that token was refused")
        self.assertGreaterEqual(self.top.adminSite.guard.refused["wrong"], 2)
        self.assertGreaterEqual(self.top.adminSite.guard.refused["missing"], 1)
        yield self.shot(page, "login.png")

        # Logged in: the overview shows every face, and its numbers change.
        yield page.evaluate(f"""(() => {{
            document.getElementById('token').value = {json.dumps(TOKEN)};
            document.getElementById('login-form').requestSubmit(); return true; }})()""")
        yield page.waitFor("document.getElementById('total-connections') && "
                           "document.getElementById('total-connections').textContent")
        faces = yield page.evaluate(
            "[...document.querySelectorAll('#faces .face')].map(e => e.id)")
        self.assertEqual(faces, ["face-core", "face-webpubsub", "face-iot", "face-peergroups",
                                 "face-ecdn"])
        yield page.waitFor("document.getElementById('iot-big').textContent === '1'")
        before = yield page.evaluate("document.getElementById('total-connections').textContent")
        dave = yield self.wps.connectJSON(userId="dave", groups=["lobby"])
        yield page.waitFor("document.getElementById('total-connections').textContent !== "
                           f"{json.dumps(before)}")
        ecdnBefore = yield page.evaluate("document.getElementById('ecdn-big').textContent")
        yield page.waitFor(f"document.getElementById('ecdn-big').textContent !== "
                           f"{json.dumps(ecdnBefore)}")
        # The overview's Web PubSub card counts the Web PubSub clients only
        # (not the peer-groups session, whose hub is that face's).
        yield page.waitFor("document.getElementById('webpubsub-big').textContent === '4'")
        # Samples for the charts (one every two seconds).
        yield page.waitFor("fetch('/api/rates', {headers: {Authorization: 'Bearer ' + "
                           "sessionStorage.getItem('brokerAdminToken')}}).then(r => r.json())"
                           ".then(r => r.t.length >= 8)", timeout=60, interval=1.0)
        yield page.waitFor("document.querySelector('#legend-messages span') && "
                           "!/–$/.test(document.querySelector('#legend-messages span')"
                           ".textContent)", timeout=30)
        yield self.shot(page, "overview.png")

        # Hubs: find bob's connection, look at it, close it.
        yield page.evaluate("document.querySelector('[data-tab=hubs]').click()")
        yield page.waitFor("document.querySelector('#hubs-table tr[data-hub=chat]')")
        yield page.evaluate(
            "(() => { const r = [...document.querySelectorAll('#hubs-table tr')]"
            ".find(t => t.dataset.hub === 'chat'); r.click(); return true; })()")
        cid = self.bob.connectionId
        row = f"document.querySelector('#conn-table tr[data-connection={json.dumps(cid)}]')"
        yield page.waitFor(row)
        yield page.evaluate(f"{row}.click()")
        yield page.waitFor("!document.getElementById('conn-detail').hidden && "
                           "document.getElementById('conn-fields').textContent.includes('bob')")
        yield page.evaluate(
            "(() => { const r = [...document.querySelectorAll('#group-table tr')]"
            ".find(t => t.dataset.group === 'lobby'); r.click(); return true; })()")
        yield page.waitFor("!document.getElementById('send-form').hidden")
        yield self.shot(page, "hubs.png")
        yield page.evaluate("document.getElementById('conn-close').click()")
        code, reason = yield self.bob.closed
        self.assertEqual((code, reason), (1008, "closed by an administrator"))
        yield page.waitFor(f"!{row}")
        yield page.waitFor("document.getElementById('conn-fields').textContent"
                           ".includes('no longer connected')")
        self.assertIsNone(self.alice.closeCode)
        self.assertIsNone(dave.closeCode)

        # IoT: the offline valve's queue, purged from the console.
        yield page.evaluate("document.querySelector('[data-tab=iot]').click()")
        purge = "document.querySelector('button[data-purge=valve7]')"
        yield page.waitFor(f"{purge} && !{purge}.disabled")
        yield page.waitFor("document.getElementById('device-table').textContent"
                           ".includes('celsius')")
        yield self.shot(page, "iot.png")
        yield page.evaluate(f"{purge}.click()")
        yield page.waitFor(f"{purge} && {purge}.disabled")
        concentrator = self.top.adminSite.views["iot"].c
        depth = yield concentrator.queueDepth("acme", "valve7")
        self.assertEqual(depth, 0)

        # Peer groups: the application, its group, the member online.
        yield page.evaluate("document.querySelector('[data-tab=peergroups]').click()")
        yield page.waitFor("document.querySelector('#pgroup-table tbody tr.click')")
        yield page.evaluate("document.querySelector('#pgroup-table tbody tr.click').click()")
        yield page.waitFor("document.getElementById('member-table').textContent"
                           ".includes('Site A')")
        yield self.shot(page, "peergroups.png")
        self.assertNotIn("Uncaught", browser.tail())


class _Port:
    """
    What L{BrokerHarness} reads of its listening port.
    """

    def __init__(self, number):
        self.number = number

    def getHost(self):
        return self

    @property
    def port(self):
        return self.number
