# -*- test-case-name: tests.test_cluster_redis -*-
"""
The broker's link to Redis: one ordered command connection and one
subscriber connection, each kept up by a L{ClientService} with exponential
backoff, built on txredisapi's protocols.

Why not txredisapi's own pool: its commands wait, unbounded, for a
connection to come back, and a pool of several connections reorders
commands.  A broker must answer "Redis is down" at once (so a durable write
is refused rather than parked), and a node's directory writes and bus
publishes must reach Redis in the order it made them.  So every command
here goes on the one live connection, or fails at once with
L{RedisUnavailable}.

Replies are bytes (C{charset=None}): payloads are binary.
"""

from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from broker.core.errors import Unavailable

log = Logger()


class RedisUnavailable(Unavailable):
    """
    Redis cannot be reached now: the request needs it and is refused (never
    parked, never dropped silently).
    """


class RedisOutcomeUnknown(RedisUnavailable):
    """
    The connection was lost after the command was sent and before its
    reply: Redis may have executed it (a write in flight when Redis shut
    down is usually in its append-only file).  Callers that tell a client
    "nothing was changed" for L{RedisUnavailable} must not say so for this
    one.
    """


def parseURL(url):
    """
    C{redis://[:password@]host[:port][/db]} to C{(host, port, password, db)}.

    @raise ValueError: for another scheme or a bad database number.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"{url!r}: only redis:// URLs are supported")
    if not parts.hostname:
        raise ValueError(f"{url!r}: no host")
    path = parts.path.strip("/")
    db = int(path) if path else 0
    password = unquote(parts.password) if parts.password else None
    return parts.hostname, parts.port or 6379, password, db


def _bytes(reply):
    """
    Status replies as bytes, whichever parser read them (txredisapi's own
    gives str, hiredis bytes), so callers see one type.
    """
    if isinstance(reply, str):
        return reply.encode("utf-8")
    if isinstance(reply, list):
        return [_bytes(r) for r in reply]
    return reply


def _lost(failure):
    """
    A command cut off by a lost connection fails as L{RedisOutcomeUnknown}
    (a L{RedisUnavailable}, like one refused because Redis was already
    down, but which may have been executed).
    """
    if failure.check(txredisapi.ConnectionError):
        raise RedisOutcomeUnknown(
            f"lost the connection to Redis: {failure.getErrorMessage()}")
    return failure


class _Commands(txredisapi.RedisProtocol):
    pass


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.client._message(channel, message)


class _Factory(Factory):
    def __init__(self, client, protocolClass, db):
        self.client = client
        self.protocolClass = protocolClass
        self.db = db
        self.isLazy = True

    def buildProtocol(self, addr):
        c = self.client
        p = self.protocolClass(charset=None, replyTimeout=c.replyTimeout,
                               password=c.password, dbid=self.db, convertNumbers=False)
        p.factory = self
        # txredisapi times replies with the global reactor; use ours.
        p.callLater = c.reactor.callLater
        return p

    # txredisapi calls these when AUTH or SELECT fails.
    def stopTrying(self):
        pass

    def connectionError(self, why):
        self.client._refused(why)


class RedisClient(service.MultiService):
    """
    @ivar connected: C{True} while both connections are up.

    Replies: bulk and status replies are bytes, integers ints, arrays
    lists; an error reply fails the Deferred with txredisapi's
    C{ResponseError}.
    """

    def __init__(self, reactor, url, replyTimeout=5.0, maxDelay=5.0):
        super().__init__()
        self.reactor = reactor
        self.url = url
        self.host, self.port, self.password, self.db = parseURL(url)
        self.replyTimeout = replyTimeout
        self._commands = None
        self._subscriber = None
        self._channels = {}          # channel bytes -> handler(message bytes)
        self._upHooks = []
        self._downHooks = []
        self._wasConnected = False
        self._downLogged = False
        self.connected = False
        self._checking = False
        self._unreachable = None
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=5)

        def backoff(attempt):
            return min(maxDelay, 0.1 * (2 ** min(attempt, 10)))

        for protocolClass, prepare in ((_Commands, self._commandsUp),
                                       (_Subscriber, self._subscriberUp)):
            internet.ClientService(
                endpoint, _Factory(self, protocolClass, self.db), retryPolicy=backoff,
                clock=reactor, prepareConnection=prepare).setServiceParent(self)

    # -- life cycle -------------------------------------------------------

    def onConnected(self, hook):
        """
        Call C{hook()} each time both connections are (re)established,
        before the link reports itself connected to anybody else: the
        engine re-registers its node there.
        """
        self._upHooks.append(hook)

    def onDisconnected(self, hook):
        self._downHooks.append(hook)

    def _commandsUp(self, protocol):
        self._whenReady(protocol, "_commands")

    def _subscriberUp(self, protocol):
        d = self._whenReady(protocol, "_subscriber")
        if self._channels:
            d.addCallback(lambda p: p.subscribe([c for c in self._channels]))
        d.addErrback(lambda f: None)    # the connection is gone: _lost says so

    def _whenReady(self, protocol, slot):
        """
        Take the connection once AUTH and SELECT are done.  Not handed back
        to ClientService as its prepareConnection result: a service stopped
        while that is pending meets the lost connection in its "stopped"
        state (automat's NoTransition).
        """
        def ready(p):
            setattr(self, slot, p)
            p.whenDisconnected().addCallback(lambda _: self._lost(slot, p))
            self.reactor.callLater(0, self._check)
            return p
        return protocol.whenConnected().addCallback(ready)

    def _lost(self, slot, protocol):
        if getattr(self, slot) is protocol:
            setattr(self, slot, None)
        if self.connected:
            self.connected = False
            log.warn("redis {url}: connection lost; local delivery goes on, "
                     "cluster-wide requests are refused until it is back", url=self.url)
            self._downLogged = True
            for hook in list(self._downHooks):
                hook()

    def _bothUp(self):
        return (self._commands is not None and self._subscriber is not None
                and self._commands.connected and self._subscriber.connected)

    @defer.inlineCallbacks
    def _check(self):
        # Each connection schedules a check when it comes up: the hooks run
        # once per (re)connection, not once per connection.
        if not self.running or self.connected or self._checking or not self._bothUp():
            return
        self._checking = True
        try:
            for hook in list(self._upHooks):
                yield hook()
        except Exception as e:
            if not isinstance(e, RedisUnavailable):
                log.failure("redis {url}: re-registering after connecting failed", url=self.url)
            if self._commands is not None:
                self._commands.transport.loseConnection()
            return
        finally:
            self._checking = False
        if not self._bothUp():
            return
        self.connected = True
        log.info("redis {url}: {what}", url=self.url,
                 what="reconnected" if self._wasConnected else "connected")
        self._wasConnected = True
        self._downLogged = False

    def _refused(self, why):
        log.error("redis {url}: {why}", url=self.url, why=why)

    def startService(self):
        super().startService()
        self._unreachable = self.reactor.callLater(3, self._reportUnreachable)

    def _reportUnreachable(self):
        self._unreachable = None
        if self.running and not self.connected and not self._downLogged:
            self._downLogged = True
            log.warn("redis {url}: not reachable yet; retrying with backoff", url=self.url)

    @defer.inlineCallbacks
    def stopService(self):
        self._upHooks = []
        self._downHooks = []
        if self._unreachable is not None and self._unreachable.active():
            self._unreachable.cancel()
        yield super().stopService()
        self.connected = False

    # -- commands ---------------------------------------------------------

    def _live(self, registering=False):
        p = self._commands
        # While the connect hooks run, every command may pass: they are
        # the node's own re-registration, and what others send meanwhile
        # is ordered after what the hooks have sent.
        if p is None or not p.connected or not (self.connected or registering or self._checking):
            raise RedisUnavailable(f"Redis at {self.host}:{self.port} is not reachable")
        return p

    def execute(self, *args, registering=False):
        """
        Run one command on the command connection.

        @param registering: allow it while the link is connecting, before
            it reports itself connected: for the L{onConnected} hooks (and
            so C{Cluster.onResync} hooks), which re-register a node's state
            before anybody else may use the link.

        @return: a L{Deferred} firing with its reply (bytes, ints, lists),
            failing with L{RedisUnavailable} at once when Redis is down, or
            with txredisapi's C{ResponseError} for a refused command.
        """
        try:
            return self._live(registering).execute_command(*args).addCallbacks(_bytes, _lost)
        except (RedisUnavailable, txredisapi.ConnectionError) as e:
            return defer.fail(RedisUnavailable(str(e)))

    def eval(self, script, keys=(), args=(), registering=False):
        """
        Run a Lua script (by its SHA once Redis knows it); C{registering}
        as for L{execute}.
        """
        try:
            return self._live(registering).eval(script, list(keys), list(args)).addCallbacks(
                _bytes, _lost)
        except (RedisUnavailable, txredisapi.ConnectionError) as e:
            return defer.fail(RedisUnavailable(str(e)))

    # -- pub/sub ----------------------------------------------------------

    def subscribe(self, channel, handler):
        """
        Call C{handler(message)} for every message published on
        C{channel} (bytes), from now on and across reconnections.
        """
        if isinstance(channel, str):
            channel = channel.encode("utf-8")
        self._channels[channel] = handler
        if self._subscriber is not None and self._subscriber.connected:
            return self._subscriber.subscribe([channel])
        return defer.succeed(None)

    def _message(self, channel, message):
        handler = self._channels.get(channel)
        if handler is None:
            return
        try:
            handler(message)
        except Exception:
            log.failure("redis: handling a message on {channel} failed", channel=channel)
