"""
Authentication: JWT access tokens now; API keys, device challenge-response
and peer identities as the faces that need them arrive.
"""
