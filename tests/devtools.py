"""
Drives a headless Chromium (started by L{tests.tools.startChromium} with
C{--remote-debugging-port=0}) through the DevTools protocol over an
autobahn WebSocket: evaluate script in the page, wait for a condition,
take screenshots.  For tests of pages that must be clicked through (the
admin console), where a page reporting back by itself is not enough.
"""

import base64
import json
import os

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater

import treq


class _DevTools(WebSocketClientProtocol):
    def __init__(self):
        super().__init__()
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.pending = {}
        self.lastId = 0

    def onOpen(self):
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):
        message = json.loads(payload)
        d = self.pending.pop(message.get("id"), None)
        if d is None:
            return
        if "error" in message:
            d.errback(RuntimeError(f"DevTools: {message['error']}"))
        else:
            d.callback(message.get("result", {}))

    def onClose(self, wasClean, code, reason):
        for d in self.pending.values():
            d.errback(RuntimeError(f"DevTools closed: {reason}"))
        self.pending = {}
        if not self.opened.called:
            self.opened.errback(RuntimeError(f"DevTools refused: {reason}"))
        self.closed.callback(None)

    def send(self, method, **params):
        self.lastId += 1
        d = self.pending[self.lastId] = defer.Deferred()
        self.sendMessage(json.dumps({"id": self.lastId, "method": method,
                                     "params": params}).encode())
        return d


class Page:
    """
    One page of the browser, by its DevTools target.
    """

    def __init__(self, reactor, protocol):
        self.reactor = reactor
        self.protocol = protocol

    @defer.inlineCallbacks
    def evaluate(self, expression):
        """
        The value of C{expression} (awaited if it is a promise), or a
        RuntimeError with the page's exception.
        """
        result = yield self.protocol.send("Runtime.evaluate", expression=expression,
                                          awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page: {result['exceptionDetails']}")
        return result["result"].get("value")

    @defer.inlineCallbacks
    def waitFor(self, expression, timeout=30.0, interval=0.1):
        """
        Poll C{expression} until it is truthy: its value.
        """
        deadline = self.reactor.seconds() + timeout
        last = None
        # An element (which comes back by value as {}) counts as true.
        wrapped = f"(() => {{ const v = ({expression}); return v instanceof Node ? true : v; }})()"
        while self.reactor.seconds() < deadline:
            try:
                last = yield self.evaluate(wrapped)
            except RuntimeError as e:
                last = e
            else:
                if last:
                    return last
            yield deferLater(self.reactor, interval, lambda: None)
        raise AssertionError(f"not true in {timeout} s: {expression} (last: {last!r})")

    def setViewport(self, width, height):
        return self.protocol.send("Emulation.setDeviceMetricsOverride", width=width,
                                  height=height, deviceScaleFactor=1, mobile=False)

    @defer.inlineCallbacks
    def screenshot(self, path):
        result = yield self.protocol.send("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(result["data"]))
        return path

    def close(self):
        self.protocol.sendClose()
        return self.protocol.closed


@defer.inlineCallbacks
def attach(testCase, reactor, profile, url, timeout=30.0):
    """
    The DevTools page of the browser started with C{--user-data-dir=profile}
    that shows C{url} (waiting for the browser to write its port).
    """
    portFile = os.path.join(profile, "DevToolsActivePort")
    deadline = reactor.seconds() + timeout
    targets = []
    while reactor.seconds() < deadline:
        if os.path.exists(portFile):
            with open(portFile) as f:
                lines = f.read().split()
            if lines:
                base = f"http://127.0.0.1:{lines[0]}"
                try:
                    r = yield treq.get(base + "/json/list", reactor=reactor, persistent=False)
                    targets = yield r.json()
                except Exception:
                    targets = []
                pages = [t for t in targets if t.get("type") == "page"
                         and t.get("url", "").startswith(url)]
                if pages:
                    break
        yield deferLater(reactor, 0.1, lambda: None)
    else:
        raise AssertionError(f"no DevTools page for {url} in {timeout} s: {targets}")
    wsURL = pages[0]["webSocketDebuggerUrl"]
    factory = WebSocketClientFactory(wsURL, reactor=reactor)
    factory.protocol = _DevTools
    factory.setProtocolOptions(autoPingInterval=0, maxFramePayloadSize=0,
                               maxMessagePayloadSize=0)
    port = int(wsURL.split(":")[2].split("/")[0])
    protocol = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    yield protocol.opened
    page = Page(reactor, protocol)
    testCase.addCleanup(lambda: page.close() if protocol.state != protocol.STATE_CLOSED
                        else None)
    return page
