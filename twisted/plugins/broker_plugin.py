from twisted.application.service import ServiceMaker

broker = ServiceMaker(
    "broker",
    "broker.tap",
    "One process routing TCP, UDP, WebSocket and HTTP(S) through one core.",
    "broker",
)
