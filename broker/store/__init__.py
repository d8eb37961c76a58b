"""
Durable state shared by the faces: queues, records, membership.  Each face
defines its own store interface beside its code; this package holds what
their SQLite implementations share.
"""
