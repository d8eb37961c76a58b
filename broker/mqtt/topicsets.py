# -*- test-case-name: tests.test_mqtt_auth -*-
"""
Topic filters as sets of topic names, for the ACLs (MQTT 3.1.1 and 5.0
section 4.7): validation, matching a name against a filter, and the two
relations between filters an ACL needs.  (The face's own topic handling,
its subscription trie, is L{broker.mqtt.topics}; L{matches} here follows
the same rules, and the relations below are tested against L{matches} by
brute force.)

A subscription is checked once, when it is made, against the ACL's filters,
so the ACL must answer questions about whole sets of topics:

  - L{covers}: every topic the inner filter matches is matched by the outer
    one (an ACL entry C{a/#} allows a subscription to C{a/+/c});
  - L{overlaps}: some topic is matched by both (a C{deny} entry
    C{a/secret} refuses a subscription to C{a/+}).

Levels are compared as strings; a filter is split once per call (filters
are short and these run on SUBSCRIBE and on an ACL's first PUBLISH check of
a topic, never per delivered message).
"""

SEPARATOR = "/"
SINGLE = "+"
MULTI = "#"


def validTopicName(name):
    """
    Whether C{name} may be published to: non-empty, no wildcard character,
    no U+0000 (4.7.3).
    """
    return bool(name) and "+" not in name and "#" not in name and "\x00" not in name


def validTopicFilter(topicFilter):
    """
    Whether C{topicFilter} may be subscribed to: non-empty, no U+0000, C{+}
    only as a whole level, C{#} only as the whole last level (4.7.1).
    """
    if not topicFilter or "\x00" in topicFilter:
        return False
    levels = topicFilter.split(SEPARATOR)
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if MULTI in level and (level != MULTI or i != last):
            return False
        if SINGLE in level and level != SINGLE:
            return False
    return True


def matches(topicFilter, topic):
    """
    Whether the topic name C{topic} matches C{topicFilter}.

    A filter starting with a wildcard does not match a topic starting with
    C{$} (4.7.2): C{#} does not match C{$SYS/uptime}.
    """
    if topic.startswith("$") and topicFilter[:1] in (SINGLE, MULTI):
        return False
    f = topicFilter.split(SEPARATOR)
    t = topic.split(SEPARATOR)
    for i, level in enumerate(f):
        if level == MULTI:
            # "a/#" matches "a" too: the parent level (4.7.1.2).
            return True
        if i >= len(t):
            return False
        if level != SINGLE and level != t[i]:
            return False
    return len(f) == len(t)


def covers(outer, inner):
    """
    Whether every topic name matched by the filter C{inner} is matched by
    the filter C{outer}.  A topic name is a filter without wildcards, so
    C{covers(f, name) == matches(f, name)}.
    """
    if inner[:1] not in (SINGLE, MULTI) and inner.startswith("$"):
        # inner's topics start with "$": a wildcard first level of outer
        # matches none of them.
        if outer[:1] in (SINGLE, MULTI):
            return False
    o = outer.split(SEPARATOR)
    n = inner.split(SEPARATOR)
    for i, level in enumerate(o):
        if level == MULTI:
            return i <= len(n)
        if i >= len(n):
            return False
        sub = n[i]
        if sub == MULTI:
            # inner matches every deeper topic and, below the first level,
            # this parent too: outer, with no "#" here, covers all of them
            # only as "+/#" at the first level (no parent to miss).
            return i == 0 and o[i:] == [SINGLE, MULTI]
        if level == SINGLE:
            continue
        if sub == SINGLE or sub != level:
            return False
    if len(n) == len(o):
        return True
    # inner is longer: only its "#" standing for "the parent itself" could
    # still fit, and then it also matches deeper topics outer does not.
    return False


def overlaps(a, b):
    """
    Whether some topic name is matched by both filters C{a} and C{b}.
    """
    aWild, bWild = a[:1] in (SINGLE, MULTI), b[:1] in (SINGLE, MULTI)
    if aWild != bWild:
        literal = b if aWild else a
        if literal.startswith("$"):
            return False
    x = a.split(SEPARATOR)
    y = b.split(SEPARATOR)
    for i in range(min(len(x), len(y))):
        p, q = x[i], y[i]
        if p == MULTI or q == MULTI:
            return True
        if p == SINGLE or q == SINGLE or p == q:
            continue
        return False
    if len(x) == len(y):
        return True
    longer = x if len(x) > len(y) else y
    # "a/#" matches "a": the shorter one's topic is the longer's parent.
    return len(longer) == min(len(x), len(y)) + 1 and longer[-1] == MULTI
