# -*- test-case-name: tests.test_config -*-
"""
The C{[ecdn]} section of the configuration (docs/configuration.md).
"""

from broker.config import Bool, Table

SECTION = Table({
    "enabled": Bool(False),
})
