"""Data-parallel training on torch.distributed: where this process stands among the training
processes (`Cluster`), its process group, and launching one process per device.

Every rank mines the same tuples from the same all-gathered descriptor cache; each step's global
batch of tuples is split into contiguous shares, one per rank, and DDP averages the gradients.
Backends: gloo on the CPU, nccl on CUDA. Collectives time out after `TIMEOUT`, so a rank that
stops answering ends the run instead of hanging it. Processes come from `launch` (one node or
several: `--nodes`/`--node-rank`/`--master-addr`) or from torchrun; `Layout` places a node's
processes among all of them.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from netvlad.errors import NetVLADError

#: How long a collective waits for the other ranks before the run fails.
TIMEOUT = timedelta(minutes=10)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(NetVLADError):
    """A training process died or failed, or the distributed options do not fit together."""


@dataclass(frozen=True)
class Cluster:
    """This process's rank (0 … world − 1) among `world` training processes, and the device its
    collectives use. The default is one process: every method is then a no-op."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes the run folder and prints."""
        return self.rank == 0

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of `rank`'s (default: this rank's) contiguous share of n items."""
        r = self.rank if rank is None else rank
        return n * r // self.world, n * (r + 1) // self.world

    def share(self, items: Sequence) -> Sequence:
        """This rank's contiguous share of `items` (shares differ in length by at most one)."""
        start, stop = self.bounds(len(items))
        return items[start:stop]

    def gather_rows(self, part: np.ndarray, total: int) -> np.ndarray:
        """Every rank's `share` of a (total, …) array, given this rank's rows `part`, joined in
        rank order: the whole (total, …) array on every rank."""
        if self.world == 1:
            return part
        sizes = [stop - start for start, stop in (self.bounds(total, r) for r in range(self.world))]
        padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=torch.float32, device=self.device)
        padded[: len(part)] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return np.concatenate([p[:size].cpu().numpy() for p, size in zip(parts, sizes)])

    def mean(self, value: float) -> float:
        """The mean over ranks of a per-rank number."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor) / self.world

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DDP (gradients averaged over ranks in backward) when there are several ranks.
        Buffers are not broadcast per forward: a step may run the network once per input shape."""
        if self.world == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def join_group(rank: int, world: int, device: torch.device, init_method: str = "env://") -> Cluster:
    """Join the process group (nccl on CUDA, gloo on the CPU) as `rank` of `world`."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    return Cluster(rank, world, device)


def leave_group(synchronise: bool = False) -> None:
    """Leave the process group, if this process joined one. With `synchronise` (a rank whose run
    ended well), first wait for every rank to get here, so that none tears the group down while
    another is still in a collective (gloo can then abort a rank); after a failure, ranks leave at
    once, since a peer may never arrive."""
    if dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


def rank_device(device: torch.device, local_rank: int, processes: int) -> torch.device:
    """The device of local rank `local_rank` of `processes` on this node: `device` itself for one
    process, else cuda:local_rank on CUDA, or the CPU with its cores split between the processes."""
    if processes == 1:
        return device
    check_devices(device, processes)
    if device.type != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
        return device
    return torch.device("cuda", local_rank)


def check_devices(device: torch.device, processes: int) -> None:
    """Refuse several processes per node on one named GPU, or more of them than GPUs."""
    if device.type != "cuda" or processes == 1:
        return
    if device.index not in (None, 0):
        raise DistributedError(f"--device {device} names one GPU; with several processes each takes cuda:<local rank>")
    if processes > torch.cuda.device_count():
        raise DistributedError(f"{processes} processes per node, but this node has {torch.cuda.device_count()} CUDA device(s)")


def free_port() -> int:
    """A TCP port free on this machine now (for a single-node run's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(worker: Callable, args: tuple, processes: int) -> None:
    """Run `worker(local_rank, *args)` in `processes` spawned processes and wait for all of them.

    When one dies or fails, the others are stopped and `DistributedError` says which one and
    why, in one line."""
    context = mp.start_processes(worker, args=args, nprocs=processes, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except ProcessException as exc:
        raise DistributedError(_failure(context.processes, exc)) from None


def _failure(processes: list, exc: ProcessException) -> str:
    """One line on why the run stopped: a process killed by a signal first, else the failure seen."""
    for index, process in enumerate(processes):
        code = process.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return (f"training process {index} was killed ({signal.Signals(-code).name}); the other processes "
                    "were stopped; continue the run with --resume")
    if isinstance(exc, mp.ProcessRaisedException):
        cause = exc.msg.strip().splitlines()[-1]
        return f"training process {exc.error_index} failed: {cause}"
    return f"training process {exc.error_index} stopped: {exc}; continue the run with --resume"


@dataclass(frozen=True)
class Layout:
    """The processes of one node within a run: `per_node` local ranks whose global ranks start at
    `first_rank`, of `world` in all, meeting at `init_method` (tcp://host:port, or env:// under
    torchrun)."""

    world: int = 1
    per_node: int = 1
    first_rank: int = 0
    init_method: str = "env://"

    @classmethod
    def of_nodes(cls, devices: int, nodes: int, node_rank: int, master_addr: str, master_port: int | None) -> "Layout":
        """`devices` processes on each of `nodes` nodes, this one being `node_rank`; the port is
        free-chosen on a single node when not given."""
        if not 0 <= node_rank < nodes:
            raise DistributedError(f"--node-rank {node_rank} is not one of the {nodes} nodes (0…{nodes - 1})")
        if master_port is None:
            if nodes > 1:
                raise DistributedError("several nodes need a --master-port that every node reaches on --master-addr")
            master_port = free_port()
        return cls(devices * nodes, devices, node_rank * devices, f"tcp://{master_addr}:{master_port}")

    @classmethod
    def of_torchrun(cls) -> "Layout | None":
        """This node's layout when torchrun started this process (its environment), else None."""
        if not all(name in os.environ for name in TORCHRUN_VARIABLES):
            return None
        local = int(os.environ["LOCAL_RANK"])
        return cls(int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                   int(os.environ["RANK"]) - local, "env://")

    def join(self, local_rank: int, device: torch.device) -> Cluster:
        """This process's `Cluster` (and its process group, when there are several processes)."""
        device = rank_device(device, local_rank, self.per_node)
        if self.world == 1:
            return Cluster(device=device)
        return join_group(self.first_rank + local_rank, self.world, device, self.init_method)
