# -*- test-case-name: tests.test_http_bounds -*-
"""
The bounds every HTTP listener shares: refusal reasons (the C{reason}
label of C{broker_http_refused_total}) and how a refused connection
lingers.  Used by L{broker.net.http} and L{broker.net.fasthttp}.
"""

# How long, and how many more bytes, a refused connection may linger
# half-closed (what it sends is dropped unparsed), so that the client reads
# the answer before the reset.
LINGER = 2.0
LINGER_BYTES = 64 * 1024

# Refusal reasons (the C{reason} label of broker_http_refused_total).
BODY_TOO_LARGE = "body_too_large"
METHOD_NOT_ALLOWED = "method_not_allowed"
HEADER_TIMEOUT = "header_timeout"
IDLE_TIMEOUT = "idle_timeout"
