"""
The subscriber worker of the fan-out benchmark (L{fanout}): C{python
bench/rawload.py PORT TOKEN [webpubsub|mqtt]}, driven by the controller over
stdin/stdout with the commands of L{wsload.WorkerControl}.

A figure of a server is only as good as the load is cheap.  A Twisted
subscriber spends about 10 µs of Python per delivery (the reactor's
context and logging wrappers, then the protocol), as much as the server it
measures, so at one message in flight the clients set the pace.  This
worker is one C{epoll} loop over non-blocking sockets: a read is a
C{recv} and a walk over frame headers, with a timestamp taken from the
first message of each read.  The wire (handshake, WebSocket and MQTT
framing) is L{wsload}'s.
"""

import json
import os
import select
import socket
import sys
import time
from array import array
from collections import deque

from wsload import (_STAMP, GROUP, MqttStream, clientFrame, mqttConnect, mqttSubscribe,
                    openingHandshake, publishPayload, readFrames)

CONCURRENCY = 64    # handshakes in flight, so the server's listen backlog never overflows

HANDSHAKE, SUBSCRIBING, OPEN = range(3)


class Conn:
    __slots__ = ("sock", "state", "buf", "mqtt", "serial")

    def __init__(self, sock, mqtt, serial):
        self.sock = sock
        self.state = HANDSHAKE
        self.buf = b""
        self.mqtt = MqttStream() if mqtt else None
        self.serial = serial


class Worker:
    def __init__(self, port, token, kind):
        self.port = port
        self.mqtt = kind == "mqtt"
        if self.mqtt:
            self.request = openingHandshake(port, None, "mqtt", "/mqtt")
        else:
            self.request = openingHandshake(port, token)
        self.ep = select.epoll()
        self.conns = {}
        self.frames = 0
        self.samples = array("q")
        self.open = 0
        self.lost = 0
        self.serial = 0
        self.commands = deque()
        self.current = None     # the command under way: (verb, args, state)
        self.stdin = sys.stdin.buffer.raw
        self.inbuf = b""
        self.ep.register(self.stdin.fileno(), select.EPOLLIN)

    # -- commands ---------------------------------------------------------

    def reply(self, extra):
        extra.update(frames=self.frames, open=self.open, lost=self.lost)
        sys.stdout.write(json.dumps(extra) + "\n")
        sys.stdout.flush()

    def readCommands(self):
        data = os.read(self.stdin.fileno(), 65536)
        if not data:
            raise SystemExit(0)     # the controller went away
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            self.commands.append(line.decode("ascii").split())

    def step(self):
        """
        Start queued commands, strictly in order; finish the one under way
        when it is done.
        """
        while True:
            if self.current is not None:
                verb, args, state = self.current
                if verb == "connect":
                    if state["pending"] or state["connecting"]:
                        self.startConnects(state)
                        return
                    self.current = None
                    self.reply({"seconds": time.monotonic() - state["started"],
                                "failed": len(state["failures"]),
                                "firstFailure": state["failures"][0] if state["failures"]
                                else None})
                elif verb == "reach":
                    if self.frames >= state["target"]:
                        self.current = None
                        self.reply({})
                    elif time.monotonic() > state["deadline"]:
                        self.current = None
                        self.reply({"timeout": True})
                    else:
                        return
            if not self.commands:
                return
            words = self.commands.popleft()
            verb, args = words[0], words[1:]
            if verb == "connect":
                self.current = (verb, args, {"pending": int(args[0]), "connecting": set(),
                                             "failures": [], "started": time.monotonic()})
            elif verb == "reach":
                self.current = (verb, args, {"target": int(args[0]),
                                             "deadline": time.monotonic() + float(args[1])})
            elif verb == "count":
                self.reply({})
            elif verb == "reset":
                self.samples = array("q")
                self.reply({})
            elif verb == "dump":
                with open(args[0], "wb") as f:
                    self.samples.tofile(f)
                self.reply({"samples": len(self.samples)})
            else:
                self.reply({"error": f"unknown command {verb!r}"})

    def startConnects(self, state):
        while state["pending"] and len(state["connecting"]) < CONCURRENCY:
            state["pending"] -= 1
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect_ex(("127.0.0.1", self.port))
            self.serial += 1
            conn = Conn(sock, self.mqtt, self.serial)
            self.conns[sock.fileno()] = conn
            state["connecting"].add(conn)
            self.ep.register(sock.fileno(), select.EPOLLOUT)

    def connected(self, conn, failure=None):
        if self.current is None or self.current[0] != "connect":
            return
        state = self.current[2]
        state["connecting"].discard(conn)
        if failure is not None:
            state["failures"].append(failure)
        else:
            self.open += 1

    # -- sockets ----------------------------------------------------------

    def drop(self, conn, why):
        fd = conn.sock.fileno()
        self.ep.unregister(fd)
        del self.conns[fd]
        conn.sock.close()
        if conn.state == OPEN:
            self.open -= 1
            self.lost += 1
        else:
            self.connected(conn, why)

    def writable(self, conn):
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.drop(conn, os.strerror(err))
            return
        conn.sock.send(self.request)
        self.ep.modify(conn.sock.fileno(), select.EPOLLIN)

    def readable(self, conn):
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            self.drop(conn, str(e))
            return
        if not data:
            self.drop(conn, "connection closed")
            return
        if conn.buf:
            data = conn.buf + data
            conn.buf = b""
        if conn.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                conn.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self.drop(conn, data[:data.find(b"\r\n")].decode("latin-1"))
                return
            data = data[end + 4:]
            if conn.mqtt is None:
                conn.state = OPEN
                self.connected(conn)
            else:
                conn.state = SUBSCRIBING
                conn.sock.send(clientFrame(mqttConnect(f"sub-{os.getpid()}-{conn.serial}"), 0x2)
                               + clientFrame(mqttSubscribe(GROUP), 0x2))
        self.frames_(conn, data)

    def frames_(self, conn, data):
        mqtt = conn.mqtt
        count, first, payloads, controls, conn.buf = readFrames(data, mqtt is not None)
        for opcode, payload in controls:
            if opcode == 0x9:
                conn.sock.send(clientFrame(payload, 0xA))
            else:
                self.drop(conn, "closed by the server")
                return
        if payloads:
            count = 0
            for kind, body in mqtt.packets(payloads):
                if kind == 3:
                    count += 1
                    if first is None:
                        first = publishPayload(body)
                elif kind == 9 and conn.state == SUBSCRIBING:
                    conn.state = OPEN
                    self.connected(conn)
        if count:
            self.samples.append(time.monotonic_ns() - int(first[_STAMP]))
            self.frames += count

    def run(self):
        stdin = self.stdin.fileno()
        conns = self.conns
        while True:
            timeout = 0.05 if self.current is not None else -1
            for fd, events in self.ep.poll(timeout):
                if fd == stdin:
                    self.readCommands()
                    continue
                conn = conns.get(fd)
                if conn is None:
                    continue
                if events & select.EPOLLOUT:
                    self.writable(conn)
                elif events & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self.readable(conn)
            self.step()


if __name__ == "__main__":
    Worker(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "webpubsub").run()
