"""Data-parallel training under torchrun: `torchrun --nproc-per-node N -m specctl pretrain|distill|finetune-head`.

Every process holds the whole model and takes its share of every batch. `train.batch_size` is the GLOBAL batch:
each of N processes gets a contiguous batch_size / N of every batch one process would draw (same order, same
seed), and after each backward the gradients are averaged over the processes (an all-reduce, as
DistributedDataParallel does), so all processes apply the same update and the run follows one process with the same
batch. Validation runs in full on every process and its metrics are averaged, so every process takes the same
best-epoch and early-stopping decisions. Only rank 0 writes (run directory, checkpoints, exports) and prints; it
saves after the epoch's metrics all-reduce, which no process passes before all have finished the epoch, and a
barrier after the save lets no process read a checkpoint before it is whole.

Why not the DistributedDataParallel wrapper: the losses of both halves call the raw module from closures, some
forward it several times per step (rollout losses) or apply its head outside its forward (early-exit losses);
DDP's hooks only see a forward through the wrapper. The all-reduce after backward gives the same gradient.

gloo on CPU, nccl on cuda (process i on cuda:LOCAL_RANK). Outside torchrun (WORLD_SIZE unset or 1) every function
here is a no-op and nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from specctl.core.errors import SpecctlError
from specctl.core.rundir import RunDir

T = TypeVar("T", bound=Sequence)
BUCKET = 2**25  # gradient elements per all-reduce (128 MB of fp32): few collectives, bounded extra memory
_device = torch.device("cpu")  # where collectives' own tensors live (cuda for nccl)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() == 1:
        return
    if _device.type == "cuda":
        dist.barrier(device_ids=[_device.index])  # nccl is told this process's GPU, which it cannot always guess
    else:
        dist.barrier()


@contextmanager
def launched(device: torch.device) -> Iterator[torch.device]:
    """Under torchrun: join the process group for the `with` and yield this process's device (cuda:LOCAL_RANK on
    cuda); otherwise yield `device` unchanged."""
    global _device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world_size() > 1:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as e:
        raise SpecctlError(f"torchrun: cannot join the process group: {e}") from None
    _device = device
    try:
        yield device
    finally:
        dist.destroy_process_group()
        _device = torch.device("cpu")


def check_batch(batch_size: int) -> None:
    world = world_size()
    if batch_size % world:
        raise SpecctlError(f"train.batch_size {batch_size} is the global batch: it must split evenly over the {world} "
                           "processes (a multiple of --nproc-per-node)")


def shard(batch: T) -> T:
    """This process's contiguous part of a global batch (equal parts)."""
    world, n = world_size(), len(batch)
    return batch if world == 1 else batch[rank() * n // world:(rank() + 1) * n // world]


def shard_batches(batches: Iterable[T]) -> Iterator[T]:
    """This process's part of each global batch. A last batch smaller than the number of processes is dropped: every
    process must take a part of every step."""
    world = world_size()
    for batch in batches:
        if len(batch) >= world:
            yield shard(batch)


def buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive tensors of one dtype, at most BUCKET elements a group (unless one tensor alone is larger)."""
    group: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if group and (size + t.numel() > BUCKET or t.dtype != group[0].dtype):
            yield group
            group, size = [], 0
        group.append(t)
        size += t.numel()
    if group:
        yield group


def average_gradients(params: list[nn.Parameter], loss: torch.Tensor) -> float:
    """After backward: each gradient becomes its mean over the processes (a missing one counts as zeros, so every
    process reduces the same tensors); returns the loss averaged likewise (the global batch's loss)."""
    world = world_size()
    if world == 1:
        return loss.item()
    value = loss.detach().float().reshape(1).to(_device)
    dist.all_reduce(value)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for group in buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(part.view_as(g))
    return value.item() / world


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Validation metrics averaged over the processes, so that every process decides alike."""
    if world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_device)
    dist.all_reduce(values)
    return {k: v / world_size() for k, v in zip(keys, values.tolist())}


def synchronize_start(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (the same start, as DDP makes it); then the other processes
    reseed, so that dropout and noise differ between the parts of a batch (rank 0 draws as one process would)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)
    if rank():
        torch.manual_seed(torch.initial_seed() + rank())


class Follower(RunDir):
    """A non-zero rank's view of rank 0's run directory: it reads checkpoints there and writes nothing."""

    def save_manifest(self) -> None:
        pass

    def write_json(self, name: str, obj: object) -> Path:
        return self.path / name

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        pass

    def __exit__(self, kind, error, traceback) -> None:
        pass


def shared_run(make: Callable[[], RunDir]) -> RunDir:
    """Rank 0 makes the run directory (a new one, or the one --resume continues); the other processes follow it. A
    failure there is raised on every process, as one line."""
    if world_size() == 1:
        return make()
    run, error = None, None
    if is_main():
        try:
            run = make()
        except (SpecctlError, OSError) as e:
            error = e
    box = [str(run.path) if run else None, str(error) if error else None]
    dist.broadcast_object_list(box, 0, device=_device)
    if error is not None:
        raise error
    if box[1] is not None:
        raise SpecctlError(box[1])
    return run if run is not None else Follower(Path(box[0]), {})
