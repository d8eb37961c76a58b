# -*- test-case-name: tests.test_mqtt_auth -*-
"""
Topic ACLs in Mosquitto's C{acl_file} format, so an operator reuses the
files a Mosquitto deployment already has.

    # comment
    topic read public/#            <- before any "user" line: anonymous clients
    user alice
    topic readwrite alice/#        <- alice's own entries
    topic deny alice/secret
    pattern write devices/%c/up    <- every client; %c client id, %u user name

An access is C{read}, C{write}, C{readwrite} (the default when omitted) or
C{deny}.  Decisions, for the client's own entries plus the patterns:

  - a PUBLISH to topic T is allowed when no C{deny} entry matches T and a
    C{write}/C{readwrite} entry matches T;
  - a SUBSCRIBE to filter F is allowed when no C{deny} entry overlaps F
    (could match a topic F matches) and one C{read}/C{readwrite} entry
    covers F (matches every topic F matches).

Mosquitto checks C{read} on each message as it is delivered and lets every
SUBSCRIBE through; the broker decides at SUBSCRIBE instead (a refused
filter gets 0x87 / 0x80), so a filter wider than what the user may read is
refused whole rather than silently thinned.

As in Mosquitto, a topic starting with C{$} is only reached by an entry
starting with C{$}, and patterns are not applied to a client whose client
id or user name holds C{+}, C{#} or C{/} (it could otherwise widen its own
entries).  An unknown keyword or access, or an invalid filter, is an error
naming the line (Mosquitto skips unknown lines; a typo here must not drop a
rule silently).
"""

import os

from broker.files import readOperatorFile
from broker.mqtt import topicsets

READ = 1
WRITE = 2
DENY = 0
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}
_DANGEROUS = frozenset("+#/")


class AclFileError(ValueError):
    """The ACL file cannot be read, or a line is malformed (the message names it)."""


class AclEntries:
    """
    One client's compiled entries: filters by access.
    """

    __slots__ = ("deny", "read", "write")

    def __init__(self):
        self.deny = []
        self.read = []
        self.write = []

    def add(self, access, topicFilter):
        if access == DENY:
            self.deny.append(topicFilter)
        if access & READ:
            self.read.append(topicFilter)
        if access & WRITE:
            self.write.append(topicFilter)

    def mayPublish(self, topic):
        if any(topicsets.matches(f, topic) for f in self.deny):
            return False
        return any(topicsets.matches(f, topic) for f in self.write)

    def maySubscribe(self, topicFilter):
        if any(topicsets.overlaps(f, topicFilter) for f in self.deny):
            return False
        return any(topicsets.covers(f, topicFilter) for f in self.read)


class AclTable:
    """
    A parsed ACL file.

    @ivar anonymous: C{[(access, filter)]} for clients without a user name.
    @ivar users: C{{user: [(access, filter)]}}.
    @ivar patterns: C{[(access, template)]} for every client.
    """

    def __init__(self, anonymous=(), users=None, patterns=()):
        self.anonymous = list(anonymous)
        self.users = users or {}
        self.patterns = list(patterns)

    def entriesFor(self, username, clientId):
        """
        The L{AclEntries} of a client: its user's (or the anonymous ones)
        and the patterns with C{%c} and C{%u} substituted.
        """
        out = AclEntries()
        own = self.anonymous if username is None else self.users.get(username, ())
        for access, f in own:
            out.add(access, f)
        if _DANGEROUS.intersection(clientId or "") or _DANGEROUS.intersection(username or ""):
            return out
        for access, template in self.patterns:
            if "%u" in template and username is None:
                continue
            if "%c" in template and not clientId:
                continue
            f = template.replace("%c", clientId or "")
            if username is not None:
                f = f.replace("%u", username)
            out.add(access, f)
        return out


def parseAclFile(data, source="ACL file"):
    """
    An L{AclTable} from the bytes of an ACL file.

    @raise AclFileError: naming the line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AclFileError(f"{source}: not UTF-8")
    anonymous, users, patterns = [], {}, []
    current = anonymous
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        where = f"{source} line {number}"
        if keyword == "user":
            if not rest:
                raise AclFileError(f"{where}: user needs a name")
            current = users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            raise AclFileError(f"{where}: unknown keyword {keyword!r} "
                               "(expected user, topic or pattern)")
        first, _, after = rest.partition(" ")
        after = after.strip()
        if first in _ACCESS and after:
            access, topicFilter = _ACCESS[first], after
        elif first and not after:
            access, topicFilter = READ | WRITE, first
        else:
            raise AclFileError(f"{where}: expected {keyword} [read|write|readwrite|deny] "
                               "<filter>")
        if not topicsets.validTopicFilter(topicFilter):
            raise AclFileError(f"{where}: {topicFilter!r} is not a valid topic filter")
        if keyword == "topic":
            current.append((access, topicFilter))
        else:
            patterns.append((access, topicFilter))
    return AclTable(anonymous, users, patterns)


def readAclFile(path):
    """
    L{parseAclFile} of the file at C{path}.

    @raise AclFileError: unreadable or malformed.
    """
    return parseAclFile(readOperatorFile(path, AclFileError, "ACL file"), os.fspath(path))
