# -*- test-case-name: tests.test_peergroups_unit -*-
"""
The Peer Grouping HRESULTs, by name and value (spec section 10), and the
exception that carries one back to the peer.

Every failed request is answered with the HRESULT the Windows API would
return for the same call, so a port of a Windows application can keep its
error handling.
"""

HRESULTS = {
    # success codes
    "S_OK": 0x00000000,
    "PEER_S_NO_EVENT_DATA": 0x00630002,
    "PEER_S_ALREADY_CONNECTED": 0x00632000,
    "PEER_S_ALREADY_A_MEMBER": 0x00630006,
    # generic
    "E_INVALIDARG": 0x80070057,
    "E_OUTOFMEMORY": 0x8007000E,
    "E_ACCESSDENIED": 0x80070005,
    "E_UNEXPECTED": 0x8000FFFF,
    "E_NOTIMPL": 0x80004001,
    # an invalid handle: here, a cursor that is unknown, expired or not the call's
    "E_HANDLE": 0x80070006,
    # HRESULT_FROM_WIN32(ERROR_MESSAGE_EXCEEDS_MAX_SIZE): an answer over max_message_size
    "E_MESSAGE_TOO_LARGE": 0x800710F0,
    # peer errors
    "PEER_E_IPV6_NOT_INSTALLED": 0x80630001,
    "PEER_E_NOT_INITIALIZED": 0x80630002,
    "PEER_E_CANNOT_START_SERVICE": 0x80630003,
    "PEER_E_NOT_LICENSED": 0x80630004,
    "PEER_E_TOO_MANY_ATTRIBUTES": 0x80630017,
    "PEER_E_CONNECTION_NOT_FOUND": 0x80630103,
    "PEER_E_CONNECT_SELF": 0x80630106,
    "PEER_E_CONNECTION_FAILED": 0x80630109,
    "PEER_E_CONNECTION_NOT_AUTHENTICATED": 0x8063010A,
    "PEER_E_CONNECTION_REFUSED": 0x8063010B,
    "PEER_E_CLASSIFIER_TOO_LONG": 0x80630201,
    "PEER_E_TOO_MANY_IDENTITIES": 0x80630202,
    "PEER_E_NO_KEY_ACCESS": 0x80630203,
    "PEER_E_GROUPS_EXIST": 0x80630204,
    "PEER_E_RECORD_NOT_FOUND": 0x80630301,
    "PEER_E_DATABASE_ACCESSDENIED": 0x80630302,
    "PEER_E_MAX_RECORD_SIZE_EXCEEDED": 0x80630304,
    "PEER_E_IDENTITY_NOT_FOUND": 0x80630501,
    "PEER_E_INVALID_SEARCH": 0x80630601,
    "PEER_E_INVALID_ATTRIBUTES": 0x80630602,
    "PEER_E_INVITATION_NOT_TRUSTED": 0x80630701,
    "PEER_E_CHAIN_TOO_LONG": 0x80630703,
    "PEER_E_INVALID_TIME_PERIOD": 0x80630705,
    "PEER_E_CIRCULAR_CHAIN_DETECTED": 0x80630706,
    "PEER_E_NO_CLOUD": 0x80631001,
    "PEER_E_CLOUD_NAME_AMBIGUOUS": 0x80631005,
    "PEER_E_INVALID_RECORD": 0x80632010,
    "PEER_E_NOT_AUTHORIZED": 0x80632020,
    "PEER_E_PASSWORD_DOES_NOT_MEET_POLICY": 0x80632021,
    "PEER_E_DEFERRED_VALIDATION": 0x80632030,
    "PEER_E_INVALID_GROUP_PROPERTIES": 0x80632040,
    "PEER_E_INVALID_PEER_NAME": 0x80632050,
    "PEER_E_INVALID_CLASSIFIER": 0x80632060,
    "PEER_E_INVALID_FRIENDLY_NAME": 0x80632070,
    "PEER_E_INVALID_ROLE_PROPERTY": 0x80632071,
    "PEER_E_INVALID_CLASSIFIER_PROPERTY": 0x80632072,
    "PEER_E_INVALID_RECORD_EXPIRATION": 0x80632080,
    "PEER_E_INVALID_CREDENTIAL_INFO": 0x80632081,
    "PEER_E_INVALID_CREDENTIAL": 0x80632082,
    "PEER_E_INVALID_RECORD_SIZE": 0x80632083,
    "PEER_E_UNSUPPORTED_VERSION": 0x80632090,
    "PEER_E_GROUP_NOT_READY": 0x80632091,
    "PEER_E_GROUP_IN_USE": 0x80632092,
    "PEER_E_INVALID_GROUP": 0x80632093,
    "PEER_E_NO_MEMBERS_FOUND": 0x80632094,
    "PEER_E_NO_MEMBER_CONNECTIONS": 0x80632095,
    "PEER_E_UNABLE_TO_LISTEN": 0x80632096,
    "PEER_E_IDENTITY_DELETED": 0x806320A0,
    "PEER_E_NOT_FOUND": 0x80070490,
    "PEER_E_ALREADY_EXISTS": 0x800700B7,
}

NAMES = {value: name for name, value in HRESULTS.items()}


def hresult(name):
    return HRESULTS[name]


def hexHR(value):
    return f"0x{value:08X}"


class PeerError(Exception):
    """
    A request failed with the HRESULT named C{name}.

    @ivar name: e.g. C{"PEER_E_NOT_AUTHORIZED"}.
    @ivar hr: its 32-bit value.
    @ivar message: why, for a human (never contains secrets).
    """

    def __init__(self, name, message=""):
        if name not in HRESULTS:
            raise ValueError(f"unknown HRESULT name {name!r}")
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.hr = HRESULTS[name]
        self.message = message

    def toJSON(self):
        return {"name": self.name, "hr": self.hr, "hex": hexHR(self.hr),
                "message": self.message}

    @classmethod
    def fromJSON(cls, obj):
        name = obj.get("name")
        if name not in HRESULTS:
            name = NAMES.get(obj.get("hr"), "E_UNEXPECTED")
        return cls(name, obj.get("message", ""))
