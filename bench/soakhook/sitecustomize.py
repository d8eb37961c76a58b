"""
A diagnostic for C{bench/soak.py --gc-every S}: on the C{PYTHONPATH} of the
broker only, it runs a full garbage collection every C{SOAK_GC_EVERY}
seconds (from a thread, inside the twistd process).  Comparing the RSS
with and without it tells memory held by unreachable reference cycles
(dropped connections waiting for the cyclic collector) from memory still
in use.  The broker's own code is not changed.
"""

import gc
import os
import sys
import threading
import time


def _collect(every):
    while True:
        time.sleep(every)
        gc.collect()


if "twistd" in os.path.basename(sys.argv[0] if sys.argv else ""):
    threading.Thread(target=_collect, args=(float(os.environ["SOAK_GC_EVERY"]),),
                     daemon=True, name="soak-gc").start()
