"""
The admin API's listings at scale: one hub of N connections (admitted to
the core directly, as the console's paging test does), and the time of one
page of the connections listing, with and without a search, and of the
overview.  Prints figures; asserts nothing.

    .venv/bin/python bench/admin.py [--connections 100000]
"""

import argparse
import time

from twisted.internet.task import Clock

from broker.admin.api import AdminAPI
from broker.admin.auth import Guard
from broker.admin.rates import RateSampler
from broker.core.router import Core
from tests.recorder import RecordingConnection


def timed(label, fn, repeat=20):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    ms = (time.perf_counter() - start) / repeat * 1000
    print(f"{label:<58} {ms:8.2f} ms")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100000)
    n = parser.parse_args().connections
    clock = Clock()
    core = Core(clock)
    hub = core.hub("big")
    start = time.perf_counter()
    for i in range(n):
        uid = f"user{i % 1000}"
        hub.admit(RecordingConnection(f"c{i:07d}", uid), uid, (), [f"g{i % 100}"])
    print(f"admitted {n:,} connections in {time.perf_counter() - start:.1f} s")
    api = AdminAPI(core, {}, Guard("t", core.quietLog), RateSampler(clock, []))

    def listing(args):
        return lambda: api._hubs(None, "GET", ["big", "connections"], args)
    timed("connections, first page (limit 50)", listing({}))
    timed(f"connections, last page (offset {n - 50:,})", listing({"offset": str(n - 50)}))
    timed("connections, limit 500", listing({"limit": "500"}))
    r = timed("connections, search matching 11% (user7)", listing({"search": "user7"}))
    print(f"{'':<58} total {r['total']:,}")
    r = timed("connections, search matching one id", listing({"search": f"c{n - 1:07d}"}))
    print(f"{'':<58} total {r['total']:,}")
    timed("groups, search", lambda: api._hubs(None, "GET", ["big", "groups"], {"search": "g9"}))
    timed("users, search", lambda: api._hubs(None, "GET", ["big", "users"], {"search": "user9"}))
    timed("overview", api.overview)



if __name__ == "__main__":
    main()
