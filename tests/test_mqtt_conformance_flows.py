"""
MQTT 5.0 conformance, sections 3.4 to 4 of the specification:
acknowledgements, subscriptions, DISCONNECT, the QoS flows, sessions,
ordering and shared subscriptions, checked byte by byte with hand-driven
clients (L{tests.test_mqtt_conformance} holds the helpers and sections 1
to 3.3).  Each test's docstring names the statements it covers.
"""

from twisted.internet import defer

from broker.mqtt import codec
from tests.mqttharness import sleep
from tests.test_mqtt_conformance import (ConformanceCase, ack, bodies, connack, connect,
                                         disconnectOf, publish, publishes, subscribe,
                                         unsubscribe, NO_LOCAL)
from tests.test_mqtt_protocol import Refusing

PERSISTENT = {"session_expiry_interval": 60}


class AcknowledgementTests(ConformanceCase):
    """Sections 3.4 to 3.7 and 4.3: PUBACK, PUBREC, PUBREL, PUBCOMP."""

    @defer.inlineCallbacks
    def test_acknowledgementsWithinLimits(self):
        """
        MQTT-3.4.2-1, MQTT-3.4.2-2, MQTT-3.4.2-3, MQTT-3.5.2-1, MQTT-3.5.2-2,
        MQTT-3.5.2-3, MQTT-3.6.2-1, MQTT-3.6.2-2, MQTT-3.6.2-3, MQTT-3.7.2-1,
        MQTT-3.7.2-2, MQTT-3.7.2-3, MQTT-3.9.2-1, MQTT-3.9.2-2, MQTT-3.11.2-1,
        MQTT-3.11.2-2, MQTT-3.2.2-19, MQTT-3.2.2-20, MQTT-3.14.2-1,
        MQTT-3.14.2-3, MQTT-3.14.2-4, MQTT-3.1.2-24: to a client whose
        Maximum Packet Size is 20 bytes every packet (CONNACK, refusals in
        PUBACK 0x87, PUBREC 0x87, PUBCOMP 0x92, PUBREL 0x92, SUBACK 0x87,
        UNSUBACK 0x11, DISCONNECT 0x8D) uses its packet's reason codes and
        fits: no Reason String or User Property beyond the size (the
        DISCONNECT drops its reason string).
        """
        self.server.auth = Refusing()
        r = yield self.raw(connect("small", keepAlive=1, props={"maximum_packet_size": 20}))
        r.transport.write(publish("secret", b"x", 1, 1) + publish("secret", b"x", 2, 2)
                          + ack(codec.PUBREL, 3) + ack(codec.PUBREC, 4)
                          + subscribe(5, ("secret", 1)) + unsubscribe(6, "none"))
        yield r.waitFor(lambda: codec.UNSUBACK in r.types())
        self.assertEqual(bodies(r, codec.PUBACK), [b"\x00\x01\x87"])
        self.assertEqual(bodies(r, codec.PUBREC), [b"\x00\x02\x87"])
        self.assertEqual(bodies(r, codec.PUBCOMP), [b"\x00\x03\x92"])
        self.assertEqual(bodies(r, codec.PUBREL), [b"\x00\x04\x92"])
        self.assertEqual(bodies(r, codec.SUBACK), [b"\x00\x05\x00\x87"])
        self.assertEqual(bodies(r, codec.UNSUBACK), [b"\x00\x06\x00\x11"])
        yield self.closedWith(r, codec.KEEP_ALIVE_TIMEOUT)
        self.assertEqual(disconnectOf(r), (codec.KEEP_ALIVE_TIMEOUT, {}))
        for t, f, body in r.packets:
            self.assertLessEqual(len(codec.packet(t << 4 | f, body)), 20, (t, body))

    @defer.inlineCallbacks
    def test_qos1Receiver(self):
        """
        MQTT-3.3.4-1, MQTT-4.3.2-4, MQTT-4.3.2-5: a QoS 1 PUBLISH is
        answered PUBACK with its identifier; once acknowledged, a PUBLISH
        with the same identifier is a new message, DUP or not.
        """
        w = yield self.watcher(("r1/t", 0))
        p = yield self.raw(connect("p"))
        p.transport.write(publish("r1/t", b"first", 1, 5))
        yield p.waitFor(lambda: codec.PUBACK in p.types())
        p.transport.write(publish("r1/t", b"second", 1, 5, dup=True))
        yield p.waitFor(lambda: p.types().count(codec.PUBACK) == 2)
        self.assertEqual(bodies(p, codec.PUBACK), [b"\x00\x05", b"\x00\x05"])
        yield self.waitPublishes(w, 2)
        self.assertEqual([m.payload for m in publishes(w)], [b"first", b"second"])

    @defer.inlineCallbacks
    def test_qos2Receiver(self):
        """
        MQTT-3.3.4-1, MQTT-4.3.3-8, MQTT-4.3.3-9, MQTT-4.3.3-10, MQTT-4.3.3-11,
        MQTT-4.3.3-12, MQTT-4.3.3-13: a QoS 2 PUBLISH gets PUBREC with its
        identifier; after a PUBREC 0x87 the identifier starts a new
        message; a repeat before PUBREL gets PUBREC again and is routed
        once; PUBREL gets PUBCOMP; after it the identifier starts a new
        message; PUBREL is answered even after the message expired.
        """
        self.server.auth = Refusing()
        w = yield self.watcher(("r2/t", 0))
        p = yield self.raw(connect("p"))
        p.transport.write(publish("secret", b"no", 2, 9))
        yield p.waitFor(lambda: codec.PUBREC in p.types())
        p.transport.write(publish("r2/t", b"one", 2, 9) + publish("r2/t", b"one", 2, 9, dup=True))
        yield p.waitFor(lambda: p.types().count(codec.PUBREC) == 3)
        p.transport.write(ack(codec.PUBREL, 9))
        yield p.waitFor(lambda: codec.PUBCOMP in p.types())
        p.transport.write(publish("r2/t", b"two", 2, 9, props={"message_expiry_interval": 1}))
        yield p.waitFor(lambda: p.types().count(codec.PUBREC) == 4)
        yield sleep(1.5)
        p.transport.write(ack(codec.PUBREL, 9))
        yield p.waitFor(lambda: p.types().count(codec.PUBCOMP) == 2)
        self.assertEqual(bodies(p, codec.PUBREC),
                         [b"\x00\x09\x87", b"\x00\x09", b"\x00\x09", b"\x00\x09"])
        self.assertEqual(bodies(p, codec.PUBCOMP), [b"\x00\x09", b"\x00\x09"])
        yield self.waitPublishes(w, 2)
        yield sleep(0.2)
        self.assertEqual([m.payload for m in publishes(w)], [b"one", b"two"])

    @defer.inlineCallbacks
    def test_qos2Sender(self):
        """
        MQTT-4.3.3-3, MQTT-4.3.3-4, MQTT-4.3.3-5, MQTT-4.3.3-6, MQTT-4.3.3-7,
        MQTT-4.4.0-1: an outgoing QoS 2 PUBLISH is not retransmitted while
        the connection lasts; unacknowledged, it is sent again (DUP, same
        identifier) when the session resumes, even past its message expiry;
        PUBREC gets PUBREL; once PUBREL was sent only PUBREL is sent again,
        until PUBCOMP.
        """
        c = connect("s2", clean=False, props=PERSISTENT)
        r = yield self.raw(c + subscribe(1, ("s2/t", 2)), codec.SUBACK)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("s2/t", b"m", 2, 1, props={"message_expiry_interval": 1}))
        yield self.waitPublishes(r, 1)
        first = publishes(r)[0]
        yield sleep(1.6)
        self.assertEqual(len(publishes(r)), 1)
        r.transport.abortConnection()
        yield r.lost
        again = yield self.raw(c, codec.PUBLISH)
        m = publishes(again)[0]
        self.assertEqual((m.dup, m.packetId, m.payload, m.qos), (True, first.packetId, b"m", 2))
        again.transport.write(ack(codec.PUBREC, m.packetId))
        yield again.waitFor(lambda: codec.PUBREL in again.types())
        self.assertEqual(bodies(again, codec.PUBREL), [m.packetId.to_bytes(2, "big")])
        again.transport.abortConnection()
        yield again.lost
        third = yield self.raw(c, codec.PUBREL)
        yield sleep(0.2)
        self.assertEqual(third.types(), [codec.CONNACK, codec.PUBREL])
        third.transport.write(ack(codec.PUBCOMP, m.packetId))
        yield sleep(0.2)
        self.assertEqual(len(self.server.sessions[("mqtt", "s2")].inflight), 0)

    @defer.inlineCallbacks
    def test_negativeAcknowledgements(self):
        """
        MQTT-4.4.0-2: a PUBACK or PUBREC with a Reason Code of 0x80 or more
        acknowledges the PUBLISH: it is not sent again, not even when the
        session resumes.
        """
        c = connect("na", clean=False, props=PERSISTENT)
        r = yield self.raw(c + subscribe(1, ("na/1", 1), ("na/2", 2)), codec.SUBACK)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("na/1", b"1", 1, 1) + publish("na/2", b"2", 2, 2))
        yield self.waitPublishes(r, 2)
        m1, m2 = publishes(r)
        r.transport.write(ack(codec.PUBACK, m1.packetId, 0x80)
                          + ack(codec.PUBREC, m2.packetId, 0x80))
        yield sleep(0.3)
        self.assertNotIn(codec.PUBREL, r.types())
        r.transport.abortConnection()
        yield r.lost
        again = yield self.raw(c)
        yield sleep(0.3)
        self.assertEqual(again.types(), [codec.CONNACK])
        self.assertEqual(len(self.server.sessions[("mqtt", "na")].inflight), 0)


class SubscriptionTests(ConformanceCase):
    """Sections 3.8 to 3.11, 4.7 and 4.8: subscriptions, filters, shares."""

    @defer.inlineCallbacks
    def test_subscribeErrors(self):
        """
        MQTT-3.8.3-2, MQTT-3.8.3-4, MQTT-3.8.3-5: a SUBSCRIBE with no filter
        and No Local on a shared subscription are protocol errors (0x82);
        reserved bits of the options set, or Retain Handling 3, are
        malformed (0x81).
        """
        yield self.refusedAfterConnect(codec.packet(0x82, b"\x00\x01\x00"), codec.PROTOCOL_ERROR)
        yield self.refusedAfterConnect(subscribe(1, ("$share/g/t", NO_LOCAL)),
                                       codec.PROTOCOL_ERROR)
        for options in (0x40, 0x80, 0x30):
            yield self.refusedAfterConnect(subscribe(1, ("t", options)), codec.MALFORMED_PACKET)

    @defer.inlineCallbacks
    def test_subackPerFilter(self):
        """
        MQTT-3.8.4-1, MQTT-3.8.4-2, MQTT-3.8.4-5, MQTT-3.8.4-6, MQTT-3.8.4-7,
        MQTT-3.9.3-1, MQTT-3.9.3-2, MQTT-4.7.1-1, MQTT-4.7.1-2, MQTT-4.8.2-1,
        MQTT-4.8.2-2: one SUBSCRIBE with several filters gets one SUBACK
        with its identifier and one Subscribe Reason Code per filter, in
        order: the granted QoS, or 0x8F for a misplaced wildcard or a
        malformed share name; the good filters work as separate
        subscriptions.
        """
        filters = [("f/0", 0), ("f/#/x", 2), ("f/1", 1), ("f+", 1), ("$share//f/2", 1),
                   ("$share/g+/f/2", 1), ("$share/g", 1), ("f/2", 2), ("$share/g/fs/+", 1),
                   ("f/a#", 0)]
        r = yield self.raw(connect("sa") + subscribe(0x0102, *filters), codec.SUBACK)
        self.assertEqual(bodies(r, codec.SUBACK),
                         [b"\x01\x02\x00" + bytes((0, 0x8F, 1, 0x8F, 0x8F, 0x8F, 0x8F, 2, 1,
                                                   0x8F))])
        p = yield self.raw(connect("p"))
        p.transport.write(publish("f/0", b"0", 2, 1) + publish("f/1", b"1", 2, 2)
                          + publish("f/2", b"2", 2, 3))
        yield self.waitPublishes(r, 3)
        yield sleep(0.2)
        self.assertEqual(sorted((m.topic, m.qos) for m in publishes(r)),
                         [("f/0", 0), ("f/1", 1), ("f/2", 2)])

    @defer.inlineCallbacks
    def test_unsubscribe(self):
        """
        MQTT-3.10.3-2, MQTT-3.10.4-1, MQTT-3.10.4-2, MQTT-3.10.4-4,
        MQTT-3.10.4-5, MQTT-3.10.4-6, MQTT-3.11.3-1, MQTT-3.11.3-2: one
        UNSUBSCRIBE with several filters gets one UNSUBACK with its
        identifier and an Unsubscribe Reason Code per filter in order; a
        filter deletes only the subscription it equals character for
        character (0x11 when none); messages then stop for it only; an
        UNSUBSCRIBE without a filter is a protocol error.
        """
        r = yield self.raw(connect("us") + subscribe(1, ("us/+", 0), ("us/a", 0)), codec.SUBACK)
        r.transport.write(unsubscribe(0x0A0B, "us/#", "us/a", "us/A"))
        yield r.waitFor(lambda: codec.UNSUBACK in r.types())
        self.assertEqual(bodies(r, codec.UNSUBACK), [b"\x0a\x0b\x00\x11\x00\x11"])
        self.assertEqual(sorted(self.server.sessions[("mqtt", "us")].subs), ["us/+"])
        p = yield self.raw(connect("p"))
        p.transport.write(publish("us/a", b"a") + publish("us/b/c", b"no"))
        yield self.waitPublishes(r, 1)
        yield sleep(0.2)
        self.assertEqual([m.topic for m in publishes(r)], ["us/a"])
        r.transport.write(unsubscribe(3, "us/+"))
        yield r.waitFor(lambda: r.types().count(codec.UNSUBACK) == 2)
        p.transport.write(publish("us/a", b"gone"))
        yield sleep(0.3)
        self.assertEqual(len(publishes(r)), 1)
        yield self.refusedAfterConnect(codec.packet(0xA2, b"\x00\x01\x00"), codec.PROTOCOL_ERROR)

    @defer.inlineCallbacks
    def test_unsubscribeCompletesStarted(self):
        """
        MQTT-3.10.4-3: a QoS 2 delivery started before the UNSUBSCRIBE is
        completed (PUBREC gets PUBREL), with no new message after it.
        """
        r = yield self.raw(connect("uc") + subscribe(1, ("uc/t", 2)), codec.SUBACK)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("uc/t", b"started", 2, 1))
        yield self.waitPublishes(r, 1)
        r.transport.write(unsubscribe(2, "uc/t"))
        yield r.waitFor(lambda: codec.UNSUBACK in r.types())
        pid = publishes(r)[0].packetId
        r.transport.write(ack(codec.PUBREC, pid))
        yield r.waitFor(lambda: codec.PUBREL in r.types())
        r.transport.write(ack(codec.PUBCOMP, pid))
        p.transport.write(publish("uc/t", b"later", 2, 2))
        yield sleep(0.3)
        self.assertEqual(len(publishes(r)), 1)
        self.assertTrue(r.transport.connected)
        self.assertEqual(len(self.server.sessions[("mqtt", "uc")].inflight), 0)

    @defer.inlineCallbacks
    def test_sharedGrantedQos(self):
        """
        MQTT-4.8.2-3: a shared subscription's message goes at the lower of
        the published QoS and the QoS granted to the member.
        """
        r0 = yield self.watcher(("$share/q/sq/t", 0), clientId="m0")
        p = yield self.raw(connect("p"))
        p.transport.write(publish("sq/t", b"x", 2, 1))
        yield self.waitPublishes(r0, 1)
        self.assertEqual(publishes(r0)[0].qos, 0)
        r0.transport.write(unsubscribe(2, "$share/q/sq/t") + subscribe(3, ("$share/q/sq/t", 1)))
        yield r0.waitFor(lambda: r0.types().count(codec.SUBACK) == 2)
        p.transport.write(publish("sq/t", b"y", 2, 2))
        yield self.waitPublishes(r0, 2)
        self.assertEqual(publishes(r0)[1].qos, 1)

    @defer.inlineCallbacks
    def test_sharedAndOwnSubscriptions(self):
        """
        MQTT-4.8.2-3, MQTT-3.8.4-8, MQTT-3.3.4-4: a client with a shared
        subscription (QoS 2, identifier 5) and its own subscription (QoS
        0) to one topic gets every message through its own; those its
        group gave to the other member come at its own subscription's QoS
        without the shared one's identifier, those its group gave it at
        the higher QoS with the identifier, once.
        """
        x = yield self.raw(connect("x") + subscribe(1, ("$share/g/ow/t", 0)), codec.SUBACK)
        y = yield self.raw(connect("y") + subscribe(1, ("$share/g/ow/t", 2),
                                                    props={"subscription_identifier": [5]})
                           + subscribe(2, ("ow/t", 0)), codec.SUBACK)
        yield y.waitFor(lambda: y.types().count(codec.SUBACK) == 2)
        p = yield self.raw(connect("p"))
        for i in range(4):
            p.transport.write(publish("ow/t", b"%d" % i, 2, i + 1))
        yield self.waitPublishes(y, 4)
        yield self.waitPublishes(x, 2)
        yield sleep(0.2)
        toX = {m.payload for m in publishes(x)}
        self.assertEqual(len(toX), 2)
        self.assertEqual(len(publishes(x)), 2)
        got = [(m.payload, m.qos, m.properties.get("subscription_identifier"))
               for m in publishes(y)]
        self.assertEqual(got, [(b"%d" % i, 0, None) if b"%d" % i in toX else
                               (b"%d" % i, 2, [5]) for i in range(4)])

    @defer.inlineCallbacks
    def sharedPair(self, name, expiry, qos):
        """Members A (persistent, C{expiry}) then B of C{$share/g/{name}}."""
        c = connect(f"{name}A", clean=False, props={"session_expiry_interval": expiry})
        a = yield self.raw(c + subscribe(1, (f"$share/g/{name}", qos)), codec.SUBACK)
        b = yield self.watcher((f"$share/g/{name}", qos), clientId=f"{name}B")
        p = yield self.raw(connect("p"))
        return c, a, b, p

    @defer.inlineCallbacks
    def test_sharedDeliveryStaysWithItsMember(self):
        """
        MQTT-4.8.2-4: a QoS 2 shared delivery cut by the member's
        disconnection is completed when that member reconnects, not given
        to another member.
        """
        c, a, b, p = yield self.sharedPair("sk", 60, 2)
        p.transport.write(publish("sk", b"m", 2, 1))
        yield self.waitPublishes(a, 1)
        pid = publishes(a)[0].packetId
        a.transport.abortConnection()
        yield a.lost
        again = yield self.raw(c, codec.PUBLISH)
        m = publishes(again)[0]
        self.assertEqual((m.payload, m.packetId, m.dup), (b"m", pid, True))
        self.assertEqual(publishes(b), [])

    @defer.inlineCallbacks
    def test_sharedDeliveryEndsWithItsSession(self):
        """
        MQTT-4.8.2-5: when the member's session ends before the shared
        delivery completes, the message is not sent to another member.
        """
        c, a, b, p = yield self.sharedPair("se", 1, 1)
        p.transport.write(publish("se", b"m", 1, 1))
        yield self.waitPublishes(a, 1)
        a.transport.abortConnection()
        yield a.lost
        yield sleep(1.5)
        self.assertNotIn(("mqtt", "seA"), self.server.sessions)
        p.transport.write(publish("se", b"next", 1, 2))
        yield self.waitPublishes(b, 1)
        yield sleep(0.2)
        self.assertEqual([m.payload for m in publishes(b)], [b"next"])

    @defer.inlineCallbacks
    def test_sharedRefusalNotRedelivered(self):
        """
        MQTT-4.8.2-6: a shared delivery the member refuses (PUBACK 0x80) is
        discarded, not sent to another member.
        """
        c, a, b, p = yield self.sharedPair("sr", 60, 1)
        p.transport.write(publish("sr", b"m", 1, 1))
        yield self.waitPublishes(a, 1)
        a.transport.write(ack(codec.PUBACK, publishes(a)[0].packetId, 0x80))
        yield sleep(0.3)
        self.assertEqual(publishes(b), [])
        self.assertEqual(len(self.server.sessions[("mqtt", "srA")].inflight), 0)


class SessionTests(ConformanceCase):
    """Sections 3.14 and 4.1 to 4.6: DISCONNECT, sessions, ordering."""

    @defer.inlineCallbacks
    def test_serverDisconnect(self):
        """
        MQTT-3.1.4-3, MQTT-3.14.2-2, MQTT-3.14.4-1, MQTT-3.14.4-2: the broker's DISCONNECT
        (a take-over of a persistent session here, 0x8E) carries no
        Session Expiry Interval, is the last packet, and the broker closes
        the connection.
        """
        c = connect("td", clean=False, props=PERSISTENT)
        first = yield self.raw(c + subscribe(1, ("td/t", 0)), codec.SUBACK)
        yield self.raw(c)
        yield self.closedWith(first, codec.SESSION_TAKEN_OVER)
        reason, props = disconnectOf(first)
        self.assertNotIn("session_expiry_interval", props)
        self.assertEqual(first.types(), [codec.CONNACK, codec.SUBACK, codec.DISCONNECT])

    @defer.inlineCallbacks
    def test_cleanStartAndResume(self):
        """
        MQTT-3.1.2-4, MQTT-3.1.2-5, MQTT-3.1.2-6, MQTT-3.1.2-23, MQTT-3.1.3-2,
        MQTT-3.1.4-4, MQTT-3.2.2-2, MQTT-3.2.2-3: Clean Start 0 without a
        session starts one (Session Present 0); kept after the connection
        closes, it is resumed by its Client Identifier (Session Present 1:
        its subscription and the message queued meanwhile); Clean Start 1
        discards it (Session Present 0: neither the queued message nor the
        subscription is left).
        """
        def c(clean):
            return connect("cs", clean=clean, props=PERSISTENT)
        p = yield self.raw(connect("p"))
        r = yield self.raw(c(False) + subscribe(1, ("cs/t", 1)), codec.SUBACK)
        self.assertEqual(connack(r)[:2], (0, codec.SUCCESS))
        r.transport.write(b"\xe0\x00")
        yield r.lost
        p.transport.write(publish("cs/t", b"away", 1, 1))
        yield p.waitFor(lambda: codec.PUBACK in p.types())
        back = yield self.raw(c(False), codec.PUBLISH)
        self.assertEqual(connack(back)[:2], (1, codec.SUCCESS))
        p.transport.write(publish("cs/t", b"live", 1, 2))
        yield self.waitPublishes(back, 2)
        self.assertEqual([m.payload for m in publishes(back)], [b"away", b"live"])
        for m in publishes(back):
            back.transport.write(ack(codec.PUBACK, m.packetId))
        back.transport.write(b"\xe0\x00")
        yield back.lost
        p.transport.write(publish("cs/t", b"queued", 1, 3))
        yield p.waitFor(lambda: p.types().count(codec.PUBACK) == 3)
        clean = yield self.raw(c(True))
        self.assertEqual(connack(clean)[:2], (0, codec.SUCCESS))
        self.assertEqual(self.server.sessions[("mqtt", "cs")].subs, {})
        p.transport.write(publish("cs/t", b"after", 1, 4))
        yield sleep(0.3)
        self.assertEqual(publishes(clean), [])

    @defer.inlineCallbacks
    def test_sessionKeptWhileConnected(self):
        """
        MQTT-4.1.0-1: a session is not discarded while its connection is
        open, however long past its Session Expiry Interval.
        """
        r = yield self.raw(connect("kc", clean=False, props={"session_expiry_interval": 1})
                           + subscribe(1, ("kc/t", 0)), codec.SUBACK)
        yield sleep(1.6)
        self.assertIn(("mqtt", "kc"), self.server.sessions)
        p = yield self.raw(connect("p"))
        p.transport.write(publish("kc/t", b"still"))
        yield self.waitPublishes(r, 1)
        self.assertEqual(publishes(r)[0].payload, b"still")
        self.assertEqual(connack(r)[1], codec.SUCCESS)

    @defer.inlineCallbacks
    def test_orderedTopic(self):
        """
        MQTT-4.5.0-1, MQTT-4.6.0-5, MQTT-4.6.0-6: messages one client
        publishes to one topic with one QoS reach every non-shared
        subscriber (exact or wildcard filter), in the order they were
        received.
        """
        exact = yield self.watcher(("ot/t", 2), clientId="exact")
        wild = yield self.watcher(("ot/#", 2), clientId="wild")
        p = yield self.raw(connect("p"))
        n = 60
        for qos in (1, 2):
            p.transport.write(b"".join(publish("ot/t", b"%d/%02d" % (qos, i), qos,
                                               qos * 100 + i + 1) for i in range(n)))
            if qos == 2:
                yield p.waitFor(lambda: p.types().count(codec.PUBREC) == n)
                p.transport.write(b"".join(ack(codec.PUBREL, 201 + i) for i in range(n)))
        for r in (exact, wild):
            yield self.waitPublishes(r, 2 * n)
            got = [m.payload for m in publishes(r)]
            for qos in (1, 2):
                self.assertEqual([x for x in got if x.startswith(b"%d/" % qos)],
                                 [b"%d/%02d" % (qos, i) for i in range(n)])
