# -*- test-case-name: tests.test_limits -*-
"""
Giving freed memory back to the operating system.

CPython frees a large map's entries (a hub that had tens of thousands of
groups) to the C allocator, which on glibc keeps most of it for reuse: the
process's RSS stays at its peak.  C{malloc_trim(0)} returns the free pages.
It walks the heap, so the core calls it rarely: once, a second after a
hub's group map shrank to a quarter of its peak.
"""

import ctypes
import ctypes.util
import gc


def _glibcTrim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None      # not glibc (musl, macOS): nothing to do
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _glibcTrim()


def releaseFreeMemory():
    """
    Return the C allocator's free memory to the system, where it can.

    @return: whether anything could be asked.
    """
    if _trim is None:
        return False
    _trim(0)
    return True


class MemoryReleaser:
    """
    Coalesces requests to give memory back: at most one trim per
    C{delay} seconds, however many hubs shrink meanwhile.
    """

    def __init__(self, reactor, delay=1.0):
        self._reactor = reactor
        self._delay = delay
        self._call = None
        self._collect = False
        self.trims = 0
        self.collections = 0

    def soon(self, collect=False):
        """
        Trim within C{delay} seconds; with C{collect}, run a full garbage
        collection first: what a dropped slow consumer held (its output
        buffer, the frames queued for it) can sit in reference cycles
        through its protocol and session, which CPython's generational
        collector reaches only rarely in a busy process; measured, twenty
        consumers dropped every few seconds then held several hundred MB.
        """
        self._collect = self._collect or collect
        if self._call is None or not self._call.active():
            self._call = self._reactor.callLater(self._delay, self._run)

    def _run(self):
        self._call = None
        if self._collect:
            self._collect = False
            gc.collect()
            self.collections += 1
        if releaseFreeMemory():
            self.trims += 1

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
