"""An asyncio event loop on its own thread, for front ends that own the main thread.

The GUI's main thread runs Qt's event loop; asyncssh needs a real asyncio loop with
sockets (PySide6's ``QtAsyncio`` cannot open them).  :class:`AsyncLoop` runs one on a
daemon thread.  Work goes in with :meth:`AsyncLoop.submit` (a coroutine) or
:meth:`AsyncLoop.call` (a plain callable run on the loop); results come back as
:class:`concurrent.futures.Future` objects, which the caller turns into queued Qt
signals.  Nothing here knows about Qt.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable, Coroutine, TypeVar

log = logging.getLogger("edgetrain.loop")
T = TypeVar("T")


class LoopError(RuntimeError):
    """The loop is not running (never started, or already stopped)."""


class AsyncLoop:
    """An asyncio loop running on a dedicated thread.

    Examples
    --------
    >>> loop = AsyncLoop().start()
    >>> loop.submit(asyncio.sleep(0, result=7)).result(timeout=5)
    7
    >>> loop.stop()
    """

    def __init__(self, name: str = "edgetrain-asyncio") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closing = False

    # ---------------------------------------------------------------- life cycle
    @property
    def running(self) -> bool:
        return self._loop is not None and self._loop.is_running() and not self._closing

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The underlying loop (for ``call_soon_threadsafe`` and friends)."""
        if self._loop is None:
            raise LoopError("the asyncio loop is not running; call start() first")
        return self._loop

    def start(self, timeout: float = 10.0) -> AsyncLoop:
        """Start the thread and wait until its loop runs (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._closing = False
        self._ready.clear()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise LoopError(f"the asyncio thread did not start within {timeout:.0f} s")
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                # let cancelled tasks run their finally blocks (remote kills, closes)
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self._loop = None

    def stop(self, timeout: float = 30.0) -> bool:
        """Cancel what still runs, stop the loop and join the thread.

        Cancelled tasks get to run their cleanup (the launcher kills remote workers in
        its ``finally``) before the loop closes.

        Returns
        -------
        bool
            Whether the thread ended within ``timeout`` seconds.
        """
        thread, loop = self._thread, self._loop
        if thread is None:
            return True
        self._closing = True
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # closed between the check and the call
                pass
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        alive = thread.is_alive()
        if alive:
            log.warning("the asyncio thread did not stop within %.0f s", timeout)
        else:
            self._thread = None
        return not alive

    # ---------------------------------------------------------------- work
    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future of its result."""
        if not self.running:
            coro.close()  # never awaited: close it so Python does not warn
            raise LoopError("the asyncio loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run the plain callable ``fn(*args)`` on the loop thread; returns a future."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

        if not self.running:
            raise LoopError("the asyncio loop is not running")
        self.loop.call_soon_threadsafe(run)
        return fut

    def __enter__(self) -> AsyncLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
