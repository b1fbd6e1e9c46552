"""Device-side profiling: what this device is, how fast it computes, how fast its links are.

Pushed to each device with the rest of ``workers/`` and run by the controller over SSH
(``app.devices.profile`` / ``app.devices.preflight``).  Standard library + torch only; torch is
imported only when asked, so the same script diagnoses a device *without* torch.

Modes (``python -m workers.probe MODE``):

``info [--bench S]``
    One JSON object: OS, CPU, memory, GPU, versions, power sensors, matmul GFLOP/s and
    the seconds of a fixed piece of non-matmul work (``op_probe_s``).
``serve --bind ADDR``
    A TCP sink for link measurements; prints ``{"port": P}`` and serves until killed.
``send --to HOST:PORT [--seconds S]``
    Measures round-trip time and bandwidth to a sink; prints one JSON object.
``agent --bind ADDR``
    Long-lived helper driven by JSON lines on stdin (one SSH channel per device for the
    whole profile: a fresh ``exec`` costs a shell start-up each time).  It starts a sink,
    announces ``{"event": "hello", ...}`` and answers each ``{"id": N, "cmd": ...}``
    with ``{"id": N, "ok": true, "result": {...}}``.  It exits when stdin closes.

Link protocol: a client opens a connection and sends one mode byte.  ``P``: 1-byte
ping-pong until EOF.  ``B``: bulk data until the client half-closes; the *receiver*
then answers with one JSON line of what it measured.  Timing on the receiver excludes
data still sitting in the sender's socket buffer, which would inflate the rate.

Kept importable by Python 3.8 so that an old interpreter gets a clear report instead of
a syntax error.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from .compute_probe import matmul_gflops, op_seconds

PROBE_VERSION = 2  # 2: op_probe_s
_CHUNK = 1 << 16


# --------------------------------------------------------------------------- versions

def _dist_version(name: str) -> Optional[str]:
    try:
        import importlib.metadata as md
    except ImportError:  # Python < 3.8
        return None
    try:
        return md.version(name)
    except Exception:  # noqa: BLE001 - any metadata failure means "not installed"
        return None


def versions() -> Dict[str, Any]:
    """Interpreter and package versions, read from package metadata (no ``import torch``)."""
    return {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
        "probe": PROBE_VERSION,
        "executable": sys.executable,
    }


def torch_status() -> Dict[str, Any]:
    """Whether ``import torch`` works here, with its version or the error."""
    t0 = time.monotonic()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - report whatever broke the import
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - t0}
    return {"ok": True, "version": torch.__version__.split("+")[0], "full_version": torch.__version__,
            "seconds": time.monotonic() - t0}


# --------------------------------------------------------------------------- hardware

def _meminfo() -> Dict[str, int]:
    out: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    if "MemTotal" not in out:
        try:
            out["MemTotal"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return out


def cpu_model() -> str:
    """CPU model name (x86 ``model name``; ARM boards: ``Model``/``Hardware``)."""
    keys = ("model name", "Model", "Hardware", "cpu model", "Processor")
    found: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key in keys and value.strip() and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    for k in keys:
        if k in found:
            return found[k]
    return platform.processor() or platform.machine() or "unknown"


def usable_threads() -> int:
    """CPUs a worker may use: the emulated budget, else ``OMP_NUM_THREADS``, else affinity."""
    for var in ("EDGETRAIN_EMU_THREADS", "OMP_NUM_THREADS"):
        try:
            n = int(os.environ.get(var, ""))
            if n > 0:
                return n
        except ValueError:
            pass
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _env_float(name: str) -> Optional[float]:
    try:
        v = float(os.environ.get(name, ""))
    except ValueError:
        return None
    return v if v > 0 else None  # the testbed writes "0" for "no power model"


def memory_limit() -> Dict[str, Any]:
    """The tightest memory limit on a process here: emulated cap, RLIMIT_AS or cgroup."""
    # The testbed exports EDGETRAIN_EMU_MEM_BYTES=0 for "no cap": that is not a limit.
    emu = _env_float("EDGETRAIN_EMU_MEM_BYTES")
    saved = os.environ.pop("EDGETRAIN_EMU_MEM_BYTES", None)
    try:
        from workers.memory import memory_limit_bytes
        limit, source = memory_limit_bytes()
    except Exception:  # noqa: BLE001 - fall back to what the stdlib can see
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        limit, source = (None, "none") if soft == resource.RLIM_INFINITY else (soft, "rlimit_as")
    finally:
        if saved is not None:
            os.environ["EDGETRAIN_EMU_MEM_BYTES"] = saved
    if emu is not None and (limit is None or emu < limit):
        limit, source = int(emu), "env:EDGETRAIN_EMU_MEM_BYTES"
    return {"bytes": limit, "source": source}


def sensors() -> Dict[str, Any]:
    """Which power sensors exist (``workers.energy.describe_sensors`` when present)."""
    try:
        from workers.energy import describe_sensors
        return describe_sensors()
    except Exception as exc:  # noqa: BLE001 - a missing/broken energy module is not fatal
        out: Dict[str, Any] = {"estimate": True, "error": f"describe_sensors unavailable: {exc}"}
        out["rapl"] = "present" if os.path.isdir("/sys/class/powercap/intel-rapl:0") else False
        out["ina3221"] = []
        out["nvml"] = False
        return out


def power_source(sens: Dict[str, Any], has_gpu: bool) -> str:
    """The meter a worker here would use (same order as ``workers.energy.select_meter``)."""
    if _env_float("EDGETRAIN_EMU_P_IDLE_W") or _env_float("EDGETRAIN_EMU_P_MAX_W"):
        return "estimate"  # emulated: host sensors would measure the whole host
    if has_gpu and sens.get("nvml"):
        return "nvml"
    if sens.get("ina3221"):
        return "ina3221"
    if sens.get("rapl") == "readable":
        return "rapl"
    return "estimate"


def device_info(bench_seconds: float = 0.3) -> Dict[str, Any]:
    """Everything the controller's :class:`DeviceProfile` is built from."""
    mem = _meminfo()
    info: Dict[str, Any] = {
        "probe": PROBE_VERSION,
        "versions": versions(),
        "os": f"{platform.system()} {platform.release()}",
        "os_pretty": _os_pretty(),
        "arch": platform.machine(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": usable_threads(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable", mem.get("MemFree")),
        "mem_limit": memory_limit(),
        "emu_preset": os.environ.get("EDGETRAIN_EMU_PRESET") or None,
        "p_idle_w": _env_float("EDGETRAIN_EMU_P_IDLE_W"),
        "p_max_w": _env_float("EDGETRAIN_EMU_P_MAX_W"),
        "gpu": None, "gflops_fp32": None, "gflops_fp16": None, "op_probe_s": None, "torch_error": None,
    }
    sens = sensors()
    info["sensors"] = sens
    ts = torch_status()
    if not ts["ok"]:
        info["torch_error"] = ts["error"]
        info["power_source"] = power_source(sens, False)
        return info
    import torch
    torch.set_num_threads(max(1, info["threads"]))
    if not info["versions"]["torch"]:  # importable without metadata (a source build)
        info["versions"]["torch"] = ts["full_version"]
    device = "cpu"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "mem_bytes": int(props.total_memory),
                       "cuda": torch.version.cuda}
        device = "cuda"
    info["power_source"] = power_source(sens, info["gpu"] is not None)
    if bench_seconds > 0:
        info["gflops_fp32"] = matmul_gflops("float32", device, bench_seconds)
        if device == "cuda":
            info["gflops_fp16"] = matmul_gflops("float16", device, bench_seconds)
        else:  # on a GPU the non-matmul work runs there too: not what this measures
            info["op_probe_s"] = op_seconds(bench_seconds)
    return info


def _os_pretty() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def disk_free(path: str) -> Dict[str, Any]:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent)."""
    p = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    usage = shutil.disk_usage(p)
    return {"path": p, "free_bytes": usage.free, "total_bytes": usage.total}


# --------------------------------------------------------------------------- links

class Sink:
    """TCP sink answering pings and bulk transfers (one thread per connection)."""

    def __init__(self, bind: str = "", port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((bind, port))
        except OSError:
            # the inventory's host may be a name or a NAT address that is not local here
            self.sock.bind(("", port))
        self.sock.listen(64)
        self.addr = self.sock.getsockname()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.addr[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mode = conn.recv(1)
            if mode == b"P":
                while True:
                    b = conn.recv(1)
                    if not b:
                        return
                    conn.sendall(b)
            elif mode == b"B":
                conn.sendall((json.dumps(_receive_bulk(conn)) + "\n").encode())
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _receive_bulk(conn: socket.socket) -> Dict[str, Any]:
    buf = bytearray(_CHUNK * 4)
    view = memoryview(buf)
    total = 0
    samples: List[tuple] = []
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        total += n
        samples.append((time.perf_counter(), total))
    if len(samples) < 2:
        return {"bytes": total, "seconds": 0.0, "mbps": None}
    t_first, t_last = samples[0][0], samples[-1][0]
    # Skip the first tenth: TCP slow start and the shaper's burst allowance are not the
    # link's sustained rate.
    skip_to = t_first + 0.1 * (t_last - t_first)
    t0, b0 = next(s for s in samples if s[0] >= skip_to)
    secs = t_last - t0
    mbps = (total - b0) * 8 / secs / 1e6 if secs > 0 else None
    return {"bytes": total, "seconds": t_last - t_first, "mbps": mbps}


def measure_link(host: str, port: int, seconds: float = 0.5, pings: int = 10,
                 timeout: float = 10.0) -> Dict[str, Any]:
    """Round-trip time (median of 1-byte ping-pongs) and bandwidth to a :class:`Sink`.

    Returns ``{"rtt_ms", "mbps", "bytes", "seconds"}``; raises ``OSError`` when the
    sink cannot be reached.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"P")
        rtts = []
        for _ in range(max(1, pings)):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if not s.recv(1):
                raise OSError("sink closed the connection during the ping")
            rtts.append((time.perf_counter() - t0) * 1e3)
    out: Dict[str, Any] = {"rtt_ms": statistics.median(rtts)}
    if seconds <= 0:
        return out
    payload = b"\0" * _CHUNK
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"B")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        f = s.makefile("r")
        line = f.readline()
    result = json.loads(line) if line else {}
    out.update(mbps=result.get("mbps"), bytes=result.get("bytes"), seconds=result.get("seconds"))
    return out


def check_port(host: str, port: int, timeout: float = 3.0) -> Dict[str, Any]:
    """Whether a TCP connection to ``host:port`` succeeds (with a ping's round trip)."""
    try:
        return {"ok": True, **measure_link(host, port, seconds=0, pings=3, timeout=timeout)}
    except (OSError, ValueError) as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}


# --------------------------------------------------------------------------- agent

def _emit(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _handle(msg: Dict[str, Any]) -> Dict[str, Any]:
    cmd = msg.get("cmd")
    if cmd == "versions":
        return versions()
    if cmd == "torch":
        return torch_status()
    if cmd == "info":
        return device_info(float(msg.get("bench", 0.3)))
    if cmd == "time":
        return {"time": time.time()}
    if cmd == "disk":
        return disk_free(str(msg.get("path", ".")))
    if cmd == "send":
        return measure_link(str(msg["host"]), int(msg["port"]), float(msg.get("seconds", 0.5)),
                            int(msg.get("pings", 10)))
    if cmd == "check_port":
        return check_port(str(msg["host"]), int(msg["port"]), float(msg.get("timeout_s", 3.0)))
    raise ValueError(f"unknown command {cmd!r}")


def agent(bind: str) -> int:
    """Serve JSON-line commands from stdin until EOF (or ``{"cmd": "quit"}``)."""
    sink = Sink(bind)
    _emit({"event": "hello", "pid": os.getpid(), "sink_port": sink.port, "time": time.time(),
           "versions": versions(), "cwd": os.getcwd()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            _emit({"id": None, "ok": False, "error": f"not JSON: {line[:80]}"})
            continue
        if msg.get("cmd") == "quit":
            break
        try:
            # nested: some answers have an "ok" of their own (torch, check_port)
            _emit({"id": msg.get("id"), "ok": True, "result": _handle(msg)})
        except Exception as exc:  # noqa: BLE001 - the controller reports it per device
            _emit({"id": msg.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    sink.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workers.probe", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("info")
    p.add_argument("--bench", type=float, default=0.3, help="seconds per matmul benchmark (0: none)")
    p = sub.add_parser("serve")
    p.add_argument("--bind", default="")
    p.add_argument("--port", type=int, default=0)
    p = sub.add_parser("send")
    p.add_argument("--to", required=True, help="HOST:PORT of a sink")
    p.add_argument("--seconds", type=float, default=0.5)
    p = sub.add_parser("agent")
    p.add_argument("--bind", default="")
    args = ap.parse_args(argv)
    if args.mode == "info":
        _emit(device_info(args.bench))
    elif args.mode == "serve":
        sink = Sink(args.bind, args.port)
        _emit({"port": sink.port})
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    elif args.mode == "send":
        host, _, port = args.to.rpartition(":")
        _emit(measure_link(host, int(port), args.seconds))
    else:
        return agent(args.bind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
