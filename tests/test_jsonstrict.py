"""
Tests for L{broker.core.jsonstrict}: the one strict JSON decoder of every
face.
"""

import json
import math

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from broker.core import jsonstrict
from broker.core.jsonstrict import JSONError, dumps, loads

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


class RefusalTests(SynchronousTestCase):
    """
    What Python's json module accepts and RFC 8259 does not, each refused
    with a L{JSONError} (a C{ValueError}) saying why in a few words.
    """

    def refused(self, data, why, **kw):
        e = self.assertRaises(JSONError, loads, data, **kw)
        self.assertIsInstance(e, ValueError)
        self.assertIn(why, str(e))
        self.assertLess(len(str(e)), 120)

    def test_constants(self):
        for name in ("NaN", "Infinity", "-Infinity"):
            self.refused(name, f"{name} is not JSON")
            self.refused(f'{{"a":[1,{name}]}}'.encode(), f"{name} is not JSON")

    def test_overflowingNumbers(self):
        """
        1e400 parses as an infinite float, which would go out as Infinity.
        """
        self.refused(b"1e400", "number out of range")
        self.refused(b"[-1e400]", "number out of range")
        self.refused(b"1" * 400 + b".0", "number out of range")
        self.assertEqual(loads(b"1e-400"), 0.0)
        self.assertEqual(loads(b"1.5e300"), 1.5e300)

    def test_hugeIntegers(self):
        self.refused(b"1" * 5000, "4300")

    def test_depth(self):
        """
        Up to MAX_DEPTH levels parse; one more is refused, and so is a
        100,000-level text, closed or not, without a RecursionError.
        """
        n = jsonstrict.MAX_DEPTH
        self.assertEqual(loads(b"[" * n + b"]" * n), loads(b"[" * n + b"]" * n))
        self.refused(b"[" * (n + 1) + b"]" * (n + 1), f"nesting deeper than {n} levels")
        self.refused(b'{"a":' * (n + 1) + b"1" + b"}" * (n + 1), "nesting deeper")
        self.refused(b"[" * 100000 + b"]" * 100000, "nesting deeper")
        self.refused(b'{"a":' * 100000 + b"1" + b"}" * 100000, "nesting deeper")
        self.refused(b"[" * 100000, "nesting deeper")
        self.refused(b"[" * 10, "Expecting value")
        self.refused(b"[[1]]", "nesting deeper than 1", maxDepth=1)

    def test_bracketsInStringsDoNotCount(self):
        text = json.dumps({"a": "[" * 1000, "b": ["{" * 1000]})
        self.assertEqual(loads(text)["a"], "[" * 1000)

    def test_wideIsNotDeep(self):
        """
        Many containers side by side (more brackets than the limit) are
        not deep.
        """
        value = [{"a": [i]} for i in range(1000)]
        self.assertEqual(loads(json.dumps(value)), value)

    def test_duplicateKeys(self):
        self.refused(b'{"x":1,"x":2}', "duplicate key 'x'")
        self.refused(b'[{"a":{"y":1,"z":2,"y":3}}]', "duplicate key 'y'")
        self.refused(('{"' + "k" * 500 + '":1,"' + "k" * 500 + '":1}').encode(), "duplicate key")
        self.assertEqual(loads(b'{"x":1,"X":2}'), {"x": 1, "X": 2})

    def test_invalidUTF8(self):
        self.refused(b'"\xff"', "invalid UTF-8")
        self.refused(b'"\xed\xa0\x80"', "invalid UTF-8")   # an encoded surrogate
        self.refused(b"\xff\xfe{\x00}\x00", "invalid UTF-8")  # UTF-16 is not sniffed

    def test_byteOrderMark(self):
        self.refused(b"\xef\xbb\xbf{}", "byte order mark")
        self.refused("\ufeff{}", "byte order mark")

    def test_loneSurrogates(self):
        self.refused(b'"\\ud800"', "lone surrogate")
        self.refused(b'{"k":["x\\udfff"]}', "lone surrogate")
        self.refused(b'{"\\udc00":1}', "lone surrogate")
        self.refused('"\ud800"', "lone surrogate")
        self.assertEqual(loads(b'"\\ud83d\\ude00"'), "\U0001F600")
        self.assertEqual(loads(b'"\\uD83D\\uDE00"'), "\U0001F600")

    def test_syntax(self):
        self.refused(b"{not json", "Expecting")
        self.refused(b"", "Expecting value")
        self.refused(b"[1,]", "Expecting value")
        self.refused(b"{} {}", "Extra data")
        self.refused(b"'a'", "Expecting value")
        self.refused(42, "cannot parse int")

    def test_inputs(self):
        for data in (b'{"a":[1,2.5,"\xc3\xa9",null,true]}',
                     bytearray(b'{"a":[1,2.5,"\xc3\xa9",null,true]}'),
                     memoryview(b'{"a":[1,2.5,"\xc3\xa9",null,true]}'),
                     '{"a":[1,2.5,"\u00e9",null,true]}'):
            self.assertEqual(loads(data), {"a": [1, 2.5, "\u00e9", None, True]})

    @given(_json)
    def test_roundTrip(self, value):
        """
        Whatever strict dumps writes, loads reads back (within the depth).
        """
        self.assertEqual(loads(dumps(value)), value)
        self.assertEqual(loads(dumps(value, ensureAscii=False).encode("utf-8")), value)


class DumpsTests(SynchronousTestCase):
    def test_compact(self):
        self.assertEqual(dumps({"a": [1, "\u00e9"]}), '{"a":[1,"\\u00e9"]}')
        self.assertEqual(dumps({"a": "\u00e9"}, ensureAscii=False), '{"a":"\u00e9"}')

    def test_noNaN(self):
        for value in (math.nan, math.inf, -math.inf, {"a": [math.nan]}):
            self.assertRaises(JSONError, dumps, value)
