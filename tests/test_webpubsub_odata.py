# -*- test-case-name: tests.test_webpubsub_odata -*-
"""
The OData filter of the REST send APIs.
"""

from twisted.trial import unittest

from broker.core.errors import BadRequest
from broker.webpubsub.odata import compileFilter


class S:
    def __init__(self, cid, userId, groups=()):
        self.connectionId = cid
        self.userId = userId
        self.groups = set(groups)


SESSIONS = [S("c1", "alice", ["a", "b"]), S("c2", "bob", ["b"]), S("c3", None, []),
            S("c4", "O'Neil", ["a"])]


def select(text):
    pred = compileFilter(text)
    return [s.connectionId for s in SESSIONS if pred(s)]


class FilterTests(unittest.TestCase):
    def test_comparisons(self):
        self.assertEqual(select("userId eq 'alice'"), ["c1"])
        self.assertEqual(select("userId ne 'alice'"), ["c2", "c3", "c4"])
        self.assertEqual(select("connectionId eq 'c2'"), ["c2"])
        self.assertEqual(select("userId eq null"), ["c3"])
        self.assertEqual(select("userId gt 'alice'"), ["c2"])
        self.assertEqual(select("'alice' eq userId"), ["c1"])

    def test_quotes(self):
        self.assertEqual(select("userId eq 'O''Neil'"), ["c4"])

    def test_in(self):
        self.assertEqual(select("'a' in groups"), ["c1", "c4"])
        self.assertEqual(select("userId in ('bob', 'alice')"), ["c1", "c2"])
        self.assertEqual(select("userId in (null)"), ["c3"])

    def test_logic(self):
        self.assertEqual(select("'a' in groups and 'b' in groups"), ["c1"])
        self.assertEqual(select("userId eq 'bob' or connectionId eq 'c3'"), ["c2", "c3"])
        self.assertEqual(select("not('a' in groups)"), ["c2", "c3"])
        self.assertEqual(select("NOT ('b' in groups) AND userId ne null"), ["c4"])
        self.assertEqual(select("userId eq 'x' or ('b' in groups and not (userId eq 'bob'))"),
                         ["c1"])
        # and binds tighter than or
        self.assertEqual(select("userId eq 'bob' or userId eq 'alice' and 'x' in groups"),
                         ["c2"])

    def test_errors(self):
        for bad in ["", "   ", "userId", "userId eq", "userId eq 'a' and", "nick eq 'a'",
                    "userId == 'a'", "groups eq 'a'", "'a' in userId", "userId eq 'a",
                    "(userId eq 'a'", "userId eq 'a')", "userId in ('a',)", "'a' in ()",
                    "not " * 2000 + "userId eq 'a'", "x" * 5000]:
            e = self.assertRaises(BadRequest, compileFilter, bad)
            self.assertTrue(e.message.startswith("filter"), e.message)

    def test_errorNamesPosition(self):
        e = self.assertRaises(BadRequest, compileFilter, "userId eq 'a' or nick eq 'b'")
        self.assertIn("at 17", e.message)
