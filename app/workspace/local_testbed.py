"""The local testbed as the control panel starts it: a first run with no devices of one's own.

:class:`LocalTestbed` starts the same background testbed as ``edgetrain testbed up``
(:func:`app.testbed.daemon.start_testbed`, in ``$EDGETRAIN_HOME/testbed``) and remembers
whether it did: the window stops the testbed when it closes only if it started it, so a
testbed the user started from the command line keeps running.  Starting blocks for a few
seconds (the daemon starts, every device answers SSH): :meth:`LocalTestbed.start_async`
runs it on a worker thread of the window's asyncio loop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from app.extras import worker_extra_problem
from app.testbed import cgroups
from app.testbed.daemon import start_testbed, stop_testbed, testbed_info
from app.testbed.emulation import TESTBED_PRESETS, TestbedError
from app.testbed.local import DEFAULT_BASE_ADDR, DEFAULT_PORT, TestbedInfo, resolve_dir

log = logging.getLogger("edgetrain.workspace.testbed")
DEVICE_COUNTS = (2, 4)
#: The homogeneous testbed's board (the paper's smallest device).
HOMOGENEOUS_BOARD = TESTBED_PRESETS["homogeneous"][0]


@dataclass(frozen=True)
class TestbedRequest:
    """What the user asked for: how many devices, all alike or different boards."""

    __test__ = False
    n_devices: int = 2
    heterogeneous: bool = False

    def device_presets(self) -> list[str]:
        """One board preset per device.

        Heterogeneous picks boards evenly from the ``heterogeneous`` testbed preset (Nano,
        Nano, TX2, NX), so 2 devices are the slowest and the fastest board.
        """
        if self.n_devices < 1:
            raise ValueError(f"a testbed needs at least one device, not {self.n_devices}")
        if not self.heterogeneous:
            return [HOMOGENEOUS_BOARD] * self.n_devices
        boards = TESTBED_PRESETS["heterogeneous"]
        if self.n_devices == 1:
            return [boards[-1]]
        last = len(boards) - 1
        return [boards[min(last, round(i * last / (self.n_devices - 1)))] for i in range(self.n_devices)]

    def describe(self) -> str:
        """``2 devices: jetson-nano, jetson-nx``."""
        return f"{self.n_devices} devices: {', '.join(self.device_presets())}"


@dataclass(frozen=True)
class TestbedStarted:
    """The outcome of :meth:`LocalTestbed.start`.

    Attributes
    ----------
    info
        The running testbed (its ``inventory_path`` is what the window loads).
    started
        ``True``: this call started it; ``False``: one was already running there.
    owned
        Whether :meth:`LocalTestbed.stop` will stop it (it was started from here).
    """

    info: TestbedInfo
    started: bool
    owned: bool


def limits_text() -> str:
    """How the devices' board limits are enforced here (for the dialog)."""
    why = cgroups.unavailable_reason()
    if why is None:
        return ("Each device gets its board's physical memory and a CPU quota that keeps the boards' "
                "relative speeds (a cgroup per device).")
    return f"Memory is capped by address space only (RLIMIT_AS): {why}."


class LocalTestbed:
    """Starts the local testbed for the window and stops it again only if it started it.

    Parameters
    ----------
    dir
        Testbed directory (default ``$EDGETRAIN_HOME/testbed``, the CLI's).
    base_addr
        Loopback address of the first device; the others follow.
    port
        SSH port of every device (the CLI's default): the endpoints stay the same from one
        start to the next, so an inventory, trusted keys and profiles of an earlier start
        still match (0 picks a free port per device).
    timeout
        Seconds to wait for every device to answer SSH.
    """

    def __init__(self, dir: str | os.PathLike[str] | None = None, base_addr: str = DEFAULT_BASE_ADDR,
                 port: int = DEFAULT_PORT, timeout: float = 60.0) -> None:
        self._dir = dir
        self.base_addr, self.port, self.timeout = base_addr, port, timeout
        self.owned: TestbedInfo | None = None
        self._cond = threading.Condition()
        self._starting = False

    @property
    def dir(self) -> Path:
        return resolve_dir(self._dir)

    @property
    def starting(self) -> bool:
        with self._cond:
            return self._starting

    def running(self) -> TestbedInfo | None:
        """The testbed whose daemon runs in :attr:`dir`, if any."""
        return testbed_info(self.dir)

    def start(self, request: TestbedRequest) -> TestbedStarted:
        """Start the testbed (blocking), or find the one already running in :attr:`dir`.

        Raises
        ------
        TestbedError
            The daemon failed or was not ready in time (the message ends with its log).
        ValueError
            An impossible request.
        """
        presets = request.device_presets()
        problem = worker_extra_problem("the local testbed", "its devices run their workers with this Python")
        if problem and self.running() is None:
            raise TestbedError(problem)
        with self._cond:
            if self._starting:
                raise RuntimeError("the local testbed is already starting")
            self._starting = True
        try:
            info = self.running()
            if info is not None:
                return TestbedStarted(info, started=False, owned=self.owned is not None)
            info = start_testbed(self.dir, device_presets=presets, base_addr=self.base_addr,
                                 port=self.port, timeout=self.timeout)
            with self._cond:
                self.owned = info
            log.info("local testbed started in %s (%s)", info.dir, request.describe())
            return TestbedStarted(info, started=True, owned=True)
        finally:
            with self._cond:
                self._starting = False
                self._cond.notify_all()

    async def start_async(self, request: TestbedRequest) -> TestbedStarted:
        """:meth:`start` on a worker thread (for the window's asyncio loop)."""
        return await asyncio.to_thread(self.start, request)

    def stop(self, wait: float = 90.0) -> bool:
        """Stop the testbed if this object started it; returns whether it stopped one.

        A start still in progress is waited for (up to ``wait`` seconds) first, so a window
        closed while its testbed starts leaves nothing running.
        """
        with self._cond:
            self._cond.wait_for(lambda: not self._starting, timeout=wait)
            info, self.owned = self.owned, None
        if info is None:
            return False
        stop_testbed(info.dir)
        log.info("local testbed in %s stopped", info.dir)
        return True
