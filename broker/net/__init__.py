"""
What every listener of the broker shares, whatever its face: the bounded
HTTP site (L{broker.net.http}) and the per-listener connection cap and
refusal counters (L{broker.net.listeners}).  Imports no face.
"""
