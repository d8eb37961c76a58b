# -*- test-case-name: tests.test_mqtt_protocol -*-
"""
The allow-all authenticator and ACL, used when the C{[mqtt]} section names
no password file, no ACL file and no token keys (a broker on loopback).
"""

from twisted.internet import defer
from zope.interface import implementer

from broker.mqtt.interfaces import IMqttAcl, IMqttAuth, IMqttAuthenticator, MqttIdentity


@implementer(IMqttAuth, IMqttAuthenticator, IMqttAcl)
class AllowAll:
    """Every client is who its user name says (anonymous without one)."""

    reloadable = False

    def authenticate(self, clientId, username, password, hub):
        return defer.succeed(MqttIdentity(userId=username or None))

    def mayPublish(self, identity, topic):
        return True

    def maySubscribe(self, identity, topicFilter):
        return True
