"""
MQTT 5.0 conformance, section 3.3 of the specification (PUBLISH: retained
messages, topic names and aliases, properties, expiry, overlapping
subscriptions, receive maximum), checked byte by byte with hand-driven
clients (L{tests.test_mqtt_conformance} holds the helpers).  Each test's
docstring names the statements it covers.
"""

from twisted.internet import defer

from broker.mqtt import codec
from tests.mqttharness import sleep
from tests.test_mqtt_conformance import (RAP, ConformanceCase, ack, connack, connect, publish,
                                         publishes, rh, subscribe, unsubscribe)


class PublishTests(ConformanceCase):
    """Section 3.3: PUBLISH."""

    @defer.inlineCallbacks
    def test_outgoingDupIndependent(self):
        """
        MQTT-3.3.1-3: a PUBLISH received with DUP 1 is forwarded with DUP 0
        (DUP says only whether the broker itself is retransmitting).
        """
        w = yield self.watcher(("dp/t", 1))
        p = yield self.raw(connect("p"))
        p.transport.write(publish("dp/t", b"again", 1, 4, dup=True))
        yield self.waitPublishes(w, 1)
        self.assertEqual((publishes(w)[0].dup, publishes(w)[0].payload), (False, b"again"))

    @defer.inlineCallbacks
    def test_retainedReplacedDeletedKept(self):
        """
        MQTT-3.3.1-5, MQTT-3.3.1-6, MQTT-3.3.1-7, MQTT-3.3.1-8: RETAIN 1
        replaces the topic's retained message; RETAIN 0 leaves it alone;
        a zero-byte retained message is delivered to live subscribers as
        any other and removes the retained message without being kept.
        """
        live = yield self.watcher(("rk/t", 0))
        p = yield self.raw(connect("p"))
        p.transport.write(publish("rk/t", b"a", retain=True) + publish("rk/t", b"b", retain=True)
                          + publish("rk/t", b"c"))
        yield self.waitPublishes(live, 3)
        late = yield self.watcher(("rk/t", 0), clientId="late")
        yield self.waitPublishes(late, 1)
        self.assertEqual([(m.payload, m.retain) for m in publishes(late)], [(b"b", True)])
        p.transport.write(publish("rk/t", b"", retain=True))
        yield self.waitPublishes(live, 4)
        self.assertEqual([m.payload for m in publishes(live)], [b"a", b"b", b"c", b""])
        self.assertNotIn("rk/t", self.server.routings["mqtt"].retained)
        later = yield self.watcher(("rk/t", 0), clientId="later")
        yield sleep(0.3)
        self.assertEqual(publishes(later), [])

    @defer.inlineCallbacks
    def test_retainHandlingAndReplacement(self):
        """
        MQTT-3.3.1-9, MQTT-3.3.1-10, MQTT-3.3.1-11, MQTT-3.8.4-3,
        MQTT-3.8.4-4: Retain Handling 1 sends the retained message only for
        a new subscription; subscribing again to the same filter replaces
        the subscription (one, with the new options), Retain Handling 0
        then sends the retained message again; Retain Handling 2 sends
        none; no message is lost by the replacement.
        """
        p = yield self.raw(connect("p"))
        p.transport.write(publish("rh/t", b"kept", 1, 1, retain=True))
        yield p.waitFor(lambda: codec.PUBACK in p.types())
        r = yield self.raw(connect("rh") + subscribe(1, ("rh/t", 0 | rh(1))), codec.SUBACK)
        yield self.waitPublishes(r, 1)
        r.transport.write(subscribe(2, ("rh/t", 1 | rh(1))))
        yield r.waitFor(lambda: r.types().count(codec.SUBACK) == 2)
        yield sleep(0.2)
        self.assertEqual(len(publishes(r)), 1)
        r.transport.write(subscribe(3, ("rh/t", 1 | rh(0))) + subscribe(4, ("rh/+", 1 | rh(2))))
        yield r.waitFor(lambda: r.types().count(codec.SUBACK) == 4)
        yield self.waitPublishes(r, 2)
        session = self.server.sessions[("mqtt", "rh")]
        self.assertEqual((sorted(session.subs), session.subs["rh/t"].qos), (["rh/+", "rh/t"], 1))
        p.transport.write(publish("rh/t", b"live", 1, 2))
        yield self.waitPublishes(r, 3)
        yield sleep(0.3)
        self.assertEqual([(m.payload, m.retain) for m in publishes(r)],
                         [(b"kept", True), (b"kept", True), (b"live", False)])

    @defer.inlineCallbacks
    def test_retainAsPublished(self):
        """
        MQTT-3.3.1-12, MQTT-3.3.1-13: a live retained message is forwarded
        with RETAIN 0, or with RETAIN as published when the subscription
        asked for Retain As Published.
        """
        r = yield self.raw(connect("rap") + subscribe(1, ("ra/0", 0), ("ra/1", RAP)),
                           codec.SUBACK)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("ra/0", b"x", retain=True) + publish("ra/1", b"x", retain=True))
        yield self.waitPublishes(r, 2)
        self.assertEqual(sorted((m.topic, m.retain) for m in publishes(r)),
                         [("ra/0", False), ("ra/1", True)])

    @defer.inlineCallbacks
    def test_topicNamesAndAliases(self):
        """
        MQTT-3.3.2-2, MQTT-4.7.0-1, MQTT-4.7.3-1, MQTT-3.3.2-8,
        MQTT-3.3.2-12: a topic name with a wildcard, or empty without a
        topic alias, closes the connection (0x90); Topic Alias 0 or one
        above the broker's Topic Alias Maximum closes it (0x94); every
        alias from 1 to that maximum is accepted.
        """
        for topic in ("a/+", "#", "a/#", ""):
            yield self.refusedAfterConnect(publish(topic), codec.TOPIC_NAME_INVALID)
        w = yield self.watcher(("ta/#", 0))
        p = yield self.raw(connect("p"))
        maximum = connack(p)[2]["topic_alias_maximum"]
        for alias in range(1, maximum + 1):
            p.transport.write(publish(f"ta/{alias}", b"set", props={"topic_alias": alias}))
        for alias in range(1, maximum + 1):
            p.transport.write(publish("", b"use", props={"topic_alias": alias}))
        yield self.waitPublishes(w, 2 * maximum)
        self.assertEqual([m.topic for m in publishes(w)][maximum:],
                         [f"ta/{a}" for a in range(1, maximum + 1)])
        for alias in (0, maximum + 1):
            yield self.refusedAfterConnect(publish("ta/x", props={"topic_alias": alias}),
                                           codec.TOPIC_ALIAS_INVALID)

    @defer.inlineCallbacks
    def test_topicAliasesPerConnection(self):
        """
        MQTT-3.3.2-7: topic aliases do not carry over to a new connection
        of the same session, in either direction: an alias set on the
        first connection is unknown on the second (a protocol error), and
        the broker sets its own aliases again.
        """
        props = {"topic_alias_maximum": 4, "session_expiry_interval": 60}
        r = yield self.raw(connect("tc", clean=False, props=props)
                           + subscribe(1, ("tc/t", 0)), codec.SUBACK)
        r.transport.write(publish("tc/t", b"1", props={"topic_alias": 1}))
        yield self.waitPublishes(r, 1)
        self.assertEqual((publishes(r)[0].topic, publishes(r)[0].properties["topic_alias"]),
                         ("tc/t", 1))
        r.transport.write(b"\xe0\x00")
        yield r.lost
        again = yield self.raw(connect("tc", clean=False, props=props))
        self.assertEqual(connack(again)[0], 1)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("tc/t", b"2"))
        yield self.waitPublishes(again, 1)
        m = publishes(again)[0]
        self.assertEqual((m.topic, m.properties["topic_alias"], m.payload), ("tc/t", 1, b"2"))
        again.transport.write(publish("", b"3", props={"topic_alias": 1}))
        yield self.closedWith(again, codec.PROTOCOL_ERROR)

    @defer.inlineCallbacks
    def test_noTopicAliasWithoutMaximum(self):
        """
        MQTT-3.1.2-27, MQTT-3.3.2-11: a client that gave no Topic Alias
        Maximum (or 0) gets no Topic Alias.
        """
        none = yield self.watcher(("na/t", 0), clientId="none")
        zero = yield self.watcher(("na/t", 0), clientId="zero",
                                  props={"topic_alias_maximum": 0})
        p = yield self.raw(connect("p"))
        p.transport.write(publish("na/t", b"1") + publish("na/t", b"2"))
        for r in (none, zero):
            yield self.waitPublishes(r, 2)
            self.assertEqual([(m.topic, "topic_alias" in m.properties) for m in publishes(r)],
                             [("na/t", False), ("na/t", False)])

    @defer.inlineCallbacks
    def test_propertiesForwardedUnaltered(self):
        """
        MQTT-3.3.2-4, MQTT-3.3.2-15, MQTT-3.3.2-16, MQTT-3.3.2-17,
        MQTT-3.3.2-18, MQTT-3.3.2-20: Payload Format Indicator, Response
        Topic, Correlation Data, every User Property (in order, repeated
        names kept) and Content Type reach the subscriber unaltered.
        """
        props = {"payload_format_indicator": 1, "response_topic": "reply/to/me",
                 "correlation_data": b"\x00\xff\x01", "content_type": "text/x; charset=utf-8",
                 "user_property": [("b", "2"), ("a", "1"), ("b", "0"), ("", "")]}
        w = yield self.watcher(("pf/t", 1))
        p = yield self.raw(connect("p"))
        p.transport.write(publish("pf/t", "é".encode(), 1, 1, props=props))
        yield self.waitPublishes(w, 1)
        self.assertEqual(publishes(w)[0].properties, props)

    @defer.inlineCallbacks
    def test_responseTopicWithoutWildcards(self):
        """
        MQTT-3.3.2-14: a Response Topic holding a wildcard is a protocol
        error (0x82); the message is not routed; in a will, the CONNECT is
        refused (closed).
        """
        w = yield self.watcher(("rt/#", 0))
        for wild in ("reply/+", "reply/#"):
            yield self.refusedAfterConnect(
                publish("rt/t", props={"response_topic": wild}), codec.PROTOCOL_ERROR)
        yield self.closedSilently(connect("rw", will=("rt/w", b"w", 0, False,
                                                      {"response_topic": "reply/#"})))
        yield sleep(0.2)
        self.assertEqual(publishes(w), [])

    @defer.inlineCallbacks
    def test_messageExpiry(self):
        """
        MQTT-3.3.2-5, MQTT-3.3.2-6: a queued message whose Message Expiry
        Interval passed before delivery began is not delivered; the one
        still valid is forwarded with its interval less the time it waited.
        """
        props = {"session_expiry_interval": 60}
        r = yield self.raw(connect("me", clean=False, props=props)
                           + subscribe(1, ("me/t", 1)), codec.SUBACK)
        r.transport.write(b"\xe0\x00")
        yield r.lost
        p = yield self.raw(connect("p"))
        p.transport.write(publish("me/t", b"short", 1, 1, props={"message_expiry_interval": 1})
                          + publish("me/t", b"long", 1, 2, props={"message_expiry_interval": 30}))
        yield p.waitFor(lambda: p.types().count(codec.PUBACK) == 2)
        yield sleep(2.2)
        back = yield self.raw(connect("me", clean=False, props=props))
        yield self.waitPublishes(back, 1)
        yield sleep(0.2)
        got = publishes(back)
        self.assertEqual([m.payload for m in got], [b"long"])
        self.assertLessEqual(got[0].properties["message_expiry_interval"], 28)
        self.assertGreaterEqual(self.server.counters["expired"], 1)

    @defer.inlineCallbacks
    def test_overlappingSubscriptions(self):
        """
        MQTT-3.3.4-2, MQTT-3.3.4-3, MQTT-3.3.4-4, MQTT-3.3.4-5: a message
        matching several subscriptions of one client is sent once, at the
        highest QoS among them, with the Subscription Identifiers of all
        of them.
        """
        r = yield self.raw(
            connect("ov") + subscribe(1, ("ov/#", 0), props={"subscription_identifier": [7]})
            + subscribe(2, ("ov/t", 2), props={"subscription_identifier": [9]})
            + subscribe(3, ("+/t", 1)), codec.SUBACK)
        yield r.waitFor(lambda: r.types().count(codec.SUBACK) == 3)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("ov/t", b"once", 2, 1))
        yield self.waitPublishes(r, 1)
        yield sleep(0.3)
        got = publishes(r)
        self.assertEqual(len(got), 1)
        self.assertEqual((got[0].qos, sorted(got[0].properties["subscription_identifier"])),
                         (2, [7, 9]))

    @defer.inlineCallbacks
    def test_receiveMaximumDelaysOnlyPublish(self):
        """
        MQTT-3.3.4-10, MQTT-4.9.0-1, MQTT-4.9.0-2, MQTT-4.9.0-3: with the
        client's Receive Maximum (1) used up, further QoS 1 PUBLISHes wait
        while PINGRESP, SUBACK, UNSUBACK and QoS 0 PUBLISHes still go out;
        the PUBACK releases the next.
        """
        r = yield self.raw(connect("rq", props={"receive_maximum": 1})
                           + subscribe(1, ("rq/1", 1), ("rq/0", 0)), codec.SUBACK)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("rq/1", b"a", 1, 1) + publish("rq/1", b"b", 1, 2))
        yield self.waitPublishes(r, 1)
        p.transport.write(publish("rq/0", b"q0"))
        r.transport.write(b"\xc0\x00" + subscribe(2, ("rq/x", 1)) + unsubscribe(3, "rq/x"))
        yield r.waitFor(lambda: codec.UNSUBACK in r.types())
        yield self.waitPublishes(r, 2)
        yield sleep(0.2)
        got = publishes(r)
        self.assertEqual([m.payload for m in got], [b"a", b"q0"])
        self.assertIn(codec.PINGRESP, r.types())
        r.transport.write(ack(codec.PUBACK, got[0].packetId))
        yield self.waitPublishes(r, 3)
        self.assertEqual(publishes(r)[2].payload, b"b")

    @defer.inlineCallbacks
    def test_noNormalisation(self):
        """
        MQTT-4.7.3-4, MQTT-3.3.2-3: names and filters match character for
        character: no case folding, no collapsing of empty levels, no
        trimming; a forwarded topic name matches its subscription.
        """
        w = yield self.watcher(("nn/A", 0), ("nn//b", 0), ("nn/c ", 0), ("nn/+/d", 0))
        p = yield self.raw(connect("p"))
        for t in ("nn/a", "nn/b", "nn/c", "nn/A", "nn//b", "nn/c ", "nn/x/d", "nn//d"):
            p.transport.write(publish(t, t.encode()))
        yield self.waitPublishes(w, 5)
        yield sleep(0.2)
        self.assertEqual([m.topic for m in publishes(w)],
                         ["nn/A", "nn//b", "nn/c ", "nn/x/d", "nn//d"])

    @defer.inlineCallbacks
    def test_topicLength(self):
        """
        MQTT-4.7.3-3: a topic name is a length-prefixed string (at most
        65,535 bytes); the broker serves names up to its documented bound
        (1024 characters, the core's longest group name) and closes the
        connection (0x90) past it.
        """
        name = "l/" + "x" * 1022
        w = yield self.watcher((name, 0))
        p = yield self.raw(connect("p"))
        p.transport.write(publish(name, b"long"))
        yield self.waitPublishes(w, 1)
        self.assertEqual(publishes(w)[0].topic, name)
        yield self.refusedAfterConnect(publish(name + "y"), codec.TOPIC_NAME_INVALID)
