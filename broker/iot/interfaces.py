# -*- test-case-name: tests.test_iot_concentrator -*-
"""
The interfaces of the IoT face: the concentrator (what the TCP sessions and
the HTTP API drive), the link to a fleet's central, and the durable
store-and-forward queue.

Payloads are L{broker.iot.frames.Payload}s throughout; errors are the
classes in L{broker.iot.errors}.
"""

from zope.interface import Attribute, Interface


class ICentralLink(Interface):
    """
    How the concentrator reaches a fleet's central: a connected central TCP
    session (L{broker.iot.protocol}) or a fallback set with
    L{IConcentrator.setCentralFallback} (the HTTP webhook client).
    """

    def deviceRequest(fleet, deviceId, payload):
        """
        Hand a device's request to the central.

        @return: a Deferred firing with the central's answer (a Payload),
            or failing with L{broker.iot.errors.Refused} (the central said
            no), L{broker.iot.errors.RequestTimeout} or another
            L{broker.iot.errors.IoTError}.  The concentrator applies its
            own timeout on top and cancels the Deferred when it expires.
        """

    def message(fleet, deviceId, payload):
        """
        Hand a device's one-way message to the central (fire and forget:
        failures are the link's to log and count).
        """

    def telemetry(fleet, deviceId, payload):
        """
        Hand accepted telemetry to the central (fire and forget).
        """


class IConcentrator(Interface):
    """
    The core of the IoT face.  Every method is fleet-scoped: a caller
    holding fleet A's credentials passes fleet A, and nothing here reaches
    another fleet's devices.
    """

    def request(fleet, deviceId, payload, timeout=None):
        """
        Send a request to an online device and wait for its answer.

        @return: a Deferred firing with the device's answer (a Payload);
            failing with UnknownDevice, DeviceOffline, RequestTimeout (after
            C{timeout} seconds, default C{iot.request_timeout}) or Refused
            (the device answered with an ERROR frame; C{.code} is its code).
        """

    def send(fleet, deviceId, payload, queue=True):
        """
        Send a one-way message.  With C{queue}, it is first stored durably,
        delivered (now or when the device connects) in order, and removed
        only when the device acknowledges it.  Without, it is written to the
        online device at once, or fails with DeviceOffline.

        @return: a Deferred firing with C{(messageId, queued)}, C{queued}
            being True when the device was offline; failing with
            UnknownDevice, DeviceOffline (not queued), QueueFull.
        """

    def devices(fleet):
        """
        @return: a Deferred firing with a list of
            C{{"id": str, "online": bool, "queueDepth": int}}, sorted by id.
        """

    def deviceStatus(fleet, deviceId):
        """
        @return: a Deferred firing with C{{"id": str, "online": bool,
            "queueDepth": int}} (UnknownDevice if it does not exist).
        """

    def queueDepth(fleet, deviceId):
        """
        @return: a Deferred firing with the number of unexpired messages
            queued for the device (UnknownDevice if it does not exist).
        """

    def issueKey(fleet, deviceId):
        """
        Create or replace the device's secret key (registering the device).

        @return: a Deferred firing with the new secret (str); a live session
            of the device under the old key is closed.
        """

    def revokeKey(fleet, deviceId):
        """
        Remove the device's key; its live session is closed.

        @return: a Deferred; UnknownDevice if it had no key.
        """

    def setCentralFallback(fleet, link):
        """
        Use the L{ICentralLink} C{link} for C{fleet} while no central TCP
        session is connected (C{None} removes it).
        """


class IMessageStore(Interface):
    """
    A durable per-device FIFO of messages waiting for acknowledgement, and
    the device keys issued at run time.
    """

    def push(fleet, deviceId, payload, ttl, maxDepth):
        """
        Append a message that expires C{ttl} seconds from now.  When the
        device already has C{maxDepth} messages, expired ones are purged
        first; if it is still full, fail with QueueFull.

        @return: a Deferred firing with the message id (int, increasing).
        """

    def pending(fleet, deviceId, afterId, limit):
        """
        @return: a Deferred firing with up to C{limit} unexpired
            C{(messageId, Payload)} with id > C{afterId}, oldest first.
        """

    def ack(fleet, deviceId, *messageIds):
        """
        Remove messages the device acknowledged, in one transaction.

        @return: a Deferred firing with True if they were all there.
        """

    def depth(fleet, deviceId):
        """
        @return: a Deferred firing with the count of unexpired messages.
        """

    def depths(fleet):
        """
        @return: a Deferred firing with C{{deviceId: depth}} for the fleet.
        """

    def listQueued(fleet, deviceId, limit):
        """
        @return: a Deferred firing with up to C{limit}
            C{(messageId, size, enqueued, expires)} of the device's queue,
            oldest first, expired ones not yet purged included (C{size}
            in payload bytes; C{enqueued} and C{expires} wall-clock
            seconds, C{enqueued} None for a message an older version
            stored).
        """

    def remove(fleet, deviceId, messageIds=None):
        """
        Delete the given messages of the device's queue (C{None}: all of
        them), in one transaction.

        @return: a Deferred firing with the ids that were there and are
            gone, ascending.
        """

    def purgeExpired():
        """
        Delete expired messages.

        @return: a Deferred firing with the C{(fleet, deviceId, messageId)}
            deleted (each by exactly one caller, cluster-wide).
        """

    def keys():
        """
        @return: a Deferred firing with C{[(fleet, deviceId, secret or None)]},
            None meaning revoked.
        """

    def setKey(fleet, deviceId, secret):
        """
        Record C{secret} (None: revoked) for the device.
        """


class ITokenBook(Interface):
    """
    The single-use UDP tokens: issued to a device over its TCP session,
    each spent by at most one datagram.  L{broker.iot.udp.TokenBook} keeps
    them in memory (one node); L{broker.iot.clustertokens.ClusterTokenBook}
    in Redis, so a token is spent once across the cluster.
    """

    ttl = Attribute("Seconds a token stays valid.")
    legacy = Attribute("Whether devices bound to no UDP key get (keyless) tokens.")

    def bindKey(fleet, deviceId, key):
        """
        The device's new session derived UDP key C{key} (None: a legacy
        session, no MAC): its tokens are issued with keys derived from it.
        """

    def unbindKey(fleet, deviceId, key):
        """
        The session that bound C{key} ended.
        """

    def issue(fleet, deviceId, n):
        """
        @return: C{n} new tokens (bytes) of the device, valid at once;
            none for a device bound to no key unless C{legacy}.
        """

    def outstanding(fleet, deviceId):
        """
        @return: how many of the device's tokens issued here are unspent.
        """

    def spend(token, verify, then, *args):
        """
        Spend C{token} if C{verify(tokenKey)} is true for the key it was
        issued with, and call C{then(outcome, fleet, deviceId, *args)},
        now or later (the outcomes of L{broker.iot.udp}; fleet and device
        are None unless it is C{ACCEPTED}; C{BAD_MAC} leaves the token
        unspent).  Never raises.
        """

    def revoke(fleet, deviceId):
        """
        Invalidate every token of the device issued here.
        """

    def purge():
        """
        Drop expired tokens; return how many.
        """


class IDeviceRegistry(Interface):
    """
    Who may connect, with which key, and what they may address.
    """

    def device(fleet, deviceId):
        """
        @return: the L{broker.iot.auth.Entry} of the device, or None.
        """

    def central(fleet):
        """
        @return: the L{broker.iot.auth.Entry} of the fleet's central, or None.
        """

    def fleetDevices(fleet):
        """
        @return: the ids of the fleet's registered devices.
        """


class IPeerSession(Interface):
    """
    An authenticated TCP session as the concentrator sees it.
    """

    fleet = Attribute("The fleet (hub name).")
    peerId = Attribute("The device id, or None for a central.")

    def close(code, reason):
        """
        Send a CLOSE frame and drop the connection.
        """
