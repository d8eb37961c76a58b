# -*- test-case-name: tests.test_webpubsub_reload -*-
"""
The settings the Web PubSub face reads at each handshake and REST call,
resolved from the C{[webpubsub]} configuration (L{broker.webpubsub.site})
and replaced whole on reload (L{broker.webpubsub.reload}).
"""


class HubSettings:
    """
    The per-hub part of the configuration, resolved against the face-wide
    defaults.
    """

    def __init__(self, accessKeys=(), allowAnonymous=False, plainMode="sendEvent",
                 plainGroup="", anonymousRoles=()):
        self.accessKeys = tuple(accessKeys)
        self.allowAnonymous = allowAnonymous
        self.plainMode = plainMode
        self.plainGroup = plainGroup
        self.anonymousRoles = tuple(anonymousRoles)

    def __eq__(self, other):
        if not isinstance(other, HubSettings):
            return NotImplemented
        return vars(self) == vars(other)


class FaceSettings:
    """
    What the face reads at each handshake and REST call, as one object: the
    hubs' settings, the default for any other hub, and the accepted token
    audiences.  A reload (L{broker.webpubsub.reload}) builds a new one and
    swaps it in whole, so a handshake never sees half of the old settings
    and half of the new; a connection keeps what it was admitted with.
    """

    def __init__(self, hubs, default, audiences=()):
        self.hubs = dict(hubs)
        self.default = default
        self.audiences = tuple(audiences)

    def hub(self, hubName):
        return self.hubs.get(hubName, self.default)
