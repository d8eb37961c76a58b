"""
broker: one Twisted process routing raw TCP, UDP, WebSocket and HTTP(S)
through one shared core.
"""

__version__ = "0.1.0"
