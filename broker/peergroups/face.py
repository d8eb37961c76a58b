# -*- test-case-name: tests.test_tap -*-
"""
Builds the peergroups face from C{[peergroups]}.
"""


def build(context):
    if not context.settings["peergroups"]["enabled"]:
        return
