# -*- test-case-name: tests.test_mqtt_protocol -*-
"""
What an MQTT publish is once it enters the routing core, and what a core
message from another face becomes for an MQTT subscriber.

An MQTT PUBLISH becomes an L{MqttMessage}: a core L{Message} (so Web PubSub
and every other face receive it as an ordinary message: C{text} when the
5.0 payload format indicator says UTF-8, else C{binary}) that also carries
its QoS, retain flag, message expiry and the properties a subscriber must
get unchanged (MQTT-3.3.2-..: user properties, content type, response
topic, correlation data, payload format indicator).  A message from
another face (a plain L{Message}) is published to MQTT subscribers with
the face's C{qos_from_other_faces}; C{text} and C{json} payloads carry the
payload format indicator 1 (and C{json} the content type
C{application/json}) on 5.0.
"""

import base64

from broker.core.message import BINARY, JSON, TEXT, Message

# The properties a PUBLISH carries from its publisher to its subscribers.
FORWARDED = ("payload_format_indicator", "content_type", "response_topic",
             "correlation_data", "user_property")


class MqttMessage(Message):
    """
    @ivar qos: the publisher's QoS (0, 1 or 2).
    @ivar retain: the publisher's retain flag.
    @ivar properties: the forwarded 5.0 properties (a dict, maybe empty).
    @ivar expiresAt: the wall-clock second the message expires, or C{None}.
    """

    __slots__ = ("qos", "retain", "properties", "expiresAt")

    def __init__(self, payload, qos=0, retain=False, properties=None, expiresAt=None):
        props = properties or {}
        dataType = TEXT if props.get("payload_format_indicator") == 1 else BINARY
        Message.__init__(self, dataType, payload)
        self.qos = qos
        self.retain = retain
        self.properties = props
        self.expiresAt = expiresAt

    def busState(self):
        """
        What the cluster bus carries beyond the payload
        (L{broker.cluster.engine.registerMessageKind}), so a subscriber on
        another node gets the publisher's QoS, retain flag and properties.
        """
        return "mqtt", [self.qos, self.retain, propsToJSON(self.properties), self.expiresAt]

    @classmethod
    def fromBus(cls, dataType, data, state):
        qos, retain, props, expiresAt = state
        return cls(data, qos, retain, propsFromJSON(props), expiresAt)

    def __repr__(self):
        return f"<MqttMessage qos={self.qos} retain={self.retain} {len(self.data)} bytes>"


_TEXT_PROPS = {"payload_format_indicator": 1}
_JSON_PROPS = {"payload_format_indicator": 1, "content_type": "application/json"}


def mqttView(message, defaultQos):
    """
    C{(qos, retain, properties, expiresAt)} of any core message as an MQTT
    subscriber sees it.
    """
    if isinstance(message, MqttMessage):
        return message.qos, message.retain, message.properties, message.expiresAt
    if message.dataType == TEXT:
        return defaultQos, False, _TEXT_PROPS, None
    if message.dataType == JSON:
        return defaultQos, False, _JSON_PROPS, None
    return defaultQos, False, {}, None


def propsToJSON(props):
    """Properties as JSON-able values (correlation data is binary: base64)."""
    if not props:
        return {}
    value = dict(props)
    if "correlation_data" in value:
        value["correlation_data"] = base64.b64encode(value["correlation_data"]).decode()
    return value


def propsFromJSON(value):
    value = dict(value)
    if "correlation_data" in value:
        value["correlation_data"] = base64.b64decode(value["correlation_data"])
    if "user_property" in value:
        value["user_property"] = [tuple(p) for p in value["user_property"]]
    return value
