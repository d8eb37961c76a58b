"""
An asyncio event loop on a thread of its own, for tests that drive an
asyncio library (Microsoft's asynchronous SDKs) against a broker on the
reactor: coroutines are handed to the loop, and waited for from the
reactor's thread pool, so the reactor keeps serving them.
"""

import asyncio
import threading

from twisted.internet import threads


class LoopThread:
    """
    One asyncio loop, running until L{close}.
    """

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def wait(self, coroutine, timeout=30):
        """
        Run C{coroutine} on the loop; block (a thread, not the reactor)
        for its result.
        """
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run(self, coroutine, timeout=30):
        """
        Run C{coroutine} on the loop; a Deferred of its result.
        """
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return threads.deferToThread(future.result, timeout)

    def close(self, coroutine=None):
        """
        Run C{coroutine} (a client's close) if given, then stop the loop; a
        Deferred.
        """
        def closing():
            try:
                if coroutine is not None:
                    self.wait(coroutine, 10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)
                self.loop.close()
        return threads.deferToThread(closing)
