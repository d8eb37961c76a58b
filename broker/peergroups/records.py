# -*- test-case-name: tests.test_peergroups_unit -*-
"""
Group records: their shape, attribute XML, the search query language and
the conflict rule (spec section 8).

Pure functions and a plain class, so the broker core, the store and the
tests share one definition of what a valid record and a matching search
are.
"""

import datetime
import re
import xml.etree.ElementTree as ET

from broker.peergroups import constants as C
from broker.peergroups.credentials import b64, unb64
from broker.peergroups.errors import PeerError

MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_NAME = 40
MAX_ATTRIBUTES_XML = 64 * 1024
MAX_SEARCH_XML = 64 * 1024
RESERVED_ATTRIBUTES = {
    "peerlastmodifiedby": "string", "peercreatorid": "string",
    "peerlastmodificationtime": "date", "peerrecordid": "string",
    "peerrecordtype": "string", "peercreationtime": "date",
}
_NAME = re.compile(r"^[A-Za-z0-9]{1,40}$")
_INT = re.compile(r"^-?[0-9]+$")
TYPES = ("string", "int", "date")
COMPARES = ("equal", "notequal", "less", "greater", "lessorequal", "greaterorequal")


class Record:
    """
    One record of a group database, live or a tombstone (C{deleted}).

    Times are peer time (FILETIME).  C{seq} is the group database's change
    counter at this record's last change, and C{createdSeq} at its
    creation: a returning member is told of what changed after the C{seq}
    it last saw.
    """

    __slots__ = ("id", "type", "version", "flags", "creatorId", "modifiedById",
                 "attributes", "creation", "lastModified", "expiration", "data",
                 "seq", "createdSeq")

    def __init__(self, id, type, version, flags, creatorId, modifiedById, attributes,
                 creation, lastModified, expiration, data, seq=0, createdSeq=0):
        self.id = id
        self.type = type
        self.version = version
        self.flags = flags
        self.creatorId = creatorId
        self.modifiedById = modifiedById
        self.attributes = attributes
        self.creation = creation
        self.lastModified = lastModified
        self.expiration = expiration
        self.data = data
        self.seq = seq
        self.createdSeq = createdSeq

    @property
    def deleted(self):
        return bool(self.flags & C.RECORD_FLAG_DELETED)

    def size(self):
        return len(self.data) + 2 * len(self.attributes.encode("utf-8"))

    def toJSON(self):
        return {"type": self.type, "id": self.id, "version": self.version,
                "flags": self.flags, "creatorId": self.creatorId,
                "modifiedById": self.modifiedById, "attributes": self.attributes,
                "creation": self.creation, "lastModified": self.lastModified,
                "expiration": self.expiration, "data": b64(self.data)}

    @classmethod
    def fromJSON(cls, obj):
        """
        For export files the broker itself wrote (integrity checked first).
        """
        return cls(obj["id"], obj["type"], obj["version"], obj["flags"], obj["creatorId"],
                   obj["modifiedById"], obj["attributes"], obj["creation"],
                   obj["lastModified"], obj["expiration"], unb64(obj["data"]))

    def copy(self):
        return Record(*(getattr(self, s) for s in self.__slots__))

    def reservedValues(self):
        return {"peerlastmodifiedby": ("string", self.modifiedById),
                "peercreatorid": ("string", self.creatorId),
                "peerlastmodificationtime": ("date", _filetimeDate(self.lastModified)),
                "peerrecordid": ("string", self.id),
                "peerrecordtype": ("string", self.type),
                "peercreationtime": ("date", _filetimeDate(self.creation))}


def beats(a, b):
    """
    The graphing conflict rule: does copy C{a} of a record win over copy
    C{b} (same id)?  First rule that differs decides.
    """
    if a.version != b.version:
        return a.version > b.version
    if bool(a.modifiedById) != bool(b.modifiedById):
        return bool(a.modifiedById)
    if a.modifiedById != b.modifiedById:
        return a.modifiedById > b.modifiedById
    if a.lastModified != b.lastModified:
        return a.lastModified > b.lastModified
    # Security data (here: the canonical payload) size, then bytes.
    if len(a.data) != len(b.data):
        return len(a.data) > len(b.data)
    return a.data > b.data


def _filetimeDate(ft):
    return datetime.datetime.fromtimestamp(C.unixFromFiletime(ft), datetime.timezone.utc)


def parseDate(text):
    text = text.strip()
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    value = datetime.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


def _convert(kind, text):
    if kind == "int":
        if not _INT.match(text.strip()):
            raise ValueError("not an integer")
        return int(text)
    if kind == "date":
        return parseDate(text)
    return text


def _xml(text, limit):
    if len(text) > limit:
        raise ValueError("too large")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("DTDs are not allowed")
    return ET.fromstring(text)


def parseAttributes(text):
    """
    Validate attribute XML and return C{[(name, type, value)]} (C{[]} for
    none).

    @raise PeerError: C{PEER_E_INVALID_ATTRIBUTES},
        C{PEER_E_TOO_MANY_ATTRIBUTES}.
    """
    if text is None or text == "":
        return []
    bad = "PEER_E_INVALID_ATTRIBUTES"
    if not isinstance(text, str):
        raise PeerError(bad, "attributes must be an XML string")
    try:
        root = _xml(text, MAX_ATTRIBUTES_XML)
    except (ET.ParseError, ValueError) as e:
        raise PeerError(bad, f"not attribute XML: {e}")
    if root.tag != "attributes" or root.attrib:
        raise PeerError(bad, "the root element must be <attributes>")
    out = []
    for child in root:
        if child.tag != "attribute" or len(child):
            raise PeerError(bad, "<attributes> holds only <attribute> elements")
        name = child.get("name", "")
        kind = child.get("type", "string")
        extra = set(child.attrib) - {"name", "type"}
        if extra or not _NAME.match(name):
            raise PeerError(bad, f"attribute name {name!r}: alphanumeric, at most 40")
        if name.lower() in RESERVED_ATTRIBUTES:
            raise PeerError(bad, f"attribute name {name!r} is reserved")
        if kind not in TYPES:
            raise PeerError(bad, f"attribute type {kind!r}: string, int or date")
        value = child.text or ""
        try:
            value = _convert(kind, value)
        except ValueError:
            raise PeerError(bad, f"attribute {name!r} is not a valid {kind}")
        out.append((name, kind, value))
    if len(out) > MAX_ATTRIBUTES:
        raise PeerError("PEER_E_TOO_MANY_ATTRIBUTES", f"at most {MAX_ATTRIBUTES}")
    return out


# -- search ------------------------------------------------------------------

class _Clause:
    def __init__(self, attrib, kind, compare, value):
        self.attrib = attrib.lower()
        self.kind = kind
        self.compare = compare
        self.value = value

    def matches(self, record, attributes):
        reserved = RESERVED_ATTRIBUTES.get(self.attrib)
        if reserved is not None:
            kind, value = record.reservedValues()[self.attrib]
            candidates = [(kind, value)]
        else:
            candidates = [(k, v) for n, k, v in attributes if n.lower() == self.attrib]
        return any(k == self.kind and self._compare(v) for k, v in candidates)

    def _compare(self, v):
        c, want = self.compare, self.value
        if self.kind == "string" and c in ("equal", "notequal"):
            hit = want.fullmatch(v) is not None
            return hit if c == "equal" else not hit
        if self.kind == "string":
            want = self.literal
        if c == "equal":
            return v == want
        if c == "notequal":
            return v != want
        if c == "less":
            return v < want
        if c == "greater":
            return v > want
        if c == "lessorequal":
            return v <= want
        return v >= want


class _And:
    def __init__(self, children):
        self.children = children

    def matches(self, record, attributes):
        return all(c.matches(record, attributes) for c in self.children)


class _Or(_And):
    def matches(self, record, attributes):
        return any(c.matches(record, attributes) for c in self.children)


def _wildcard(text):
    """
    Compile a search string: C{*} any run, C{?} one character, C{\\*},
    C{\\?}, C{\\\\} literal; any other escape is C{E_INVALIDARG}.

    @return: C{(regex, literal)}.
    """
    out, literal, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in "*?\\":
                raise PeerError("E_INVALIDARG", f"bad escape in search string {text!r}")
            out.append(re.escape(text[i + 1]))
            literal.append(text[i + 1])
            i += 2
            continue
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
        literal.append(ch)
        i += 1
    return re.compile("".join(out), re.DOTALL), "".join(literal)


def parseSearch(text):
    """
    Parse the search XML: C{<peersearch>} with exactly one C{clause},
    C{and} or C{or}; C{and}/C{or} hold at least one; clauses have C{attrib},
    C{type} and C{compare} (default C{equal}).

    @raise PeerError: C{PEER_E_INVALID_SEARCH} for schema errors,
        C{E_INVALIDARG} for a bad escape.
    """
    bad = "PEER_E_INVALID_SEARCH"
    if not isinstance(text, str):
        raise PeerError(bad, "the criteria must be an XML string")
    try:
        root = _xml(text, MAX_SEARCH_XML)
    except (ET.ParseError, ValueError) as e:
        raise PeerError(bad, f"not search XML: {e}")
    if root.tag != "peersearch" or len(root) != 1:
        raise PeerError(bad, "<peersearch> must have exactly one child")

    def build(node, depth):
        if depth > 32:
            raise PeerError(bad, "search nested too deep")
        if node.tag in ("and", "or"):
            if len(node) < 1 or node.attrib:
                raise PeerError(bad, f"<{node.tag}> needs at least one child")
            kids = [build(k, depth + 1) for k in node]
            return _And(kids) if node.tag == "and" else _Or(kids)
        if node.tag != "clause" or len(node):
            raise PeerError(bad, f"unexpected element <{node.tag}>")
        attrib = node.get("attrib")
        kind = node.get("type", "string")
        compare = node.get("compare", "equal")
        if set(node.attrib) - {"attrib", "type", "compare"}:
            raise PeerError(bad, "unknown clause attribute")
        if not attrib or not (_NAME.match(attrib) or attrib.lower() in RESERVED_ATTRIBUTES):
            raise PeerError(bad, f"bad attrib {attrib!r}")
        if kind not in TYPES or compare not in COMPARES:
            raise PeerError(bad, f"bad type {kind!r} or compare {compare!r}")
        raw = node.text or ""
        if kind == "string":
            regex, literal = _wildcard(raw)
            clause = _Clause(attrib, kind, compare, regex)
            clause.literal = literal
            return clause
        try:
            return _Clause(attrib, kind, compare, _convert(kind, raw))
        except ValueError:
            raise PeerError(bad, f"clause value {raw!r} is not a valid {kind}")

    return build(root[0], 0)


def search(query, records):
    """
    The live records of C{records} that C{query} (from L{parseSearch})
    matches.
    """
    out = []
    for r in records:
        try:
            attributes = parseAttributes(r.attributes)
        except PeerError:
            attributes = []
        if query.matches(r, attributes):
            out.append(r)
    return out
