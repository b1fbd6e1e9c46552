"""Where EdgeTrain keeps the user's files on the controller, and how it reads and writes them."""
from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path

#: The largest inventory, session or known_hosts file EdgeTrain reads: real ones are a few
#: KiB, so anything bigger is the wrong file (a model, a log) and is refused, not parsed.
MAX_USER_FILE_BYTES = 16 * 2**20


def edgetrain_home() -> Path:
    """EdgeTrain's state directory (``$EDGETRAIN_HOME``, default ``~/.edgetrain``)."""
    return Path(os.environ.get("EDGETRAIN_HOME") or Path.home() / ".edgetrain")


def default_runs_dir() -> Path:
    """Run records: one ``runs/<run id>/`` directory per run."""
    return edgetrain_home() / "runs"


def default_known_hosts() -> Path:
    """EdgeTrain's own known_hosts (the trusted domain), unless an inventory names another."""
    return edgetrain_home() / "known_hosts"


def atomic_write_bytes(path: Path | str, data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves the old file or
    the new one, never a torn one.

    The data goes to a temp file in the same folder (a unique name: two writers never
    share it), is flushed to disk, renamed over ``path``, and the folder is flushed so the
    rename itself survives a power cut.  An existing file keeps its permissions.

    Parameters
    ----------
    path
        The file to replace (its folder is created if missing).
    data
        The complete new content.
    mode
        Permissions of a new file.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def asset_path(name: str) -> Path | None:
    """A file of EdgeTrain's ``assets/`` folder (the icon), or ``None`` when absent.

    In the desktop bundle the assets lie in PyInstaller's unpacked data folder
    (``sys._MEIPASS``); in a source tree or an editable install, beside ``app/``.
    """
    roots = [Path(sys._MEIPASS)] if hasattr(sys, "_MEIPASS") else []
    roots.append(Path(__file__).resolve().parent.parent)
    return next((r / "assets" / name for r in roots if (r / "assets" / name).is_file()), None)


def atomic_write_text(path: Path | str, text: str, mode: int = 0o644) -> Path:
    """:func:`atomic_write_bytes` of ``text`` as UTF-8 (the one writer of the user's files)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def read_user_text(path: Path | str, what: str, error: type[Exception], *, missing_fix: str,
                   errors: str = "strict", limit: int = MAX_USER_FILE_BYTES) -> str:
    """Read one of the user's text files, or raise ``error`` naming the file and the fix.

    Every way the read can fail becomes one clear message (``"<path>: <problem>. Fix:
    <fix>"``): no such file, a folder, a device or pipe (never read: it could block or
    never end), no permission, over ``limit`` bytes, or bytes that are not UTF-8.  The
    file is only read.

    Parameters
    ----------
    path
        The file.
    what
        What the file should be, for messages (``"inventory"``, ``"session"``).
    error
        The caller's exception type; it is called with the message alone.
    missing_fix
        What to do when the file does not exist.
    errors
        How to decode: ``"strict"`` refuses bytes that are not UTF-8 (naming the line and
        column); ``"surrogateescape"`` keeps them, so a rewrite gives them back unchanged.
    limit
        The largest size accepted, in bytes.

    Returns
    -------
    str
        The text, without a leading byte-order mark.
    """
    path = Path(path)

    def fail(problem: str, fix: str) -> Exception:
        return error(f"{path}: {problem}. Fix: {fix}")

    try:
        # non-blocking: opening a FIFO someone passed by mistake must not hang the GUI
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise fail(f"cannot read the {what} file: there is no such file", missing_fix) from None
    except PermissionError:
        raise fail(f"cannot read the {what} file: permission denied",
                   f"make it readable by this user (chmod u+r '{path}') or run EdgeTrain as its owner") from None
    except OSError as exc:
        raise fail(f"cannot open the {what} file ({exc.strerror or exc})", missing_fix) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise fail(f"is a folder, not a {what} file", f"pass the {what} file itself, not the folder it is in")
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"is not a regular file (a device, pipe or socket), so it cannot be a {what} file",
                       f"pass the {what} file itself")
        cap = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
        too_big = fail(f"is over {cap}, far larger than any {what} file",
                       f"check the path: this is not a {what} file")
        if st.st_size > limit:
            raise too_big
        chunks, size = [], 0
        while size <= limit:  # not trusting st_size: the file may be growing
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise too_big
    except OSError as exc:
        raise fail(f"cannot read the {what} file ({exc.strerror or exc})",
                   "check the disk and the file's permissions") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - data.rfind(b"\n", 0, exc.start)
        raise fail(f"line {line}, column {col}: byte 0x{data[exc.start]:02x} is not UTF-8 text, so this is "
                   f"not a {what} file or it was saved in another encoding",
                   f"check the path, or convert it to UTF-8 (iconv -f latin1 -t utf-8 '{path}')") from None
    return text.removeprefix("\ufeff")
