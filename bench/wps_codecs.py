"""
Web PubSub wire formats: what encoding a group message and decoding a
sendToGroup request cost in the JSON subprotocol (broker/webpubsub/frames.py)
and in the protobuf one (broker/webpubsub/protobuf.py), with the frame
sizes.  In-process timeit, no sockets: the per-message CPU of the codecs
alone (a fan-out encodes once per format, so the encode figure is per
message, not per receiver).  Prints figures and asserts nothing.

Usage: python bench/wps_codecs.py [--number N]
"""

import argparse
import json
import timeit

from google.protobuf.internal import api_implementation

from broker.core.message import FROM_GROUP, TEXT, Delivery, Message
from broker.webpubsub import frames, protobuf
from broker.webpubsub.proto import webpubsub_pb2 as pb

Up = pb.UpstreamMessage
PAYLOAD = {"user": "alice", "text": "hello everyone, this is a chat line",
           "ts": 1712345678901, "n": 42}
TEXT_LINE = "hello everyone, this is a chat line"


def cases():
    jsonDelivery = Delivery(Message.json(PAYLOAD), FROM_GROUP, "room-17", "alice", "c1")
    textDelivery = Delivery(Message(TEXT, TEXT_LINE.encode()), FROM_GROUP, "room-17",
                            "alice", "c1")

    def jsonRequest(dataType, data):
        return json.dumps({"type": "sendToGroup", "group": "room-17", "ackId": 12345,
                           "dataType": dataType, "data": data}).encode()

    def protobufRequest(**data):
        return Up(send_to_group_message=Up.SendToGroupMessage(
            group="room-17", ack_id=12345, data=pb.MessageData(**data))).SerializeToString()

    return [
        ("encode group message, json payload", jsonDelivery,
         lambda: frames.messageFrame(jsonDelivery), lambda: protobuf.messageFrame(jsonDelivery)),
        ("encode group message, text payload", textDelivery,
         lambda: frames.messageFrame(textDelivery), lambda: protobuf.messageFrame(textDelivery)),
        ("decode sendToGroup, json payload", (jsonRequest("json", PAYLOAD),
                                              protobufRequest(json_data=json.dumps(PAYLOAD))),
         None, None),
        ("decode sendToGroup, text payload", (jsonRequest("text", TEXT_LINE),
                                              protobufRequest(text_data=TEXT_LINE)),
         None, None),
        ("encode ack", None, lambda: frames.ack(12345), lambda: protobuf.ack(12345)),
    ]


def best(f, number):
    return min(timeit.repeat(f, number=number, repeat=5)) / number * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200000)
    args = parser.parse_args()
    print(f"protobuf runtime: {api_implementation.Type()}")
    print(f"{'':40s} {'JSON':>10s} {'protobuf':>10s}   bytes JSON / protobuf")
    for label, subject, encodeJSON, encodeProtobuf in cases():
        if encodeJSON is None:
            jsonFrame, protobufFrame = subject
            encodeJSON = lambda f=jsonFrame: frames.parseRequest(f)  # noqa: E731
            encodeProtobuf = lambda f=protobufFrame: protobuf.parseRequest(f)  # noqa: E731
        else:
            jsonFrame, protobufFrame = encodeJSON(), encodeProtobuf()
        print(f"{label:40s} {best(encodeJSON, args.number):8.2f}us "
              f"{best(encodeProtobuf, args.number):8.2f}us   "
              f"{len(jsonFrame)} / {len(protobufFrame)}")


if __name__ == "__main__":
    main()
