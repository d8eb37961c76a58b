# -*- test-case-name: tests.test_tap -*-
"""
Builds the ecdn face from C{[ecdn]}.
"""


def build(context):
    if not context.settings["ecdn"]["enabled"]:
        return
