# -*- test-case-name: tests.test_peergroups_paging -*-
"""
Answers of any size (docs/peergroups-protocol.md, "Answers of any size"):
the cursors of one session, paged listings, the chunked database export
built as its parts are asked for, and the chunked import upload.

No message is larger than C{peergroups.max_message_size}: a listing is cut
into pages of whole items that fit, an export into parts of its text.  A
cursor is opaque, bound to its session (it lives in the session's
L{Cursors}), its handle and its method, bounded in number and idle time.
"""

import base64
import hashlib
import hmac
import json
import secrets

from broker.peergroups import credentials as cred
from broker.peergroups.errors import PeerError

# Room left in a message for what surrounds the items: the id (at most 64
# characters, possibly escaped), "hr", the cursor, "total" and the keys.
ENVELOPE = 512
MAX_COUNT = 100000
BAD_CURSOR = "unknown, expired or released cursor, or not this call's"
EXPORT_HEAD = '{"PEERGROUPDATABASE": {"payload": "'


def encodedSize(obj):
    """
    The size of C{obj} as the transports encode it (compact UTF-8 JSON).
    """
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def budget(maxMessageSize):
    return max(maxMessageSize - ENVELOPE, 256)


def tooLarge(what, size, limit):
    return PeerError("E_MESSAGE_TOO_LARGE",
                     f"{what} is {size} bytes encoded, over peergroups.max_message_size "
                     f"({limit}) with its envelope")


class Cursor:
    """
    What a cursor holds: its method, its handle id (C{None} for a call
    without handle) and the state of its listing, export or upload.
    """

    def __init__(self, method, handleId, state):
        self.method = method
        self.handleId = handleId
        self.state = state
        self.token = None
        self.lastUsed = 0.0


class Cursors:
    """
    The open cursors of one session.

    @param clock: C{callable() -> float}.
    @param limit: at most this many open at once.
    @param timeout: seconds of idleness after which a cursor expires.
    """

    def __init__(self, clock, limit=16, timeout=60.0):
        self._clock = clock
        self.limit = limit
        self.timeout = timeout
        self._open = {}

    def __len__(self):
        self._expire()
        return len(self._open)

    def _expire(self):
        now = self._clock()
        for token in [t for t, c in self._open.items() if now - c.lastUsed > self.timeout]:
            del self._open[token]

    def open(self, cursor):
        """
        Register C{cursor}; C{E_OUTOFMEMORY} when the session has as many
        as it may.

        @return: its token.
        """
        self._expire()
        if len(self._open) >= self.limit:
            raise PeerError("E_OUTOFMEMORY", f"at most {self.limit} open cursors per session "
                            f"(peergroups.max_cursors_per_session); end one with endEnumeration")
        cursor.token = "c" + secrets.token_urlsafe(18)
        cursor.lastUsed = self._clock()
        self._open[cursor.token] = cursor
        return cursor.token

    def get(self, token, method=None, handleId=None, anyKind=False):
        """
        The open cursor C{token} of C{method} and C{handleId}; C{E_HANDLE}
        otherwise, the same answer whatever the reason.
        """
        self._expire()
        cursor = self._open.get(token) if isinstance(token, str) else None
        if cursor is None or (not anyKind and (cursor.method != method or
                                               cursor.handleId != handleId)):
            raise PeerError("E_HANDLE", BAD_CURSOR)
        cursor.lastUsed = self._clock()
        return cursor

    def release(self, cursor):
        if cursor is not None and self._open.get(cursor.token) is cursor:
            del self._open[cursor.token]

    def releaseHandle(self, handleId):
        for token in [t for t, c in self._open.items() if c.handleId == handleId]:
            del self._open[token]

    def find(self, predicate):
        self._expire()
        return next((c for c in self._open.values() if predicate(c)), None)


class Listing:
    """
    A paged listing: the keys fixed at its first call and how to render
    one now (C{None}: gone since, skipped).
    """

    def __init__(self, key, keys, render):
        self.key = key
        self.keys = keys
        self.render = render
        self.position = 0


def page(listing, limit, count=None):
    """
    The next page of C{listing}: as many whole items as fit in C{limit}
    bytes (and at most C{count}).

    @return: C{(items, done)}.
    @raise PeerError: C{E_MESSAGE_TOO_LARGE} if the next item alone does
        not fit.
    """
    room = budget(limit)
    items, used = [], 0
    keys = listing.keys
    while listing.position < len(keys) and (count is None or len(items) < count):
        item = listing.render(keys[listing.position])
        if item is None:
            listing.position += 1
            continue
        size = encodedSize(item) + 1
        if used + size > room:
            if not items:
                raise tooLarge(f"{listing.key[:-1]} {keys[listing.position]}", size, limit)
            break
        items.append(item)
        used += size
        listing.position += 1
    return items, listing.position >= len(keys)


class ExportStream:
    """
    The sealed database text, built as its parts are asked for: the payload
    (canonical JSON of the header and the records) is base64-encoded and
    sealed as it goes, so the broker never holds more than a part and one
    record of it.  The text is that of a one-piece export, byte for byte.

    @param header: the payload's fields but C{records}.
    @param recordIds: the records, fixed now, in order.
    @param render: C{id -> record JSON or None} (gone since: skipped).
    """

    def __init__(self, exportKey, header, recordIds, render):
        full = cred.canonical(dict(header, records=[]))
        cut = full.index(b'"records":[') + len(b'"records":[')
        self._prefix, self._suffix = full[:cut], full[cut:]
        self._ids = recordIds
        self._render = render
        self._position = -1
        self._first = True
        self._mac = hmac.new(exportKey, digestmod=hashlib.sha256)
        self._carry = b""
        self._text = [EXPORT_HEAD]
        self._textLength = len(EXPORT_HEAD)
        self.done = False

    def _feed(self, raw):
        self._mac.update(raw)
        raw = self._carry + raw
        whole = len(raw) - len(raw) % 3
        self._carry = raw[whole:]
        if whole:
            chunk = base64.b64encode(raw[:whole]).decode("ascii")
            self._text.append(chunk)
            self._textLength += len(chunk)

    def _produce(self):
        """
        Add the next piece of raw payload; C{False} once all was added.
        """
        if self._position == -1:
            self._feed(self._prefix)
            self._position = 0
            return True
        while self._position < len(self._ids):
            record = self._render(self._ids[self._position])
            self._position += 1
            if record is None:
                continue
            self._feed((b"" if self._first else b",") + cred.canonical(record))
            self._first = False
            return True
        if self._position == len(self._ids):
            self._position += 1
            self._feed(self._suffix)
            tail = base64.b64encode(self._carry).decode("ascii")
            seal = base64.b64encode(self._mac.digest()).decode("ascii")
            self._text.append(f'{tail}", "seal": "{seal}"}}}}')
            self._textLength += len(self._text[-1])
            return True
        return False

    def nextPart(self, size):
        """
        The next at most C{size} characters of the text.
        """
        while self._textLength < size and self._produce():
            pass
        text = "".join(self._text)
        part, rest = text[:size], text[size:]
        self._text = [rest] if rest else []
        self._textLength = len(rest)
        self.done = not rest and self._position > len(self._ids)
        return part


class Upload:
    """
    The parts of a chunked import received so far (at most C{limit}
    characters in all).
    """

    def __init__(self, limit):
        self.limit = limit
        self.parts = []
        self.received = 0

    def add(self, part):
        if self.received + len(part) > self.limit:
            raise PeerError("E_OUTOFMEMORY", f"the database is over "
                            f"peergroups.max_import_size ({self.limit} bytes)")
        self.parts.append(part)
        self.received += len(part)

    def text(self):
        return "".join(self.parts)
