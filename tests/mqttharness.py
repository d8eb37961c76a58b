"""
Helpers of the MQTT tests: a broker built in this process by
L{broker.tap.buildService} on ephemeral loopback ports, and C{paho-mqtt}
clients (which block and run their own network thread) driven from trial
through the reactor's thread pool.
"""

import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
from twisted.internet import defer, reactor, threads

from broker.mqtt import codec
from tests.test_iot_face import listeningPort
from tests.test_tap import configFile, startInProcess

ACCESS_KEY = "mqtt-tests-access-key-0123456789abcdef"

MQTT_SECTION = """
[mqtt]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
{mqtt}
[mqtt.websocket]
listen = ["tcp:0:interface=127.0.0.1"]
[mqtt.tls]
listen = ["tcp:0:interface=127.0.0.1"]
"""


def writeConfig(testCase, mqtt="", extra=""):
    return configFile(testCase,
                      '[admin]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      '[webpubsub]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
                      f'access_keys = ["{ACCESS_KEY}"]\n'
                      '[webpubsub.hubs.mqtt]\n'
                      '[iot]\nenabled = false\n'
                      + MQTT_SECTION.format(mqtt=mqtt) + extra)


LISTENERS = ("mqtt.listen[0]", "mqtt.websocket.listen[0]", "mqtt.tls.listen[0]",
             "webpubsub.listen[0]", "admin.listen[0]")


@defer.inlineCallbacks
def startBroker(testCase, mqtt="", extra="", listeners=LISTENERS):
    """
    Build and start the broker in this process.

    @return: C{(top service, {listener key: port}, directory)}.
    """
    directory, path = writeConfig(testCase, mqtt, extra)
    top = startInProcess(testCase, path)
    ports = {}
    for key in listeners:
        port = yield listeningPort(top.getServiceNamed(key))
        ports[key] = port.getHost().port
    return top, ports, directory


class Paho:
    """
    One paho-mqtt client; every blocking step runs in a thread and returns
    a Deferred.  Messages received are kept in C{messages} (topic, payload,
    qos, retain, properties).
    """

    def __init__(self, testCase, port, clientId="", version=5, transport="tcp",
                 clean=True, path="/mqtt", tls=None, reconnect=True):
        self.version = version
        protocol = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs = {}
        if version != 5:
            kwargs["clean_session"] = clean
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=clientId,
                                  protocol=protocol, transport=transport,
                                  reconnect_on_failure=reconnect, **kwargs)
        if transport == "websockets":
            self.client.ws_set_options(path=path)
        if tls is not None:
            self.client.tls_set(ca_certs=tls)
            self.client.tls_insecure_set(True)
        self.port = port
        self.clean = clean
        self.messages = []
        self.cond = threading.Condition()
        self.connack = None
        self.disconnected = threading.Event()
        self.disconnectReason = None
        self.acks = {}
        self.client.on_message = self._message
        self.client.on_connect = self._connect
        self.client.on_disconnect = self._disconnect
        self.client.on_subscribe = self._ack("suback")
        self.client.on_unsubscribe = self._ack("unsuback")
        self.client.on_publish = self._published
        self.published = set()
        testCase.addCleanup(self.stop)

    def _message(self, client, userdata, m):
        with self.cond:
            props = getattr(m, "properties", None)
            self.messages.append((m.topic, m.payload, m.qos, m.retain, props))
            self.cond.notify_all()

    def _connect(self, client, userdata, flags, reason, properties):
        with self.cond:
            self.connack = (flags.session_present, reason.value, properties)
            self.cond.notify_all()

    def _disconnect(self, client, userdata, flags, reason, properties):
        with self.cond:
            self.disconnectReason = reason.value if hasattr(reason, "value") else reason
            self.disconnected.set()
            self.cond.notify_all()

    def _ack(self, kind):
        def ack(client, userdata, mid, reasons, properties):
            with self.cond:
                self.acks[mid] = [r.value if hasattr(r, "value") else r for r in reasons]
                self.cond.notify_all()
        return ack

    def _published(self, client, userdata, mid, reason, properties):
        with self.cond:
            self.published.add(mid)
            self.cond.notify_all()

    def _wait(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting")
                self.cond.wait(left)

    def connect(self, keepalive=60, properties=None, will=None):
        def run():
            if will is not None:
                self.client.will_set(*will)
            kw = {}
            if self.version == 5:
                kw["clean_start"] = self.clean
                if properties is not None:
                    kw["properties"] = properties
            self.client.connect("127.0.0.1", self.port, keepalive, **kw)
            self.client.loop_start()
            self._wait(lambda: self.connack is not None)
            return self.connack
        return threads.deferToThread(run)

    def subscribe(self, topic, qos=0, **options):
        def run():
            if self.version == 5 and options:
                from paho.mqtt.subscribeoptions import SubscribeOptions
                topics = [(topic, SubscribeOptions(qos=qos, **options))]
                result, mid = self.client.subscribe(topics)
            else:
                result, mid = self.client.subscribe(topic, qos)
            self._wait(lambda: mid in self.acks)
            return self.acks[mid]
        return threads.deferToThread(run)

    def unsubscribe(self, topic):
        def run():
            result, mid = self.client.unsubscribe(topic)
            self._wait(lambda: mid in self.acks)
            return self.acks[mid]
        return threads.deferToThread(run)

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        def run():
            info = self.client.publish(topic, payload, qos, retain, properties=properties)
            if qos:
                self._wait(lambda: info.mid in self.published)
            return info.mid
        return threads.deferToThread(run)

    def waitMessages(self, n, timeout=10):
        def run():
            self._wait(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)
        return threads.deferToThread(run)

    def waitDisconnected(self, timeout=10):
        def run():
            if not self.disconnected.wait(timeout):
                raise AssertionError("not disconnected")
            return self.disconnectReason
        return threads.deferToThread(run)

    def disconnect(self):
        def run():
            self.client.disconnect()
            self.disconnected.wait(5)
            self.client.loop_stop()
        return threads.deferToThread(run)

    def drop(self):
        """Close the socket without DISCONNECT (so the will is published)."""
        def run():
            self.client.loop_stop()
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        return threads.deferToThread(run)

    def stop(self):
        def run():
            try:
                self.client.disconnect()
            except Exception:
                pass
            self.client.loop_stop()
        return threads.deferToThread(run)


def v5props(kind, **values):
    props = Properties(getattr(PacketTypes, kind))
    for k, v in values.items():
        setattr(props, k, v)
    return props


def restSendToGroup(port, group, text):
    """
    Send C{text} to C{group} of hub C{mqtt} through the REST API on C{port}
    with Microsoft's service SDK, in a thread (the SDK blocks).
    """
    def send():
        from azure.messaging.webpubsubservice import WebPubSubServiceClient
        client = WebPubSubServiceClient.from_connection_string(
            f"Endpoint=http://127.0.0.1:{port};AccessKey={ACCESS_KEY};Version=1.0;", hub="mqtt")
        client.send_to_group(group, text, content_type="text/plain")
    return threads.deferToThread(send)


def sleep(seconds):
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class PacketWaiter:
    """
    What a hand-driven test client received, parsed into packets, and
    predicates waited on: shared by the raw TCP client and the WebSocket
    one.  C{reader} is the client's L{broker.mqtt.codec.PacketReader}.
    """

    def __init__(self, maxPacket):
        self.reader = codec.PacketReader(maxPacket)
        self.packets = []
        self._waiting = []

    def received(self, data):
        self.packets.extend(self.reader.feed(data))
        waiting, self._waiting = self._waiting, []
        for predicate, d in waiting:
            if predicate():
                d.callback(None)
            else:
                self._waiting.append((predicate, d))

    def releaseWaiters(self):
        """The connection is gone: every wait ends."""
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.callback(None)

    def waitFor(self, predicate):
        if predicate():
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append((predicate, d))
        return d

    def types(self):
        return [p[0] for p in self.packets]
