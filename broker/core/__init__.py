"""
The routing core: hubs, groups, users and connections, with no knowledge of
any wire format.
"""
