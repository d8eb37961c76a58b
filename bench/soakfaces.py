"""
The load of L{soak} for each face: never-reading subscribers, well-behaved
ones, the 8 KB and 64-byte floods, churn and malformed input.

A face's load is a class with:

  - C{sections()}: its TOML sections for the broker (ports chosen here);
  - C{connect(soak)}: connect every client, before the baseline;
  - C{flood(soak)}: a Deferred that publishes while C{soak.running};
  - C{settle(soak)}: wait for the answers still in flight;
  - C{churn()}, C{probes()}: the raw exchanges of L{soaklib.churn} and
    L{soaklib.probes};
  - C{brokerDrops(metrics)}: the broker's slow-consumer counters;
  - C{close(soak)}.
"""

import itertools
import json
import os
import time

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from procs import freePort
from wsload import GROUP, HUB, KEY, WebSocketClient, clientFrame, openingHandshake
from iot import FLEET, HTTPConnection
from peergroups import Bench as PeerBench
from soaklib import (MB, NeverReading, classifyHTTP, classifyWS, declaredFrame,
                     fragmented, httpHead, httpProbes, messageKey, metricLabels, metricSum,
                     payload, streamed)

from broker.iot import apikeys, frames
from broker.iot.auth import newSecret
from broker.iot.client import IoTClient
from broker.iot.concentrator import DIRECT_BASE
from broker.iot.frames import FrameReader, Payload
from broker.peergroups import constants as C
from broker.peergroups import credentials as cred

BIG, SMALL = 8192, 64
DEEP = b"[" * 100000 + b"]" * 100000


def keyOf(tag, seq):
    return tag[0] << 40 | seq


async def settleAll(reactor, publishers, timeout=10.0):
    """
    Wait until no publisher has a message unanswered (at most C{timeout}).
    """
    def busy(p):
        return p.waiting is not None if isinstance(p, HTTPConnection) else p.inflight
    deadline = time.monotonic() + timeout
    while any(busy(p) for p in publishers) and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.1)


async def postLoop(soak, name, conn, requests):
    """
    POST C{requests} over C{conn}, one at a time while the run lasts:
    C{(raw request, accepted)}, C{accepted(body)} called on each 202; any
    other status is a refusal, with the error code of the body if any.
    """
    for raw, accepted in requests:
        if not soak.running:
            return
        try:
            status, body = await conn.call(raw).addTimeout(10, soak.reactor)
        except Exception as e:
            soak.refuse(name, type(e).__name__)
            return
        if status == 202:
            soak.accepted[name] += 1
            accepted(body)
            continue
        try:
            code = json.loads(body)["error"]["code"]
        except Exception:
            code = ""
        soak.refuse(name, f"http {status} {code}".rstrip())


# -- Web PubSub ----------------------------------------------------------------


class Receiver(WebSocketClient):
    """
    A well-behaved plain subscriber: every payload goes to its ledger.
    """

    collect = True

    def __init__(self, request, soak, ledger):
        super().__init__(request)
        self.soak = soak
        self.ledger = ledger

    def dataFrames(self, count, payloads):
        for p in payloads:
            self.ledger.receive(messageKey(p))

    def connectionLost(self, reason):
        if self.open and self.soak.running:
            self.ledger.dropped = True
        super().connectionLost(reason)


class GroupPublisher(WebSocketClient):
    """
    A C{json.webpubsub.azure.v1} client flooding C{sendToGroup} with ackIds,
    C{window} unacknowledged at most; each successful ack is an accepted
    message for every ledger.
    """

    collect = True

    def __init__(self, request, soak, name, tag, size, window, ledgers):
        super().__init__(request)
        self.soak, self.name, self.tag, self.size = soak, name, tag, size
        self.window, self.ledgers = window, ledgers
        self.welcomed = defer.Deferred()
        self.seq = self.inflight = 0
        self.flooding = False

    def dataFrames(self, count, payloads):
        for p in payloads:
            if p.startswith(b'{"type":"ack"'):
                ack = json.loads(p)
                self.inflight -= 1
                if ack["success"]:
                    self.soak.accepted[self.name] += 1
                    key = keyOf(self.tag, ack["ackId"])
                    for ledger in self.ledgers:
                        ledger.accept(key)
                else:
                    self.soak.refuse(self.name, "ack " + ack["error"]["name"])
            elif b'"event":"connected"' in p:
                self.welcomed.callback(self)
            else:
                self.soak.refuse(self.name, p[:60].decode("utf-8", "replace"))
        self.fill()

    def fill(self):
        if not (self.flooding and self.soak.running and self.open):
            return
        out = []
        while self.inflight < self.window:
            self.seq += 1
            self.inflight += 1
            out.append(clientFrame(
                b'{"type":"sendToGroup","group":"%s","ackId":%d,"noEcho":true,'
                b'"dataType":"text","data":"%s"}'
                % (GROUP.encode(), self.seq, payload(self.tag, self.seq, self.size))))
        self.transport.write(b"".join(out))

    def connectionLost(self, reason):
        if self.open and self.soak.running:
            self.soak.refuse(self.name, "connection lost")
        super().connectionLost(reason)


class WebPubSubLoad:
    """
    Never-reading plain subscribers in group C{g}, two plain subscribers
    that read, two JSON publishers (8 KB and 64 B) and a REST publisher
    (8 KB, one request at a time) to the group.
    """

    def __init__(self, opts, workdir):
        self.opts = opts
        self.publishers = []
        self.clients = []

    def sections(self):
        return ""

    async def _ws(self, reactor, proto):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=10)
        await connectProtocol(endpoint, proto)
        await proto.ready
        return proto

    def _publisherRequest(self):
        from broker.auth.tokens import makeClientToken

        token = makeClientToken(KEY, f"http://127.0.0.1:{self.port}/client/hubs/{HUB}",
                                roles=["webpubsub.sendToGroup"])
        return openingHandshake(self.port, token, "json.webpubsub.azure.v1")

    async def connect(self, soak):
        reactor, b = soak.reactor, soak.broker
        self.port = b.port
        self.plain = openingHandshake(b.port, b.token())
        self.pool = NeverReading(soak, "never-reading WebSocket subscribers",
                                 self.opts.subscribers,
                                 lambda i: defer.ensureDeferred(
                                     self._ws(reactor, WebSocketClient(self.plain))))
        await self.pool.start()
        ledgers = [soak.ledger(f"plain subscriber {i}") for i in range(2)]
        for ledger in ledgers:
            self.clients.append(await self._ws(reactor, Receiver(self.plain, soak, ledger)))
        for name, tag, size, window in (("sendToGroup 8 KB", b"A", BIG, 32),
                                        ("sendToGroup 64 B", b"S", SMALL, 128)):
            pub = GroupPublisher(self._publisherRequest(), soak, name, tag, size, window,
                                 ledgers)
            await self._ws(reactor, pub)
            await pub.welcomed
            self.publishers.append(pub)
        self.rest = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), HTTPConnection())
        self.ledgers = ledgers

    def _restRequest(self, seq):
        import jwt

        path = f"/api/hubs/{HUB}/groups/{GROUP}/:send?api-version=2024-12-01"
        if not hasattr(self, "_token"):
            self._token = jwt.encode({"aud": f"http://127.0.0.1:{self.port}{path}",
                                      "exp": int(time.time() + 3600)}, KEY, algorithm="HS256")
        body = payload(b"R", seq, BIG)
        return httpHead("POST", path, [("Authorization", "Bearer " + self._token),
                                       ("Content-Type", "text/plain"),
                                       ("Content-Length", str(len(body)))]) + body

    def _restFlood(self, soak):
        def requests():
            for seq in itertools.count(1):
                key = keyOf(b"R", seq)
                yield self._restRequest(seq), lambda _, key=key: [
                    ledger.accept(key) for ledger in self.ledgers]
        return defer.ensureDeferred(postLoop(soak, "REST send to group 8 KB", self.rest,
                                             requests()))

    def flood(self, soak):
        for pub in self.publishers:
            pub.flooding = True
            pub.fill()
        return self._restFlood(soak)

    async def settle(self, soak):
        await settleAll(soak.reactor, self.publishers + [self.rest])

    def churn(self):
        p, req = self.port, self.plain
        return [("tcp open, abort", p, [], True),
                ("half a handshake, abort", p, [req[:40], 0.05], True),
                ("handshake, abort", p, [req, 0.1], True),
                ("handshake, close frame", p, [req, 0.1, clientFrame(b"\x03\xe8", 0x8)], False)]

    def probes(self):
        p, json_ = self.port, self._publisherRequest()

        def text(frame):
            try:
                obj = json.loads(frame)
            except ValueError:
                return "non-JSON text"
            if obj.get("type") == "ack" and not obj.get("success"):
                return "ack " + obj["error"]["name"]
            if obj.get("event") == "disconnected":
                return "system disconnected"
            return None

        def ws(name, frames):
            # A client waits for the 101 before it sends frames (RFC 6455
            # 4.1): the broker ignores frames that come with the handshake.
            return (name, p, [json_, 0.2] + frames, lambda d, h: classifyWS(d, h, text))

        def send(data):
            return clientFrame(b'{"type":"sendToGroup","group":"g","ackId":1,'
                               b'"dataType":"json","data":%s}' % data)
        restPath = f"/api/hubs/{HUB}/groups/{GROUP}/:send?api-version=2024-12-01"
        import jwt
        token = jwt.encode({"aud": f"http://127.0.0.1:{p}{restPath}",
                            "exp": int(time.time() + 3600)}, KEY, algorithm="HS256")
        return [
            ws("frame over max_frame_size (declared, streamed)", declaredFrame(MB + 1)),
            ws("fragmented message over max_frame_size", fragmented(MB + 128 * 1024)),
            ws("NaN in data", [send(b"NaN")]),
            ws("100,000-deep nesting in data", [send(DEEP)]),
            ws("100,000-deep nesting, bare", [clientFrame(DEEP)]),
            ws("truncated JSON", [clientFrame(b'{"type":"sendToGroup","group":"g","ack')]),
            ws("binary frame", [clientFrame(b"\x00\x01", 0x2)]),
            ws("garbage bytes after the handshake", [os.urandom(64)]),
            ("garbage bytes instead of a handshake", p, [b"\x16\x03\x01" + os.urandom(61)],
             classifyHTTP),
        ] + [(name, p, chunks, classifyHTTP) for name, chunks in httpProbes(
            restPath, [("Authorization", "Bearer " + token), ("Content-Type", "text/plain")],
            2 * MB)]

    def brokerDrops(self, m):
        return [("broker_slow_consumer_drops_total",
                 metricSum(m, "broker_slow_consumer_drops_total"))]

    def close(self, soak):
        self.pool.close()
        for c in self.clients + self.publishers + [self.rest]:
            c.transport.abortConnection()


# -- IoT -------------------------------------------------------------------------


class Device(IoTClient):
    """
    A well-behaved device: every MESSAGE goes to its ledger; queued ones
    are acknowledged.
    """

    def __init__(self, secret, did, soak, ledger):
        super().__init__("device", FLEET, did, secret)
        self.soak, self.ledger = soak, ledger

    def _frame(self, frame):
        if self.open and frame.kind == frames.MESSAGE:
            self.ledger.receive(frame.requestId)
            if frame.requestId < DIRECT_BASE:
                self.write(frames.ACK, frame.requestId)
        elif self.open and frame.kind == frames.TOKENS:
            pass
        else:
            super()._frame(frame)

    def connectionLost(self, reason):
        if self.open and self.soak.running:
            self.ledger.dropped = True
        super().connectionLost(reason)


class Central(IoTClient):
    """
    A central flooding 64-byte queued MESSAGE frames, C{window}
    unanswered at most (the broker's limit is 256), over C{targets}.
    """

    name = "central MESSAGE 64 B (queued)"

    def __init__(self, secret, soak, targets, ledgers, window=200):
        super().__init__("central", FLEET, None, secret)
        self.soak, self.targets, self.ledgers, self.window = soak, targets, ledgers, window
        self.inflight = self.seq = 0
        self._to = {}

    def _frame(self, frame):
        did = self._to.pop(frame.requestId, None) if self.open else None
        if did is None:
            return super()._frame(frame)
        self.inflight -= 1
        if frame.kind == frames.ACK:
            self.soak.accepted[self.name] += 1
            if did in self.ledgers:
                self.ledgers[did].accept(int(frame.payload.value()["messageId"]))
        else:
            self.soak.refuse(self.name + f" to {did[:2]}", frame.payload.value()["code"])
        self.fill()

    def fill(self):
        if not self.soak.running:
            return
        out = []
        while self.inflight < self.window:
            self.seq += 1
            self.inflight += 1
            did = self.targets[self.seq % len(self.targets)]
            self._to[self.seq] = did
            out.append(frames.encode(frames.MESSAGE, self.seq,
                                     Payload(frames.UTF8, payload(b"C", self.seq, SMALL)), did))
        self.transport.write(b"".join(out))


class IoTLoad:
    """
    Never-reading devices C{nr*} and well-behaved devices C{wb0}, C{wb1}:
    the HTTP API floods them with 8 KB direct messages (C{queue: false}),
    4 connections round-robin over the never-reading ones and 2 over the
    well-behaved ones, one request in flight each; a central floods 64-byte
    queued messages, mostly to the well-behaved devices (every 8th to a
    never-reading one, whose queue fills up: C{QUEUE_FULL}).
    """

    def __init__(self, opts, workdir):
        self.opts = opts
        self.tcp, self.http = freePort(), freePort()
        n = opts.subscribers
        self.never = [f"nr{i}" for i in range(n)]
        self.good = ["wb0", "wb1"]
        self.secrets = {d: newSecret() for d in self.never + self.good}
        self.centralSecret = newSecret()
        self.apiKey, _ = apikeys.newKey()
        self.registry = os.path.join(workdir, "registry.toml")
        with open(self.registry, "w") as f:
            f.write(f'[fleets.{FLEET}]\ncentral_key = "{self.centralSecret}"\n')
            for did, secret in self.secrets.items():
                f.write(f'[fleets.{FLEET}.devices.{did}]\nkey = "{secret}"\n')
        self.http_ = []

    def sections(self):
        return f"""
[iot]
enabled = true
listen = ["tcp:{self.tcp}:interface=127.0.0.1:backlog=1024"]
registry_file = "{self.registry}"
[iot.udp]
port = 0
[iot.http]
listen = ["tcp:{self.http}:interface=127.0.0.1:backlog=1024"]
api_keys = ["{apikeys.hashLine(FLEET, self.apiKey)}"]
"""

    async def _client(self, reactor, client):
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.tcp, timeout=10),
                              client)
        await client.authenticated
        return client

    async def connect(self, soak):
        reactor = soak.reactor
        self.pool = NeverReading(
            soak, "never-reading devices", len(self.never),
            lambda i: defer.ensureDeferred(self._client(reactor, IoTClient(
                "device", FLEET, self.never[i], self.secrets[self.never[i]]))))
        await self.pool.start()
        self.ledgers = {d: soak.ledger(f"device {d}") for d in self.good}
        self.devices = [await self._client(reactor, Device(self.secrets[d], d, soak, ledger))
                        for d, ledger in self.ledgers.items()]
        targets = [self.good[i % 2] if i % 8 else self.never[(i // 8) % len(self.never)]
                   for i in range(16 * len(self.never))]
        self.central = await self._client(reactor, Central(self.centralSecret, soak, targets,
                                                           self.ledgers))
        for _ in range(6):
            conn = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.http),
                                         HTTPConnection())
            self.http_.append(conn)

    def _post(self, did):
        body = json.dumps({"payload": {"type": "utf8", "data": payload(b"H", 0, BIG).decode()},
                           "queue": False}).encode()
        return httpHead("POST", f"/v1/fleets/{FLEET}/devices/{did}/messages",
                        [("Authorization", f"Bearer {self.apiKey}"),
                         ("Content-Type", "application/json"),
                         ("Content-Length", str(len(body)))]) + body

    def _httpFlood(self, soak, conn, dids):
        posts = [(did, self._post(did)) for did in dids]
        name = "HTTP message 8 KB (direct) to " + ("well-behaved" if dids[0] in self.ledgers
                                                    else "never-reading")

        def accepted(did, body):
            if did in self.ledgers:
                self.ledgers[did].accept(int(json.loads(body)["messageId"]))

        def requests():
            for did, raw in itertools.cycle(posts):
                yield raw, lambda body, did=did: accepted(did, body)
        return defer.ensureDeferred(postLoop(soak, name, conn, requests()))

    def flood(self, soak):
        self.central.fill()
        never = self.never
        shares = [never[i::4] or never for i in range(4)] + [self.good, self.good[::-1]]
        return defer.DeferredList([self._httpFlood(soak, c, dids)
                                   for c, dids in zip(self.http_, shares)])

    async def settle(self, soak):
        await settleAll(soak.reactor, [self.central] + self.http_)

    def _hello(self, body):
        return frames.LENGTH.pack(frames.HEADER.size + len(body)) + frames.HEADER.pack(
            frames.VERSION, frames.HELLO, 0, 4, 0) + body

    def churn(self):
        p = self.tcp
        def hello():
            return frames.encode(frames.HELLO, 0, Payload.json(
                {"role": "device", "fleet": FLEET, "id": "wb0", "nonce": os.urandom(32).hex()}))
        head = httpHead("POST", f"/v1/fleets/{FLEET}/devices/wb0/messages",
                        [("Authorization", f"Bearer {self.apiKey}"),
                         ("Content-Length", "100")])
        return [("tcp open, abort", p, [], True),
                ("half a HELLO, abort", p, lambda: [hello()[:10], 0.05], True),
                ("HELLO, abort after the challenge", p, lambda: [hello(), 0.05], True),
                ("HTTP head, part of the body, abort", self.http, [head + b"{", 0.05], True)]

    def probes(self):
        p = self.tcp

        def classify(data, how):
            said = []
            try:
                received = FrameReader(64 * MB).feed(data)
            except frames.FrameError as e:
                received = [e]
            for f in received:
                if isinstance(f, Exception):
                    said.append(f"bad frame {f.code}")
                elif f.kind in (frames.ERROR, frames.CLOSE):
                    said.append(f"{frames.KINDS[f.kind].upper()} {f.payload.value()['code']}")
            return ", ".join(said + [how])

        def hello(rest, cut=None):
            def fresh():
                # A fresh nonce each time, or the broker answers REPLAY.
                head = b'{"role":"device","fleet":"%s","id":"nr0","nonce":"%s"' % (
                    FLEET.encode(), os.urandom(32).hex().encode())
                return [self._hello((head + rest)[:cut])]
            return fresh
        tooBig = frames.LENGTH.pack(MB + 1) + frames.HEADER.pack(frames.VERSION, frames.HELLO,
                                                                 0, 1, 0)
        path = f"/v1/fleets/{FLEET}/devices/wb0/messages"
        auth = [("Authorization", f"Bearer {self.apiKey}"), ("Content-Type", "application/json")]

        def post(body):
            return httpHead("POST", path, auth + [("Content-Length", str(len(body)))]) + body
        return [
            ("frame over max_frame_size (declared, streamed)", p,
             [tooBig] + streamed(2 * MB), classify),
            ("HELLO with NaN", p, hello(b',"x":NaN}'), classify),
            ("HELLO 100,000-deep", p, hello(b',"x":' + DEEP + b"}"), classify),
            ("HELLO truncated JSON", p, hello(b"}", 30), classify),
            ("garbage bytes", p, [b"\0\0\0\x20" + os.urandom(32)], classify),
            ("HTTP body with NaN", self.http,
             [post(b'{"payload":{"type":"json","data":NaN},"queue":false}')], classifyHTTP),
            ("HTTP body 100,000-deep", self.http,
             [post(b'{"payload":{"type":"json","data":' + DEEP + b'}}')], classifyHTTP),
        ] + [(name, self.http, chunks, classifyHTTP)
             for name, chunks in httpProbes(path, auth, 2 * MB)]

    def brokerDrops(self, m):
        return [(name, metricSum(m, name)) for name in (
            "broker_iot_slow_consumers_total", "broker_iot_dead_sessions_total")]

    def close(self, soak):
        self.pool.close()
        for c in self.devices + [self.central] + self.http_:
            c.transport.abortConnection()


# -- peer groups -----------------------------------------------------------------


class DataSender:
    """
    One member flooding C{sendData} over its direct connections, round-robin
    over C{targets()} (C{(connection id, ledger or None)} pairs), C{window}
    unanswered at most.
    """

    def __init__(self, soak, name, client, handle, tag, size, window, targets):
        self.soak, self.name, self.client, self.handle = soak, name, client, handle
        self.tag, self.size, self.window, self.targets = tag, size, window, targets
        self.inflight = self.seq = 0

    def fill(self):
        while self.soak.running and self.inflight < self.window:
            targets = self.targets(self)
            cid, ledger = targets[self.seq % len(targets)]
            self.seq += 1
            self.inflight += 1
            d = self.client.sendData(self.handle, cid, DATA_TYPE,
                                     payload(self.tag, self.seq, self.size))
            d.addCallbacks(self._ok, self._refused, (self.seq, ledger))

    def _ok(self, _, seq, ledger):
        self.inflight -= 1
        self.soak.accepted[self.name] += 1
        if ledger is not None:
            ledger.accept(keyOf(self.tag, seq))
        self.fill()

    def _refused(self, f):
        self.inflight -= 1
        self.soak.refuse(self.name, getattr(f.value, "name", type(f.value).__name__))
        if self.soak.running:
            self.soak.reactor.callLater(0.01, self.fill)


DATA_TYPE = "11111111-2222-3333-4444-555555555555"


class PeerGroupsLoad:
    """
    One group: the creator floods 8 KB sendData and a second member 64 B,
    each over a direct connection to every other member: never-reading
    members (half over WebSocket, half over TCP, each replaced once
    dropped, with new direct connections) and two well-behaved ones (one
    per wire).
    """

    def __init__(self, opts, workdir):
        self.opts = opts
        self.ws, self.tcp = freePort(), freePort()
        self.never = {}
        self.good = []
        self.made = 0

    def sections(self):
        return f"""
[peergroups]
enabled = true
listen = ["tcp:{self.ws}:interface=127.0.0.1"]
tcp_listen = ["tcp:{self.tcp}:interface=127.0.0.1"]
"""

    async def _member(self, wire):
        self.made += 1
        c, ident = await self.benches[wire].peer(f"m{self.made}")
        inv = await self.admin.createInvitation(self.handle, ident.identityInfo())
        h = await c.join(inv)
        reg = await c.registerEvent(h, [C.EVENT_STATUS_CHANGED, C.EVENT_DIRECT_CONNECTION,
                                        C.EVENT_INCOMING_DATA])
        await c.connect(h)
        await c.nextEvent(reg, C.EVENT_STATUS_CHANGED)
        return c, h, ident

    async def _target(self, wire):
        """
        A new member with a direct connection from each sender.
        """
        c, h, ident = await self._member(wire)
        cids = [await s.client.openDirectConnection(s.handle, ident.peerName)
                for s in self.senders]
        return c, cids

    async def _neverReading(self, i):
        c, cids = await self._target("ws" if i % 2 else "tcp")
        self.never[i] = cids
        return c

    async def connect(self, soak):
        reactor = soak.reactor
        nodes = [(self.ws, self.tcp)]
        self.benches = {w: PeerBench(reactor, w, nodes, [soak.broker.pid]) for w in ("ws", "tcp")}
        peers, _ = await self.benches["tcp"].setup(1)
        admin, self.handle = peers[0][0], peers[0][1]
        self.admin = admin
        small, smallHandle, _ = await self._member("tcp")

        def targets(sender):
            i = self.senders.index(sender)
            return [(cids[i], ledger) for _, cids, ledger in self.good] + [
                (cids[i], None) for cids in self.never.values()]
        self.senders = [
            DataSender(soak, "sendData 8 KB", admin, self.handle, b"A", BIG, 64, targets),
            DataSender(soak, "sendData 64 B", small, smallHandle, b"S", SMALL, 128, targets)]
        self.pool = NeverReading(soak, "never-reading members", self.opts.subscribers,
                                 lambda i: defer.ensureDeferred(self._neverReading(i)))
        await self.pool.start()
        for i, wire in enumerate(("ws", "tcp")):
            ledger = soak.ledger(f"member over {wire}")
            c, cids = await self._target(wire)
            self._watch(soak, c, ledger)
            self.good.append((c, cids, ledger))

    def _watch(self, soak, client, ledger):
        original = client._event

        def event(e):
            if e["eventType"] == C.EVENT_INCOMING_DATA:
                ledger.receive(messageKey(cred.unb64(e["incomingData"]["data"])))
            else:
                original(e)
        client._event = event

        def lost(_):
            if soak.running:
                ledger.dropped = True
        client.closed.addCallback(lost)

    def flood(self, soak):
        for s in self.senders:
            s.fill()

        async def wait():
            while soak.running:
                await task.deferLater(soak.reactor, 0.5)
        return defer.ensureDeferred(wait())

    async def settle(self, soak):
        await settleAll(soak.reactor, self.senders)

    def _wsRequest(self):
        return (f"GET /peergroups/v1 HTTP/1.1\r\nHost: 127.0.0.1:{self.ws}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {C.PROTOCOL}\r\n\r\n").encode()

    def churn(self):
        startup = json.dumps({"id": 1, "method": "startup",
                              "params": {"application": "soak"}}).encode()
        framed = len(startup).to_bytes(4, "big") + startup
        req = self._wsRequest()
        return [("tcp open, abort", self.tcp, [], True),
                ("half a length prefix, abort", self.tcp, [b"\0\0", 0.05], True),
                ("startup, abort", self.tcp, [framed, 0.05], True),
                ("WebSocket: half a handshake, abort", self.ws, [req[:40], 0.05], True),
                ("WebSocket: handshake, abort", self.ws, [req, 0.1], True)]

    def probes(self):
        def said(obj):
            if isinstance(obj, dict) and "error" in obj:
                return "error " + str(obj["error"].get("name"))
            return None

        def classifyTCP(data, how):
            out, i = [], 0
            while len(data) - i >= 4:
                n = int.from_bytes(data[i:i + 4], "big")
                if len(data) - i - 4 < n:
                    break
                try:
                    what = said(json.loads(data[i + 4:i + 4 + n]))
                except ValueError:
                    what = "non-JSON"
                if what:
                    out.append(what)
                i += 4 + n
            return ", ".join(out + [how])

        def textWS(p):
            try:
                return said(json.loads(p))
            except ValueError:
                return "non-JSON"

        def framed(body):
            return len(body).to_bytes(4, "big") + body

        def call(params):
            return b'{"id":1,"method":"startup","params":%s}' % params
        limit = 4 * MB
        req = self._wsRequest()

        def ws(name, chunks):
            return (name, self.ws, [req, 0.2] + chunks, lambda d, h: classifyWS(d, h, textWS))
        return [
            ("TCP length prefix over max_message_size (streamed)", self.tcp,
             [(limit + 1).to_bytes(4, "big")] + streamed(limit + MB), classifyTCP),
            ("TCP NaN", self.tcp, [framed(call(b'{"version":NaN}'))], classifyTCP),
            ("TCP 100,000-deep", self.tcp, [framed(call(DEEP))], classifyTCP),
            ("TCP truncated JSON", self.tcp, [framed(call(b'{"applica'))], classifyTCP),
            ("TCP garbage bytes", self.tcp, [framed(os.urandom(64))], classifyTCP),
            ws("WebSocket message over max_message_size (fragments)",
               fragmented(limit + 256 * 1024)),
            ws("WebSocket frame over max_message_size (declared, streamed)",
               declaredFrame(limit + 1)),
            ws("WebSocket NaN", [clientFrame(call(b'{"version":NaN}'))]),
            ws("WebSocket 100,000-deep", [clientFrame(call(DEEP))]),
            ws("WebSocket garbage after the handshake", [os.urandom(64)]),
        ] + [(name, self.ws, chunks, classifyHTTP)
             for name, chunks in httpProbes("/peergroups/v1", [], 2 * MB)]

    def brokerDrops(self, m):
        return [(f"broker_peergroups_dropped_sessions_total{k}", v)
                for k, v in metricLabels(m, "broker_peergroups_dropped_sessions_total").items()]

    def close(self, soak):
        self.pool.close()
        for c in [self.admin] + [s.client for s in self.senders] + [g[0] for g in self.good]:
            c.transport.abortConnection()


FACES = {"webpubsub": WebPubSubLoad, "iot": IoTLoad, "peergroups": PeerGroupsLoad}
