# -*- test-case-name: tests.test_wsmask -*-
"""
The small-frame masker unmasks as autobahn's does, whole or in pieces.
"""

import os

from autobahn.websocket.xormasker import create_xor_masker
from hypothesis import given, strategies as st
from twisted.trial import unittest

from broker.net import wsmask


class SmallMaskerTests(unittest.TestCase):

    @given(st.binary(min_size=4, max_size=4), st.binary(max_size=300),
           st.lists(st.integers(min_value=0, max_value=300), max_size=5))
    def test_sameAsAutobahn(self, mask, payload, cuts):
        """
        Any payload, cut anywhere: the same bytes and pointer as autobahn's
        masker.
        """
        ours = wsmask.SmallMasker(mask)
        theirs = create_xor_masker(mask, len(payload))
        bounds = sorted({0, len(payload), *(c for c in cuts if c <= len(payload))})
        for a, b in zip(bounds, bounds[1:]):
            self.assertEqual(ours.process(payload[a:b]), theirs.process(payload[a:b]))
            self.assertEqual(ours.pointer(), theirs.pointer())
        ours.reset()
        self.assertEqual(ours.pointer(), 0)

    def test_factory(self):
        """
        Small frames get the pure masker, large ones autobahn's, and the
        protocol module calls ours once installed.
        """
        import autobahn.websocket.protocol as protocol
        mask = os.urandom(4)
        self.assertIsInstance(wsmask.createMasker(mask, 100), wsmask.SmallMasker)
        self.assertNotIsInstance(wsmask.createMasker(mask, wsmask.SMALL), wsmask.SmallMasker)
        wsmask.install()
        wsmask.install()
        self.assertIs(protocol.create_xor_masker, wsmask.createMasker)
        big = os.urandom(10000)
        self.assertEqual(wsmask.createMasker(mask, len(big)).process(big),
                         create_xor_masker(mask, len(big)).process(big))
