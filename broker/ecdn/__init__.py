"""
The eCDN on-premises API (Google Meet's contract) face.
"""
