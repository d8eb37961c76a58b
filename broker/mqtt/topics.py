# -*- test-case-name: tests.test_mqtt_codec -*-
"""
Topic names, topic filters and the per-hub trie of wildcard and shared
subscriptions (MQTT 5.0 section 4.7 and 4.8.2).

Exact-topic subscriptions are core group memberships (the group is the
topic); only what a group lookup cannot answer, filters holding C{+} or
C{#} and C{$share/{group}/{filter}} subscriptions, lives in a
L{SubscriptionTrie}, which the hub asks for extra receivers of every group
send (L{broker.core.hub.Hub.addGroupResolver}).
"""

SHARE_PREFIX = "$share/"


class TopicError(ValueError):
    """An invalid topic name or filter."""


def checkTopicName(topic, maxLength=65535):
    """
    A topic name a client publishes to: non-empty, no wildcards
    (MQTT-3.3.2-2, MQTT-4.7.3-1).
    """
    if not topic:
        raise TopicError("empty topic name")
    if "+" in topic or "#" in topic:
        raise TopicError("wildcard in a topic name")
    if len(topic) > maxLength:
        raise TopicError("topic name too long")
    return topic


def checkFilter(topicFilter):
    """
    A filter: non-empty, C{#} only as the whole last level, C{+} only as a
    whole level (MQTT-4.7.1-1, MQTT-4.7.1-2, MQTT-4.7.3-1).

    @return: whether it holds a wildcard.
    """
    if not topicFilter:
        raise TopicError("empty topic filter")
    wild = False
    levels = topicFilter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "#":
            if i != last:
                raise TopicError("'#' not last")
            wild = True
        elif level == "+":
            wild = True
        elif "#" in level or "+" in level:
            raise TopicError("wildcard inside a level")
    return wild


def parseShared(topicFilter):
    """
    C{(shareName, filter)} for a C{$share/{name}/{filter}} subscription,
    C{(None, topicFilter)} otherwise.

    @raise TopicError: a malformed shared subscription (MQTT-4.8.2-1/2).
    """
    if not topicFilter.startswith(SHARE_PREFIX):
        return None, topicFilter
    rest = topicFilter[len(SHARE_PREFIX):]
    name, sep, f = rest.partition("/")
    if not sep or not name or not f or "+" in name or "#" in name:
        raise TopicError("malformed shared subscription")
    return name, f


def matches(topicFilter, topic):
    """
    Whether C{topic} matches C{topicFilter}; a C{$} topic is not matched by
    a filter starting with a wildcard (MQTT-4.7.2-1).
    """
    if topicFilter == topic:
        return True
    if topic.startswith("$") and topicFilter[:1] in ("+", "#"):
        return False
    f = topicFilter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


class _Node:
    __slots__ = ("children", "members")

    def __init__(self):
        self.children = {}
        # key -> value: a session's connectionId -> session, or a share
        # name -> SharedGroup.
        self.members = {}


class SharedGroup:
    """The members of one C{$share/{name}/{filter}}: one gets each message."""

    __slots__ = ("key", "sessions", "_next")

    def __init__(self, share, topicFilter):
        self.key = (share, topicFilter)
        self.sessions = {}      # connectionId -> session
        self._next = 0

    def pick(self):
        """The next member, round robin; a member offline is skipped if
        an online one exists (5.0 section 4.8.2)."""
        members = list(self.sessions.values())
        n = len(members)
        for k in range(n):
            s = members[(self._next + k) % n]
            if s.online:
                self._next = (self._next + k + 1) % n
                return s
        if not n:
            return None
        s = members[self._next % n]
        self._next = (self._next + 1) % n
        return s


class SharedPick:
    """
    A session as the receiver of one message some of its shared
    subscriptions were chosen for: its other shared subscriptions (those
    whose group chose another member) take no part in the delivery
    (MQTT-4.8.2-3, MQTT-3.8.4-8, MQTT-3.3.4-4).
    """

    __slots__ = ("session", "shares", "connectionId")

    def __init__(self, session):
        self.session = session
        self.shares = []        # (share name, filter) of the groups that chose it
        self.connectionId = session.connectionId

    def deliver(self, delivery):
        self.session.deliver(delivery, self.shares)

    def close(self, code, reason):
        self.session.close(code, reason)


class SubscriptionTrie:
    """
    Wildcard and shared subscriptions of one hub, by topic level.
    """

    def __init__(self):
        self._root = _Node()
        self.count = 0

    def _node(self, topicFilter, create):
        node = self._root
        path = [node]
        for level in topicFilter.split("/"):
            child = node.children.get(level)
            if child is None:
                if not create:
                    return None, path
                child = node.children[level] = _Node()
            node = child
            path.append(node)
        return node, path

    def add(self, topicFilter, session, share=None):
        node, _ = self._node(topicFilter, True)
        if share is None:
            if session.connectionId not in node.members:
                self.count += 1
            node.members[session.connectionId] = session
            return
        group = node.members.get(("share", share))
        if group is None:
            group = node.members[("share", share)] = SharedGroup(share, topicFilter)
        if session.connectionId not in group.sessions:
            self.count += 1
        group.sessions[session.connectionId] = session

    def remove(self, topicFilter, session, share=None):
        node, path = self._node(topicFilter, False)
        if node is None:
            return
        if share is None:
            if node.members.pop(session.connectionId, None) is not None:
                self.count -= 1
        else:
            group = node.members.get(("share", share))
            if group is not None and group.sessions.pop(session.connectionId, None) is not None:
                self.count -= 1
                if not group.sessions:
                    del node.members[("share", share)]
        # Prune empty branches.
        levels = topicFilter.split("/")
        for i in range(len(levels), 0, -1):
            n = path[i]
            if n.members or n.children:
                break
            del path[i - 1].children[levels[i - 1]]

    def hasShared(self, topicFilter, share):
        """Whether the shared group C{$share/share/topicFilter} has members."""
        node, _ = self._node(topicFilter, False)
        return node is not None and ("share", share) in node.members

    def match(self, topic, accept=None):
        """
        The sessions whose filters match C{topic}: every plain subscriber
        once, and one member of each matching shared group, as a
        L{SharedPick} naming the groups that chose it.

        @param accept: C{accept(topic, (share, filter))} says whether this
            node delivers to that shared group (cluster mode: another
            node's member may be the one); C{None}: always.
        """
        found = {}
        shared = []
        levels = topic.split("/")
        dollar = topic.startswith("$")
        self._walk(self._root, levels, 0, found, shared, dollar)
        for group in shared:
            if accept is not None and not accept(topic, group.key):
                continue
            s = group.pick()
            if s is not None:
                pick = found.get(s.connectionId)
                if type(pick) is not SharedPick:
                    pick = found[s.connectionId] = SharedPick(s)
                pick.shares.append(group.key)
        return found

    def _walk(self, node, levels, i, found, shared, dollar):
        children = node.children
        if not children:
            return
        first = i == 0 and dollar
        hashNode = None if first else children.get("#")
        if hashNode is not None:
            self._collect(hashNode, found, shared)
        if i == len(levels):
            return
        plus = None if first else children.get("+")
        if plus is not None:
            if i + 1 == len(levels):
                self._collect(plus, found, shared)
            self._walk(plus, levels, i + 1, found, shared, dollar)
        exact = children.get(levels[i])
        if exact is not None:
            if i + 1 == len(levels):
                self._collect(exact, found, shared)
            self._walk(exact, levels, i + 1, found, shared, dollar)

    @staticmethod
    def _collect(node, found, shared):
        for key, member in node.members.items():
            if type(key) is tuple:
                shared.append(member)
            else:
                found[key] = member
