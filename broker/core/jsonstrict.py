# -*- test-case-name: tests.test_jsonstrict -*-
"""
The one JSON decoder of every face: strict RFC 8259.

Python's C{json.loads} accepts more than JSON, and what it lets through
reaches other clients as text no strict parser reads, or crashes the
process further on.  L{loads} refuses, with one exception type
(L{JSONError}, a C{ValueError}) and a short message:

  - C{NaN}, C{Infinity}, C{-Infinity} (not JSON), and numbers too large
    for a float (C{1e400} would come back as C{Infinity} on output);
  - nesting deeper than C{maxDepth} (default L{MAX_DEPTH}) arrays and
    objects; C{RecursionError} never escapes, however deep the input;
  - duplicate keys in one object (RFC 8259 leaves their meaning open, so
    different receivers may read different values);
  - lone surrogates (C{"\\ud800"}): not Unicode, and a later UTF-8 encode
    of such a string would raise far from here; pairs are fine;
  - bytes that are not UTF-8, and a leading byte order mark (RFC 8259
    section 8.1 lets parsers refuse it).

The common case (a small frame with few brackets and no C{\\uD8xx}
escape) costs a C{str.count} pair and the object hook on top of the C
decoder; the depth walk runs only when the text holds more brackets than
the limit.  L{dumps} is the matching encoder: compact, and
C{NaN}/C{Infinity} raise L{JSONError} instead of being written.

This module imports nothing from the broker, so every face may use it.
"""

import json
import math
import re

__all__ = ["JSONError", "MAX_DEPTH", "loads", "dumps"]

# How deep arrays and objects may nest.
MAX_DEPTH = 64


class JSONError(ValueError):
    """
    The input is not strict JSON; the message says why, in a few words
    (it never quotes more than a short key of the input).
    """


def _constant(name):
    raise JSONError(f"{name} is not JSON")


def _float(text):
    value = float(text)
    if math.isinf(value):
        raise JSONError("number out of range")
    return value


def _object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONError(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return obj


# parse_float costs a call per float only: texts without floats (most
# frames) do not pay for it.
_decode = json.JSONDecoder(parse_constant=_constant, parse_float=_float,
                           object_pairs_hook=_object).decode
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_encoderUnicode = json.JSONEncoder(separators=(",", ":"), allow_nan=False,
                                   ensure_ascii=False)

# A \uD800-\uDFFF escape: a surrogate, paired or lone.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _tooDeep(value, maxDepth):
    """
    Whether the parsed C{value} nests deeper than C{maxDepth}: a walk one
    level at a time, without recursion.
    """
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > maxDepth:
            return True
        deeper = []
        for container in level:
            for item in (container.values() if type(container) is dict else container):
                if type(item) is dict or type(item) is list:
                    deeper.append(item)
        level = deeper
    return False


def loads(data, maxDepth=MAX_DEPTH):
    """
    Parse one JSON text, strictly.

    @param data: C{bytes} (UTF-8, no byte order mark) or C{str}.
    @param maxDepth: how deep arrays and objects may nest.
    @raise JSONError: when C{data} is not strict JSON.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise JSONError("invalid UTF-8") from None
    elif isinstance(data, str):
        text = data
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise JSONError("lone surrogate in the text") from None
    else:
        raise JSONError(f"cannot parse {type(data).__name__} as JSON")
    if text[:1] == "\ufeff":
        raise JSONError("byte order mark before JSON")
    try:
        # The C decoder stops at the interpreter's recursion limit (about
        # 1000 levels): RecursionError, caught below.
        value = _decode(text)
    except JSONError:
        raise
    except RecursionError:
        raise JSONError(f"nesting deeper than {maxDepth} levels") from None
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at character {e.pos}") from None
    except ValueError as e:
        # int() refuses numbers of more than sys.get_int_max_str_digits().
        raise JSONError(str(e)[:80]) from None
    if text.count("[") + text.count("{") > maxDepth and _tooDeep(value, maxDepth):
        raise JSONError(f"nesting deeper than {maxDepth} levels")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        # Paired escapes decode to one code point; only lone ones remain as
        # surrogates, which UTF-8 cannot encode.
        try:
            _encoderUnicode.encode(value).encode("utf-8")
        except UnicodeEncodeError:
            raise JSONError("lone surrogate escape") from None
    return value


def dumps(value, ensureAscii=True):
    """
    Serialise C{value} compactly as strict JSON (C{str}).

    @param ensureAscii: escape non-ASCII characters as C{\\uXXXX}.
    @raise JSONError: for C{NaN} or an infinite float.
    """
    try:
        return (_encoder if ensureAscii else _encoderUnicode).encode(value)
    except ValueError as e:
        raise JSONError(str(e)[:80]) from None
