# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{broker.tap}: the C{twistd broker} options, the service tree,
and the real C{twistd} process started as an operator would start it.
"""

import base64
import io
import os
import re
import signal
import stat
import sys

import treq
from twisted.application.service import IServiceCollection
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from broker import config, tap
from broker.core.router import Core
from tests.tools import killAtCleanup

LOOPBACK = "tcp:0:interface=127.0.0.1"


def writeConfig(testCase, text="", webpubsub=LOOPBACK, admin=LOOPBACK, webpubsubText=""):
    """
    Write a configuration into a fresh temporary directory whose C{state}
    child is the broker's state_dir, so no test writes into the checkout.

    @param webpubsubText: more keys of C{[webpubsub]}; C{text} follows the
        C{chat} hub's table.
    @return: the directory and the configuration file, as L{FilePath}s.
    """
    return configFile(testCase, f'[admin]\nlisten = ["{admin}"]\n'
                                f'[webpubsub]\nlisten = ["{webpubsub}"]\n{webpubsubText}'
                                f'[webpubsub.hubs.chat]\n{text}')


def configFile(testCase, text):
    """
    Write C{text} after a C{[broker]} table whose state_dir is the C{state}
    child of a fresh temporary directory.

    @return: the directory and the configuration file, as L{FilePath}s.
    """
    directory = FilePath(testCase.mktemp())
    directory.makedirs()
    path = directory.child("broker.toml")
    path.setContent(
        (f'[broker]\nstate_dir = "{directory.child("state").path}"\n' + text).encode("utf-8"))
    return directory, path


def startInProcess(testCase, path):
    """
    The broker's service tree for the configuration file C{path}, started in
    this process and stopped at the test's cleanup.
    """
    top = tap.buildService(config.load(path.path), reactor)
    top.privilegedStartService()
    top.startService()
    testCase.addCleanup(top.stopService)
    return top


def servicePort(top, key):
    """The port the listener C{key} of a started service tree listens on."""
    return top.getServiceNamed(key)._waitingForPort.result.getHost().port


class OptionsTests(TestCase):
    def test_embeddedDefault(self):
        """
        Without C{--config} the embedded default configuration is loaded.
        """
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["settings"], config.load())

    def test_configFile(self):
        _, path = writeConfig(self)
        options = tap.Options()
        options.parseOptions(["--config", path.path])
        self.assertEqual(options["settings"]["admin"]["listen"], [LOOPBACK])

    def failToParse(self, *args):
        """
        Parse C{args}, which must fail as a configuration error: exit status
        78 (EX_CONFIG), not a L{usage.UsageError} (twistd would print its
        usage text).

        @return: what was written on the options' C{stderr}.
        """
        options = tap.Options()
        options.stderr = io.StringIO()
        e = self.assertRaises(SystemExit, options.parseOptions, list(args))
        self.assertEqual(e.code, 78)
        return options.stderr.getvalue()

    def test_badConfigExits78(self):
        """
        A configuration error names the key and its line in the file.
        """
        _, path = writeConfig(self, "plain_mode = 'loud'\n")
        text = self.failToParse("--config", path.path)
        line = path.getContent().splitlines().index(b"plain_mode = 'loud'") + 1
        self.assertIn(f"{path.path}:{line}: webpubsub.hubs.chat.plain_mode: expected one of", text)

    def test_missingConfigExits78(self):
        missing = FilePath(self.mktemp()).path
        self.assertIn(missing, self.failToParse("-c", missing))


class BuildServiceTests(TestCase):
    """
    L{tap.buildService} on the real reactor and ephemeral loopback ports.
    """

    def build(self, foreground=True, **listeners):
        _, path = writeConfig(self, **listeners)
        return tap.buildService(config.load(path.path), reactor, foreground)

    def start(self, top):
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)

    def test_structure(self):
        """
        The core comes first, then one listener per configured endpoint,
        named after its key: Web PubSub, then admin.
        """
        top = self.build()
        self.assertIsInstance(list(top)[0], Core)
        self.assertIs(top.core, list(top)[0])
        self.assertEqual([s.name for s in top],
                         ["core", "webpubsub.listeners", "webpubsub.handlers",
                          "webpubsub.listen[0]", "admin.rates", "admin.listen[0]", "reloader"])
        listener = IServiceCollection(top).getServiceNamed("webpubsub.listen[0]")
        self.assertIsInstance(listener, tap.ListenerService)
        self.assertEqual(listener.description, LOOPBACK)

    def test_severalListeners(self):
        directory, path = writeConfig(self)
        settings = config.load(path.path)
        settings["webpubsub"]["listen"] = [LOOPBACK, LOOPBACK]
        top = tap.buildService(settings, reactor)
        self.assertEqual([s.name for s in top][3:5],
                         ["webpubsub.listen[0]", "webpubsub.listen[1]"])

    def test_webpubsubDisabled(self):
        directory, path = writeConfig(self)
        settings = config.load(path.path)
        settings["webpubsub"]["enabled"] = False
        top = tap.buildService(settings, reactor)
        # The reloader runs all the same: SIGHUP must never end the broker.
        self.assertEqual([s.name for s in top],
                         ["core", "admin.rates", "admin.listen[0]", "reloader"])

    def test_developmentKey(self):
        """
        With no access key configured, one is generated into state_dir, mode
        0600, and kept across restarts.
        """
        directory, path = writeConfig(self)
        settings = config.load(path.path)
        tap.buildService(settings, reactor)
        keyFile = directory.child("state").child(tap.ACCESS_KEY_FILE)
        key = keyFile.getContent()
        self.assertGreater(len(key.strip()), 30)
        self.assertEqual(stat.S_IMODE(os.stat(keyFile.path).st_mode), 0o600)
        tap.buildService(settings, reactor)
        self.assertEqual(keyFile.getContent(), key)

    def test_unusableStateDir(self):
        """
        A state_dir where the development key cannot be written is reported
        by key.
        """
        directory, path = writeConfig(self)
        settings = config.load(path.path)
        blocker = directory.child("file")
        blocker.setContent(b"")
        settings["broker"]["state_dir"] = blocker.child("state").path
        e = self.assertRaises(config.ConfigError, tap.buildService, settings, reactor)
        self.assertEqual(e.key, "broker.state_dir")

    def test_configuredKeyWritesNothing(self):
        directory, path = writeConfig(self)
        settings = config.load(path.path)
        settings["webpubsub"]["access_keys"] = ["configured"]
        settings["admin"]["token"] = "configured admin token"
        tap.buildService(settings, reactor)
        self.assertFalse(directory.child("state").exists())

    def test_adminToken(self):
        """
        With no admin.token configured, one is generated into state_dir,
        mode 0600, kept across restarts; the log names the file, never
        the token.
        """
        directory, path = writeConfig(self)
        settings = config.load(path.path)
        with capturedLogs() as events:
            top = tap.buildService(settings, reactor)
        tokenFile = directory.child("state").child("admin.token")
        token = tokenFile.getContent().strip().decode()
        self.assertGreater(len(token), 30)
        self.assertEqual(stat.S_IMODE(os.stat(tokenFile.path).st_mode), 0o600)
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any(tokenFile.path in line for line in lines), lines)
        self.assertFalse(any(token in line for line in lines))
        self.assertTrue(top.adminSite.guard.allows(_Authorized(token)))
        tap.buildService(settings, reactor)
        self.assertEqual(tokenFile.getContent().strip().decode(), token)

    @defer.inlineCallbacks
    def test_listening(self):
        """
        Each listener logs C{"{key} listening on host:port"} once listening,
        and serves: here, the admin site's /healthz.
        """
        top = self.build()
        with capturedLogs() as events:
            self.start(top)
        lines = [formatEvent(e) for e in events if e.get("address")]
        ports = dict(re.match(r"(\S+) listening on 127\.0\.0\.1:(\d+)$", line).groups()
                     for line in lines)
        self.assertEqual(sorted(ports), ["admin.listen[0]", "webpubsub.listen[0]"])
        response = yield treq.get(f"http://127.0.0.1:{ports['admin.listen[0]']}/healthz",
                                  reactor=reactor, persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield treq.content(response)), b"ok\n")

    def busyPort(self):
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"tcp:{port.getHost().port}:interface=127.0.0.1"

    def test_portInUseForeground(self):
        """
        Under C{twistd -n}, a listener that cannot listen logs one critical
        line naming its key and leaves by C{SystemExit(1)}: no traceback.
        """
        busy = self.busyPort()
        top = self.build(webpubsub=busy)
        with capturedLogs() as events:
            e = self.assertRaises(SystemExit, top.privilegedStartService)
        self.assertEqual(e.code, 1)
        critical = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        line = formatEvent(critical[0])
        self.assertTrue(line.startswith(f"webpubsub.listen[0]: cannot listen on {busy!r}: "),
                        line)
        self.assertNotIn("\n", line)

    def test_portInUseDaemon(self):
        """
        A daemonizing twistd gets an exception it can report to its parent
        process instead.
        """
        busy = self.busyPort()
        top = self.build(foreground=False, admin=busy)
        # The Web PubSub listener, before admin, does listen.
        self.addCleanup(IServiceCollection(top).getServiceNamed("webpubsub.listen[0]").stopService)
        with capturedLogs():
            e = self.assertRaises(tap.ListenError, top.privilegedStartService)
        self.assertTrue(str(e).startswith(f"admin.listen[0]: cannot listen on {busy!r}: "), str(e))


class FakeEndpoint:
    """
    An endpoint that listens when the test says so.
    """

    def __init__(self):
        self.waiting = defer.Deferred()

    def listen(self, factory):
        return self.waiting


class FakeReactor:
    def __init__(self):
        self.stopped = False
        self.triggers = []

    def stop(self):
        self.stopped = True

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f, args))


class LateFailureTests(TestCase):
    """
    An endpoint may fail after start-up (one that listens asynchronously);
    the broker then stops rather than run without that listener.
    """

    def setUp(self):
        self.endpoint = FakeEndpoint()
        self.reactor = FakeReactor()
        self.exits = []
        self.listener = tap.ListenerService("admin.listen[0]", "onion:80", self.endpoint,
                                            protocol.Factory(), self.reactor)
        self.listener._exit = self.exits.append
        self.listener.privilegedStartService()

    def test_lateFailureStopsTheProcess(self):
        with capturedLogs() as events:
            self.endpoint.waiting.errback(error.CannotListenError("x", 80, "no route"))
        critical = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(critical), 1)
        self.assertIn("admin.listen[0]: cannot listen on 'onion:80'",
                      formatEvent(critical[0]))
        self.assertTrue(self.reactor.stopped)
        self.assertEqual(self.reactor.triggers,
                         [("after", "shutdown", self.exits.append, (1,))])

    def test_stopBeforeListening(self):
        """
        Stopping before the endpoint listened cancels quietly.
        """
        with capturedLogs() as events:
            d = self.listener.stopService()
        self.successResultOf(d)
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])
        self.assertFalse(self.reactor.stopped)


# -- the real twistd --------------------------------------------------------


def twistdCommand():
    """
    twistd under this interpreter: the script installed beside it, or the
    same entry point run by hand when there is none.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


LISTENING = re.compile(r"\] (\S+) listening on 127\.0\.0\.1:(\d+)$")


class TwistdProcess(protocol.ProcessProtocol):
    """
    One twistd process: its output, the ports its listeners report, and
    how it ended.
    """

    def __init__(self, expectListeners=()):
        self.output = {1: b"", 2: b""}
        self.ports = {}
        self.expect = set(expectListeners)
        self.listening = defer.Deferred()
        self.ended = defer.Deferred()
        self.reason = None

    def childDataReceived(self, fd, data):
        self.output[fd] = self.output.get(fd, b"") + data
        for line in self.lines():
            m = LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(2))
        if self.expect and self.expect <= set(self.ports) and not self.listening.called:
            self.listening.callback(self.ports)

    def lines(self):
        """
        The complete lines written so far, stdout's then stderr's.
        """
        return [line for chunk in self.output.values()
                for line in chunk.decode("utf-8", "replace").split("\n")[:-1]]

    def text(self):
        return "\n".join(self.lines())

    def processEnded(self, reason):
        self.reason = reason.value
        if self.expect and not self.listening.called:
            self.listening.errback(AssertionError(
                "twistd ended before listening:\n" + self.text()))
        self.ended.callback(self.reason)

    def exitCode(self):
        return getattr(self.reason, "exitCode", None)


class TwistdTestsMixin:
    timeout = 60

    def spawn(self, args, cwd, expectListeners=()):
        """
        Run C{twistd *args} in C{cwd}; it is killed, and waited for, when
        the test ends.
        """
        proc = TwistdProcess(expectListeners)
        command = twistdCommand() + list(args)
        transport = reactor.spawnProcess(proc, command[0], command,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                         path=cwd.path)
        killAtCleanup(self, transport, proc.ended)
        return proc

    def assertOneLineNaming(self, proc, text):
        matching = [line for line in proc.lines() if text in line]
        self.assertEqual(len(matching), 1, proc.text())
        self.assertNotIn("Traceback", proc.text())


class RunningBrokerTests(TwistdTestsMixin, TestCase):
    """
    C{twistd -n broker --config FILE}, reached over the network.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.directory, path = writeConfig(self)
        self.proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path],
                               self.directory, ["webpubsub.listen[0]", "admin.listen[0]"])
        self.ports = yield self.proc.listening

    @defer.inlineCallbacks
    def test_healthz(self):
        response = yield treq.get(f"http://127.0.0.1:{self.ports['admin.listen[0]']}/healthz",
                                  reactor=reactor, persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield treq.content(response)), b"ok\n")

    @defer.inlineCallbacks
    def test_handshakeWithoutTokenRefused(self):
        """
        A WebSocket handshake on /client/hubs/chat without a token is
        refused with 401.
        """
        status = yield handshake(self.ports["webpubsub.listen[0]"], "/client/hubs/chat")
        self.assertEqual(status.split(b" ", 2)[1], b"401", status)

    @defer.inlineCallbacks
    def test_sigterm(self):
        """
        SIGTERM shuts the broker down cleanly.  twistd then ends by the same
        signal (it re-raises it once the reactor has stopped, so whoever
        waits learns why it ended), not with an exit status.
        """
        # Listening happens before the reactor runs and installs its signal
        # handlers; a served request proves the reactor is running.
        response = yield treq.get(f"http://127.0.0.1:{self.ports['admin.listen[0]']}/healthz",
                                  reactor=reactor, persistent=False)
        yield treq.content(response)
        self.proc.transport.signalProcess("TERM")
        reason = yield self.proc.ended
        self.assertIsInstance(reason, error.ProcessTerminated)
        self.assertEqual(reason.signal, signal.SIGTERM)
        lines = self.proc.lines()
        self.assertTrue(any(line.endswith("Main loop terminated.") for line in lines), lines[-8:])
        self.assertTrue(any(line.endswith("Server Shut Down.") for line in lines))
        self.assertNotIn("Traceback", self.proc.text())


class HandshakeClient(protocol.Protocol):
    """
    Sends a raw WebSocket opening handshake and reads the status line.
    """

    def __init__(self, path):
        self.path = path
        self.received = b""
        self.status = defer.Deferred()

    def connectionMade(self):
        key = base64.b64encode(os.urandom(16))
        self.transport.write(
            b"GET " + self.path.encode("ascii") + b" HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")

    def dataReceived(self, data):
        self.received += data
        if b"\r\n" in self.received and not self.status.called:
            self.status.callback(self.received.split(b"\r\n", 1)[0])
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.status.called:
            self.status.errback(reason)


@defer.inlineCallbacks
def handshake(port, path):
    client = HandshakeClient(path)
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(lambda: client))
    status = yield client.status
    return status


class StartupFailureTests(TwistdTestsMixin, TestCase):
    def setUp(self):
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()

    @defer.inlineCallbacks
    def test_help(self):
        """
        C{twistd --help} lists the broker plugin.
        """
        proc = self.spawn(["--help"], self.directory)
        yield proc.ended
        self.assertEqual(proc.exitCode(), 0)
        self.assertTrue(any(re.match(r"\s+broker\s", line) for line in proc.lines()),
                        proc.text())

    @defer.inlineCallbacks
    def test_unknownKey(self):
        """
        An unknown key: twistd exits 78 (EX_CONFIG) with one line naming it.
        """
        _, path = writeConfig(self, "plainmode = 'sendEvent'\n")
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], self.directory)
        yield proc.ended
        self.assertEqual(proc.exitCode(), 78)
        self.assertOneLineNaming(proc, "webpubsub.hubs.chat.plainmode: unknown key")

    def busyPort(self):
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"tcp:{port.getHost().port}:interface=127.0.0.1"

    @defer.inlineCallbacks
    def test_portInUse(self):
        """
        A listener port already in use: start-up fails with status 1 and one
        line naming the listener's key, and no traceback.
        """
        _, path = writeConfig(self, webpubsub=self.busyPort())
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", path.path], self.directory)
        yield proc.ended
        self.assertEqual(proc.exitCode(), 1)
        self.assertOneLineNaming(proc, "webpubsub.listen[0]: cannot listen on")
        self.assertEqual(proc.ports, {})

    @defer.inlineCallbacks
    def test_portInUseDaemon(self):
        """
        Daemonizing, twistd's parent process reports the listener by key,
        exits 1, and leaves no pid file.
        """
        _, path = writeConfig(self, admin=self.busyPort())
        pidfile = self.directory.child("twistd.pid")
        self.addCleanup(self.killDaemon, pidfile)
        proc = self.spawn(["--pidfile", pidfile.path,
                           "--logfile", self.directory.child("twistd.log").path,
                           "broker", "--config", path.path], self.directory)
        yield proc.ended
        self.assertEqual(proc.exitCode(), 1)
        self.assertIn("admin.listen[0]: cannot listen on", proc.text())
        # The daemon reports to its parent before it removes the pid file on
        # its way out, so the parent may exit first: allow the daemon 10 s.
        # (os.path, not FilePath.exists: that caches a successful stat.)
        for _ in range(200):
            if not os.path.exists(pidfile.path):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(os.path.exists(pidfile.path), self.describeDaemon(pidfile))
        self.assertIn(b"admin.listen[0]: cannot listen on",
                      self.directory.child("twistd.log").getContent())

    def describeDaemon(self, pidfile):
        """
        What is known of a daemon whose pid file outlived its parent.
        """
        try:
            pid = int(pidfile.getContent())
            with open(f"/proc/{pid}/stat") as f:
                state = f"pid {pid}: {f.read()}"
        except (OSError, ValueError) as e:
            state = f"pid file or process: {e}"
        log = self.directory.child("twistd.log")
        tail = log.getContent()[-3000:].decode("utf-8", "replace") if log.exists() else ""
        return f"{state}\ntwistd.log:\n{tail}"

    def killDaemon(self, pidfile):
        """
        Should the daemon have started after all, do not leave it running.
        """
        try:
            os.kill(int(pidfile.getContent()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


class _Authorized:
    """
    The head of a request carrying C{Authorization: Bearer <token>}.
    """

    def __init__(self, token):
        self.token = token

    def getHeader(self, name):
        return b"Bearer " + self.token.encode() if name == b"authorization" else None
