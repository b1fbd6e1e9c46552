"""Where EdgeTrain keeps the user's files on the controller, and how it writes them."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def edgetrain_home() -> Path:
    """EdgeTrain's state directory (``$EDGETRAIN_HOME``, default ``~/.edgetrain``)."""
    return Path(os.environ.get("EDGETRAIN_HOME") or Path.home() / ".edgetrain")


def default_runs_dir() -> Path:
    """Run records: one ``runs/<run id>/`` directory per run."""
    return edgetrain_home() / "runs"


def default_known_hosts() -> Path:
    """EdgeTrain's own known_hosts (the trusted domain), unless an inventory names another."""
    return edgetrain_home() / "known_hosts"


def atomic_write_text(path: Path | str, text: str, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``text`` so that a crash at any moment leaves the old file or
    the new one, never a torn one.

    The text goes to a temp file in the same folder (a unique name: two writers never
    share it), is flushed to disk, renamed over ``path``, and the folder is flushed so the
    rename itself survives a power cut.  An existing file keeps its permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
