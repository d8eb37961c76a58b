# -*- test-case-name: tests.test_peergroups_unit -*-
"""
The numbers of the Peer Grouping API (p2p.h) that travel in the
C{peergroup.v1} protocol, and peer time.

Peer time is a FILETIME (100 ns ticks since 1601-01-01 UTC), as in the
Windows API, so record times on the wire mean the same thing they mean
there.  The broker is the group's time authority: peer time is the
broker's clock.
"""

import re
import uuid

PROTOCOL = "peergroup.v1"

# PEER_GROUP_VERSION: MAKEWORD(major, minor); low byte major.
VERSION_1_0 = 0x0001
VERSION_1_1 = 0x0101
HIGHEST_VERSION = VERSION_1_1

# Roles (PEER_ROLE_ID) and their rank: a role may issue roles of rank at
# most its own, and a member (rank 1) issues nothing.
ROLE_ADMIN = "04387127-aa56-450a-8ce5-4f565c6790f4"
ROLE_INVITING_MEMBER = "4370fd89-dc18-4cfb-8dbf-9853a8a9f905"
ROLE_MEMBER = "f12dc4c7-0857-4ca0-93fc-b1bb19a3d8c2"
ROLE_RANK = {ROLE_ADMIN: 3, ROLE_INVITING_MEMBER: 2, ROLE_MEMBER: 1}
ROLE_NAMES = {ROLE_ADMIN: "admin", ROLE_INVITING_MEMBER: "invitingMember",
              ROLE_MEMBER: "member"}

MAX_CHAIN_LENGTH = 24

# PEER_GROUP_EVENT_TYPE
EVENT_STATUS_CHANGED = 1
EVENT_PROPERTY_CHANGED = 2
EVENT_RECORD_CHANGED = 3
EVENT_DIRECT_CONNECTION = 4
EVENT_NEIGHBOR_CONNECTION = 5
EVENT_INCOMING_DATA = 6
EVENT_MEMBER_CHANGED = 8
EVENT_CONNECTION_FAILED = 10
EVENT_AUTHENTICATION_FAILED = 11
EVENT_TYPES = (1, 2, 3, 4, 5, 6, 8, 10, 11)

# PEER_GROUP_STATUS
STATUS_LISTENING = 0x1
STATUS_HAS_CONNECTIONS = 0x2

# PEER_RECORD_CHANGE_TYPE
RECORD_ADDED = 1
RECORD_UPDATED = 2
RECORD_DELETED = 3
RECORD_EXPIRED = 4

# PEER_MEMBER_CHANGE_TYPE
MEMBER_CONNECTED = 1
MEMBER_DISCONNECTED = 2
MEMBER_UPDATED = 3
MEMBER_JOINED = 4

# PEER_CONNECTION_STATUS
PEER_CONNECTED = 1
PEER_DISCONNECTED = 2
PEER_CONNECTION_FAILED = 3

# PeerGroupEnumConnections flags
CONNECTION_NEIGHBOR = 0x1
CONNECTION_DIRECT = 0x2

# PeerGroupEnumMembers flags / PEER_MEMBER.dwFlags
MEMBER_PRESENT = 0x1

# PEER_GROUP_PROPERTY_FLAGS
MEMBER_DATA_OPTIONAL = 0x1
DISABLE_PRESENCE = 0x2
DEFER_EXPIRATION = 0x4
PROPERTY_FLAGS = MEMBER_DATA_OPTIONAL | DISABLE_PRESENCE | DEFER_EXPIRATION

# dwAuthenticationSchemes
GMC_AUTHENTICATION = 0x1
PASSWORD_AUTHENTICATION = 0x2

# PeerGroupIssueCredentials flags
STORE_CREDENTIALS = 0x1

# PEER_RECORD flags
RECORD_FLAG_AUTOREFRESH = 0x1
RECORD_FLAG_DELETED = 0x2

# Property defaults and limits (spec section 5).
DEFAULT_PRESENCE_LIFETIME = 300
MIN_PRESENCE_LIFETIME = 300
DEFAULT_MEMBER_DATA_LIFETIME = 2419200
MIN_MEMBER_DATA_LIFETIME = 2280
MAX_MEMBER_DATA_LIFETIME = 31536000

# Reserved record types: graphing and grouping infrastructure.
RESERVED_RECORD_TYPES = frozenset({
    "00000100-0000-0000-0000-000000000000",   # graph info
    "00000200-0000-0000-0000-000000000000",   # signature
    "00000300-0000-0000-0000-000000000000",   # contact
    "00000400-0000-0000-0000-000000000000",   # presence
    "01000000-0000-0000-0000-000000000000",   # membership
    "02000000-0000-0000-0000-000000000000",   # security properties
})
# The internal ping data type of PeerGroupSendData.
RESERVED_DATA_TYPE = "0ccbb0d2-be41-4bd6-914b-058ec5dcce64"

# -- peer time ---------------------------------------------------------------

# Seconds between 1601-01-01 and 1970-01-01.
_EPOCH_DELTA = 11644473600
TICKS = 10_000_000
# "Infinite" lifetime: 1000 years.
INFINITE_SECONDS = 1000 * 31556952   # Gregorian years
INFINITE_TICKS = INFINITE_SECONDS * TICKS


def filetimeFromUnix(seconds):
    return int(round((seconds + _EPOCH_DELTA) * TICKS))


def unixFromFiletime(filetime):
    return filetime / TICKS - _EPOCH_DELTA


# -- GUIDs -------------------------------------------------------------------

_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")


def normGUID(value):
    """
    The canonical lower-case form of a GUID string (braces optional), or
    C{None} if C{value} is not one.
    """
    if not isinstance(value, str) or not _GUID.match(value):
        return None
    return value.strip("{}").lower()


def newGUID():
    return str(uuid.uuid4())
