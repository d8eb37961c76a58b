"""
The measurement behind broker/mqtt/codec.py: PUBLISH (64-byte payload,
QoS 1) encode and decode per operation with this codec, and, when they are
installed, the two maintained MQTT codecs on PyPI (`mqtt5`, Rust;
`moat-lib-mqtt`, sans-io), plus what the fan-out path really pays per
subscriber (a PublishTemplate with its packet id patched).  Prints figures;
asserts nothing but that all produce the same bytes.

    .venv/bin/python bench/mqtt_codec.py [--number N]
"""

import argparse
import timeit

from broker.mqtt import codec

TOPIC = "sensors/room1/temp"
PAYLOAD = bytes(range(64))


def candidates():
    wire = codec.encodePublish(TOPIC, PAYLOAD, 1, False, 7, codec.V5)
    out = [
        ("struct encode", lambda: codec.encodePublish(TOPIC, PAYLOAD, 1, False, 7, codec.V5)),
        ("struct decode", lambda: codec.decodePublish(wire[0] & 0x0F, wire[2:], codec.V5)),
    ]
    template = codec.PublishTemplate(TOPIC, PAYLOAD, 1, False, codec.V5)
    assert template.bytes(7) == wire
    out.append(("template per subscriber", lambda: template.bytes(7)))
    try:
        import mqtt5
    except ImportError:
        print("mqtt5 not installed: skipped")
    else:
        assert mqtt5.PublishPacket(TOPIC, PAYLOAD, qos=mqtt5.QoS(1), packet_id=7).write() == wire
        out += [
            ("mqtt5 encode", lambda: mqtt5.PublishPacket(
                TOPIC, PAYLOAD, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=7).write()),
            ("mqtt5 decode", lambda: mqtt5.read(memoryview(wire))),
        ]
    try:
        from moat.lib.mqtt import _types as moat
    except ImportError:
        print("moat-lib-mqtt not installed: skipped")
    else:
        def moatEncode():
            b = bytearray()
            moat.MQTTPublishPacket(topic=TOPIC, payload=PAYLOAD, qos=moat.QoS.AT_LEAST_ONCE,
                                   packet_id=7).encode(b)
            return b
        assert bytes(moatEncode()) == wire
        out += [("moat encode", moatEncode),
                ("moat decode", lambda: moat.decode_packet(memoryview(wire)))]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=100000)
    args = parser.parse_args()
    for name, fn in candidates():
        best = min(timeit.repeat(fn, number=args.number, repeat=3))
        print(f"{name:24s} {best / args.number * 1e6:7.2f} us/op")


if __name__ == "__main__":
    main()
