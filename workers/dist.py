"""Process-group set-up on a device: gloo bound to the device's own address, or NCCL.

Stock gloo binds to whatever the machine's hostname resolves to, and GLOO_SOCKET_IFNAME
picks an interface, not an address.  Emulated devices share one host (each on its own
loopback address) and real boards may have several interfaces, so we register a backend
whose gloo device is created for the device's address.  Everything else (collectives,
DDP, DTensor meshes, pipelining) is stock torch.distributed on top of it.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

BACKEND = "edgegloo"
_ADDR_ENV = "EDGETRAIN_BIND_ADDR"


def _create_gloo(store, rank: int, size: int, timeout: datetime.timedelta):
    opts = dist.ProcessGroupGloo._Options()
    addr = os.environ.get(_ADDR_ENV, "")
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=addr)] if addr else \
        [dist.ProcessGroupGloo.create_default_device()]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, size, opts)


def init(rank: int, world_size: int, master_addr: str, master_port: int, bind_addr: str,
         device: str = "cpu", timeout_s: float = 60.0) -> torch.device:
    """Join the run's process group.

    Parameters
    ----------
    rank, world_size
        This worker's place in the run.
    master_addr, master_port
        Rank 0's device address and the rendezvous port (rank 0 hosts the TCPStore).
    bind_addr
        This device's own address; gloo's connections use it.
    device
        ``cpu`` (gloo) or ``cuda`` (NCCL for CUDA tensors, gloo for CPU ones).
    timeout_s
        How long a collective may wait for a silent peer before failing the run.

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
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world_size, timeout=timeout)
    return dev


def free_port(addr: str = "127.0.0.1") -> int:
    """A TCP port free on ``addr`` now (for a rendezvous on this host: tests, benches)."""
    import socket
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
