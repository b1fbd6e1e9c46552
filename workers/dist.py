"""Process-group set-up on a device: gloo bound to the device's own address, or NCCL.

Stock gloo binds to whatever the machine's hostname resolves to, and GLOO_SOCKET_IFNAME
picks an interface, not an address.  Emulated devices share one host (each on its own
loopback address) and real boards may have several interfaces, so we register a backend
whose gloo device is created for the device's address.  Everything else (collectives,
DDP, DTensor meshes, pipelining) is stock torch.distributed on top of it.

The rendezvous store is built here too (:func:`rendezvous_store`): with the run's secret,
rank 0's ``TCPStore`` listens on loopback only behind :class:`workers.rendezvous.Gate` and
every other rank reaches it through a :class:`workers.rendezvous.Relay`; without one (a run
started by hand), the store listens on rank 0's device address only, never on every
interface.  Gloo's own peer connections, made after the rendezvous, are unchanged.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist

from .config import SECRET_ENV
from .rendezvous import Gate, Relay

BACKEND = "edgegloo"
_ADDR_ENV = "EDGETRAIN_BIND_ADDR"
#: The gate or relay of this process's rendezvous, closed by :func:`shutdown`.
_endpoints: list[Gate | Relay] = []


#: How long joining the run may wait for its slowest rank (seconds).
JOIN_S = 600.0


def _create_gloo(store, rank: int, size: int, timeout: datetime.timedelta):
    opts = dist.ProcessGroupGloo._Options()
    addr = os.environ.get(_ADDR_ENV, "")
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=addr)] if addr else \
        [dist.ProcessGroupGloo.create_default_device()]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, size, opts)


def _listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (the store's server takes its descriptor)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, kind, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(128)
    except OSError as exc:
        s.close()
        raise OSError(f"the rendezvous cannot listen on {host}:{port}: {exc}") from None
    return s


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout: datetime.timedelta, secret: str | None = None,
                     on_refused: Callable[[str], None] | None = None) -> dist.Store:
    """The run's key-value store (rank 0 hosts it), reachable only as described above.

    Parameters
    ----------
    rank, world_size
        This worker's place in the run.
    master_addr, master_port
        Rank 0's device address and the run's rendezvous port.
    timeout
        How long joining, and every store operation, may wait.
    secret
        The run's secret; ``None``: unauthenticated (bound to ``master_addr`` only).
    on_refused
        Called with a message for each connection the gate or relay refused.

    Raises
    ------
    RuntimeError
        The rendezvous failed; the message says why (no answer, a wrong secret).
    """
    if not secret:
        if rank == 0:
            fd = _listener(master_addr, master_port).detach()  # the store owns it from here
            return dist.TCPStore(master_addr, master_port, world_size, True, timeout, master_listen_fd=fd)
        return dist.TCPStore(master_addr, master_port, world_size, False, timeout)
    if rank == 0:
        loopback = _listener("127.0.0.1", 0)
        port = loopback.getsockname()[1]
        try:
            gate = Gate(master_addr, master_port, port, secret, on_refused)
        except BaseException:
            loopback.close()
            raise
        _endpoints.append(gate)
        # rank 0's own client talks to the loopback store directly: same process, no gate
        return dist.TCPStore("127.0.0.1", port, world_size, True, timeout, master_listen_fd=loopback.detach())
    relay = Relay(master_addr, master_port, secret, timeout.total_seconds(), on_refused)
    _endpoints.append(relay)
    try:
        return dist.TCPStore("127.0.0.1", relay.port, world_size, False, timeout)
    except Exception as exc:
        if relay.error:
            raise RuntimeError(f"rendezvous with rank 0 at {master_addr}:{master_port} failed: {relay.error}") from exc
        raise


def init(rank: int, world_size: int, master_addr: str, master_port: int, bind_addr: str,
         device: str = "cpu", timeout_s: float = 60.0, secret: str | None = None,
         on_refused: Callable[[str], None] | None = None) -> torch.device:
    """Join the run's process group.

    Parameters
    ----------
    rank, world_size
        This worker's place in the run.
    master_addr, master_port
        Rank 0's device address and the rendezvous port (rank 0 hosts the store).
    bind_addr
        This device's own address; gloo's connections use it.
    device
        ``cpu`` (gloo) or ``cuda`` (NCCL for CUDA tensors, gloo for CPU ones).
    timeout_s
        How long a collective may wait for a silent peer before failing the run.
    secret
        The run's rendezvous secret; ``None`` takes it from ``$EDGETRAIN_RUN_SECRET``
        (removed from the environment once read), and without one the rendezvous is
        unauthenticated (:func:`rendezvous_store`).
    on_refused
        Called with a message for each stranger the rendezvous refused.

    Returns
    -------
    torch.device
        The device tensors should live on.
    """
    os.environ[_ADDR_ENV] = bind_addr
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create_gloo, devices=["cpu"])
    timeout = datetime.timedelta(seconds=timeout_s)
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(local)
        backend, dev = f"cpu:{BACKEND},cuda:nccl", torch.device("cuda", local)
    else:
        backend, dev = BACKEND, torch.device("cpu")
    if secret is None:
        secret = os.environ.pop(SECRET_ENV, None)
    # A slow board (an emulated Nano at a tenth of a core, a real one on an SD card) may take
    # minutes to import torch: joining waits that long for the last rank, a collective does not
    join = datetime.timedelta(seconds=max(timeout_s, JOIN_S))
    store = rendezvous_store(rank, world_size, master_addr, master_port, join, secret, on_refused)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=join)
    store.set_timeout(timeout)
    dist.distributed_c10d._set_pg_timeout(timeout)  # a silent peer fails a collective after timeout_s
    return dev


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now (for a rendezvous on this host: tests, benches)."""
    import socket
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the process group and close this process's rendezvous (store, gate, relay)."""
    if dist.is_initialized():
        dist.destroy_process_group()  # drops the store: the loopback server closes with it
    while _endpoints:
        _endpoints.pop().close()
