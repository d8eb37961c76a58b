# -*- test-case-name: tests.test_tap -*-
"""
Builds the iot face from C{[iot]}.
"""


def build(context):
    if not context.settings["iot"]["enabled"]:
        return
