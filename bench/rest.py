"""
REST API benchmark for the Web PubSub face.

Runs the broker as a real C{twistd broker} process on loopback ports and
calls its REST API:

  - sdk: the official service SDK (azure-messaging-webpubsubservice), one
    thread, sequential C{send_to_group} calls: what one application thread
    gets, SDK overhead (a new JWT per call) included;
  - raw: P processes, each with one keep-alive HTTP/1.1 connection (prepared
    bytes on a socket, or C{--client httplib}: Python's http.client), sending
    64-byte text messages to a group as fast as answers come back (the
    token is signed once per process: its audience is the URL, the same for
    every call); requests/s and latency p50/p99;
  - raw with group history on (C{history_messages = 1000}) to show what
    recording a position per message costs.

The group has one WebSocket subscriber that drains everything, so every
send is a real delivery.  Prints figures and asserts nothing.

Usage: python bench/rest.py [--quick] [--procs P] [--seconds S] [--only PART ...]

C{BENCH_TWISTD_ARGS="--profile=FILE --profiler=cprofile --savestats"}
profiles the broker during a run (each broker started overwrites FILE).
"""

import argparse
import http.client
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

KEY = "bench-key-0123456789abcdef0123456789abcdef"
HUB = "bench"
GROUP = "g"
CLK_TCK = os.sysconf("SC_CLK_TCK")
API = "api-version=2024-12-01"


def freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpuSeconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Broker:
    def __init__(self, history, twistd=None, pollSpin=0):
        self.dir = tempfile.mkdtemp(prefix="bench-rest-")
        self.port = freePort()
        admin = freePort()
        config = os.path.join(self.dir, "broker.toml")
        with open(config, "w") as f:
            f.write(f"""
[broker]
state_dir = "{self.dir}/var"
{f"poll_spin_us = {pollSpin}" if pollSpin else ""}
[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
[webpubsub]
listen = ["tcp:{self.port}:interface=127.0.0.1"]
access_keys = ["{KEY}"]
[webpubsub.hubs.{HUB}]
history_messages = {history}
""")
        twistd = twistd or os.path.join(os.path.dirname(sys.executable), "twistd")
        self.log = open(os.path.join(self.dir, "twistd.log"), "w")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", *os.environ.get("BENCH_TWISTD_ARGS", "").split(),
             "broker", "--config", config],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/api/health")
                if c.getresponse().status == 200:
                    c.close()
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("broker did not start; see " + self.log.name)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def subscriber(broker, stop):
    """
    One JSON WebSocket client in the group, draining every message.
    """
    import websocket
    from azure.messaging.webpubsubservice import WebPubSubServiceClient

    sdk = WebPubSubServiceClient.from_connection_string(
        f"Endpoint={broker.endpoint};AccessKey={KEY};Version=1.0;", hub=HUB)
    url = sdk.get_client_access_token(groups=[GROUP])["url"]
    ws = websocket.create_connection(url, subprotocols=["json.webpubsub.azure.v1"])
    ws.settimeout(0.5)
    count = [0]

    def drain():
        while not stop.is_set():
            try:
                ws.recv()
                count[0] += 1
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                break
        ws.close()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t, count


def sdkRun(broker, seconds):
    from azure.messaging.webpubsubservice import WebPubSubServiceClient

    sdk = WebPubSubServiceClient.from_connection_string(
        f"Endpoint={broker.endpoint};AccessKey={KEY};Version=1.0;", hub=HUB)
    lat = []
    end = time.monotonic() + seconds
    cpu = time.thread_time()
    while time.monotonic() < end:
        t0 = time.perf_counter()
        sdk.send_to_group(GROUP, "x" * 64, content_type="text/plain")
        lat.append(time.perf_counter() - t0)
    cpu = time.thread_time() - cpu
    sdk.close()
    # What the SDK itself costs a call bounds this figure, however fast the
    # broker answers.
    print(f"{'':<40} the SDK's own CPU: {cpu / len(lat) * 1e6:,.0f} µs a call "
          f"(of {sum(lat) / len(lat) * 1e6:,.0f} µs)")
    return lat


def rawWorker(port, seconds, out, client="socket"):
    import jwt

    path = f"/api/hubs/{HUB}/groups/{GROUP}/:send?{API}"
    token = jwt.encode({"aud": f"http://127.0.0.1:{port}{path}",
                        "exp": int(time.time() + 3600)}, KEY, algorithm="HS256")
    headers = {"Authorization": "Bearer " + token, "Content-Type": "text/plain"}
    body = b"x" * 64
    if client == "socket":
        socketWorker(port, path, headers, body, seconds, out)
        return
    c = http.client.HTTPConnection("127.0.0.1", port)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        c.request("POST", path, body, headers)
        r = c.getresponse()
        r.read()
        if r.status != 202:
            raise SystemExit(f"unexpected status {r.status}")
        lat.append(time.perf_counter() - t0)
    c.close()
    out.put(lat)


def socketWorker(port, path, headers, body, seconds, out):
    """
    The same requests as http.client sends, written as prepared bytes on
    a plain socket, and just enough of a parser for the answer (its
    status, and a C{Content-Length} or chunked body): a load that costs
    far less than the broker's side of the request.
    """
    raw = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
           + f"Content-Length: {len(body)}\r\n\r\n").encode("ascii") + body
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = b""
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        s.sendall(raw)
        while True:
            head = buffer.find(b"\r\n\r\n")
            if head >= 0:
                lower = buffer[:head].lower()
                if b"transfer-encoding: chunked" in lower:
                    stop = buffer.find(b"0\r\n\r\n", head + 4)
                    if stop >= 0:
                        rest = stop + 5
                        break
                else:
                    n = lower.find(b"content-length:")
                    length = int(lower[n + 15:].split(b"\r\n", 1)[0]) if n >= 0 else 0
                    if len(buffer) >= head + 4 + length:
                        rest = head + 4 + length
                        break
            data = s.recv(65536)
            if not data:
                raise SystemExit("the broker closed the connection")
            buffer += data
        if buffer[9:12] != b"202":
            raise SystemExit(f"unexpected answer {buffer[:rest]!r}")
        buffer = buffer[rest:]
        lat.append(time.perf_counter() - t0)
    s.close()
    out.put(lat)


def rawRun(broker, procs, seconds, client="socket"):
    q = multiprocessing.Queue()
    ps = [multiprocessing.Process(target=rawWorker, args=(broker.port, seconds, q, client))
          for _ in range(procs)]
    for p in ps:
        p.start()
    lat = []
    for _ in ps:
        lat.extend(q.get())
    for p in ps:
        p.join()
    return lat


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def report(name, lat, seconds, cpu):
    print(f"{name:<48} {len(lat) / seconds:>9,.0f} req/s   p50 {pct(lat, .5) * 1e3:6.2f} ms"
          f"   p99 {pct(lat, .99) * 1e3:6.2f} ms   broker CPU {cpu / seconds * 100:4.0f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-second runs")
    ap.add_argument("--procs", type=int, default=2, help="raw client processes (default 2)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--client", choices=("socket", "httplib"), default="socket",
                    help="the raw runs' client: prepared bytes on a socket (default), or "
                         "http.client (what figures before 2026-12-06 used)")
    ap.add_argument("--only", action="append", choices=("sdk", "raw", "history"),
                    help="run only this part (repeatable): the SDK run, the raw run "
                         "without history, the raw run with history")
    ap.add_argument("--twistd", default=None,
                    help="another checkout's twistd (its venv's), to compare brokers")
    ap.add_argument("--poll-spin", type=int, default=0, metavar="US",
                    help="the broker's broker.poll_spin_us (default 0: sleep when idle)")
    opts = ap.parse_args()
    seconds = 2.0 if opts.quick else opts.seconds
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {seconds:.0f} s per run, "
          f"64-byte text messages to a group with one subscriber")
    parts = set(opts.only or ("sdk", "raw", "history"))
    for history in (0, 1000):
        if history == 0 and not parts & {"sdk", "raw"} or history and "history" not in parts:
            continue
        broker = Broker(history, opts.twistd, opts.poll_spin)
        stop = threading.Event()
        try:
            t, received = subscriber(broker, stop)
            label = f"history_messages={history}"
            if history == 0 and "sdk" in parts:
                c0 = cpuSeconds(broker.proc.pid)
                lat = sdkRun(broker, seconds)
                report(f"sdk, 1 thread, {label}", lat, seconds, cpuSeconds(broker.proc.pid) - c0)
            if history or "raw" in parts:
                c0 = cpuSeconds(broker.proc.pid)
                lat = rawRun(broker, opts.procs, seconds, opts.client)
                report(f"raw keep-alive, {opts.procs} procs, {opts.client}, {label}", lat, seconds,
                       cpuSeconds(broker.proc.pid) - c0)
            time.sleep(0.5)
            stop.set()
            t.join(5)
            print(f"{'':<40} subscriber received {received[0]:,} messages")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
