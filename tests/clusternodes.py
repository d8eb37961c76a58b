"""
Broker nodes as real C{twistd -n broker} processes joined through one test
redis-server: what the cluster process tests of every face share (writing
each node's configuration, spawning it, reading its listeners' ports, and
its admin endpoints).
"""

import treq
from twisted.internet import defer, reactor
from twisted.python.filepath import FilePath

from tests.redisserver import RedisServer, settle
from tests.test_tap import TwistdTestsMixin

CLUSTER = """\
[broker]
state_dir = "{state}"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
[cluster]
redis_url = "{redis}"
prefix = "{prefix}"
node_id = "{node}"
heartbeat = {heartbeat}
dead_after = {deadAfter}
"""


class ClusterNodesMixin(TwistdTestsMixin):
    """
    @cvar faces: the TOML of the faces after the C{[cluster]} section, a
        format string filled by L{faceSettings}.
    @cvar listeners: the listener keys each node must report before it is
        used (the admin listener is added).
    @ivar nodes: C{{name: TwistdProcess}}; each has C{ports} (listener key
        to port).
    """

    timeout = 60
    heartbeat = 0.2
    deadAfter = 1.0
    prefix = "it"
    faces = ""
    listeners = ()

    def prepareCluster(self, durable=False):
        """
        A redis-server (not started yet) and a directory for the nodes.

        @param durable: run Redis with its append-only file fsynced on
            every write, so what it acknowledged survives its restart.
        """
        self.redis = RedisServer(self, reactor, durable=durable)
        self.directory = FilePath(self.mktemp())
        self.directory.makedirs()
        self.nodes = {}

    def faceSettings(self, name):
        return {}

    def nodeConfig(self, name):
        return CLUSTER.format(
            state=self.directory.child(name).path, redis=self.redis.url, prefix=self.prefix,
            node=name, heartbeat=self.heartbeat, deadAfter=self.deadAfter,
        ) + self.faces.format(**self.faceSettings(name))

    @defer.inlineCallbacks
    def startNode(self, name, healthy=True):
        """
        Start the node C{name}; fire with its process once its listeners
        report their ports (and, if C{healthy}, once /healthz answers 200).
        """
        config = self.directory.child(f"{name}.toml")
        config.setContent(self.nodeConfig(name).encode())
        proc = self.spawn(["-n", "--pidfile=", "broker", "--config", config.path],
                          self.directory, list(self.listeners) + ["admin.listen[0]"])
        proc.ports = yield proc.listening
        proc.admin = proc.ports["admin.listen[0]"]
        self.nodeStarted(proc)
        self.nodes[name] = proc
        if healthy:
            yield self.waitHealth(name, 200)
        return proc

    def nodeStarted(self, proc):
        """
        A hook: name the node's ports on C{proc} as the tests like.
        """

    def startNodes(self, names):
        """
        Start several nodes side by side (each twistd takes a second or so).
        """
        return defer.gatherResults([self.startNode(n) for n in names], consumeErrors=True)

    @defer.inlineCallbacks
    def adminGet(self, name, path):
        """
        C{(status, body)} of C{GET path} on the node's admin listener.
        """
        response = yield treq.get(f"http://127.0.0.1:{self.nodes[name].admin}{path}",
                                  reactor=reactor, persistent=False)
        body = yield treq.content(response)
        return response.code, body

    def healthz(self, name):
        return self.adminGet(name, "/healthz")

    @defer.inlineCallbacks
    def waitHealth(self, name, code, timeout=15.0):
        """
        Fire with the body once the node's /healthz answers C{code}.
        """
        deadline = reactor.seconds() + timeout
        while True:
            got, body = yield self.healthz(name)
            if got == code:
                return body
            if reactor.seconds() > deadline:
                self.fail(f"node {name} never answered /healthz {code} (last: {got} {body!r})")
            yield settle(reactor, 0.05)

    def kill(self, name):
        """
        SIGKILL node C{name}; fires once it has ended.
        """
        proc = self.nodes[name]
        proc.transport.signalProcess("KILL")
        return proc.ended

    def assertNoTraceback(self, *names):
        for name in names:
            self.assertNotIn("Traceback", self.nodes[name].text(), self.nodes[name].text())
