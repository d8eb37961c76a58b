# -*- test-case-name: tests.test_faceplugins -*-
"""
Tests for L{broker.plugins}: faces found as Twisted plugins, the built-in
ones and an operator's.

The operator's face is the C{lines} package of docs/plugins.md, taken from
that page as it is, installed with C{pip install --target} into a
temporary directory and run by a real C{twistd -n broker} with that
directory on its C{PYTHONPATH}; a real Web PubSub client in the group
receives what a real TCP client sends to the face.
"""

import importlib
import os
import re
import sys

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.plugin import IPlugin
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from broker import config
from broker.auth.tokens import makeClientToken
from broker.plugins import FacePluginError, FacePlugins, IBrokerFace, findFaces
from tests.redisserver import RedisServer
from tests.test_cluster_redis import waitFor
from tests.test_tap import TwistdProcess, twistdCommand
from tests.tools import killAtCleanup
from tests.wsharness import Client

LOOPBACK = "tcp:0:interface=127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "plugin-test-access-key-0123456789"
BUILTINS = ["webpubsub", "ecdn", "iot", "peergroups"]


class BuiltinFaceTests(TestCase):
    def test_builtinsFound(self):
        """
        The four built-in faces are found by C{getPlugins(IBrokerFace)}, in
        their start-up order, each a full L{IBrokerFace} and L{IPlugin}
        whose section is the schema's.
        """
        plugins = findFaces()
        self.assertEqual(plugins.names()[:4], BUILTINS)
        schema = config.schema(plugins)
        for face in plugins.faces[:4]:
            self.assertTrue(verifyObject(IBrokerFace, face))
            self.assertTrue(IPlugin.providedBy(face))
            self.assertIsInstance(face.section, config.Table)
            self.assertIs(schema.fields[face.name], face.section)
        self.assertEqual(plugins.broken, [])

    def test_disabledFaceListensNowhere(self):
        """
        A built-in face's C{listeners} are empty when its section disables
        it, as its C{build} opens nothing.
        """
        settings = config.parse("[webpubsub]\nenabled = false\n")
        byName = {face.name: face for face in findFaces().faces}
        for name in BUILTINS:
            self.assertEqual(byName[name].listeners(settings), [], name)


class PluginPackage:
    """
    A throwaway plugin package (a directory with C{__init__.py} on
    C{sys.path}) holding the modules given, for L{findFaces}.
    """

    count = 0

    def __init__(self, testCase, modules):
        PluginPackage.count += 1
        self.name = f"faceplugins_{os.getpid()}_{PluginPackage.count}"
        root = FilePath(testCase.mktemp())
        package = root.child(self.name)
        package.makedirs()
        package.child("__init__.py").setContent(b"")
        for name, source in modules.items():
            package.child(f"{name}.py").setContent(source.encode("utf-8"))
        sys.path.insert(0, root.path)
        testCase.addCleanup(self._forget, root.path)
        self.module = importlib.import_module(self.name)

    def _forget(self, path):
        sys.path.remove(path)
        for name in [n for n in sys.modules if n == self.name or n.startswith(self.name + ".")]:
            del sys.modules[name]


FACE = """
from twisted.plugin import IPlugin
from zope.interface import implementer
from broker.config import Int, Table
from broker.plugins import IBrokerFace


@implementer(IPlugin, IBrokerFace)
class Face:
    description = "a test face"

    def __init__(self, name, order, section):
        self.name = name
        self.order = order
        self.section = section

    def build(self, context):
        pass

    def listeners(self, settings):
        return []


{assignments}
"""


def faceModule(**faces):
    """
    A plugin module's source defining one L{IBrokerFace} per keyword:
    C{variable=(name, order)}.
    """
    lines = [f'{variable} = Face({name!r}, {order!r}, Table({{"port": Int(7)}}))'
             for variable, (name, order) in faces.items()]
    return FACE.replace("{assignments}", "\n".join(lines))


class FindFacesTests(TestCase):
    def test_order(self):
        """
        Faces come in increasing C{order}, then by name, whichever module
        holds them.
        """
        package = PluginPackage(self, {"a": faceModule(z=("zeta", 5), b=("beta", 100)),
                                       "b": faceModule(a=("alpha", 100))})
        self.assertEqual(findFaces(package.module).names(), ["zeta", "alpha", "beta"])

    def test_duplicateNames(self):
        """
        Two plugins of one name: L{FacePluginError} naming it, and the
        configuration cannot be loaded with them (one line, naming it).
        """
        package = PluginPackage(self, {"one": faceModule(echo=("echo", 100)),
                                       "two": faceModule(echo=("echo", 101))})
        e = self.assertRaises(FacePluginError, findFaces, package.module)
        self.assertIn("two face plugins are named 'echo'", str(e))
        self.assertIn("uninstall one of them", str(e))

    def test_reservedName(self):
        package = PluginPackage(self, {"one": faceModule(a=("admin", 100))})
        e = self.assertRaises(FacePluginError, findFaces, package.module)
        self.assertIn("is named 'admin', a section of the broker itself", str(e))

    def test_badName(self):
        package = PluginPackage(self, {"one": faceModule(a=("Echo-1", 100))})
        e = self.assertRaises(FacePluginError, findFaces, package.module)
        self.assertIn("unusable name 'Echo-1'", str(e))

    def test_badOrder(self):
        package = PluginPackage(self, {"one": faceModule(a=("echo", "first"))})
        e = self.assertRaises(FacePluginError, findFaces, package.module)
        self.assertIn("unusable order 'first'", str(e))

    def test_brokenModule(self):
        """
        A plugin module that cannot be imported: the other modules' faces
        are found, the broken module is listed with its error and logged
        in one line naming it.
        """
        package = PluginPackage(self, {"good": faceModule(echo=("echo", 100)),
                                       "broken": "import no_such_module_for_a_face\n"})
        plugins = findFaces(package.module)
        self.assertEqual(plugins.names(), ["echo"])
        self.assertEqual(plugins.broken, [
            (f"{package.name}.broken",
             "ModuleNotFoundError: No module named 'no_such_module_for_a_face'")])
        # Twisted's own log of the import failure (its traceback).
        self.assertEqual(len(self.flushLoggedErrors(ModuleNotFoundError)), 1)

    def test_unknownSectionNamesPlugins(self):
        """
        An unknown section's error names the broker's own sections, the
        installed face plugins and the plugin modules that failed; a known
        face's section is validated by its table.
        """
        package = PluginPackage(self, {"good": faceModule(echo=("echo", 100)),
                                       "broken": "raise RuntimeError('half installed')\n"})
        plugins = findFaces(package.module)
        self.flushLoggedErrors(RuntimeError)
        schema = config.schema(plugins)
        e = self.assertRaises(config.ConfigError, schema.check, "", {"ehco": {}})
        self.assertEqual(e.key, "ehco")
        self.assertEqual(
            str(e), "ehco: unknown section (the broker's own: broker, admin, cluster; "
                    f"installed face plugins: echo; plugin modules that failed to import: "
                    f"{package.name}.broken (RuntimeError: half installed))")
        self.assertEqual(schema.check("", {"echo": {"port": 9}})["echo"], {"port": 9})
        e = self.assertRaises(config.ConfigError, schema.check, "", {"echo": {"port": "x"}})
        self.assertEqual(e.key, "echo.port")

    def test_sectionUnusable(self):
        """
        A face whose section cannot be had (its settings module missing)
        or is not a L{config.Table}: a configuration error naming the face.
        """
        package = PluginPackage(self, {"odd": FACE.replace(
            "{assignments}",
            "odd = Face('odd', 100, {'port': 7})\n"
            "from broker.plugins import PackageFace\n"
            "gone = PackageFace('gone', 100, 'missing code', package='no_such_face_package')\n")})
        plugins = findFaces(package.module)
        gone = FacePlugins([f for f in plugins.faces if f.name == "gone"])
        e = self.assertRaises(config.ConfigError, config.schema, gone)
        self.assertEqual(e.key, "gone")
        self.assertIn("cannot give its section: ModuleNotFoundError", str(e))
        odd = FacePlugins([f for f in plugins.faces if f.name == "odd"])
        e = self.assertRaises(config.ConfigError, config.schema, odd)
        self.assertIn("not a broker.config.Table", str(e))


# -- the operator's face of docs/plugins.md ------------------------------------


EXAMPLE_FILE = re.compile(r"^```\w+\n# file: (\S+)\n(.*?)^```", re.M | re.S)


def exampleFiles():
    """
    C{{path: text}} of the files docs/plugins.md shows as the C{lines}
    package (each fenced block opening with C{# file: <path>}).
    """
    with open(os.path.join(ROOT, "docs", "plugins.md"), encoding="utf-8") as f:
        text = f.read()
    return {path: f"# file: {path}\n{body}" for path, body in EXAMPLE_FILE.findall(text)}


_installed = {}


@defer.inlineCallbacks
def installExample(testCase):
    """
    The docs' package built and installed with C{pip install --target}
    (once per test run); the target directory.
    """
    if "target" in _installed:
        return _installed["target"]
    work = FilePath(testCase.mktemp())
    source = work.child("broker-lines")
    for path, text in exampleFiles().items():
        child = source.preauthChild(path)
        child.parent().makedirs(ignoreExistingDirectory=True)
        child.setContent(text.encode("utf-8"))
    target = work.child("site")
    # --no-deps: the broker is installed already; --no-build-isolation:
    # build with this environment's setuptools (scripts/test installs it),
    # without an index.
    out, err, code = yield utils.getProcessOutputAndValue(
        sys.executable,
        ["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
         "--no-deps", "--no-build-isolation", "--no-index", "--target", target.path,
         source.path],
        env=dict(os.environ), reactor=reactor)
    if code != 0:
        raise AssertionError(f"pip install failed ({code}):\n{out.decode()}\n{err.decode()}")
    _installed["target"] = target
    return target


class LineClient(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self):
        self.lines = []
        self._waiting = []
        self.lost = defer.Deferred()

    def lineReceived(self, line):
        if self._waiting:
            self._waiting.pop(0).callback(line)
        else:
            self.lines.append(line)

    def nextLine(self):
        if self.lines:
            return defer.succeed(self.lines.pop(0))
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def connectionLost(self, reason):
        self.lost.callback(None)


@defer.inlineCallbacks
def lineClient(testCase, port):
    client = LineClient()
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(lambda: client))
    testCase.addCleanup(lambda: None if client.lost.called
                        else client.transport.abortConnection() or client.lost)
    return client


@defer.inlineCallbacks
def groupMember(testCase, port, group):
    """
    A Web PubSub JSON client of hub C{chat}, in C{group} from its token,
    connected.
    """
    url = f"ws://127.0.0.1:{port}/client/hubs/chat"
    token = makeClientToken(KEY, url, userId="watcher", groups=[group])
    factory = WebSocketClientFactory(f"{url}?access_token={token}",
                                     protocols=["json.webpubsub.azure.v1"], reactor=reactor)
    factory.protocol = Client
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
    client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    testCase.addCleanup(lambda: client.transport.abortConnection() or client.closed
                        if client.state != client.STATE_CLOSED else None)
    yield client.opened
    connected = yield client.nextJSON()
    testCase.assertEqual(connected["event"], "connected")
    return client


def groupMessage(group, text):
    return {"type": "message", "from": "group", "group": group, "dataType": "text",
            "data": text}


class OperatorFaceTests(TestCase):
    """
    The docs' C{lines} face, installed with pip, under a real C{twistd}.
    """

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.site = yield installExample(self)
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()

    def writeConfig(self, text):
        path = self.directory.child("broker.toml")
        path.setContent(
            (f'[broker]\nstate_dir = "{self.directory.child("state").path}"\n'
             f'[admin]\nlisten = ["{LOOPBACK}"]\n'
             f'[webpubsub]\nlisten = ["{LOOPBACK}"]\naccess_keys = ["{KEY}"]\n'
             + text).encode("utf-8"))
        return path

    def spawn(self, args, pythonPath, expectListeners=()):
        proc = TwistdProcess(expectListeners)
        command = twistdCommand() + list(args)
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([p.path for p in pythonPath]
                                              + [os.environ.get("PYTHONPATH", "")]))
        transport = reactor.spawnProcess(proc, command[0], command, env=env,
                                         path=self.directory.path)
        killAtCleanup(self, transport, proc.ended)
        return proc

    def start(self, text, pythonPath=None, expectListeners=("lines.listen[0]",
                                                          "webpubsub.listen[0]")):
        path = self.writeConfig(text)
        return self.spawn(["-n", "--pidfile=", "broker", "--config", path.path],
                          [self.site] if pythonPath is None else pythonPath, expectListeners)

    def extraPlugins(self, modules):
        """
        A second directory on the path with C{twisted/plugins/<name>.py}
        modules (no package: the plugin files alone).
        """
        root = FilePath(self.mktemp())
        plugins = root.child("twisted").child("plugins")
        plugins.makedirs()
        for name, source in modules.items():
            plugins.child(f"{name}.py").setContent(source.encode("utf-8"))
        return root

    @defer.inlineCallbacks
    def test_lineReachesGroup(self):
        """
        A line sent to the operator's face reaches the Web PubSub client in
        the configured group through the routing core, and is acknowledged
        C{ok}; a line over C{max_line_length} is refused and its connection
        closed, and the face goes on serving the others.
        """
        proc = self.start(f'[lines]\nlisten = ["{LOOPBACK}"]\ngroup = "news"\n'
                          f'max_line_length = 64\n')
        ports = yield proc.listening
        member = yield groupMember(self, ports["webpubsub.listen[0]"], "news")
        sender = yield lineClient(self, ports["lines.listen[0]"])
        sender.sendLine("héllo from a plugin".encode("utf-8"))
        self.assertEqual((yield sender.nextLine()), b"ok")
        self.assertEqual((yield member.nextJSON()), groupMessage("news", "héllo from a plugin"))

        flooder = yield lineClient(self, ports["lines.listen[0]"])
        flooder.transport.write(b"x" * 65 * 4)
        self.assertEqual((yield flooder.nextLine()), b"error line too long")
        yield flooder.lost
        sender.sendLine(b"still here")
        self.assertEqual((yield sender.nextLine()), b"ok")
        # The next frame is the good line: nothing of the long one went out.
        self.assertEqual((yield member.nextJSON()), groupMessage("news", "still here"))
        self.assertNotIn("Traceback", proc.text())

    @defer.inlineCallbacks
    def test_unknownSectionNamesInstalled(self):
        """
        A misspelt section: exit 1, one line naming the installed face
        plugins, the operator's among them.
        """
        proc = self.start(f'[lnes]\nlisten = ["{LOOPBACK}"]\n', expectListeners=())
        yield proc.ended
        self.assertEqual(proc.exitCode(), 78)  # EX_CONFIG
        matching = [line for line in proc.lines() if "lnes: unknown section" in line]
        self.assertEqual(len(matching), 1, proc.text())
        self.assertIn("installed face plugins: webpubsub, ecdn, iot, peergroups, mqtt, lines",
                      matching[0])
        self.assertNotIn("Traceback", proc.text())

    @defer.inlineCallbacks
    def test_withoutThePackage(self):
        """
        The same configuration without the package on the path: the
        section is unknown, and the installed plugins are the built-ins.
        """
        proc = self.start(f'[lines]\nlisten = ["{LOOPBACK}"]\n', pythonPath=[],
                          expectListeners=())
        yield proc.ended
        self.assertEqual(proc.exitCode(), 78)  # EX_CONFIG
        self.assertIn("lines: unknown section (the broker's own: broker, admin, cluster; "
                      "installed face plugins: webpubsub, ecdn, iot, peergroups, mqtt)", proc.text())

    @defer.inlineCallbacks
    def test_duplicateName(self):
        """
        A second plugin named C{lines}: exit 1, one line naming both.
        """
        other = self.extraPlugins({"lines_again": (
            "from broker.plugins import PackageFace\n"
            "again = PackageFace('lines', 100, 'another lines face', package='elsewhere')\n")})
        proc = self.start(f'[lines]\nlisten = ["{LOOPBACK}"]\n', [self.site, other],
                          expectListeners=())
        yield proc.ended
        self.assertEqual(proc.exitCode(), 78)  # EX_CONFIG
        matching = [line for line in proc.lines() if "two face plugins are named 'lines'" in line]
        self.assertEqual(len(matching), 1, proc.text())
        self.assertIn("lines_face", matching[0])
        self.assertIn("elsewhere", matching[0])

    @defer.inlineCallbacks
    def test_brokenPluginModule(self):
        """
        A plugin module that fails to import breaks neither C{twistd
        --help} nor the broker: the module is named in one line, and the
        other faces serve.
        """
        broken = self.extraPlugins({"broken_face": "import no_such_dependency_of_a_face\n"})
        help = self.spawn(["--help"], [self.site, broken])
        yield help.ended
        self.assertEqual(help.exitCode(), 0, help.text())
        self.assertTrue(any(re.match(r"\s+broker\s", line) for line in help.lines()),
                        help.text())

        proc = self.start(f'[lines]\nlisten = ["{LOOPBACK}"]\n', [self.site, broken])
        ports = yield proc.listening
        named = [line for line in proc.lines()
                 if "face plugins: twisted.plugins.broken_face could not be imported "
                    "(ModuleNotFoundError: No module named 'no_such_dependency_of_a_face')"
                 in line]
        self.assertEqual(len(named), 1, proc.text())
        sender = yield lineClient(self, ports["lines.listen[0]"])
        sender.sendLine(b"hello")
        self.assertEqual((yield sender.nextLine()), b"ok")

    @defer.inlineCallbacks
    def test_workers(self):
        """
        With C{cluster.workers = 2}, the supervisor opens the operator's
        listener (from the face's C{listeners}) and both workers find the
        plugin and adopt it: a line reaches the group across the workers.
        """
        redis = RedisServer(self, reactor)
        yield redis.start()
        proc = self.start(f'[cluster]\nredis_url = "{redis.url}"\nworkers = 2\n'
                          f'[lines]\nlisten = ["{LOOPBACK}"]\n')
        ports = yield proc.listening
        # Ready to serve across workers means linked to Redis too: a line
        # published before its worker's link is up stays on that worker.
        ready = re.compile(r"\[(w\d) broker\.(workers#info\] ready: node|cluster\.redis"
                           r"#info\] redis .*: connected)")
        yield waitFor(lambda: len({m.group(0) for m in map(ready.search, proc.lines())
                                   if m}) == 4, timeout=60)

        def step(d, what):
            # A step that hangs fails with the broker's log, not the test's
            # timeout.
            d.addTimeout(20, reactor)
            d.addErrback(lambda f: self.fail(f"{what}: {f.getErrorMessage()}\n"
                                             f"{proc.text()[-6000:]}"))
            return d

        member = yield step(groupMember(self, ports["webpubsub.listen[0]"], "lines"),
                            "the group member")
        for i in range(4):
            sender = yield step(lineClient(self, ports["lines.listen[0]"]), "a line client")
            sender.sendLine(f"line {i}".encode("ascii"))
            self.assertEqual((yield step(sender.nextLine(), f"ok {i}")), b"ok")
            self.assertEqual((yield step(member.nextJSON(), f"line {i}")),
                             groupMessage("lines", f"line {i}"))
            sender.transport.loseConnection()
            yield sender.lost
        adopted = [line for line in proc.lines()
                   if re.search(r"\[w\d broker\.tap#info\] lines\.listen\[0\] listening on", line)]
        self.assertEqual(len(adopted), 2, proc.text())
        proc.transport.signalProcess("TERM")
        yield proc.ended
