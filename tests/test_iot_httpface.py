"""
Tests for the IoT face's HTTP wiring (L{broker.iot.face.buildHTTP}): the
API listener built from the configuration by L{broker.tap.buildService},
its API keys from a file and their reload on SIGHUP, the webhooks.
"""

import treq
from twisted.application.service import IServiceCollection
from twisted.internet import defer, reactor
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, tap
from broker.iot import apikeys


class HTTPFaceTests(TestCase):
    def build(self, http="", webhook="", keys=None):
        directory = self.directory = FilePath(self.mktemp())
        directory.makedirs()
        self.keyFile = directory.child("iot-api-keys")
        if keys is not None:
            self.keyFile.setContent(keys.encode())
            http += f'\napi_key_file = "{self.keyFile.path}"'
        path = directory.child("broker.toml")
        path.setContent(f"""
[broker]
state_dir = "{directory.child('state').path}"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
[webpubsub]
enabled = false
[iot]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
[iot.udp]
port = 0
[iot.http]
listen = ["tcp:0:interface=127.0.0.1"]
{http}
{webhook}
""".encode())
        self.top = tap.buildService(config.load(path.path), reactor)
        self.top.privilegedStartService()
        self.top.startService()
        self.addCleanup(self.top.stopService)
        listener = IServiceCollection(self.top).getServiceNamed("iot.http.listen[0]")
        self.port = listener._waitingForPort.result.getHost().port
        return self.top

    @defer.inlineCallbacks
    def get(self, key, path="/v1/fleets/demo/devices"):
        r = yield treq.get(f"http://127.0.0.1:{self.port}{path}",
                           headers={"Authorization": ["Bearer " + key]},
                           reactor=reactor, persistent=False)
        yield treq.content(r)
        return r.code

    @defer.inlineCallbacks
    def test_keyFileReloaded(self):
        """
        Keys come from api_key_file; on SIGHUP the file is read again, and a
        broken file keeps the previous keys.
        """
        k1, _ = apikeys.newKey()
        k2, _ = apikeys.newKey()
        self.build(keys=apikeys.hashLine("demo", k1) + "\n")
        self.assertEqual((yield self.get(k1)), 200)
        self.assertEqual((yield self.get(k2)), 401)
        reloader = IServiceCollection(self.top).getServiceNamed("reloader")
        self.keyFile.setContent(apikeys.hashLine("demo", k2).encode() + b"\n")
        reloader.reload()
        self.assertEqual((yield self.get(k1)), 401)
        self.assertEqual((yield self.get(k2)), 200)
        self.keyFile.setContent(b"not a key line\n")
        reloader.reload()
        self.flushLoggedErrors()
        self.assertEqual((yield self.get(k2)), 200)

    @defer.inlineCallbacks
    def test_developmentKey(self):
        """
        With no key configured, the development key of fleet demo in the
        state directory opens the API.
        """
        self.build()
        keyPath = self.directory.child("state").child(apikeys.DEVELOPMENT_KEY_FILE)
        key = keyPath.getContent().decode().strip()
        self.assertEqual((yield self.get(key)), 200)

    def test_badKeyLine(self):
        e = self.assertRaises(config.ConfigError, self.build,
                              http='api_keys = ["demo:1234:abc"]')
        self.assertIn("iot.http.api_keys[0]", str(e))

    def test_webhookNeedsSecret(self):
        e = self.assertRaises(config.ConfigError, self.build,
                              webhook='[iot.webhook.fleets.demo]\nurl = "http://x/"')
        self.assertIn("iot.webhook.fleets.demo.signing_secret", str(e))

    def test_webhookInstalled(self):
        self.build(webhook='[iot.webhook.fleets.demo]\nurl = "http://127.0.0.1:1/"\n'
                           'signing_secret = "s"')
        names = [s.name for s in self.top]
        self.assertIn("iot.webhook", names)
        self.assertIn("iot.http.listen[0]", names)
