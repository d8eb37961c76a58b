"""
Outside tools some tests drive (chromium, node with npm packages): skipped
where they are missing, unless C{BROKER_TEST_REQUIRE_TOOLS} is set, as
scripts/test sets it after installing them, so CI never passes by skipping.
"""

import os

from twisted.trial.unittest import FailTest, SkipTest


def requireTool(present, why):
    """
    Go on if C{present}; otherwise skip, or fail under scripts/test.
    """
    if present:
        return
    if os.environ.get("BROKER_TEST_REQUIRE_TOOLS"):
        raise FailTest(f"{why} (BROKER_TEST_REQUIRE_TOOLS is set)")
    raise SkipTest(why)
