# -*- test-case-name: tests.test_ecdn_policy -*-
"""
Tests for L{broker.ecdn.policy}: rules files and peering decisions.
"""

import ipaddress

from twisted.trial.unittest import TestCase

from broker.ecdn.policy import Decision, Policy, RulesError, parseAddress, parseRules

RULES = """\
# the announcement's example: specific first
10.0.0.0-10.0.0.255    allow   floor1
10.0.0.0-15.0.0.0      block   wide
fd00:1::/48            allow   v6site
192.168.7.0/24         redirect https://ecdn2.example:8443
"""


def ips(*texts):
    return [ipaddress.ip_address(t) for t in texts]


class RulesFileTests(TestCase):
    def test_parse(self):
        rules, warnings = parseRules(RULES, "rules.txt")
        self.assertEqual([(r.action, r.target, r.line) for r in rules],
                         [("allow", "floor1", 2), ("block", "wide", 3),
                          ("allow", "v6site", 4), ("redirect", "https://ecdn2.example:8443", 5)])
        # Overlap is legal (order decides) but reported.
        self.assertEqual(warnings, ["rules.txt:3 overlaps line 2; line 2 wins where both match"])

    def assertBadLine(self, text, line, problem):
        e = self.assertRaises(RulesError, parseRules, text, "r.txt")
        self.assertIn(f"r.txt:{line}:", str(e))
        self.assertIn(problem, str(e))

    def test_badLines(self):
        self.assertBadLine("10.0.0.0/8 allow a\n10.0.0.0/33 allow b\n", 2, "bad range")
        self.assertBadLine("10.0.0.1/8 allow a\n", 1, "host bits")
        self.assertBadLine("10.0.0.9-10.0.0.1 allow a\n", 1, "ends before")
        self.assertBadLine("10.0.0.1-fd00::1 allow a\n", 1, "mixes")
        self.assertBadLine("\n\n10.0.0.0/8 permit a\n", 3, "action")
        self.assertBadLine("10.0.0.0/8 allow\n", 1, "RANGE ACTION TARGET")
        self.assertBadLine("10.0.0.0/8 redirect ftp://x\n", 1, "http(s) URL")

    def test_sentinelGroupsRefused(self):
        """
        Group ids equal to the legacy sentinels are refused at load.
        """
        self.assertBadLine("10.0.0.0/8 allow NOT_FOUND\n", 1, "reserved")
        self.assertBadLine("10.0.0.0/8 block BLOCKED\n", 1, "reserved")
        self.assertRaises(RulesError, Policy, "rules", fallbackGroup="BLOCKED")


class DecisionTests(TestCase):
    def setUp(self):
        self.policy = Policy("rules", parseRules(RULES)[0])

    def test_firstMatchWins(self):
        """
        The announcement's example: 10.0.0.30 is allowed (line 2 first).
        """
        self.assertEqual(self.policy.decide(ips("10.0.0.30")), Decision("allowed", "floor1"))
        self.assertEqual(self.policy.decide(ips("10.0.1.30")), Decision("blocked", "wide"))

    def test_anyAddressOfTheViewer(self):
        """
        Every submitted address is considered; the first rule matching any
        of them wins, whatever the order of the addresses.
        """
        self.assertEqual(self.policy.decide(ips("172.16.0.1", "10.5.0.1", "10.0.0.3")),
                         Decision("allowed", "floor1"))
        self.assertEqual(self.policy.decide(ips("fd00:1::5")), Decision("allowed", "v6site"))

    def test_redirect(self):
        self.assertEqual(self.policy.decide(ips("192.168.7.7")).outcome, "redirect")

    def test_fallbacks(self):
        self.assertEqual(self.policy.decide(ips("172.16.0.1")), Decision("blocked", "unmatched"))
        allow = Policy("rules", [], fallback="allow", fallbackGroup="everyone")
        self.assertEqual(allow.decide(ips("172.16.0.1")), Decision("allowed", "everyone"))
        end = Policy("rules", [], fallback="end")
        self.assertEqual(end.decide(ips("172.16.0.1")), Decision("unmatched", ""))

    def test_subnet(self):
        policy = Policy("subnet", prefixV4=24, prefixV6=64)
        a = policy.decide(ips("10.1.2.3"))
        self.assertEqual(a, Decision("allowed", "subnet-10.1.2.0-24"))
        self.assertEqual(policy.decide(ips("10.1.2.200")), a)
        self.assertNotEqual(policy.decide(ips("10.1.3.1")), a)
        self.assertEqual(policy.decide(ips("fd00::1:2")).group, "subnet-fd00::-64")
        # A public address is no peering key: the fallback.
        self.assertEqual(policy.decide(ips("8.8.8.8")), Decision("blocked", "unmatched"))

    def test_random(self):
        policy = Policy("random", groupSize=2)
        groups = [policy.decide(ips("10.0.0.1")).group for _ in range(5)]
        self.assertEqual(groups, ["random-0", "random-0", "random-1", "random-1", "random-2"])


class AddressTests(TestCase):
    def test_formats(self):
        self.assertEqual(parseAddress("ipv4", "10.0.0.1"), ipaddress.ip_address("10.0.0.1"))
        self.assertEqual(parseAddress("ipv6", "fd00::1"), ipaddress.ip_address("fd00::1"))

    def test_refused(self):
        for fmt, address, problem in [("ipv4", "fd00::1", "does not match"),
                                      ("ipv6", "10.0.0.1", "does not match"),
                                      ("ipv4", "10.0.0.300", "not a valid"),
                                      ("ipv5", "10.0.0.1", "format"),
                                      ("ipv4", 167772161, "must be a string")]:
            e = self.assertRaises(ValueError, parseAddress, fmt, address)
            self.assertIn(problem, str(e))
            # The message never echoes the address.
            self.assertNotIn(str(address), str(e))
