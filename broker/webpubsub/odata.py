# -*- test-case-name: tests.test_webpubsub_odata -*-
"""
The OData C{filter} of the Web PubSub REST send APIs.

Azure lets a server narrow a send to the connections a filter selects, over
three fields of a connection: C{userId} and C{connectionId} (strings, the
userId may be C{null}) and C{groups} (a collection).  The grammar here is
the subset Azure documents::

    expr       := or
    or         := and ("or" and)*
    and        := unary ("and" unary)*
    unary      := "not" unary | "(" expr ")" | comparison
    comparison := value ("eq"|"ne"|"gt"|"ge"|"lt"|"le") value
                | value "in" (field | "(" value ("," value)* ")")
    value      := 'string' | null | userId | connectionId | groups

Strings are single-quoted, a quote inside doubled (C{'O''Neil'}).  Keywords
are case-insensitive, field names are not.  A filter is compiled once per
request into a predicate over L{broker.core.session.Session}.
"""

import re

from broker.core.errors import BadRequest

MAX_FILTER_LENGTH = 4096

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<punct>[(),])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE)

_FIELDS = ("userId", "connectionId", "groups")
_COMPARE = {
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and b is not None and a > b,
    "ge": lambda a, b: a is not None and b is not None and a >= b,
    "lt": lambda a, b: a is not None and b is not None and a < b,
    "le": lambda a, b: a is not None and b is not None and a <= b,
}
_KEYWORDS = set(_COMPARE) | {"and", "or", "not", "in", "null"}


class _Tok:
    __slots__ = ("kind", "value", "pos")

    def __init__(self, kind, value, pos):
        self.kind, self.value, self.pos = kind, value, pos


def _tokenize(text):
    toks = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise BadRequest(f"filter: unexpected character {text[pos]!r} at {pos}")
        kind = m.lastgroup
        value = m.group()
        if kind == "string":
            toks.append(_Tok("string", value[1:-1].replace("''", "'"), pos))
        elif kind == "word":
            low = value.lower()
            if low in _KEYWORDS:
                toks.append(_Tok("kw", low, pos))
            else:
                toks.append(_Tok("field", value, pos))
        elif kind == "punct":
            toks.append(_Tok(value, value, pos))
        pos = m.end()
    toks.append(_Tok("end", None, pos))
    return toks


def _field(name):
    if name == "userId":
        return lambda s: s.userId
    if name == "connectionId":
        return lambda s: s.connectionId
    return lambda s: s.groups


class _Parser:
    def __init__(self, text):
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self):
        return self.toks[self.i]

    def take(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect(self, kind):
        t = self.take()
        if t.kind != kind:
            self.fail(t, f"expected {kind!r}")
        return t

    def fail(self, tok, why):
        what = "end of filter" if tok.kind == "end" else repr(tok.value)
        raise BadRequest(f"filter: {why} at {tok.pos}, found {what}")

    def isKw(self, word):
        t = self.peek()
        return t.kind == "kw" and t.value == word

    def parse(self):
        pred = self.orExpr()
        t = self.peek()
        if t.kind != "end":
            self.fail(t, "expected 'and', 'or' or the end")
        return pred

    def orExpr(self):
        terms = [self.andExpr()]
        while self.isKw("or"):
            self.take()
            terms.append(self.andExpr())
        if len(terms) == 1:
            return terms[0]
        return lambda s: any(t(s) for t in terms)

    def andExpr(self):
        terms = [self.unary()]
        while self.isKw("and"):
            self.take()
            terms.append(self.unary())
        if len(terms) == 1:
            return terms[0]
        return lambda s: all(t(s) for t in terms)

    def unary(self):
        if self.isKw("not"):
            self.take()
            inner = self.unary()
            return lambda s: not inner(s)
        if self.peek().kind == "(":
            self.take()
            inner = self.orExpr()
            self.expect(")")
            return inner
        return self.comparison()

    def value(self):
        """
        @return: C{(getter, isCollection)}.
        """
        t = self.take()
        if t.kind == "string":
            v = t.value
            return (lambda s: v), False
        if t.kind == "kw" and t.value == "null":
            return (lambda s: None), False
        if t.kind == "field":
            if t.value not in _FIELDS:
                self.fail(t, f"unknown field (use {', '.join(_FIELDS)})")
            return _field(t.value), t.value == "groups"
        self.fail(t, "expected a string, null or a field")

    def comparison(self):
        left, leftIsSet = self.value()
        if leftIsSet:
            self.fail(self.toks[self.i - 1], "groups can only follow 'in'")
        op = self.take()
        if op.kind != "kw" or (op.value not in _COMPARE and op.value != "in"):
            self.fail(op, "expected an operator (eq, ne, gt, ge, lt, le, in)")
        if op.value == "in":
            if self.peek().kind == "(":
                self.take()
                items = [self.literal()]
                while self.peek().kind == ",":
                    self.take()
                    items.append(self.literal())
                self.expect(")")
                values = frozenset(items)
                return lambda s: left(s) in values
            right, rightIsSet = self.value()
            if not rightIsSet:
                self.fail(self.toks[self.i - 1], "'in' needs groups or a list")
            return lambda s: left(s) in right(s)
        right, rightIsSet = self.value()
        if rightIsSet:
            self.fail(self.toks[self.i - 1], "groups can only follow 'in'")
        compare = _COMPARE[op.value]
        return lambda s: compare(left(s), right(s))

    def literal(self):
        t = self.take()
        if t.kind == "string":
            return t.value
        if t.kind == "kw" and t.value == "null":
            return None
        self.fail(t, "expected a string or null in the list")


def compileFilter(text):
    """
    Compile an OData filter into C{predicate(session) -> bool}.

    @raise BadRequest: naming the position of the first error.
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise BadRequest(f"filter is longer than {MAX_FILTER_LENGTH} characters")
    if not text.strip():
        raise BadRequest("filter is empty")
    try:
        return _Parser(text).parse()
    except RecursionError:
        raise BadRequest("filter is nested too deeply")
