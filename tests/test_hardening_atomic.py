"""The one atomic writer survives kill -9 at any moment: the file is always a whole version.

A child process rewrites a 4 MiB file over and over with :func:`app.paths.atomic_write_text`
(what run records, sessions, inventories and known_hosts are written with); it is
SIGKILLed at a random moment, 50 times.  After every kill the file must be one complete
version (header and body agree: never truncated, never a mix), and never older than the
version seen after the previous kill.  Some kills land mid-write (a temp file is left
behind: the helper's rename had not happened), so the window that matters is hit.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 * 2**20
KILLS = 50

# shared by the test and the child: version g of the file
CONTENT = '''
def content(g, size):
    return f"version {g}\\n" + chr(ord("a") + g % 26) * (size + g % 1000)
'''
WRITER = CONTENT + '''
import sys
sys.path.insert(0, sys.argv[1])
from app.paths import atomic_write_text
target, size, g = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while True:
    atomic_write_text(target, content(g, size))
    g += 1
'''
ns: dict = {}
exec(CONTENT, ns)
content = ns["content"]


def version_of(text: str) -> int:
    """The version a whole file holds; fails on a torn or mixed one."""
    head, sep, _ = text.partition("\n")
    assert sep and head.startswith("version "), f"no header: {text[:40]!r}"
    g = int(head.split()[1])
    assert text == content(g, SIZE), f"version {g} is torn: {len(text)} characters, ends {text[-20:]!r}"
    return g


def test_atomic_write_survives_kill_9_at_random_moments(tmp_path):
    target = tmp_path / "record.json"
    target.write_text(content(0, SIZE))
    rng = random.Random(1234)
    seen, mid_write = 0, 0
    for _ in range(KILLS):
        child = subprocess.Popen([sys.executable, "-S", "-c", WRITER, str(ROOT), str(target), str(SIZE),
                                  str(seen + 1)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.15))   # a random moment within the first few writes
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=30) == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        now = version_of(target.read_text())
        assert now >= seen, f"the file went back from version {seen} to {now}"
        seen = now
        temps = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
        mid_write += bool(temps)
        for p in temps:  # what a killed writer leaves: never the file itself
            (tmp_path / p).unlink()
    assert sorted(os.listdir(tmp_path)) == ["record.json"]
    assert seen > 0, "no write ever completed: the kills came too early to test anything"
    # about a quarter land between the temp file's creation and the rename (the rest mostly
    # in the folder's fsync after it); a few are enough to show the window is hit
    assert mid_write >= 3, f"only {mid_write} of {KILLS} kills landed mid-write"
