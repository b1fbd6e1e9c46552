"""The worker's lifeline to its controller: a worker never outlives the controller that started it.

The launcher keeps each worker's stdin open over the SSH channel and writes a newline to it
every few seconds.  When the controller dies (``kill -9``, a crash, a closed laptop lid),
its SSH connection closes and the device's SSH server closes the worker's stdin: the read
returns end-of-file.  When the controller's machine vanishes without closing anything (power,
Wi-Fi), the newlines stop.  Either way the worker ends itself.  Nothing else would end it:
a closed channel does not signal the process (OpenSSH running as root ignores the client's
signals, and the worker leads its own session), so it would go on training for nobody until
its steps ran out.

Standard library only.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import Callable

#: Exit statuses of a worker: done, failed, out of memory (it caught the allocation failure).
EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3
#: Exit status of a worker that ended itself because its controller went away.
EXIT_ORPHANED = 5
#: Exit status of a worker that wrote a checkpoint and ended because its controller asked.
EXIT_STOPPED = 6
#: How often the launcher writes a heartbeat, as a fraction of the worker's patience.
HEARTBEATS_PER_TIMEOUT = 10
#: Commands the controller may write on a line of its own: ``stop`` = checkpoint and end.
COMMANDS = ("stop",)
#: Seconds a worker that lost its controller has to write an emergency checkpoint before
#: it ends regardless (a step that takes minutes cannot be waited for).
EMERGENCY_GRACE_S = 8.0


def leave(reason: str) -> None:
    # stdout may be gone with the controller: say why on stderr (a device log, if any) and go
    try:
        sys.stderr.write(f"edgetrain worker: {reason}; ending\n")
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(EXIT_ORPHANED)


def watch(timeout_s: float, fd: int = 0, on_lost: Callable[[str], None] = leave,
          on_command: Callable[[str], None] | None = None,
          on_beat: Callable[[], None] | None = None) -> threading.Thread:
    """Watch ``fd`` (stdin) on a daemon thread; call ``on_lost(reason)`` when it reaches
    end-of-file or stays silent for ``timeout_s`` seconds.

    Every non-empty line is a command from the controller (:data:`COMMANDS`), handed to
    ``on_command``; an empty line is a heartbeat, answered through ``on_beat``.  Returns
    the thread (already started).
    Reading happens off the training thread, so a step that takes minutes does not delay
    the check.
    """
    def run() -> None:
        last = time.monotonic()
        pending = b""
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.1, timeout_s - (time.monotonic() - last)))
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError as exc:
                    on_lost(f"cannot read from the controller ({exc})")
                    return
                if not data:
                    on_lost("the controller's connection closed")
                    return
                last = time.monotonic()
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    command = line.strip().decode("ascii", "replace")
                    if command and on_command is not None:
                        on_command(command)
                    elif not command and on_beat is not None:
                        on_beat()
            elif time.monotonic() - last >= timeout_s:
                on_lost(f"no word from the controller for {timeout_s:.0f} s")
                return

    thread = threading.Thread(target=run, name="edgetrain-lifeline", daemon=True)
    thread.start()
    return thread
