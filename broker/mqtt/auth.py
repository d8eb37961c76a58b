# -*- test-case-name: tests.test_mqtt_auth -*-
"""
Who an MQTT client is and which topics it may touch: the password file
(L{broker.mqtt.passwords}), Web PubSub access tokens, and topic ACLs
(L{broker.mqtt.acl}), behind the face's L{IMqttAuth}.

A CONNECT is decided in this order:

  1. a password (or, with no password, a user name) shaped like a JWT,
     when the hub has access keys: a Web PubSub client access token, as
     C{:generateToken?clientType=MQTT} or the service SDK's
     C{get_client_access_token(client_protocol="MQTT")} make it.  Its
     C{sub} is the user, its C{role} claims decide the topics: a topic is
     a group, so C{webpubsub.sendToGroup.<topic>} allows PUBLISH to it and
     C{webpubsub.joinLeaveGroup.<topic>} a SUBSCRIBE to exactly it; a
     filter with wildcards needs C{webpubsub.joinLeaveGroup} (every group).
     Over WebSocket the face may also take the token from the URL
     (C{/clients/mqtt/hubs/<hub>?access_token=}) or the C{Authorization}
     header, as Azure does, and call L{MqttAuth.authenticateToken};
  2. a user name with the password file configured: the password checked
     against it (C{mosquitto_passwd} hashes); the ACL file, when there is
     one, decides the topics, otherwise every topic is allowed;
  3. neither: anonymous, when C{allowAnonymous}; the ACL file's entries
     before any C{user} line apply.

Bad credentials are refused with 0x86 (3.1.1: 4), an anonymous client
when anonymous access is off with 0x87 (3.1.1: 5), and a CONNECT arriving
while too many password checks wait with 0x89 (server busy).

C{reload()} (the face's C{SIGHUP} hook) reads both files again; a file
that no longer reads or parses keeps the previous table, logged once per
reload.  The new ACL applies at once to connected clients' next PUBLISH
and SUBSCRIBE.
"""

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from broker.auth.tokens import CLIENT_PATH, MQTT_PATH, TokenError, verifyClientToken
from broker.core.permissions import JOIN_LEAVE_GROUP, SEND_TO_GROUP, Permissions
from broker.mqtt import acl as aclmodule
from broker.mqtt import passwords
from broker.mqtt import topicsets
from broker.mqtt.interfaces import (
    BAD_USER_NAME_OR_PASSWORD, NOT_AUTHORIZED, IMqttAcl, IMqttAuth, IMqttAuthenticator,
    MqttAuthError, MqttIdentity)

log = Logger()

SERVER_BUSY = 0x89
# The audiences an MQTT client's token may name: the MQTT endpoint, and
# the Web PubSub one (a Default token grants the same hub, same roles).
TOKEN_PATHS = (MQTT_PATH, CLIENT_PATH)


def looksLikeJWT(value):
    """
    Whether C{value} (str) has a JWT's shape: three base64url parts, a JSON
    header (C{eyJ} is C{{"} in base64).  Cheap: decides which check runs,
    not whether the token is good.
    """
    return value.startswith("eyJ") and value.count(".") == 2 and len(value) < 16384


class TokenGrant:
    """
    A token client's topic rights: its roles as core L{Permissions}.
    """

    __slots__ = ("permissions",)

    def __init__(self, roles):
        self.permissions = Permissions.fromRoles(roles)

    def mayPublish(self, topic):
        return self.permissions.has(SEND_TO_GROUP, topic)

    def maySubscribe(self, topicFilter):
        if self.permissions.has(JOIN_LEAVE_GROUP):
            return True
        if not topicsets.validTopicName(topicFilter):
            return False
        return self.permissions.has(JOIN_LEAVE_GROUP, topicFilter)


class AclSubject:
    """
    A password or anonymous client under the ACL file: its user name and
    client id, and its entries compiled from the table of one generation
    (compiled again after a reload).
    """

    __slots__ = ("username", "clientId", "_generation", "_entries")

    def __init__(self, username, clientId):
        self.username = username
        self.clientId = clientId
        self._generation = -1
        self._entries = None

    def entries(self, table, generation):
        if self._generation != generation:
            self._entries = table.entriesFor(self.username, self.clientId)
            self._generation = generation
        return self._entries


@implementer(IMqttAuth, IMqttAuthenticator, IMqttAcl)
class MqttAuth:
    """
    The face's authenticator and ACL.

    @param tokenKeys: C{keys(hub)} -> the hub's access keys (the Web PubSub
        hub's C{access_keys}); empty or C{None}: no tokens for that hub.
    @param origins: accepted token audience origins (empty: any).
    @param checker: options for L{passwords.PasswordChecker} (maxConcurrent,
        maxQueued, cacheSeconds, threadpool).
    """

    reloadable = True

    def __init__(self, reactor, passwordFile=None, aclFile=None, tokenKeys=None,
                 allowAnonymous=False, origins=(), clock=None, **checker):
        self._reactor = reactor
        self.passwordFile = passwordFile
        self.aclFile = aclFile
        self._tokenKeys = tokenKeys
        self.allowAnonymous = allowAnonymous
        self.origins = tuple(origins)
        self._clock = clock
        self.checker = passwords.PasswordChecker(reactor, **checker)
        self.acl = None
        self._generation = 0
        self.stats = {"accepted": 0, "refused": 0, "tokens": 0, "reloadFailures": 0}

    # -- files ------------------------------------------------------------

    def load(self):
        """
        Read the files at start-up.

        @raise passwords.PasswordFileError, aclmodule.AclFileError: the
            broker does not start with a file it cannot use.
        """
        if self.passwordFile is not None:
            self.checker.replace(passwords.readPasswordFile(self.passwordFile))
        if self.aclFile is not None:
            self._setAcl(aclmodule.readAclFile(self.aclFile))
        return self

    def reload(self):
        """
        C{SIGHUP}: read both files again (and the hubs' token keys, when
        they can be).  Each that fails keeps its previous table; the
        failure is logged once (this call).
        """
        refresh = getattr(self._tokenKeys, "reload", None)
        if refresh is not None:
            refresh()
        if self.passwordFile is not None:
            try:
                table = passwords.readPasswordFile(self.passwordFile)
            except passwords.PasswordFileError as e:
                self.stats["reloadFailures"] += 1
                log.error("MQTT password file not reloaded, previous users kept: {why}", why=e)
            else:
                self.checker.replace(table)
                log.info("MQTT password file reloaded: {n} users", n=len(table))
        if self.aclFile is not None:
            try:
                table = aclmodule.readAclFile(self.aclFile)
            except aclmodule.AclFileError as e:
                self.stats["reloadFailures"] += 1
                log.error("MQTT ACL file not reloaded, previous rules kept: {why}", why=e)
            else:
                self._setAcl(table)
                log.info("MQTT ACL file reloaded")

    def _setAcl(self, table):
        self.acl = table
        self._generation += 1

    # -- IMqttAuthenticator -------------------------------------------------

    def authenticate(self, clientId, username, password, hub):
        text = None
        if password is not None:
            try:
                text = password.decode("utf-8")
            except UnicodeDecodeError:
                text = None
        token = None
        if text is not None and looksLikeJWT(text):
            token = text
        elif password is None and username and looksLikeJWT(username):
            token = username
        if token is not None and self._keys(hub):
            return self.authenticateToken(token, hub)
        if username is not None and self.passwordFile is not None:
            return self._password(clientId, username, password or b"")
        if username is None and password is None or self.passwordFile is None:
            if not self.allowAnonymous:
                return self._refuse(NOT_AUTHORIZED, "anonymous access is off")
            self.stats["accepted"] += 1
            return defer.succeed(MqttIdentity(userId=username or None,
                                              acl=self._subject(username, clientId)))
        return self._refuse(BAD_USER_NAME_OR_PASSWORD, "a password without a user name")

    def authenticateToken(self, token, hub):
        """
        A client access token's identity (the WebSocket URL's
        C{access_token} or C{Authorization: Bearer}, or CONNECT's password).

        @return: a Deferred firing an L{MqttIdentity} or failing with
            L{MqttAuthError} 0x86.
        """
        now = self._clock.seconds() if self._clock is not None else None
        try:
            claims = verifyClientToken(token, self._keys(hub), hub, self.origins, now=now,
                                       paths=TOKEN_PATHS)
        except TokenError as e:
            return self._refuse(BAD_USER_NAME_OR_PASSWORD, f"token refused: {e}")
        self.stats["tokens"] += 1
        self.stats["accepted"] += 1
        return defer.succeed(MqttIdentity(userId=claims.userId, roles=claims.roles,
                                          acl=TokenGrant(claims.roles)))

    def _keys(self, hub):
        if self._tokenKeys is None:
            return ()
        return tuple(self._tokenKeys(hub) or ())

    def _password(self, clientId, username, password):
        def checked(ok):
            if not ok:
                return self._refuse(BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
            self.stats["accepted"] += 1
            return MqttIdentity(userId=username, acl=self._subject(username, clientId))

        def busy(f):
            f.trap(passwords.PasswordCheckBusy)
            return self._refuse(SERVER_BUSY, "too many password checks waiting")

        return self.checker.check(username, password).addCallbacks(checked, busy)

    def _subject(self, username, clientId):
        if self.aclFile is None:
            return None
        return AclSubject(username, clientId)

    def _refuse(self, code, why):
        self.stats["refused"] += 1
        return defer.fail(MqttAuthError(code, why))

    # -- IMqttAcl -----------------------------------------------------------

    def mayPublish(self, identity, topic):
        grant = identity.acl
        if grant is None:
            return True
        if isinstance(grant, AclSubject):
            return grant.entries(self.acl, self._generation).mayPublish(topic)
        return grant.mayPublish(topic)

    def maySubscribe(self, identity, topicFilter):
        grant = identity.acl
        if grant is None:
            return True
        if isinstance(grant, AclSubject):
            return grant.entries(self.acl, self._generation).maySubscribe(topicFilter)
        return grant.maySubscribe(topicFilter)


def fromSettings(reactor, section, tokenKeys=None, resolve=None):
    """
    An L{MqttAuth} from the C{[mqtt]} section's keys C{password_file},
    C{acl_file}, C{allow_anonymous} and C{token_origins}, its files read (a
    bad file raises, so the broker does not start with it).

    Without C{allow_anonymous} (absent or C{None}), anonymous clients are
    allowed exactly when there is no password file, as in Mosquitto; token
    clients are taken either way when C{tokenKeys} gives the hub keys, so a
    broker that must take tokens only sets C{allow_anonymous = false}.

    @param resolve: C{resolve(path)} -> the path to open (relative paths
        against the configuration's directory), or C{None} for as given.
    """
    def path(key):
        value = section.get(key)
        if not value:
            return None
        return resolve(value) if resolve is not None else value

    passwordFile, aclFile = path("password_file"), path("acl_file")
    anonymous = section.get("allow_anonymous")
    if anonymous is None:
        anonymous = passwordFile is None
    auth = MqttAuth(reactor, passwordFile=passwordFile, aclFile=aclFile, tokenKeys=tokenKeys,
                    allowAnonymous=anonymous, origins=section.get("token_origins") or ())
    return auth.load()


class HubKeys:
    """
    C{keys(hub)}: the access keys that sign a hub's client tokens, from the
    C{[webpubsub]} section (the hub's C{access_keys}, else the section's,
    else the development key in C{state_dir}), as the Web PubSub face and
    the REST API's C{:generateToken} use them; read again on C{reload()}.
    """

    def __init__(self, context):
        self._context = context
        self._settings = self._load(context.settings)

    def _load(self, settings):
        from broker.webpubsub.face import developmentKey
        from broker.webpubsub.site import faceSettings

        wps = settings["webpubsub"]
        defaultKeys = list(wps["access_keys"])
        if not defaultKeys:
            defaultKeys = [developmentKey(self._context.stateDir)[0]]
        return faceSettings(wps, defaultKeys)

    def __call__(self, hub):
        return self._settings.hub(hub).accessKeys

    @property
    def audiences(self):
        return self._settings.audiences

    def reload(self):
        from broker.config import ConfigError

        try:
            self._settings = self._load(self._context.loadSettings())
        except (ConfigError, OSError) as e:
            log.error("MQTT token keys not reloaded, previous keys kept: {why}", why=e)


def build(context, cfg):
    """
    The face's L{IMqttAuth} (L{broker.mqtt.face.buildAuth}): L{fromSettings}
    of the C{[mqtt]} table, tokens checked with the Web PubSub hubs' keys
    (L{HubKeys}), their audience origins C{[webpubsub] audiences} unless
    C{token_origins} is set.

    @raise broker.config.ConfigError: a password or ACL file the broker
        cannot use, naming the key.
    """
    from broker.config import ConfigError

    keys = HubKeys(context)
    if not cfg.get("token_origins") and keys.audiences:
        cfg = dict(cfg, token_origins=list(keys.audiences))
    try:
        return fromSettings(context.reactor, cfg, tokenKeys=keys)
    except passwords.PasswordFileError as e:
        raise ConfigError("mqtt.password_file", str(e))
    except aclmodule.AclFileError as e:
        raise ConfigError("mqtt.acl_file", str(e))
