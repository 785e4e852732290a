"""Gathering rows of tensors across processes (unequal counts per rank allowed), and the checks that every rank
passes or fails together."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# The world of the running Trainer: a single-device Trainer run after a DDP one in the same script (Lightning's advice
# for testing, run by every process) finds the process group still up, but must not gather with the other processes.
_trainer_world: ContextVar[int | None] = ContextVar("dn2_trainer_world", default=None)


def follow_trainer(world: int | None) -> None:
    """Make DN2's collectives follow a Trainer of ``world`` processes (its ``world_size``; set at each run's setup,
    ``None`` at its teardown: the process group's): with 1, none of them gathers, even while a process group is up."""
    _trainer_world.set(world)


@contextlib.contextmanager
def across_processes() -> Iterator[None]:
    """DN2's collectives gather from the whole process group in this block, whatever run set them last (e.g. saving a
    bank sharded over the processes after a single-device run that stopped on an error, before its teardown)."""
    token = _trainer_world.set(None)
    try:
        yield
    finally:
        _trainer_world.reset(token)


def process_world() -> int:
    """Processes in the process group (1 without one), whatever the running Trainer's world."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if process_world() > 1 else 0


def world_size() -> int:
    """Ranks that DN2's collectives gather from: the process group's, or 1 under a single-device Trainer."""
    return 1 if _trainer_world.get() == 1 else process_world()


def collectives_available() -> bool:
    """Whether DN2's collectives gather (torchmetrics' ``distributed_available_fn`` for DN2's metric states)."""
    return world_size() > 1


def run_by_process_zero_too(trainer: Any) -> bool:
    """Whether ``trainer`` is a single-device Trainer that every process of a DDP script runs, and this process not
    the first: process zero runs the same and writes its files (as Lightning's loggers do)."""
    return trainer.world_size == 1 and process_rank() != 0


def writes_files(trainer: Any) -> bool:
    """Whether this process writes a run's reports: the Trainer's rank zero, once per job."""
    return bool(trainer.is_global_zero) and not run_by_process_zero_too(trainer)


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (any number of rows per rank) from every rank, in rank order."""
    if world_size() == 1:
        return tensor
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])


def gather_rows_to_cpu(tensor: Tensor) -> Tensor:
    """Like :func:`gather_rows`, but the result lands in host memory and the device holds at most one rank's
    rows at a time (for saving a sharded bank larger than one device)."""
    if world_size() == 1:
        return tensor.cpu()
    counts = count_rows(tensor.shape[0], tensor.device)
    parts = []
    for src, count in enumerate(counts):
        buffer = tensor.contiguous() if src == rank() else tensor.new_empty((count, *tensor.shape[1:]))
        dist.broadcast(buffer, src=src)
        parts.append(buffer.cpu())
    return torch.cat(parts)


def check_unique_indices(indices: Tensor, what: str, padded_rows: int = 1) -> None:
    """Refuse dataset indices that repeat more often than ``DistributedSampler``'s padding can explain.

    Rows are matched to samples by their dataset ``index``: under DDP the sampler pads the ranks with fewer than
    ``world_size`` repeated samples, whose rows are dropped. Any other repeat means that different samples share
    an index (a ``ConcatDataset`` of datasets that each number their samples from 0, a custom ``index``), and
    dropping those rows would silently lose samples. Fewer repeats than the padding allows cannot be told apart
    from it (under DDP only).

    Args:
        indices: every rank's dataset indices, gathered.
        what: the rows, for the message (e.g. ``"training samples"``).
        padded_rows: rows per padded sample (a group's members when each is a row); 0 where the sampler does not
            pad (Lightning's predict sampler).
    """
    repeats = len(indices) - int(torch.unique(indices).numel())
    if repeats <= (world_size() - 1) * padded_rows:
        return
    values, counts = torch.unique(indices, return_counts=True)
    if world_size() > 1 and bool((counts == world_size()).all()):
        raise ValueError(
            f"every one of the {len(values)} {what} was read by all {world_size()} ranks: the dataloader does not "
            "split its samples across ranks (Trainer(use_distributed_sampler=False), or a sampler of your own). "
            "Leave use_distributed_sampler=True, or give each rank its share of the samples."
        )
    shared = values[counts > 1][:5].tolist()
    raise ValueError(
        f"{repeats} of {len(indices)} {what} share their dataset 'index' with another sample (e.g. indices "
        f"{shared}); rows are matched to samples by index (a dict sample's 'index', or the third element of a "
        "tuple sample: an (image, label, class_id) tuple would be read so), so every sample needs its own. A "
        "ConcatDataset of dn2 datasets numbers each part from 0: wrap it, "
        "dn2_lightning.data.Renumbered(ConcatDataset([...])), or give samples no 'index' (they are then numbered "
        "in the order their sampler deals them: under DDP, Lightning's DistributedSampler)."
    )


def unique_by_index(indices: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Sort rows by dataset index and keep one row per index (DistributedSampler pads with repeats).

    Rows already in strictly increasing order (one process's pass) come back as they are, without a copy."""
    if len(indices) < 2 or bool((indices[1:] > indices[:-1]).all()):
        return (indices, *tensors)
    order = torch.argsort(indices, stable=True)
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[order[1:]] != indices[order[:-1]]
    rows = order[keep]  # one gather per tensor, not a sorted copy and then a filtered one
    return (indices[rows], *(t[rows] for t in tensors))


def broadcast_module_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP does when it wraps a module)."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def rank() -> int:
    """This process's rank among the ranks DN2's collectives gather from (0 under a single-device Trainer)."""
    return dist.get_rank() if world_size() > 1 else 0


def keep_first_owner(indices: Tensor) -> Tensor:
    """Mask of this rank's rows to keep so that every dataset index lives on exactly one rank (the lowest
    rank holding it; the ``DistributedSampler`` repeats samples across ranks). Only indices travel."""
    if world_size() == 1:
        first = torch.ones_like(indices, dtype=torch.bool)
        order = torch.argsort(indices, stable=True)
        first[order[1:]] = indices[order[1:]] != indices[order[:-1]]
        return first
    owner = torch.full_like(indices, rank())
    all_indices, all_owners = gather_rows(indices), gather_rows(owner)
    order = torch.argsort(all_indices * world_size() + all_owners, stable=True)
    sorted_indices, sorted_owners = all_indices[order], all_owners[order]
    first = torch.ones_like(sorted_indices, dtype=torch.bool)
    first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    mine = sorted_indices[first & (sorted_owners == rank())]
    keep = torch.isin(indices, mine)
    # a rank can hold an index twice only if its own sampler repeated it: keep the first
    order = torch.argsort(indices, stable=True)
    repeated = torch.zeros_like(keep)
    repeated[order[1:]] = indices[order[1:]] == indices[order[:-1]]
    return keep & ~repeated


def all_gather_same_shape(tensor: Tensor) -> list[Tensor]:
    if world_size() == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def count_rows(n: int, device: torch.device) -> list[int]:
    """Row counts of every rank."""
    return [int(c) for c in gather_rows(torch.tensor([n], device=device))]


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (any picklable value), in rank order."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def stop_together(agree: dict[str, object] | None = None, what: str = "", fix: str = "") -> Iterator[None]:
    """Run rank-local checks so that, under DDP, every rank stops when one does: after the block each rank's error
    (or none) is gathered, and the ranks whose own checks passed raise too, naming the rank that failed. Without it
    they would go on into the next collective and wait there for the process group's timeout (half an hour) before
    failing without the reason. ``agree``: values every rank must share, compared in the same gather (see
    :func:`refuse_ranks_that_differ`). A collective: every rank enters the block at the same point."""
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        if world_size() == 1:
            raise
        error = err
    if world_size() == 1:
        return
    # the error's nearest built-in class travels too, for the other ranks to raise one a caller's ``except`` takes alike
    built_in = None if error is None else next(c for c in type(error).__mro__ if c.__module__ == "builtins").__name__
    values = {name: repr(value) for name, value in (agree or {}).items()}
    seen = gather_objects((None if error is None else (built_in, type(error).__name__, str(error)), values))
    if error is not None:
        raise error
    failed = [(r, found) for r, (found, _) in enumerate(seen) if found is not None]
    if failed:
        (r, (built_in, kind, message)), more = failed[0], len(failed) - 1
        also = f" (and {more} other rank(s))" if more else ""
        cls = getattr(builtins, built_in, RuntimeError)
        cls = cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError
        raise cls(f"rank {r}{also} stopped: {kind}: {message}")
    _refuse_differences([v for _, v in seen], what, fix)


def refuse_ranks_that_differ(values: dict[str, object], what: str, fix: str) -> None:
    """Under DDP, refuse on every rank together when the ranks' ``values`` differ (e.g. a module loaded with other
    overrides on one node, another checkpoint to resume from, or a bank held on some ranks only): each rank would
    score its share of the samples otherwise, or enter other collectives. ``what`` names the values, ``fix`` says
    what to do. A collective: every rank calls it at the same point."""
    with stop_together(values, what, fix):
        pass


def _refuse_differences(seen: list[dict[str, str]], what: str, fix: str) -> None:
    differ = sorted({name for s in seen for name in s if any(t.get(name) != s.get(name) for t in seen)})
    if differ:
        shown = "; ".join(
            f"{name}: " + ", ".join(f"rank {r}: {s.get(name)}" for r, s in enumerate(seen)) for name in differ
        )
        raise ValueError(f"under DDP the ranks' {what} differ ({shown}). {fix}")


def refuse_ranks_with_other_banks(summary: tuple[int, int, float, float]) -> None:
    """Under DDP with a bank on every rank (not sharded), the ranks' banks must be one: each node may have loaded
    its own copy of a checkpoint path (a node-local disk), and Lightning broadcasts rank 0's parameters but not the
    bank's buffers. Compared by ``MemoryBank.summary()`` (size, index sum, float64 sums; a collective)."""
    if world_size() == 1:
        return
    seen = gather_objects(tuple(summary))
    first = seen[0]
    slack = 1e-9 * max(first[3], 1.0)  # the same rows summed by another device's kernels may round otherwise
    if not all(s[:2] == first[:2] and abs(s[2] - first[2]) <= slack and abs(s[3] - first[3]) <= slack for s in seen):
        sizes = ", ".join(f"rank {r}: {s[0]} rows" for r, s in enumerate(seen))
        raise ValueError(
            f"under DDP the ranks hold different memory banks ({sizes}; their values differ), e.g. a checkpoint path "
            "that holds another file on another node's disk. Give every node the same checkpoint (one shared copy), "
            "or fit again."
        )
