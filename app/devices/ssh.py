"""SSH connections to devices, with EdgeTrain's own trusted-domain host-key store.

EdgeTrain keeps its own known_hosts file (OpenSSH format).  A host key that is not in
it is refused until the user trusts it (``edgetrain devices trust NAME``); a key that
differs from the stored one is always refused.  Authentication is key-only.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from app.devices.inventory import Device
from app.paths import atomic_write_bytes, read_user_text

PLAIN_HOST_KEY_ALGS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                       "rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")


class SSHError(RuntimeError):
    """A device could not be reached or used; the message names it and the fix."""

    def __init__(self, device: str, message: str) -> None:
        super().__init__(message)
        self.device = device


class KnownHostsError(ValueError):
    """EdgeTrain's known_hosts file cannot be read; the message names it and the fix."""


class HostKeyError(SSHError):
    """The device's host key is unknown (``kind='unknown'``) or changed (``'changed'``)."""

    def __init__(self, device: str, kind: str, fingerprint: str, message: str,
                 key: asyncssh.SSHKey | None = None) -> None:
        super().__init__(device, message)
        self.kind, self.fingerprint, self.key = kind, fingerprint, key


def host_pattern(host: str, port: int) -> str:
    """The known_hosts spelling of an endpoint (``[host]:port`` unless port 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: asyncssh.SSHKey) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key."""
    return key.get_fingerprint("sha256")


@dataclass
class KnownHostEntry:
    pattern: str
    key: asyncssh.SSHKey


class KnownHosts:
    """A plain OpenSSH known_hosts file that only EdgeTrain writes.

    Only exact ``host`` / ``[host]:port`` patterns are understood; hashed or wildcard
    lines written by other tools, and lines that are not keys at all, are kept byte for
    byte but never match (stricter, not looser).

    Raises
    ------
    KnownHostsError
        When the file exists but cannot be read: a folder, no permission, over 16 MiB.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lines: list[str] = []
        self._entries: list[KnownHostEntry] = []
        self.reload()

    def reload(self) -> None:
        """Read the file again (a missing file is an empty trusted domain)."""
        self._lines, self._entries = [], []
        if not os.path.lexists(self.path):
            return
        # surrogateescape: bytes that are not UTF-8 are kept, so trust() writes them back as they were
        text = read_user_text(self.path, "known_hosts", KnownHostsError, errors="surrogateescape",
                              missing_fix="run 'edgetrain devices trust NAME' to create it")
        # split on newlines only: a CR or form feed in someone's line stays in that line
        self._lines = text.split("\n")
        if self._lines[-1] == "":
            self._lines.pop()
        for line in self._lines:
            parts = line.split()
            if len(parts) < 3 or line.lstrip().startswith(("#", "@", "|")):
                continue
            try:
                key = asyncssh.import_public_key(f"{parts[1]} {parts[2]}")
            except Exception:  # noqa: BLE001 - any failure of the key parser on a foreign line
                # (KeyImportError, OverflowError on a negative RSA exponent, ...) means the
                # same thing: not a key EdgeTrain can use, so the line never matches
                continue
            for pat in parts[0].split(","):
                self._entries.append(KnownHostEntry(pat, key))

    def lookup(self, host: str, port: int) -> list[asyncssh.SSHKey]:
        """Stored keys for the endpoint."""
        pat = host_pattern(host, port)
        return [e.key for e in self._entries if e.pattern == pat]

    def trust(self, host: str, port: int, key: asyncssh.SSHKey, replace: bool = False) -> None:
        """Store ``key`` for the endpoint (``replace`` drops older keys of that endpoint).

        The file is rewritten atomically; every other line stays as it was, byte for byte.
        """
        pat = host_pattern(host, port)
        # another process (the CLI, the GUI) may have written since we read: start from disk
        self.reload()
        if replace:
            self._lines = [ln for ln in self._lines if not ln.split() or pat not in ln.split()[0].split(",")]
        line = f"{pat} {key.export_public_key('openssh').decode().strip()}"
        self._lines.append(line)
        atomic_write_bytes(self.path, ("\n".join(self._lines) + "\n").encode("utf-8", "surrogateescape"))
        self.reload()


class _Client(asyncssh.SSHClient):
    """Validates the server's host key against :class:`KnownHosts`, remembering why not."""

    def __init__(self, known: KnownHosts, device: Device) -> None:
        self._known, self._device = known, device
        self.offered: asyncssh.SSHKey | None = None
        self.verdict = "ok"

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.offered = key
        stored = self._known.lookup(self._device.host, self._device.port)
        if not stored:
            self.verdict = "unknown"
            return False
        if any(k == key for k in stored):
            return True
        self.verdict = "changed"
        return False


def host_key_message(device: Device, kind: str, fp: str, known_path: Path) -> str:
    if kind == "unknown":
        return (f"device '{device.name}' ({device.address}) presented an unknown host key {fp}. "
                f"It is not in EdgeTrain's trusted domain ({known_path}). If this is your device, "
                f"check the fingerprint on it and run: edgetrain devices trust {device.name}")
    return (f"HOST KEY CHANGED for device '{device.name}' ({device.address}): it now presents {fp}, "
            f"which differs from the key trusted in {known_path}. This may be a different machine "
            f"answering at that address. Refusing to connect. If the device was reinstalled, verify "
            f"the new fingerprint and run: edgetrain devices trust {device.name} --replace")


async def connect(device: Device, known_hosts: KnownHosts, timeout: float = 10.0) -> asyncssh.SSHClientConnection:
    """Open an SSH connection to ``device`` with strict host-key checking.

    Raises
    ------
    HostKeyError
        Unknown or changed host key (the message shows the SHA256 fingerprint).
    SSHError
        Unreachable device, refused authentication, timeout.
    """
    client_holder: list[_Client] = []

    def factory() -> _Client:
        client = _Client(known_hosts, device)
        client_holder.append(client)
        return client

    keys = [device.key] if device.key else ()
    try:
        # known_hosts=([], [], []) makes asyncssh ask our client about every key
        # (known_hosts=None would disable checking altogether).
        return await asyncio.wait_for(asyncssh.connect(
            device.host, port=device.port, username=device.user, client_keys=keys or None,
            known_hosts=([], [], []), client_factory=factory, password=None,
            kbdint_auth=False, agent_path=None, config=None,
            preferred_auth=("publickey",),
            # plain keys only: a host certificate would bypass our per-device key store
            server_host_key_algs=PLAIN_HOST_KEY_ALGS,
            # a board that loses power must fail its own connection, so the run names it
            keepalive_interval=5, keepalive_count_max=3), timeout)
    except asyncssh.HostKeyNotVerifiable:
        client = client_holder[-1] if client_holder else None
        kind = client.verdict if client else "unknown"
        key = client.offered if client else None
        fp = fingerprint(key) if key is not None else "(no key offered)"
        raise HostKeyError(device.name, kind, fp, host_key_message(device, kind, fp, known_hosts.path), key) from None
    except asyncssh.PermissionDenied:
        raise SSHError(device.name, f"device '{device.name}' ({device.address}) refused key authentication "
                       f"for user '{device.user}' with key {device.key}. Fix: add the public key to "
                       f"~{device.user}/.ssh/authorized_keys on the device") from None
    except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
        why = "timed out" if isinstance(exc, asyncio.TimeoutError) else (str(exc) or type(exc).__name__)
        raise SSHError(device.name, f"device '{device.name}' ({device.address}) is unreachable: {why}. "
                       "Fix: check that it is powered on, on the network, and runs an SSH server "
                       "on that port") from None


async def fetch_host_key(device: Device, timeout: float = 10.0) -> asyncssh.SSHKey:
    """The host key the device presents now (for the user to inspect before trusting)."""
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(device.host, device.port), timeout)
    except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
        raise SSHError(device.name, f"device '{device.name}' ({device.address}) is unreachable: {exc}") from None
    if key is None:
        raise SSHError(device.name, f"device '{device.name}' offered no host key")
    return key
