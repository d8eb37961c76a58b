# -*- test-case-name: tests.test_peergroups -*-
"""
Try the peer-groups face: Alice creates a group, invites Bob, they
exchange a record and direct data, and Mallory (never invited) is refused.

    python -m broker.peergroups.demo                       # ws://127.0.0.1:8084/peergroups/v1
    python -m broker.peergroups.demo --tcp tcp:127.0.0.1:7100
    python -m broker.peergroups.demo --embedded             # a throwaway broker in-process
    python -m broker.peergroups.demo --browser              # the same in a browser page

Each peer's Ed25519 key is generated here and never leaves this process.
"""

import argparse
import sys
import tempfile

from twisted.internet import defer, task

from broker.peergroups import constants as C
from broker.peergroups.client import (Identity, PeerError, connectStream, connectWebSocket)

NOTE = "5a1d0c3e-9b1f-4c55-9a07-6e7f3b2c1d00"
CHAT = "7c6b5a49-3827-4165-a4b3-c2d1e0f9a8b7"


def say(*args):
    print(*args, flush=True)


@defer.inlineCallbacks
def peer(reactor, args, name, application):
    if args.tcp:
        client = yield connectStream(reactor, args.tcp)
    else:
        client = yield connectWebSocket(reactor, args.ws)
    yield client.startup(application)
    identity = Identity.generate(name.lower(), name)
    yield client.registerIdentity(identity)
    return client, identity


@defer.inlineCallbacks
def run(reactor, args):
    app = args.application
    alice, aliceId = yield peer(reactor, args, "Alice", app)
    say(f"Alice is {aliceId.peerName}")
    h = yield alice.create(friendlyName="Demo group")
    gpn = alice.groupPeerName(h)
    ra = yield alice.registerEvent(h, [C.EVENT_STATUS_CHANGED, C.EVENT_RECORD_CHANGED,
                                       C.EVENT_DIRECT_CONNECTION, C.EVENT_MEMBER_CHANGED])
    yield alice.connect(h)
    yield alice.nextEvent(ra, C.EVENT_STATUS_CHANGED)
    say(f"Alice created and connected group {gpn}")

    bob, bobId = yield peer(reactor, args, "Bob", app)
    invitation = yield alice.createInvitation(h, bobId.identityInfo())
    say(f"Alice invited Bob ({len(invitation)}-byte invitation bound to his key)")
    hb = yield bob.join(invitation)
    rb = yield bob.registerEvent(hb, [C.EVENT_STATUS_CHANGED, C.EVENT_DIRECT_CONNECTION,
                                      C.EVENT_INCOMING_DATA, C.EVENT_RECORD_CHANGED])
    yield bob.connect(hb)
    yield bob.nextEvent(rb, C.EVENT_STATUS_CHANGED)
    event = yield alice.nextEvent(ra, C.EVENT_MEMBER_CHANGED, changeType=C.MEMBER_CONNECTED,
                                  identity=bobId.peerName)
    say(f"Bob joined and connected; Alice saw MEMBER_CHANGED {event['memberChangeData']}")

    rid = yield bob.addRecord(hb, NOTE, b"Hello from Bob", attributes=(
        '<attributes><attribute name="topic">greeting</attribute></attributes>'))
    yield alice.nextEvent(ra, C.EVENT_RECORD_CHANGED, recordId=rid)
    found = yield alice.searchRecords(
        h, '<peersearch><clause attrib="topic">greet*</clause></peersearch>')
    say(f"Alice found {len(found)} record(s) about greetings: {found[0]['id']}")

    cid = yield alice.openDirectConnection(h, bobId.peerName)
    yield bob.nextEvent(rb, C.EVENT_DIRECT_CONNECTION, status=C.PEER_CONNECTED)
    for text in ("one", "two", "three"):
        yield alice.sendData(h, cid, CHAT, text.encode())
    got = []
    for _ in range(3):
        event = yield bob.nextEvent(rb, C.EVENT_INCOMING_DATA)
        got.append(event["incomingData"]["data"])
    from broker.peergroups.credentials import unb64
    say(f"Bob received over direct connection {cid}: {[unb64(d).decode() for d in got]}")
    yield alice.closeDirectConnection(h, cid)

    mallory, malloryId = yield peer(reactor, args, "Mallory", app)
    for what, attempt in (("join with Bob's invitation", lambda: mallory.join(invitation)),
                          ("open the group", lambda: mallory.open(gpn))):
        try:
            yield attempt()
        except PeerError as e:
            say(f"Mallory tried to {what}: {e.name} ({e.hr:#010x})")
        else:
            raise RuntimeError(f"Mallory could {what}")
    for c, handle in ((bob, hb), (alice, h)):
        yield c.close(handle)
    yield defer.DeferredList([c.disconnect() for c in (alice, bob, mallory)])
    say("done")


def browserDemoURL(ws):
    """
    The broker's browser demo page next to its WebSocket URL: C{http} for
    C{ws}, C{https} for C{wss} (WebCrypto needs a secure context: https,
    or a loopback address).
    """
    scheme, rest = ws.split("://", 1)
    host = rest.split("/", 1)[0]
    return f"{'https' if scheme == 'wss' else 'http'}://{host}/peergroups/demo.html"


@defer.inlineCallbacks
def main(reactor, *argv):
    parser = argparse.ArgumentParser(prog="python -m broker.peergroups.demo")
    parser.add_argument("--ws", default="ws://127.0.0.1:8084/peergroups/v1")
    parser.add_argument("--tcp", help="a client endpoint, e.g. tcp:127.0.0.1:7100")
    parser.add_argument("--application", default="demo")
    parser.add_argument("--embedded", action="store_true",
                        help="run a throwaway broker in this process")
    parser.add_argument("--browser", action="store_true",
                        help="print the URL of the broker's browser demo page (with "
                             "--embedded, serve it until interrupted)")
    args = parser.parse_args(argv)
    broker = None
    if args.embedded:
        broker = yield _embedded(reactor)
        args.ws = broker["ws"]
        if args.tcp:
            args.tcp = broker["tcp"]
    if args.browser:
        say(f"open {browserDemoURL(args.ws)} in a browser (reload it: the same peers "
            f"reopen their group)")
        if broker is not None:
            yield defer.Deferred()   # until Ctrl-C
        return
    try:
        yield run(reactor, args)
    finally:
        if broker is not None:
            yield broker["stop"]()


@defer.inlineCallbacks
def _embedded(reactor):
    from twisted.internet.endpoints import TCP4ServerEndpoint

    from broker import config
    from broker.peergroups.face import makePeerGroups
    from broker.peergroups.protocol import PeerStreamFactory, PeerWebSocketFactory, makeSite
    cfg = config.parse("[peergroups]\nenabled = true\n")["peergroups"]
    state = tempfile.mkdtemp(prefix="peergroups-demo-")
    store, pg = makePeerGroups(reactor, None, cfg, state)
    store.start()
    pg.startService()
    ws = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        makeSite(PeerWebSocketFactory(pg, cfg["max_message_size"], reactor=reactor)))
    tcp = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        PeerStreamFactory(pg, cfg["max_message_size"]))

    @defer.inlineCallbacks
    def stop():
        yield ws.stopListening()
        yield tcp.stopListening()
        yield pg.stopService()
        yield store.close()
    say(f"embedded broker, state in {state}")
    return {"ws": f"ws://127.0.0.1:{ws.getHost().port}/peergroups/v1",
            "tcp": f"tcp:127.0.0.1:{tcp.getHost().port}", "stop": stop}


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
