"""
The MQTT face: MQTT 3.1.1 and 5.0 over TCP, TLS and WebSocket, routed
through the broker's core (an MQTT topic is a core group in a hub).
"""
