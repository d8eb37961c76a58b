# -*- test-case-name: tests.test_configerrors -*-
"""
Where a configuration key is in its TOML file, and how a configuration that
cannot be used is reported at start-up.

C{tomllib} gives values, not positions, so L{KeyLines} scans the text
itself: table headers (C{[a.b]}, C{[[a.b]]} counted per path) and C{key =}
lines, dotted and quoted keys included.  That is enough for every key the
schema names (C{webpubsub.hubs.chat.event_handlers[1].url_template},
C{iot.udp.listen[0]}); a key written inside an inline table, or one the
file leaves to its default, is given the line of the nearest enclosing
table or key that is in the file, or none.

This module imports nothing of the broker, so L{broker.config} can use it.
"""

import json
import re

# EX_CONFIG of sysexits.h: "something was found in an unconfigured or
# misconfigured state".  Service managers and scripts tell it from a crash.
EX_CONFIG = 78

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_INDEX = re.compile(r"\[(\d+)\]")


def _keyParts(text, pos=0, stop=("=",)):
    """
    Read a TOML (dotted) key from C{text} at C{pos}.

    @return: C{(parts, pos after the key)}, or C{(None, pos)} when there is
        no key there.
    """
    parts = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] == '"':
            end = pos + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            try:
                parts.append(json.loads(text[pos:end + 1]))
            except ValueError:
                return None, pos
            pos = end + 1
        elif pos < n and text[pos] == "'":
            end = text.find("'", pos + 1)
            if end < 0:
                return None, pos
            parts.append(text[pos + 1:end])
            pos = end + 1
        else:
            m = _BARE.match(text, pos)
            if not m:
                return None, pos
            parts.append(m.group())
            pos = m.end()
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] == ".":
            pos += 1
            continue
        if pos < n and text[pos] in stop:
            return parts, pos
        return None, pos


def splitKey(key):
    """
    The parts of a dotted key as the schema writes it in a message
    (L{broker.config._join}): bare or JSON-quoted names, and C{[n]} indexes
    as parts of their own.
    """
    parts = []
    pos = 0
    n = len(key)
    while pos < n:
        if key[pos] == ".":
            pos += 1
        elif key[pos] == "[":
            m = _INDEX.match(key, pos)
            if not m:
                break
            parts.append(m.group())
            pos = m.end()
        elif key[pos] == '"':
            end = pos + 1
            while end < n and key[end] != '"':
                end += 2 if key[end] == "\\" else 1
            parts.append(json.loads(key[pos:end + 1]))
            pos = end + 1
        else:
            end = pos
            while end < n and key[end] not in ".[":
                end += 1
            parts.append(key[pos:end])
            pos = end
    return tuple(parts)


class KeyLines:
    """
    The line (1-based) of every table header and key of a TOML text, by
    its path as L{splitKey} returns it.
    """

    def __init__(self, text):
        self.lines = {}
        table = ()
        arrays = {}
        quote = None
        for number, line in enumerate(text.splitlines(), 1):
            if quote is not None:
                # Inside a multi-line string: nothing here is a key.
                if line.count(quote) % 2:
                    quote = None
                continue
            stripped = line.lstrip()
            if stripped.startswith("[["):
                parts, _ = _keyParts(stripped, 2, stop=("]",))
                if parts is not None:
                    base = self._path(table=(), parts=parts, arrays=arrays)
                    index = arrays.get(base, -1) + 1
                    arrays[base] = index
                    table = base + (f"[{index}]",)
                    self.lines.setdefault(base, number)
                    self.lines.setdefault(table, number)
                continue
            if stripped.startswith("["):
                parts, _ = _keyParts(stripped, 1, stop=("]",))
                if parts is not None:
                    table = self._path((), parts, arrays)
                    self.lines.setdefault(table, number)
                continue
            parts, _ = _keyParts(stripped)
            if parts is not None:
                for i in range(1, len(parts) + 1):
                    self.lines.setdefault(table + tuple(parts[:i]), number)
                for q in ('"""', "'''"):
                    if line.count(q) % 2:
                        quote = q
                        break

    @staticmethod
    def _path(table, parts, arrays):
        """
        The full path of C{parts} under C{table}: a part naming an array of
        tables already seen means its latest element (TOML's rule for
        C{[a.b]} after C{[[a]]}).
        """
        path = table
        for i, part in enumerate(parts):
            path = path + (part,)
            if path in arrays and i < len(parts) - 1:
                path = path + (f"[{arrays[path]}]",)
        return path

    def line(self, key):
        """
        The line of C{key} (a dotted key as a message names it), else of the
        nearest enclosing key or table in the text, else C{None}.
        """
        parts = splitKey(key)
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return None


def report(error, write):
    """
    Write every error of C{error} (a L{broker.config.ConfigError}, or a
    L{broker.config.ConfigErrors}) with C{write}, one line each, for the
    operator.
    """
    errors = getattr(error, "errors", [error])
    n = len(errors)
    write(f"broker: the configuration has {n} error{'s' if n != 1 else ''}:\n")
    for e in errors:
        write(f"  {e.located()}\n")
