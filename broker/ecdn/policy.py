# -*- test-case-name: tests.test_ecdn_policy -*-
"""
Peering policies: which peering group a viewer's private addresses belong
to, and whether the viewer may peer at all.

Google's hosted custom rules are evaluated top to bottom, first match wins,
over every private address the viewer reports (the October 2025 rule); the
on-premises service mirrors that so an organisation can move its rules here
unchanged.  Rules come from a line-oriented file so that a bad line is
reported by number and the previous rules stay in force.
"""

import ipaddress
import itertools
from dataclasses import dataclass

from broker.ecdn.linefile import entries

ALLOW, BLOCK, REDIRECT = "allow", "block", "redirect"

# Reserved by the legacy response format; a group with one of these names
# would be read by the client as "unknown" or "blocked".
SENTINELS = frozenset({"NOT_FOUND", "BLOCKED"})


class RulesError(ValueError):
    """
    A rules file or rule is unusable; C{str(error)} is one line naming the
    file and line.
    """


@dataclass(frozen=True)
class Decision:
    """
    What get-peering-group answers.

    @ivar outcome: C{"allowed"}, C{"blocked"}, C{"unmatched"} (end the
        session) or C{"redirect"}.
    @ivar group: the peering group id (or the redirect URL).
    """
    outcome: str
    group: str


@dataclass(frozen=True)
class Rule:
    first: int
    last: int
    version: int
    action: str
    target: str
    line: int

    def contains(self, address):
        return address.version == self.version and self.first <= int(address) <= self.last


def parseAddress(fmt, text):
    """
    One C{availableIPs} entry: C{fmt} is C{"ipv4"} or C{"ipv6"} and must
    match the address's family.

    @raise ValueError: with a message fit for the caller (it never echoes
        the address: private addresses are what this API protects).
    """
    if fmt not in ("ipv4", "ipv6"):
        raise ValueError('format must be "ipv4" or "ipv6"')
    if not isinstance(text, str):
        raise ValueError("address must be a string")
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"an address is not a valid {fmt} address")
    if address.version != (4 if fmt == "ipv4" else 6):
        raise ValueError(f"an address does not match its format {fmt}")
    return address


def _parseRange(text):
    """
    C{a.b.c.d/n}, C{start-end} or a single address → (first, last, version).
    """
    if "-" in text:
        start, end = (ipaddress.ip_address(p.strip()) for p in text.split("-", 1))
        if start.version != end.version:
            raise ValueError("the range mixes IPv4 and IPv6")
        if int(end) < int(start):
            raise ValueError("the range ends before it starts")
        return int(start), int(end), start.version
    network = ipaddress.ip_network(text, strict=True)
    return int(network.network_address), int(network.broadcast_address), network.version


def parseRules(text, source="<rules>"):
    """
    Parse a rules file: one rule a line, C{RANGE ACTION TARGET}, where RANGE
    is a CIDR block, a C{start-end} range or one address, ACTION is
    C{allow}, C{block} or C{redirect}, TARGET a group id (allow, block) or an
    C{https://} URL (redirect).  C{#} starts a comment.

    @return: (rules, warnings): warnings name rules that overlap an earlier
        one (list order decides; overlap is legal but often a mistake).
    @raise RulesError: naming C{source:line}.
    """
    rules = []
    for number, where, parts in entries(text, source):
        if len(parts) != 3:
            raise RulesError(f"{where}: expected RANGE ACTION TARGET, got {len(parts)} fields")
        rangeText, action, target = parts
        try:
            first, last, version = _parseRange(rangeText)
        except ValueError as e:
            raise RulesError(f"{where}: bad range {rangeText!r}: {e}")
        if action not in (ALLOW, BLOCK, REDIRECT):
            raise RulesError(f"{where}: action must be allow, block or redirect, got {action!r}")
        if action == REDIRECT:
            if not target.startswith(("https://", "http://")):
                raise RulesError(f"{where}: a redirect target must be an http(s) URL")
        elif target in SENTINELS:
            raise RulesError(f"{where}: {target} is reserved by the legacy response format")
        rules.append(Rule(first, last, version, action, target, number))
    warnings = []
    for a, b in itertools.combinations(rules, 2):
        if a.version == b.version and a.first <= b.last and b.first <= a.last:
            warnings.append(f"{source}:{b.line} overlaps line {a.line}; line {a.line} wins "
                            f"where both match")
    return rules, warnings


class Policy:
    """
    Maps a viewer's addresses to a L{Decision}.

    @param kind: C{"rules"}, C{"subnet"} or C{"random"}.
    @param fallback: for unmatched viewers: C{"block"}, C{"allow"} (in
        C{fallbackGroup}) or C{"end"}.
    """

    def __init__(self, kind, rules=(), prefixV4=24, prefixV6=64, groupSize=50,
                 fallback="block", fallbackGroup="unmatched"):
        if fallbackGroup in SENTINELS:
            raise RulesError(f"the fallback group {fallbackGroup} is reserved")
        self.kind = kind
        self.rules = tuple(rules)
        self.prefixV4 = prefixV4
        self.prefixV6 = prefixV6
        self.groupSize = groupSize
        self.fallback = fallback
        self.fallbackGroup = fallbackGroup
        self._assigned = itertools.count()

    def decide(self, addresses):
        if self.kind == "rules":
            # First rule in list order matching any address wins.
            for rule in self.rules:
                if any(rule.contains(a) for a in addresses):
                    outcome = {ALLOW: "allowed", BLOCK: "blocked", REDIRECT: "redirect"}
                    return Decision(outcome[rule.action], rule.target)
        elif self.kind == "subnet":
            for address in addresses:
                if not address.is_private:
                    continue
                prefix = self.prefixV4 if address.version == 4 else self.prefixV6
                network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
                return Decision("allowed", f"subnet-{network.network_address}-{prefix}")
        elif self.kind == "random" and addresses:
            # Testing only (Google's "Random"): consecutive viewers fill
            # groups of groupSize.
            return Decision("allowed", f"random-{next(self._assigned) // self.groupSize}")
        return self.fallbackDecision()

    def fallbackDecision(self):
        if self.fallback == "allow":
            return Decision("allowed", self.fallbackGroup)
        if self.fallback == "block":
            return Decision("blocked", self.fallbackGroup)
        return Decision("unmatched", "")
