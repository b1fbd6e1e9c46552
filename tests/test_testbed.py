"""The local testbed: real SSH endpoints on their own loopback addresses, real subprocesses.

Every test talks to the devices with a plain asyncssh client, trusting only the files the
testbed wrote (client_key, known_hosts). Devices use ``port=0`` (a free port each) and a
random 127.x.y.0/24 block so that tests running beside a real testbed or each other never clash.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import pytest
import yaml

from app.boards import BOARDS
from app.testbed.daemon import start_testbed, stop_testbed
from app.testbed.daemon import testbed_status as status_of
from app.testbed.emulation import parse_size, plan_devices
from app.testbed.local import Testbed, TestbedError

pytestmark = pytest.mark.slow


def _base_addr() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.1"


def _connect(tb: Any, dev: Any, **kw: Any) -> Any:
    kw.setdefault("client_keys", [str(tb.client_key_path)])
    kw.setdefault("known_hosts", str(tb.known_hosts_path))
    return asyncssh.connect(dev.host, dev.port, **kw)


@pytest.fixture
def with_testbed(tmp_path: Path) -> Callable[..., None]:
    """Run ``body(tb)`` inside an in-process testbed on a fresh event loop."""

    def run(body: Callable[[Testbed], Awaitable[None]], **kw: Any) -> None:
        async def main() -> None:
            kw.setdefault("n_devices", 2)
            async with Testbed(tmp_path / "tb", base_addr=_base_addr(), port=0, **kw) as tb:
                await asyncio.wait_for(body(tb), 20)

        asyncio.run(main())

    return run


def test_exit_status_stdout_and_stderr(with_testbed: Callable[..., None]) -> None:
    async def body(tb: Testbed) -> None:
        async with _connect(tb, tb.devices[0]) as conn:
            r = await conn.run("echo hi; echo oops >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_status, r.exit_signal) == ("hi\n", "oops\n", 3, None)

    with_testbed(body)


def test_killed_command_reports_exit_signal(with_testbed: Callable[..., None]) -> None:
    async def body(tb: Testbed) -> None:
        async with _connect(tb, tb.devices[0]) as conn:
            r = await conn.run("echo before; kill -9 $$")
            assert r.stdout == "before\n"
            assert r.exit_signal is not None and r.exit_signal[0] == "KILL"
            assert r.returncode == -9
            # A client signal request reaches the command, as with OpenSSH.
            proc = await conn.create_process("sleep 30")
            await asyncio.sleep(0.2)
            proc.send_signal("TERM")
            r = await proc.wait()
            assert r.exit_signal is not None and r.exit_signal[0] == "TERM"

    with_testbed(body)


def test_output_streams_before_exit(with_testbed: Callable[..., None]) -> None:
    async def body(tb: Testbed) -> None:
        async with _connect(tb, tb.devices[0]) as conn:
            proc = await conn.create_process(
                "for i in 1 2 3; do echo $i; echo e$i >&2; sleep 0.2; done")
            assert await proc.stdout.readline() == "1\n"
            t1 = time.monotonic()
            assert await proc.stderr.readline() == "e1\n"
            assert proc.exit_status is None
            assert await proc.stdout.readline() == "2\n"
            assert proc.exit_status is None
            r = await proc.wait()
            # Three 0.2 s sleeps follow the first line: it arrived live, not at exit.
            assert r.exit_status == 0 and time.monotonic() - t1 >= 0.5

    with_testbed(body)


def test_sftp_lands_in_device_home(with_testbed: Callable[..., None], tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(bytes(range(256)) * 100)

    async def body(tb: Testbed) -> None:
        dev = tb.devices[1]
        async with _connect(tb, dev) as conn, conn.start_sftp_client() as sftp:
            await sftp.put(str(src), "weights.bin")
            assert "weights.bin" in await sftp.listdir("/")  # chroot: / is the home
            await sftp.get("/weights.bin", str(tmp_path / "back.bin"))
            r = await conn.run("wc -c < weights.bin; pwd")
        assert (dev.home / "weights.bin").read_bytes() == src.read_bytes()
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        assert r.stdout.split() == ["25600", str(dev.home)]

    with_testbed(body)


def test_unauthorized_key_and_user_are_refused(with_testbed: Callable[..., None]) -> None:
    async def body(tb: Testbed) -> None:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(tb, tb.devices[0], client_keys=[stranger])
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(tb, tb.devices[0], username="not-the-user")
        with pytest.raises(asyncssh.PermissionDenied):
            await _connect(tb, tb.devices[0], client_keys=None, password="x")

    with_testbed(body)


def test_unknown_host_key_is_refused(with_testbed: Callable[..., None], tmp_path: Path) -> None:
    async def body(tb: Testbed) -> None:
        lines = tb.known_hosts_path.read_text().splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"[{tb.devices[0].host}]:")
        only_second = tmp_path / "known_hosts_dev1"
        only_second.write_text(lines[1] + "\n")
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            await _connect(tb, tb.devices[0], known_hosts=str(only_second))
        async with _connect(tb, tb.devices[1], known_hosts=str(only_second)) as conn:
            assert (await conn.run("true")).exit_status == 0

    with_testbed(body)


def test_each_device_has_its_own_address_and_emulation(
        with_testbed: Callable[..., None]) -> None:
    async def body(tb: Testbed) -> None:
        assert len({d.host for d in tb.devices}) == 3
        for dev in tb.devices:
            async with _connect(tb, dev) as conn:
                assert conn.get_extra_info("peername")[:2] == (dev.host, dev.port)
                r = await conn.run(
                    'echo "$EDGETRAIN_DEVICE|$EDGETRAIN_DEVICE_ADDR|$SSH_CONNECTION|$HOME'
                    '|$EDGETRAIN_EMU_PRESET|$EDGETRAIN_EMU_THREADS|$OMP_NUM_THREADS'
                    '|$EDGETRAIN_EMU_MEM_BYTES|$EDGETRAIN_EMU_P_MAX_W"')
            name, addr, ssh_conn, home, preset, thr, omp, mem, pmax = r.stdout.strip().split("|")
            assert (name, addr, home, preset) == (dev.name, dev.host, str(dev.home), dev.preset)
            assert ssh_conn.split()[2:] == [dev.host, str(dev.port)]  # the server's socket
            assert thr == omp == str(dev.threads)
            assert int(mem) == dev.mem_bytes == BOARDS[dev.preset].mem_bytes
            assert float(pmax) == BOARDS[dev.preset].p_max_w
        inv = yaml.safe_load(tb.inventory_path.read_text())
        assert inv["version"] == 1 and inv["known_hosts"] == "known_hosts"
        assert [(d["name"], d["host"], d["port"], d["key"]) for d in inv["devices"]] == [
            (d.name, d.host, d.port, "client_key") for d in tb.devices]
        labels = inv["devices"][2]["labels"]
        assert {k: labels[k] for k in ("preset", "testbed")} == {"preset": "jetson-tx2", "testbed": "local"}
        # what the cap means travels with the device: the planner compares RSS or virtual size
        assert labels["mem_cap"] == tb.devices[2].mem_cap in ("cgroup", "address-space")

    with_testbed(body, n_devices=None, device_presets=["jetson-nano", "jetson-nano",
                                                       "jetson-tx2"])


def test_memory_cap_makes_big_allocations_fail(with_testbed: Callable[..., None]) -> None:
    """Without root (forced here): an address-space cap, a catchable allocation failure."""
    async def body(tb: Testbed) -> None:
        assert tb.devices[0].mem_bytes == 1024**3 and tb.devices[0].mem_cap == "address-space"
        async with _connect(tb, tb.devices[0]) as conn:
            big = await conn.run(f"{sys.executable} -c 'bytearray(2*1024**3)'")
            small = await conn.run(f"{sys.executable} -c 'bytearray(200*1024**2)'")
        assert big.exit_status == 1 and "MemoryError" in big.stderr
        assert small.exit_status == 0

    with_testbed(body, n_devices=1, mem_overrides={"dev0": "1G"}, cgroups=False)


def test_taken_address_names_it_and_the_fix(tmp_path: Path) -> None:
    base = _base_addr()
    with socket.socket() as s:
        s.bind((base, 0))
        s.listen()
        port = s.getsockname()[1]

        async def main() -> None:
            async with Testbed(tmp_path, n_devices=1, base_addr=base, port=port):
                pass

        with pytest.raises(TestbedError, match=rf"{base}:{port}.*testbed down.*--base-addr"):
            asyncio.run(main())


def test_plans_and_sizes() -> None:
    specs = plan_devices(preset="heterogeneous", n_cpus=2)
    assert [(s.name, s.preset.name, s.threads) for s in specs] == [
        ("nano0", "jetson-nano", 1), ("nano1", "jetson-nano", 1),
        ("tx2-0", "jetson-tx2", 1), ("nx0", "jetson-nx", 1)]
    assert [s.name for s in plan_devices(6, "homogeneous")] == [f"nano{i}" for i in range(6)]
    solo = plan_devices(1, "jetson-tx2", mem_overrides={0: "1.5G"}, n_cpus=16)[0]
    assert (solo.threads, solo.mem_bytes) == (2, int(1.5 * 1024**3))
    assert plan_devices(1, n_cpus=2)[0].threads == 2 and plan_devices(1)[0].mem_bytes is None
    assert parse_size("512MiB") == 512 * 1024**2 and parse_size("2GB") == 2 * 10**9
    for bad in (lambda: plan_devices(2, "jetson-orin"), lambda: plan_devices(3, "heterogeneous"),
                lambda: plan_devices(2, mem_overrides={"nano9": 1}), lambda: parse_size("lots")):
        with pytest.raises(ValueError):
            bad()


def _gone(pid: int) -> bool:
    # PID 1 of a container may not reap orphans: a zombie has stopped existing as a process.
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_daemon_up_status_down_kills_commands(tmp_path: Path) -> None:
    d = tmp_path / "tb"
    info = start_testbed(d, n_devices=2, base_addr=_base_addr(), port=0,
                         mem_overrides={"dev1": "1.5G"})
    try:
        assert psutil.pid_exists(info.pid)
        assert {p.name for p in d.iterdir()} >= {
            "client_key", "client_key.pub", "known_hosts", "inventory.yaml", "state.json"}
        statuses = status_of(d)
        assert [(s.name, s.reachable) for s in statuses] == [("dev0", True), ("dev1", True)]
        assert info.devices[1].mem_bytes == int(1.5 * 1024**3)
        with pytest.raises(TestbedError, match="already running"):
            start_testbed(d, n_devices=2, port=0)

        async def launch() -> tuple[int, int]:
            async with _connect(info, info.devices[0]) as conn:
                r = await conn.run("nohup sleep 1000 >/dev/null 2>&1 & echo $!")
                proc = await conn.create_process("echo $$; exec sleep 1000")
                fg = int(await proc.stdout.readline())
                # The client leaves while sleep runs: like sshd, the device leaves it be
                # (it writes nothing, so no SIGPIPE); `down` must still find it.
                return int(r.stdout), fg

        bg, fg = asyncio.run(launch())
        assert psutil.pid_exists(bg) and not _gone(fg)
    finally:
        assert stop_testbed(d)
    deadline = time.monotonic() + 3
    while not (_gone(bg) and _gone(fg)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(bg) and _gone(fg) and _gone(info.pid)
    assert not (d / "state.json").exists() and status_of(d) == []
    assert not stop_testbed(d)


@pytest.mark.skipif(not shutil.which("ssh") or not shutil.which("scp"), reason="no OpenSSH client")
def test_openssh_client_interoperates(with_testbed: Callable[..., None], tmp_path: Path) -> None:
    src = tmp_path / "note.txt"
    src.write_text("hello\n")

    async def body(tb: Testbed) -> None:
        dev = tb.devices[0]
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={tb.known_hosts_path}", "-i", str(tb.client_key_path)]

        async def run(*argv: str) -> int:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
            return await proc.wait()

        assert await run("ssh", *opts, "-p", str(dev.port), dev.host, "exit 7") == 7
        assert await run("ssh", *opts, "-p", str(dev.port), dev.host, "kill -9 $$") == 255
        # scp speaks SFTP; it fails unless the sftp session ends with exit status 0.
        assert await run("scp", *opts, "-P", str(dev.port), str(src), f"{dev.host}:note.txt") == 0
        assert (dev.home / "note.txt").read_text() == "hello\n"

    with_testbed(body, n_devices=1)
