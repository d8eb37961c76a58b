"""
The Peer groups (after the Windows Peer Grouping API), brokered face.
"""
