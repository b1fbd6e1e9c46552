"""A file that cannot be an inventory or a session is refused with its path and a fix.

Each case is a real file on disk: bytes that are not UTF-8, a folder, a FIFO, a file this
process may not read, a file over the 16 MiB cap, a /proc file whose size lies.  After
every refusal the file is exactly as it was.  The known_hosts store is checked the same
way, and keeps bytes it does not understand through a rewrite.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from app.devices.inventory import InventoryError, load_inventory
from app.devices.ssh import KnownHosts, KnownHostsError
from app.paths import MAX_USER_FILE_BYTES, read_user_text
from app.workspace.session import SessionError, load_session

ROOT = Path(__file__).resolve().parent.parent
LOADERS: dict[str, tuple[Callable, type[Exception]]] = {
    "inventory": (load_inventory, InventoryError),
    "session": (load_session, SessionError),
}
VALID = {"inventory": "version: 1\ndevices:\n  - name: a\n    host: h\n",
         "session": "version: 1\nparticipants: [a]\n"}


def snapshot(path: Path) -> tuple[bytes, int, int] | None:
    """Content, size and modification time (None for what is not a regular file)."""
    if not path.is_file():
        return None
    st = path.stat()
    return path.read_bytes(), st.st_size, st.st_mtime_ns


def refused(what: str, path: Path, *needles: str) -> str:
    load, error = LOADERS[what]
    before = snapshot(path)
    with pytest.raises(error) as info:
        load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "Fix:" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert snapshot(path) == before
    return msg


@pytest.mark.parametrize("what", LOADERS)
def test_valid_files_still_load(tmp_path, what):
    p = tmp_path / f"{what}.yaml"
    p.write_bytes(b"\xef\xbb\xbf" + VALID[what].encode())      # a byte-order mark is fine
    LOADERS[what][0](p)


@pytest.mark.parametrize("what", LOADERS)
def test_undecodable_bytes_name_the_line(tmp_path, what):
    p = tmp_path / f"{what}.yaml"
    p.write_bytes(b"version: 1\n# caf\xe9 \xff\n")
    refused(what, p, "line 2, column 6: byte 0xe9 is not UTF-8", "iconv")


@pytest.mark.parametrize("what", LOADERS)
def test_a_folder_is_refused(tmp_path, what):
    d = tmp_path / "folder.yaml"
    d.mkdir()
    refused(what, d, "is a folder", f"pass the {what} file itself")


@pytest.mark.parametrize("what", LOADERS)
def test_a_fifo_is_refused_without_hanging(tmp_path, what):
    p = tmp_path / "pipe.yaml"
    os.mkfifo(p)
    refused(what, p, "not a regular file")


@pytest.mark.parametrize("what", LOADERS)
def test_a_missing_file_says_what_to_do(tmp_path, what):
    refused(what, tmp_path / "nope.yaml", "no such file")


@pytest.mark.parametrize("what", LOADERS)
def test_a_huge_file_is_refused(tmp_path, what):
    p = tmp_path / "huge.yaml"
    with open(p, "wb") as f:
        f.write(VALID[what].encode())
        f.truncate(MAX_USER_FILE_BYTES + 1)      # sparse: 16 MiB + 1 byte without writing them
    refused(what, p, "over 16 MiB", "not a")


@pytest.mark.parametrize("what", LOADERS)
def test_absurdly_nested_yaml_is_refused(tmp_path, what):
    p = tmp_path / "deep.yaml"
    p.write_text("version: 1\nx: " + "[" * 800 + "\n")
    refused(what, p, "nested too deeply")


def test_a_file_whose_size_lies_is_capped_while_reading():
    # /proc files report size 0; the reader stops at the cap instead of trusting st_size
    assert Path("/proc/self/maps").stat().st_size == 0
    with pytest.raises(ValueError, match="over 16 bytes"):
        read_user_text("/proc/self/maps", "test", ValueError, missing_fix="-", limit=16)
    assert "[stack]" in read_user_text("/proc/self/maps", "test", ValueError, missing_fix="-")


UNREADABLE = """
import sys
sys.path.insert(0, sys.argv[1])
from app.devices.inventory import InventoryError, load_inventory
from app.workspace.session import SessionError, load_session
for load, error in ((load_inventory, InventoryError), (load_session, SessionError)):
    try:
        load(sys.argv[2])
    except error as exc:
        print(exc)
"""


def _drop_file_access_override() -> None:
    """In the child, before exec: root loses the capabilities that let it read any file."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (PR_CAPBSET_DROP = 24)
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unreadable_file_is_refused(tmp_path):
    """chmod 000 stops anyone but root; as root, the loader runs in a child process that
    has given up root's right to read any file, so the permission check is the kernel's."""
    p = tmp_path / "locked.yaml"
    p.write_text(VALID["inventory"])
    p.chmod(0)
    preexec = _drop_file_access_override if os.geteuid() == 0 else None
    try:
        proc = subprocess.run([sys.executable, "-c", UNREADABLE, str(ROOT), str(p)], capture_output=True,
                              text=True, timeout=60, preexec_fn=preexec, check=False)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's file-access capabilities here ({exc}); chmod 000 does not stop root")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    for line, what in zip(lines, ("inventory", "session")):
        assert line.startswith(f"{p}: cannot read the {what} file: permission denied"), line
        assert f"Fix: make it readable by this user (chmod u+r '{p}')" in line
    p.chmod(0o600)
    assert p.read_text() == VALID["inventory"]


# ----------------------------------------------------------------------------- known_hosts

def _key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519").convert_to_public()


def test_known_hosts_folder_or_huge_file_is_refused_naming_it(tmp_path):
    d = tmp_path / "known_hosts"
    d.mkdir()
    with pytest.raises(KnownHostsError, match=f"^{d}: is a folder.*Fix:"):
        KnownHosts(d)
    big = tmp_path / "big_known_hosts"
    with open(big, "wb") as f:
        f.truncate(MAX_USER_FILE_BYTES + 1)
    with pytest.raises(KnownHostsError, match=f"^{big}: is over 16 MiB.*Fix:"):
        KnownHosts(big)
    assert big.stat().st_size == MAX_USER_FILE_BYTES + 1


def test_known_hosts_keeps_foreign_bytes_through_a_trust(tmp_path):
    """Lines EdgeTrain does not understand (latin-1 comments, CRLF, form feeds) are
    kept byte for byte when a key is added; a key on a CRLF line still matches."""
    key = _key()
    p = tmp_path / "known_hosts"
    old = (b"# caf\xe9 \xff\r\n"
           + f"[h]:2200 {key.export_public_key('openssh').decode().strip()}\r\n".encode()
           + b"junk\x0cline \x85 not a key\n|1|hashed= ssh-ed25519 AAAA\nno newline at the end")
    p.write_bytes(old)
    kh = KnownHosts(p)
    assert kh.lookup("h", 2200) == [key]
    other = _key()
    kh.trust("g", 22, other)
    new = p.read_bytes()
    assert new.startswith(old + b"\n") and new.endswith(b"\n")
    assert KnownHosts(p).lookup("g", 22) == [other] and KnownHosts(p).lookup("h", 2200) == [key]
