# -*- test-case-name: tests.test_ecdn_policy -*-
"""
The line-oriented files of the eCDN face (rules, keys): one entry a line,
C{#} comments, errors named by C{file:line}.
"""


def entries(text, source):
    """
    Yield C{(number, where, fields)} for each line with content: its line
    number, C{"source:line"} for error messages, and its fields.
    """
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, f"{source}:{number}", line.split()
