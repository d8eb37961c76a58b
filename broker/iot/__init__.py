"""
The IoT concentrator: devices and the central over TCP/TLS, UDP telemetry, HTTP API face.
"""
