"""
The MQTT face, registered as an L{broker.plugins.IBrokerFace} plugin of its
own, exactly as an operator's package would register a face
(docs/plugins.md): the broker's launch code knows nothing of MQTT.
"""

from broker.plugins import PackageFace

mqtt = PackageFace("mqtt", 50, "MQTT 3.1.1 and 5.0 over TCP, TLS and WebSocket")
