# -*- test-case-name: tests.test_iot_api -*-
"""
Typed payloads in JSON, as the HTTP API and the webhook carry them.

A payload is an object C{{"type": T, "data": D}}:

  - C{"json"}: C{data} is any JSON value;
  - C{"utf8"}: C{data} is a string;
  - C{"ascii"}: C{data} is a string of code points below 128;
  - C{"binary"}: C{data} is the bytes in standard base64 (padding required);
  - C{"none"}: no C{data} (or C{null}).

The same shape goes both ways, so what a central sends is what it gets
back, and the type a device chose survives the trip through HTTP.
"""

import base64
import binascii

from broker.core import jsonstrict
from broker.iot import frames
from broker.iot.frames import FrameError, Payload


# jsonstrict.MAX_DEPTH levels take at least twice as many bytes ("[]"):
# JSON text shorter than that cannot nest too deep.
_TRUSTED_SIZE = 2 * jsonstrict.MAX_DEPTH - 1


class PayloadError(ValueError):
    """
    A JSON payload object that does not follow the shape above; the message
    says which rule it breaks.
    """


def toJSON(payload):
    """
    @return: the JSON-ready C{dict} of a L{Payload}.
    """
    t = payload.type
    if t == frames.JSON:
        return {"type": t, "data": jsonstrict.loads(payload.data)}
    if t in (frames.ASCII, frames.UTF8):
        return {"type": t, "data": payload.data.decode("utf-8")}
    if t == frames.BINARY:
        return {"type": t, "data": base64.b64encode(payload.data).decode("ascii")}
    return {"type": frames.NONE, "data": None}


def fromJSON(obj):
    """
    @return: the L{Payload} an object of the shape above describes.
    @raise PayloadError: naming what is wrong.
    """
    if not isinstance(obj, dict):
        raise PayloadError('a payload is an object {"type": ..., "data": ...}')
    extra = set(obj) - {"type", "data"}
    if extra:
        raise PayloadError(f"unknown payload field {sorted(extra)[0]!r}")
    t = obj.get("type")
    if t not in frames.PAYLOAD_CODES:
        raise PayloadError(f"payload type must be one of {', '.join(frames.PAYLOAD_CODES)}")
    data = obj.get("data")
    if t == frames.NONE:
        if data is not None:
            raise PayloadError("a payload of type none has no data")
        return frames.EMPTY
    if "data" not in obj:
        raise PayloadError(f"a payload of type {t} needs data")
    if t == frames.JSON:
        try:
            raw = jsonstrict.dumps(data, ensureAscii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError("the data is not valid Unicode (lone surrogate)")
        except (TypeError, ValueError, RecursionError) as e:
            raise PayloadError(f"the data is not JSON: {e}")
        if len(raw) <= _TRUSTED_SIZE:
            # Strict JSON by construction, and too short to nest deeper
            # than jsonstrict allows: not parsed again to be validated.
            return Payload.trusted(t, raw)
    elif t in (frames.ASCII, frames.UTF8):
        if not isinstance(data, str):
            raise PayloadError(f"the data of a {t} payload is a string")
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise PayloadError("the data is not valid Unicode (lone surrogate)")
    else:
        if not isinstance(data, str):
            raise PayloadError("the data of a binary payload is a base64 string")
        try:
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise PayloadError("the data of a binary payload is not valid base64")
    try:
        return Payload(t, raw)
    except FrameError as e:
        raise PayloadError(e.message)
