# -*- test-case-name: tests.test_core -*-
"""
Typed messages, delivery targets and deliveries.

A L{Message} is payload bytes plus a data type.  A L{Delivery} wraps one
message on its way to many receivers and carries a per-wire-format cache, so
that a fan-out to N WebSocket connections frames the payload once, not N
times.
"""

import json
from base64 import b64decode, b64encode

from broker.core import jsonstrict
from broker.core.errors import BadRequest

BINARY = "binary"
TEXT = "text"
JSON = "json"
# A serialised google.protobuf.Any, as the Web PubSub protobuf subprotocols
# carry it (broker/webpubsub/protobuf.py): bytes to every other client.
PROTOBUF = "protobuf"
DATA_TYPES = (BINARY, TEXT, JSON, PROTOBUF)

# Delivery sources.
FROM_GROUP = "group"
FROM_SERVER = "server"


class Message:
    """
    An immutable payload with its data type.

    @ivar dataType: one of L{DATA_TYPES}.
    @ivar data: the payload as bytes; for C{text} it is UTF-8, for C{json}
        it is a serialised JSON value (validated on construction), for
        C{protobuf} a serialised C{google.protobuf.Any}.
    """

    __slots__ = ("dataType", "data")
    # A group stream's fragment says which (broker.webpubsub.streams).
    stream = None

    def __init__(self, dataType, data):
        if dataType not in DATA_TYPES:
            raise BadRequest(f"unknown dataType {dataType!r}")
        if not isinstance(data, bytes):
            raise TypeError("Message data must be bytes")
        self.dataType = dataType
        self.data = data

    @classmethod
    def text(cls, s):
        return cls(TEXT, s.encode("utf-8"))

    @classmethod
    def binary(cls, b):
        return cls(BINARY, bytes(b))

    @classmethod
    def json(cls, value):
        return cls(JSON, jsonstrict.dumps(value).encode("utf-8"))

    @classmethod
    def fromJSONField(cls, dataType, value):
        """
        Build a message from the C{data} field of a JSON protocol frame, as
        the Web PubSub JSON subprotocol and REST bodies carry it.

        @raise BadRequest: when C{value} does not fit C{dataType}.
        """
        if dataType is None:
            dataType = JSON
        if dataType == JSON:
            return cls.json(value)
        if dataType == TEXT:
            if not isinstance(value, str):
                raise BadRequest("data must be a string when dataType is 'text'")
            return cls.text(value)
        if dataType == BINARY:
            if not isinstance(value, str):
                raise BadRequest("data must be base64 when dataType is 'binary'")
            try:
                return cls(BINARY, b64decode(value, validate=True))
            except ValueError:
                raise BadRequest("data is not valid base64")
        raise BadRequest(f"unknown dataType {dataType!r}")

    def jsonField(self):
        """
        The payload as the raw JSON text of a C{data} field (bytes), the
        inverse of L{fromJSONField}.  JSON payloads are embedded as they are.
        """
        if self.dataType == JSON:
            return self.data
        if self.dataType == TEXT:
            return json.dumps(self.data.decode("utf-8")).encode("utf-8")
        return b'"' + b64encode(self.data) + b'"'

    @property
    def isBinary(self):
        """
        True when the payload is bytes rather than text (C{binary} and
        C{protobuf}): what goes to a plain WebSocket client as a binary
        frame.
        """
        return self.dataType == BINARY or self.dataType == PROTOBUF

    def __len__(self):
        return len(self.data)

    def __eq__(self, other):
        if not isinstance(other, Message):
            return NotImplemented
        return (self.dataType, self.data) == (other.dataType, other.data)

    def __hash__(self):
        return hash((self.dataType, self.data))

    def __repr__(self):
        return f"<Message {self.dataType} {len(self.data)} bytes>"


class Target:
    """
    Where a publish goes: one connection, one user's connections, one
    group's connections or the whole hub, less the excluded connections.
    """

    CONNECTION = "connection"
    USER = "user"
    GROUP = "group"
    HUB = "hub"
    KINDS = (CONNECTION, USER, GROUP, HUB)
    __slots__ = ("kind", "name", "excluded", "filter")

    def __init__(self, kind, name=None, excluded=(), filter=None):
        """
        @param filter: the text of a session filter (Web PubSub's OData
            C{filter}), compiled by the core's filter compiler on every
            node that holds receivers: text, not a predicate, so that it
            travels between nodes.
        """
        if kind not in self.KINDS:
            raise ValueError(f"unknown target kind {kind!r}")
        self.kind = kind
        self.name = name
        self.excluded = frozenset(excluded)
        self.filter = filter

    def toJSON(self):
        """
        A JSON-ready list, for a target travelling between nodes.
        """
        return [self.kind, self.name, sorted(self.excluded), self.filter]

    @classmethod
    def fromJSON(cls, value):
        kind, name, excluded, filter = value
        return cls(kind, name, excluded, filter)

    def __repr__(self):
        return f"<Target {self.kind} {self.name!r} excluding {len(self.excluded)}>"


class Delivery:
    """
    One message on its way to its receivers.

    @ivar source: L{FROM_GROUP} or L{FROM_SERVER}.
    @ivar group: the group it was published to, for group messages.
    @ivar fromUserId: the publishing user, for group messages.
    @ivar fromConnectionId: the publishing connection, if any.
    @ivar history: C{(epoch, offset)} when the group keeps a history (see
        L{broker.webpubsub.history}), so a client can resume from it.
    @ivar encoded: cache of wire encodings, keyed by whatever an adapter
        chooses; see L{encode}.
    """

    __slots__ = ("message", "source", "group", "fromUserId", "fromConnectionId", "history",
                 "_encoded")

    def __init__(self, message, source=FROM_SERVER, group=None, fromUserId=None,
                 fromConnectionId=None):
        self.message = message
        self.source = source
        self.group = group
        self.fromUserId = fromUserId
        self.fromConnectionId = fromConnectionId
        self.history = None
        self._encoded = {}

    def encode(self, key, encoder):
        """
        Return C{encoder(self)}, computed once per C{key} for this delivery.

        Adapters use this to build a frame once and reuse it for every
        receiver of a fan-out.
        """
        try:
            return self._encoded[key]
        except KeyError:
            value = self._encoded[key] = encoder(self)
            return value
