"""
eCDN API benchmark: requests/s and p50/p99 latency per endpoint over real
HTTP keep-alive connections to a real C{twistd broker}.

    .venv/bin/python bench/ecdn.py [--rate 500] [--seconds 10] [--connections 4]

For each endpoint: a paced run at --rate requests/s (the target is a p99
under 20 ms at 500/s; Meet allows 2 s), then an unpaced run with the same
connections (the most this process can serve).  The load runs in threads
of this process; the broker is a separate process.
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from broker.ecdn.keyring import newKeyLine  # noqa: E402

SDP = ("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
       "a=candidate:1 1 udp 2122260223 10.1.2.3 50000 typ host\r\n") * 20
RULES = "".join(f"10.{i}.0.0/16 allow site{i}\n" for i in range(200)) + "10.0.0.0/8 block corp\n"


def startBroker(directory):
    keys = os.path.join(directory, "keys.txt")
    with open(keys, "w") as f:
        f.write(newKeyLine("k1") + "\n")
    os.chmod(keys, 0o600)
    rules = os.path.join(directory, "rules.txt")
    with open(rules, "w") as f:
        f.write(RULES)
    config = os.path.join(directory, "broker.toml")
    with open(config, "w") as f:
        f.write(f"""
[broker]
state_dir = "{directory}/state"
[admin]
listen = ["tcp:0:interface=127.0.0.1"]
[webpubsub]
enabled = false
[ecdn]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
key_file = "{keys}"
rules_file = "{rules}"
""")
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([sys.executable, twistd, "-n", "--pidfile=", "broker",
                             "--config", config], cwd=directory, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    pattern = re.compile(r"ecdn\.listen\[0\] listening on 127\.0\.0\.1:(\d+)")
    for line in proc.stdout:
        m = pattern.search(line.decode())
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit("the broker did not start")


def worker(port, path, body, deadline, interval, start, latencies, errors):
    connection = http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json", "Origin": "https://meet.google.com"}
    n = 0
    while True:
        scheduled = start + n * interval if interval else time.perf_counter()
        now = time.perf_counter()
        if scheduled > deadline:
            break
        if scheduled > now:
            time.sleep(scheduled - now)
        sent = time.perf_counter()
        # Open loop: latency counts from the scheduled time when late.
        begin = min(sent, scheduled) if interval else sent
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        data = response.read()
        latencies.append(time.perf_counter() - begin)
        if response.status != 200 or json.loads(data).get("error") is not None:
            errors.append(response.status)
        n += 1
    connection.close()


def run(port, path, body, rate, seconds, connections):
    latencies, errors, threads = [], [], []
    start = time.perf_counter() + 0.2
    deadline = start + seconds
    interval = connections / rate if rate else 0
    for i in range(connections):
        offset = i * interval / connections if interval else 0
        t = threading.Thread(target=worker, args=(port, path, body, deadline, interval,
                                                  start + offset, latencies, errors))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return len(latencies) / elapsed, pct(0.50), pct(0.99), len(errors)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        proc, port = startBroker(directory)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            conn.request("POST", "/v1/encrypt-sdp", json.dumps({"data": SDP}),
                         {"Content-Type": "application/json"})
            token = json.loads(conn.getresponse().read())["result"]
            conn.close()
            bodies = {
                "get-peering-group": {"availableIPs": [{"format": "ipv4", "address": "172.16.0.1"},
                                                       {"format": "ipv4", "address": "10.150.3.4"}]},
                "encrypt-sdp": {"data": SDP},
                "decrypt-sdp": {"data": token},
            }
            print(f"{len(SDP)}-byte SDP, {RULES.count(chr(10))} rules, "
                  f"{args.connections} keep-alive connections, {args.seconds:.0f} s a run")
            print(f"{'endpoint':<20}{'mode':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
            for name, body in bodies.items():
                data = json.dumps(body)
                for label, rate in ((f"paced {args.rate:.0f}/s", args.rate), ("unpaced", 0)):
                    rps, p50, p99, errors = run(port, f"/v1/{name}", data, rate,
                                                args.seconds, args.connections)
                    print(f"{name:<20}{label:<14}{rps:>9.0f}{p50:>9.2f}{p99:>9.2f}{errors:>8}")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
