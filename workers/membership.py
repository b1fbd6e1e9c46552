"""Who trains together: process groups per membership generation, re-formed when a device leaves.

torch 2.13's gloo backend cannot abort a group or shrink one (``dist._reconfigure`` comes in
2.14), so the pattern is torchft's (FEASIBILITY.md): training collectives never run on the
default group.  Generation ``g`` builds its group over ``PrefixStore(f"g{g}/", store)`` on
the rendezvous store (hosted by rank 0's worker); when a peer is lost the survivors drop
that group (never destroy it: a collective may still be in flight on a gloo thread) and
build generation ``g + 1`` among themselves.  A re-used prefix would hang in the store's
barrier, so every generation has its own.  The store is reached as at the start, through
rank 0's authenticating gate (:mod:`workers.rendezvous`); its connections are made when a
worker joins the run, before any generation, so :class:`Links` never counts them as a
generation's and never cuts them.

Who survived is decided by the controller, which sees every worker's process and heartbeat;
it writes ``regroup <generation> <rank,rank,...>`` (original ranks, in their new order) on
each survivor's stdin (:mod:`workers.lifeline` hands the line here).
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dist import _create_gloo


@dataclass(frozen=True)
class Membership:
    """One generation: the original ranks that train together, in their order."""

    generation: int
    ranks: tuple[int, ...]

    def rank_of(self, original: int) -> int:
        return self.ranks.index(original)

    @property
    def size(self) -> int:
        return len(self.ranks)


def parse_regroup(command: str) -> Membership | None:
    """``regroup 1 0,1,3`` -> ``Membership(1, (0, 1, 3))``; ``None`` for any other line."""
    parts = command.split()
    if len(parts) != 3 or parts[0] != "regroup":
        return None
    try:
        gen = int(parts[1])
        ranks = tuple(int(r) for r in parts[2].split(",") if r)
    except ValueError:
        return None
    if gen < 1 or not ranks or len(set(ranks)) != len(ranks) or min(ranks) < 0:
        return None
    return Membership(gen, ranks)


def generation_group(store, m: Membership, original_rank: int, timeout_s: float,
                     tag: str = "", join_timeout_s: float = 60.0) -> dist.ProcessGroup:
    """A gloo process group of ``m``'s members over the generation's own store prefix,
    bound to this device's address like every group of the run (``workers.dist``).

    ``dist.new_group`` cannot make it: every rank of the default group must call that, the
    lost one too.  So the group is built by hand and then entered in torch's group registry
    the way ``new_group`` does (``_register_pg_in_world``), because DCP and
    ``dist.get_rank(group)`` look groups up there.  ``tag`` separates several groups of
    one generation (training, control).

    ``timeout_s`` bounds the group's collectives; joining it waits up to
    ``join_timeout_s`` for every member (a survivor may still be finding out, at its old
    group's bound, that a peer is gone).
    """
    name = f"edgetrain-g{m.generation}{tag}"
    prefixed = dist.PrefixStore(f"g{m.generation}{tag}/", store)
    rank, size = m.rank_of(original_rank), m.size
    # gloo's own rendezvous would use the collective bound: wait for everyone first
    prefixed.set(f"here/{rank}", "1")
    prefixed.wait([f"here/{r}" for r in range(size)], datetime.timedelta(seconds=join_timeout_s))
    backend = _create_gloo(prefixed, rank, size, datetime.timedelta(seconds=timeout_s))
    pg = dist.ProcessGroup(prefixed, rank, size)
    pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    pg._set_group_name(name)
    c10d = dist.distributed_c10d
    c10d._register_pg_in_world(pg, "edgegloo", prefixed, name, "cpu:edgegloo",
                               rank_mapping={g: i for i, g in enumerate(m.ranks)})
    return pg


def _sockets() -> dict[int, str]:
    """This process's socket descriptors: fd -> ``socket:[inode]`` (Linux ``/proc``)."""
    out = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out[int(name)] = link
    return out


class Links:
    """The TCP connections each generation's groups opened, so an abandoned generation can
    be cut.

    Why: gloo in torch 2.13 cannot abort a collective (``abort()`` and ``shutdown()`` are
    no-ops for it), so a survivor waiting on a peer that has itself given up would wait
    out the whole collective bound.  Shutting down the abandoned group's open connections
    makes every pending read on them fail at once ("connection closed by peer"); each
    survivor that fails cuts its own in turn, so the release cascades in milliseconds.
    The group object itself is kept (never destroyed, see above), and only connections
    are shut: shutting gloo's listening socket would abort the process.  Each entry keeps
    the socket's inode, so a descriptor number reused by a newer group is never cut.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_generation: dict[int, dict[int, str]] = {}

    @staticmethod
    def snapshot() -> dict[int, str]:
        return _sockets()

    def record(self, generation: int, before: dict[int, str]) -> int:
        """Sockets opened since ``before`` belong to ``generation``; returns how many."""
        new = {fd: link for fd, link in _sockets().items() if before.get(fd) != link}
        with self._lock:
            self._by_generation.setdefault(generation, {}).update(new)
        return len(new)

    def sever(self, below: int) -> int:
        """Shut down the open connections of every generation older than ``below``;
        returns how many were cut."""
        with self._lock:
            old = [g for g in self._by_generation if g < below]
            entries = [e for g in old for e in self._by_generation.pop(g).items()]
        cut = 0
        for fd, link in entries:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != link:
                    continue  # closed, and the number reused
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM \
                        and not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    s.shutdown(socket.SHUT_RDWR)
                    cut += 1
            except OSError:
                pass  # already shut or reset by the peer
            finally:
                s.close()  # the duplicate only: gloo still owns ``fd``
        return cut


class Regroups:
    """The controller's ``regroup`` commands, waited for by the training thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._latest: Membership | None = None

    def offer(self, command: str) -> Membership | None:
        """Take a command line; returns the membership if it was a regroup."""
        m = parse_regroup(command)
        if m is None:
            return None
        with self._cond:
            if self._latest is None or m.generation > self._latest.generation:
                self._latest = m
            self._cond.notify_all()
        return m

    def wait(self, after: int, timeout_s: float) -> Membership | None:
        """The first membership of a generation above ``after``, or None after ``timeout_s``."""
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None and self._latest.generation > after, timeout_s)
            m = self._latest
            return m if m is not None and m.generation > after else None


def sync_state(tensors: list[torch.Tensor], clean_step: int, group: dist.ProcessGroup) -> int:
    """Make every member's state the one with the most progress; returns the agreed step.

    A peer lost in the middle of a gradient all-reduce may leave one survivor with the
    optimizer step done and another without, so the survivors agree on the highest clean
    step and, when they differ, the lowest member that has it sends its tensors
    (parameters and optimizer state) to the others.
    """
    rank = group.rank()
    steps = torch.tensor([clean_step, -clean_step], dtype=torch.int64)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)
    top, low = int(steps[0]), -int(steps[1])
    if top == low:
        return top
    has = torch.tensor([rank if clean_step == top else 1 << 30], dtype=torch.int64)
    dist.all_reduce(has, op=dist.ReduceOp.MIN, group=group)
    for t in tensors:
        dist.broadcast(t, group=group, group_src=int(has))
    return top
