# -*- test-case-name: tests.test_mqtt_protocol -*-
"""
The interfaces of the MQTT face that another module may implement: who a
client is (L{IMqttAuthenticator}) and what it may touch (L{IMqttAcl}).

The protocol adapter (L{broker.mqtt.protocol}) only calls these; the
password file, JWT access tokens and topic ACLs live in L{broker.mqtt.auth},
and L{broker.mqtt.noauth} is the allow-all used when neither is configured.
Both protocol versions are served by the same objects: the adapter maps a
5.0 reason code onto the 3.1.1 CONNACK return code itself
(L{MqttAuthError.returnCode311}).

How the face finds the implementation (L{broker.mqtt.face.buildAuth}):
C{broker.mqtt.auth.build(context, cfg)} (C{cfg} the C{[mqtt]} table, keys
C{password_file}, C{acl_file}) returning an L{IMqttAuth}; when it has a
true C{reloadable} attribute, its C{reload()} is called on SIGHUP.  A
WebSocket client of C{/clients/mqtt/hubs/{hub}?access_token=JWT} whose
CONNECT has no password is authenticated with the token's UTF-8 bytes as
the password (Azure Web PubSub's MQTT clients authenticate this way).
"""

from zope.interface import Attribute, Interface

# CONNACK reason codes (5.0) an authenticator may fail with.
BAD_USER_NAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87

# 5.0 reason code -> 3.1.1 CONNACK return code (MQTT 3.1.1 section 3.2.2.3).
_RETURN_CODES_311 = {BAD_USER_NAME_OR_PASSWORD: 4, NOT_AUTHORIZED: 5}


class MqttIdentity:
    """
    Who an authenticated MQTT client is.

    @ivar userId: the core user id (str) or C{None} for an anonymous client;
        the session joins the hub as this user, so REST C{sendToUser}
        reaches it.
    @ivar roles: Web PubSub-style roles/permissions (a frozenset of str,
        e.g. C{"webpubsub.joinLeaveGroup.a/b"}) from a JWT, empty otherwise.
    @ivar acl: what the L{IMqttAcl} consults for this user: an opaque
        object of the authenticator's choosing (C{None}: allow all).
    @ivar hub: the hub the client is bound to (a token's audience may
        choose it), or C{None} to keep the listener's hub.
    """

    __slots__ = ("userId", "roles", "acl", "hub")

    def __init__(self, userId=None, roles=(), acl=None, hub=None):
        self.userId = userId
        self.roles = frozenset(roles)
        self.acl = acl
        self.hub = hub

    def __repr__(self):
        return f"<MqttIdentity user={self.userId!r} hub={self.hub!r} roles={sorted(self.roles)!r}>"


class MqttAuthError(Exception):
    """
    A refused CONNECT.

    @ivar reasonCode: the MQTT 5.0 CONNACK reason code:
        L{BAD_USER_NAME_OR_PASSWORD} (0x86) or L{NOT_AUTHORIZED} (0x87).
    """

    def __init__(self, reasonCode, message=""):
        Exception.__init__(self, reasonCode, message)
        self.reasonCode = reasonCode
        self.message = message

    @property
    def returnCode311(self):
        """The MQTT 3.1.1 CONNACK return code: 4 or 5 (5 for anything else)."""
        return _RETURN_CODES_311.get(self.reasonCode, 5)


class IMqttAuthenticator(Interface):
    """
    Decides who a connecting client is, from its CONNECT packet.
    """

    def authenticate(clientId, username, password, hub):
        """
        @param clientId: the client identifier (str; may be one the broker
            assigned).
        @param username: str or C{None}.
        @param password: bytes or C{None} (MQTT passwords are binary; a JWT
            arrives as its UTF-8 bytes).
        @param hub: the hub the listener (or the WebSocket path) chose.
        @return: a Deferred firing an L{MqttIdentity} or failing with
            L{MqttAuthError}.
        """


class IMqttAcl(Interface):
    """
    Topic access per identity, asked on every PUBLISH and SUBSCRIBE (so it
    must be cheap and synchronous).  A refused publish is acknowledged with
    0x87 (5.0) or dropped silently (3.1.1, whose PUBACK has no code); a
    refused subscription is granted 0x87 / 0x80.
    """

    def mayPublish(identity, topic):
        """
        @param identity: the L{MqttIdentity} from L{IMqttAuthenticator}.
        @param topic: the topic name (str, no wildcards).
        @return: bool
        """

    def maySubscribe(identity, topicFilter):
        """
        @param topicFilter: the filter as subscribed (str, may hold C{+}
            and C{#}; a shared subscription's C{$share/{group}/} prefix
            removed).
        @return: bool
        """


class IMqttAuth(IMqttAuthenticator, IMqttAcl):
    """What the face is given: one object doing both (L{broker.mqtt.noauth})."""

    reloadable = Attribute("Whether C{reload()} re-reads files (SIGHUP); may be absent.")
