"""Memory measurement, limits and out-of-memory recognition for a worker.

Host memory is the resident set (RSS).  Its kernel high-water mark (``VmHWM``) cannot
be reset through ``getrusage``; on Linux >= 4.0 writing ``5`` to
``/proc/self/clear_refs`` resets it, which is how :class:`PeakTracker` gets an exact
per-step peak.  (``ru_maxrss`` is not used where ``VmHWM`` exists: it also carries the
peak of the image before ``exec``, i.e. of the parent that started the worker.)  Elsewhere (macOS, a locked-down ``/proc``) the tracker
samples RSS at phase boundaries and keeps the running max, which is a lower bound; it
then also uses ``ru_maxrss`` whenever that rose during the window (a new lifetime high
is by definition the window's peak).

Standard library (+ psutil if present); torch is imported only if already loaded.
"""
from __future__ import annotations

import errno
import os
import re
import resource
import sys
from typing import Any, Callable

ENV_MEM = "EDGETRAIN_EMU_MEM_BYTES"
#: cgroup v1 reports "no limit" as a huge page-aligned number (PAGE_COUNTER_MAX * page).
_CGROUP1_UNLIMITED = 1 << 60
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory",
                 "defaultcpuallocator", "not enough memory", "std::bad_alloc")
#: A thread that cannot be started: pthread_create answers EAGAIN when its stack cannot be
#: mapped, so under an address-space cap this is the allocation failure, seen from a thread
#: pool (std::system_error from gloo or torch, or Python's threading).
_THREAD_MESSAGES = ("resource temporarily unavailable", "can't start new thread")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: Largest VmHWM seen before any clear_refs reset, so the lifetime peak survives resets.
_hwm_before_resets = 0


def _read_proc(path: str) -> bytes | None:
    # raw os calls: half the cost of open()/text decoding, and this runs every step
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 16384)
    except OSError:
        return None
    finally:
        os.close(fd)


def rss_bytes() -> int:
    """Current resident set size of this process, in bytes."""
    data = _read_proc("/proc/self/statm")  # cheapest where it exists
    if data is not None:
        return int(data.split()[1]) * _PAGE
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return peak_rss_bytes()  # no better figure without /proc or psutil


def _vm_hwm() -> int | None:
    # the mm's own high-water mark; ru_maxrss also folds in signal->maxrss (the
    # pre-exec image's peak), which clear_refs does not reset
    data = _read_proc("/proc/self/status")
    if data is None or b"VmHWM:" not in data:
        return None
    return int(data.split(b"VmHWM:", 1)[1].split(None, 1)[0]) * 1024


def _maxrss() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size over the process's life, in bytes.

    Prefers ``VmHWM``: ``ru_maxrss`` also holds the pre-exec image's peak, so a worker
    started from a 500 MB parent reports >= 500 MB even if it never used 20 MB
    (measured here with ``subprocess`` and with fork+exec).  ``ru_maxrss`` (kB on
    Linux, bytes on macOS) is the fallback.  Resets made by :class:`PeakTracker`
    lower the kernel's figure, so the peak seen before them is kept.
    """
    hwm = _vm_hwm()
    return max(_maxrss() if hwm is None else hwm, _hwm_before_resets)


def cuda_peak_bytes(device: Any = "cuda") -> int | None:
    """Peak bytes allocated by torch on a CUDA device since the last peak reset.

    Returns ``None`` when torch is not loaded, CUDA is unavailable or ``device`` is not CUDA.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(dev))


def _join(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _unescape(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), path)


def _cgroup_dirs(root: str, controller: str = "memory") -> list[tuple[str, str, str]]:
    """(version, leaf dir, mount point) of this process's ``controller`` cgroups."""
    try:
        with open(_join(root, "/proc/self/cgroup")) as f:
            groups = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
        with open(_join(root, "/proc/self/mountinfo")) as f:
            mounts = [line.split() for line in f]
    except OSError:
        return []
    out = []
    for m in mounts:
        if "-" not in m:
            continue
        sep = m.index("-")
        fstype = m[sep + 1]
        superopts = m[sep + 3].split(",") if len(m) > sep + 3 else []
        mroot, mpoint = _unescape(m[3]), _unescape(m[4])
        if fstype == "cgroup2":
            version, path = "cgroup2", next((g[2] for g in groups if g[0] == "0" and g[1] == ""), None)
        elif fstype == "cgroup" and controller in superopts:
            version = "cgroup1"
            path = next((g[2] for g in groups if controller in g[1].split(",")), None)
        else:
            continue
        if path is None:
            continue
        # the process's path is relative to the hierarchy root; the mount may show a subtree
        rel = path[len(mroot):] if path.startswith(mroot) else ""
        out.append((version, _join(root, mpoint + "/" + rel.lstrip("/")), _join(root, mpoint)))
    return out


def smallest_along_path(leaf: str, top: str, read: Callable[[str], float | None]) -> float | None:
    """The smallest of ``read(directory)`` from cgroup ``leaf`` up to the hierarchy's
    ``top``: a parent's limit binds its children too.  ``read`` returns ``None`` for no
    limit; a file that cannot be read or parsed counts as none."""
    best = None
    d, top = os.path.normpath(leaf), os.path.normpath(top)
    while True:
        try:
            value = read(d)
            if value is not None:
                best = value if best is None else min(best, value)
        except (OSError, ValueError):
            pass
        if d == top or len(d) <= len(top):
            return best
        d = os.path.dirname(d)


def _cgroup_limit(version: str, leaf: str, top: str) -> int | None:
    name = "memory.max" if version == "cgroup2" else "memory.limit_in_bytes"

    def read(d: str) -> int | None:
        with open(os.path.join(d, name)) as f:
            text = f.read().strip()
        value = None if text == "max" else int(text)
        return value if value is not None and value < _CGROUP1_UNLIMITED else None

    best = smallest_along_path(leaf, top, read)
    return int(best) if best is not None else None


def memory_limit_bytes(root: str = "/") -> tuple[int | None, str]:
    """The tightest memory limit on this process and where it comes from.

    Parameters
    ----------
    root
        Filesystem root for ``/proc`` and cgroup files (tests use a fixture tree).

    Returns
    -------
    tuple
        ``(bytes, source)`` with source ``rlimit_as``, ``cgroup2``, ``cgroup1`` or
        ``env:EDGETRAIN_EMU_MEM_BYTES``; ``(None, 'none')`` if nothing limits it.
        ``RLIMIT_AS`` bounds virtual size, the others resident memory: the smallest
        is reported, which is the one a step will hit first in practice.
    """
    found: list[tuple[int, str]] = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append((soft, "rlimit_as"))
    for version, leaf, top in _cgroup_dirs(root):
        limit = _cgroup_limit(version, leaf, top)
        if limit is not None:
            found.append((limit, version))
    try:
        env = int(float(os.environ[ENV_MEM]))
    except (KeyError, ValueError):
        env = 0
    if env > 0:  # the testbed exports 0 for "no cap"
        found.append((env, f"env:{ENV_MEM}"))
    if not found:
        return None, "none"
    # on a tie the enforced limit names the kind (the testbed declares what it enforces)
    return min(found, key=lambda f: (f[0], f[1].startswith("env:")))


def memory_cgroup(root: str = "/") -> tuple[str, str] | None:
    """``(version, directory)`` of the memory cgroup whose limit binds this process (the
    leaf, where the kernel counts its OOM kills), or None when no cgroup limits it."""
    best = None
    for version, leaf, top in _cgroup_dirs(root):
        limit = _cgroup_limit(version, leaf, top)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, version, leaf)
    return None if best is None else (best[1], best[2])


def oom_kill_count(version: str, directory: str) -> int | None:
    """The kernel's count of OOM kills in a memory cgroup (v1 ``memory.oom_control``,
    v2 ``memory.events``), or None when the kernel does not say."""
    name = "memory.oom_control" if version == "cgroup1" else "memory.events"
    try:
        with open(os.path.join(directory, name)) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def limit_kind(source: str) -> str:
    """What a limit from :func:`memory_limit_bytes` caps: ``cgroup`` (physical memory,
    as on a real board), ``address-space`` (``RLIMIT_AS``: virtual size), ``declared``
    (the testbed's figure, enforced by neither) or ``none``."""
    if source.startswith("cgroup"):
        return "cgroup"
    if source == "rlimit_as":
        return "address-space"
    return "none" if source == "none" else "declared"


def _glibc():
    """glibc's ``malloc_trim`` and ``mallopt``, or None elsewhere (loaded once)."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            import ctypes.util
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), where available.

    glibc raises its mmap threshold after large frees, so later tensors of up to 32 MB
    come from the heap and their freed space stays in RSS; building a model piece by
    piece (TP shards) then looks like it needs the whole model.  No-op elsewhere.
    """
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def _mallopt(param: int, value: int) -> bool:
    lib = _glibc()
    return lib is not None and bool(lib.mallopt(param, int(value)))


_libc = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
#: The ceilings glibc's own adjustment of its thresholds reaches on 64-bit (mmap 32 MiB,
#: trim twice that): :func:`steady_heap` sets them from the start.
STEADY_MMAP_THRESHOLD = 32 << 20
STEADY_TRIM_THRESHOLD = 64 << 20


def steady_heap(mmap_threshold: int = STEADY_MMAP_THRESHOLD, trim_threshold: int = STEADY_TRIM_THRESHOLD) -> bool:
    """Let one training step's freed tensors serve the next step's (glibc).

    glibc starts with tensors above 128 KiB in their own mmap and a heap trimmed back to
    the OS whenever its free top passes a threshold; it raises both only as large blocks
    get freed, so how far they rise depends on the process's history.  In a worker (a
    model built in parts, several gloo groups) they stayed low: each step gave its
    activations back and the kernel zeroed them again at the next, ~7,000 page faults
    (28 MiB) per tiny-gpt2 step, 8-15 % slower than the same step in a bare torchrun
    script (``bench/overhead.py``).  Set at the ceilings glibc would reach by itself, steps
    fault nothing.  A step's peak does not grow (the next step reuses the kept blocks);
    between steps up to ``trim_threshold`` of free heap stays resident.  Call before the
    first large allocation; a worker calls it through :func:`tune_allocator`, which uses
    :func:`unmap_large_frees` instead under an address-space cap.  Returns whether both could be set (glibc only).

    Blocks above 32 MiB (the most glibc's threshold accepts) still get their own mapping,
    faulted in afresh each time.  The largest one a step made again and again, the dense
    token-embedding gradient of every micro-batch (154 MB for gpt2-s, 40 % of a pipeline
    embedding stage's CPU), is gone at its source: pipeline stages take sparse embedding
    gradients (``workers.engine.sparse_embedding_grads``).  Two allocator-side fixes were
    measured and not kept (``bench/RESULTS.md``, "Large blocks"): no mappings at all
    (``M_MMAP_MAX`` 0) removed the faults but fragmented the heap, a GPT2-L embedding
    stage peaking 0.8 GiB higher on a 4 GiB board; torch's huge-page allocation
    (``THP_MEM_ALLOC_ENABLE``) also aligns every tensor from 2 MiB in the heap, +15-28 %
    peak RSS on mid-size models.  Memory is what edge boards run out of first.

    Parameters
    ----------
    mmap_threshold
        Allocations from this size on get their own mapping (returned on free).
    trim_threshold
        Free heap top kept before it is returned to the OS.
    """
    return _mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and _mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def unmap_large_frees(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more with their own mmap (glibc).

    Under an address-space cap (RLIMIT_AS, how the testbed emulates a board's memory)
    virtual size is what runs out.  glibc's dynamic threshold moves tensors of up to
    32 MB into the heap after the first large free; building a model piece by piece then
    leaves freed holes that ``malloc_trim`` returns to the OS as RSS but not as address
    space, and a TP rank hits the cap at a fraction of its real use.  A fixed threshold
    gives every large tensor back on free.  Returns whether it could be set.
    """
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


def tune_allocator() -> str:
    """The worker's allocator settings, made before its first tensor: under an
    address-space cap :func:`unmap_large_frees` (address space is what runs out), else
    :func:`steady_heap` (steps reuse their freed memory).  Returns which was applied,
    ``"none"`` where neither could be (not glibc)."""
    if _address_space_capped():
        return "unmap-large-frees" if unmap_large_frees() else "none"
    return "steady-heap" if steady_heap() else "none"


def apply_memory_limit(nbytes: int | None) -> None:
    """Set the soft ``RLIMIT_AS`` of this process (``None`` lifts it to the hard limit).

    Exceeding it makes allocations fail with a catchable error instead of the kernel
    OOM killer: the way tests emulate a small device.  Leave room for the interpreter
    (``import torch`` alone maps ~0.65 GB of address space).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if nbytes is None:
        soft = hard
    else:
        if hard != resource.RLIM_INFINITY and nbytes > hard:
            raise ValueError(f"{nbytes} bytes exceeds the hard RLIMIT_AS of {hard}")
        soft = int(nbytes)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _oom_types() -> tuple[type, ...]:
    types: list[type] = [MemoryError]
    torch = sys.modules.get("torch")  # an exception of torch's can only exist if it is loaded
    if torch is not None:
        for owner in (torch, getattr(torch, "cuda", None)):
            t = getattr(owner, "OutOfMemoryError", None)
            if isinstance(t, type):
                types.append(t)
    return tuple(types)


def _address_space_capped() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return soft != resource.RLIM_INFINITY


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised ``from``) is a failed allocation.

    Recognises ``MemoryError``, ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError``,
    ``OSError`` with ``ENOMEM``, and ``RuntimeError`` messages of torch's allocators
    ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory", ...).  Under an
    address-space cap (``RLIMIT_AS``) a thread that cannot start counts too: its stack is
    the mapping that failed.
    """
    types = _oom_types()
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, types):
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            return True
        if isinstance(e, RuntimeError):
            msg = str(e).lower()
            if any(m in msg for m in _OOM_MESSAGES):
                return True
            if any(m in msg for m in _THREAD_MESSAGES) and _address_space_capped():
                return True
        # follow only explicit chaining: an error raised while *handling* an OOM is not one
        e = e.__cause__
    return False


def _clear_refs() -> bool:
    global _hwm_before_resets
    hwm = _vm_hwm()
    if hwm is None:
        return False  # no way to read the reset value back
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _hwm_before_resets = max(_hwm_before_resets, hwm)
    return True


class PeakTracker:
    """Peak memory per window (e.g. per training step): ``reset()`` at the start,
    ``sample()`` at phase boundaries (optional), ``peak()`` at the end.

    Parameters
    ----------
    device
        ``cpu`` or ``cuda[:N]``; for CUDA, :meth:`cuda_peak` reports torch's allocator peak.
    use_clear_refs
        Reset the kernel's high-water mark (Linux) for an exact peak.  The reset is
        process-wide; :func:`peak_rss_bytes` keeps the lifetime peak regardless.

    Attributes
    ----------
    exact
        True when :meth:`peak` is the kernel's high-water mark for the window; False
        when it is the max of samples (a lower bound).
    """

    def __init__(self, device: str = "cpu", use_clear_refs: bool = True) -> None:
        self.device = device
        self.use_clear_refs = use_clear_refs
        self.exact = False
        self._max = 0
        self._maxrss0 = 0
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.exact = self.use_clear_refs and _clear_refs()
        self._maxrss0 = _maxrss()
        self._max = rss_bytes()
        torch = sys.modules.get("torch")
        # before CUDA is initialised there is nothing to reset, and torch raises
        # "Invalid device argument" if asked to
        if self.device.startswith("cuda") and torch is not None and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))

    def sample(self) -> int:
        """Fold the current RSS into the window's peak; returns the current RSS."""
        now = rss_bytes()
        if now > self._max:
            self._max = now
        return now

    def peak(self) -> int:
        """Peak RSS in bytes since :meth:`reset` (exact or lower bound, see ``exact``)."""
        if self.exact:
            hwm = _vm_hwm()
            if hwm is not None:
                return max(hwm, self._max)
        maxrss = _maxrss()
        self.sample()
        if maxrss > self._maxrss0:  # a new lifetime high happened inside this window
            return max(self._max, maxrss)
        return self._max

    def cuda_peak(self) -> int | None:
        """Torch's CUDA allocator peak since :meth:`reset`, or ``None`` off CUDA."""
        return cuda_peak_bytes(self.device) if self.device.startswith("cuda") else None
