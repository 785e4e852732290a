"""How a dataloader's sampler deals samples: which one draws them, in which order each rank reads them, and the
samplers DN2 refuses or warns about (a bank and its scores need every sample once, matched by dataset index)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.data import sized_len
from lightning.fabric.utilities.distributed import _DatasetSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from dn2_lightning.distributed import gather_objects, world_size


@dataclass
class Reading:
    """How far this rank has read a loader in one pass: batches and samples, and the dataset index of each position
    when its sampler tells (``order``; samples without an ``index`` are numbered by it, else by position)."""

    batches: int = 0
    samples: int = 0
    order: Tensor | None = None


def drawing_sampler(loader: Any) -> Any:
    """The sampler that decides which samples the loader reads and in which order, under the wrappers Lightning
    puts around it (predict's batch sampler wrapper; the DistributedSamplerWrapper of a custom or predict
    sampler, which draws the wrapped sampler again on every rank)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    batch_sampler = getattr(batch_sampler, "_batch_sampler", batch_sampler)
    sampler = getattr(batch_sampler, "sampler", None)
    sampler = sampler if sampler is not None else getattr(loader, "sampler", None)
    while isinstance(getattr(sampler, "dataset", None), _DatasetSamplerWrapper):
        sampler = sampler.dataset._sampler
    return sampler


def distributed_sampler(loader: Any) -> DistributedSampler | None:
    """The loader's ``DistributedSampler``: its sampler, or Lightning's predict sampler in its batch sampler (which
    deals in order and does not pad). One inside another batch sampler is not taken: it may regroup or pad."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    batch_sampler = getattr(loader, "batch_sampler", None)
    for holder in (batch_sampler, getattr(batch_sampler, "_batch_sampler", None)):
        inner = getattr(holder, "sampler", None)
        if type(holder) is BatchSampler and isinstance(inner, UnrepeatedDistributedSamplerWrapper):
            return inner
    return None


def sampler_order(loader: Any) -> Tensor | None:
    """The dataset index of each sample this rank reads, from its ``DistributedSampler`` (whose order for an epoch
    can be listed again: seed + epoch); ``None`` where it cannot be known (then numbered as read). Under DDP a
    loader without one may hand every rank the same samples (``use_distributed_sampler=False``): refused."""
    sampler = distributed_sampler(loader)
    if world_size() > 1 and sampler is None:
        how = "an IterableDataset" if isinstance(getattr(loader, "dataset", None), IterableDataset) else None
        how = how or f"a {type(getattr(loader, 'batch_sampler', None) or getattr(loader, 'sampler', None)).__name__}"
        raise ValueError(
            f"under DDP, samples without an 'index' are numbered from the DistributedSampler that Lightning gives "
            f"each rank, but this dataloader reads {how} (a custom sampler or batch sampler, or "
            "Trainer(use_distributed_sampler=False)?), so ranks may read the same samples under different numbers: "
            "give every sample its dataset 'index' (dict samples, or (image, label, index) tuples), or leave "
            "use_distributed_sampler=True with a plain sampler."
        )
    # read back only a plain one that the loader batches in order (wrappers re-draw their inner sampler; a custom
    # batch sampler may regroup): the others keep the unshuffled numbering
    plain = sampler is not None and type(sampler).__iter__ is DistributedSampler.__iter__
    if plain and sampler is loader.sampler and type(loader.batch_sampler) is BatchSampler:
        return torch.tensor(list(sampler), dtype=torch.long)
    return None


def warn_if_out_of_order(loader: Any) -> None:
    """Samples without an ``index`` are numbered in the order they are read; a loader that shuffles or picks
    makes those numbers (neighbour indices, paths, the order of the scores) mean nothing, though scores stay
    right."""
    if isinstance(getattr(loader, "dataset", None), IterableDataset):
        return  # an iterable has no positions to point at but its own order (workers: see the warning below)
    if not reads_in_order(loader):
        rank_zero_warn(
            "the dataloader does not read in order (it shuffles, its sampler picks, or a custom batch sampler "
            "regroups) and its samples carry no "
            "'index': they are numbered in the order they are read, so neighbour indices (and paths) do not "
            "point at dataset positions, scores are not in dataset order and the report draws no top anomalies "
            "(the scores themselves are right). Use shuffle=False or give samples an 'index'.",
        )


def reads_in_order(loader: Any) -> bool:
    """Whether the loader reads its dataset's positions in order: a sequential sampler or an unshuffled
    ``DistributedSampler`` (or none at all), batched by a plain ``BatchSampler`` (a custom batch sampler may
    regroup, e.g. by size)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    batch_sampler = getattr(batch_sampler, "_batch_sampler", batch_sampler)  # Lightning's predict wrapper
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return False
    sampler = drawing_sampler(loader)
    sequential = isinstance(sampler, SequentialSampler | DistributedSampler)
    return sampler is None or (sequential and not getattr(sampler, "shuffle", False))


def warn_if_drop_last(loader: Any, consequence: str) -> None:
    """``DataLoader(drop_last=True)`` leaves out a short last batch without a word (Lightning says nothing)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    size = getattr(batch_sampler, "batch_size", None)
    sampler = getattr(batch_sampler, "sampler", None)
    samples = sized_len(sampler) if sampler is not None else None  # None for an IterableDataset's sampler
    if samples is None and isinstance(getattr(loader, "dataset", None), IterableDataset):
        samples = sized_len(loader.dataset)  # an iterable with a length (each worker drops its own remainder)
    if isinstance(getattr(loader, "dataset", None), IterableDataset) and getattr(loader, "num_workers", 0) > 1:
        return  # each worker drops its own remainder: counted after the pass (refuse_iterable_cut_short)
    if getattr(batch_sampler, "drop_last", False) and size and samples and samples % size:
        per_rank = " (of each rank)" if world_size() > 1 else ""
        rank_zero_warn(
            f"the dataloader has drop_last=True: its last {samples % size}{per_rank} {consequence}. Use "
            "drop_last=False (DN2 needs every sample, and any batch size works)."
        )


def refuse_ranks_drawing_their_own_samples(loader: Any) -> None:
    """Under DDP, a random sampler inside Lightning's DistributedSamplerWrapper is drawn on every rank on its own,
    so the ranks' shares overlap: some samples are read twice and others never (a different set of samples than
    the dataset's, whatever their indices say). Unless every rank's generator is in one state. A collective under
    DDP: every rank calls it where all are (a stage's epoch start, a pass read outside the loops)."""
    if world_size() == 1:
        return
    sampler = drawing_sampler(loader)
    random = isinstance(sampler, RandomSampler | WeightedRandomSampler | SubsetRandomSampler)
    random = random and not isinstance(sampler, DistributedSampler)
    generator = getattr(sampler, "generator", None) if random else None
    state = hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest() if generator is not None else None
    drawn = gather_objects((type(sampler).__name__, state) if random else None)
    kinds = [d for d in drawn if d is not None]
    if kinds and (len(kinds) < len(drawn) or len(set(drawn)) > 1 or any(s is None for _, s in kinds)):
        raise ValueError(
            f"under DDP this dataloader's {kinds[0][0]} draws its own order on every rank (Lightning wraps it, as "
            "it does every sampler of a predict dataloader and every custom sampler), so some samples would be scored "
            "twice and others never: use shuffle=False and no random sampler (DN2's scores do not depend on the "
            "order; Lightning's DistributedSampler then splits the samples across ranks), or give it a generator in "
            "one state on every rank (torch.Generator().manual_seed(0) on each: the same order everywhere)."
        )


def refuse_ranks_reading_other_data(loader: Any) -> None:
    """Under DDP a ``DistributedSampler`` deals dataset indices to the ranks, so index i must be the same sample on
    every rank; a dataset listed on each node from its own files (a file unreadable, missing or extra on one node,
    whose ``on_corrupt="skip"`` drops it there only) numbers them otherwise, and scores, bank and AUROC would mix
    samples silently. Compared: the length and, for image-file datasets, the files in index order (relative to
    their common folder, which may lie elsewhere on each node). A collective, called where
    :func:`refuse_ranks_drawing_their_own_samples` is."""
    if world_size() == 1:
        return
    dataset = getattr(loader, "dataset", None)
    dealt = distributed_sampler(loader) is not None
    seen = gather_objects(_dataset_fingerprint(dataset) if dealt else None)
    if None not in seen and len(set(seen)) > 1:
        shown = "; ".join(
            f"rank {r}: {n} samples" + (f", files {files}" if files else "") for r, (n, files) in enumerate(seen)
        )
        raise ValueError(
            f"under DDP the ranks read different datasets ({shown}), so a dataset index would name other samples on "
            "other ranks. Give every node the same files (e.g. one shared copy; a file unreadable on one node only is "
            "dropped there with on_corrupt='skip': see that node's warning, or use on_corrupt='raise')."
        )


def _dataset_fingerprint(dataset: Any) -> tuple[int | None, str | None]:
    paths = getattr(dataset, "paths", None)
    digest = None
    if paths:
        names = [str(p) for p in paths]
        try:
            common = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
            # a slice where it is a prefix (relpath's normalising cost 1 s per 200k files at each evaluation start)
            names = [
                n[len(common) :].lstrip("/\\") if n.startswith(common) else os.path.relpath(n, common) for n in names
            ]
        except ValueError:  # absolute and relative paths mixed, or other drives: compared as given
            pass
        digest = hashlib.sha1("\0".join(names).encode()).hexdigest()[:12]
    return sized_len(dataset) if dataset is not None else None, digest


def shard_for_this_rank(loader: DataLoader) -> DataLoader:
    """Give each rank a disjoint share of the train set when building the bank outside fit."""
    if world_size() == 1:
        return loader
    if loader.batch_size is None:
        raise ValueError(
            f"building the memory bank under DDP outside fit splits the train dataloader across ranks, which needs "
            f"its batch_size; this one batches with a {type(loader.batch_sampler).__name__}, which cannot be split: "
            "run trainer.fit first (Lightning splits it), or give the train dataloader a batch_size."
        )
    workers = loader.num_workers
    return DataLoader(  # the same loader, its sampler aside (spawn context, worker set-up and seeds included)
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=DistributedSampler(loader.dataset, shuffle=False),
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )


def refuse_iterable_cut_short(loader: Any, reading: Reading, what: str) -> None:
    """An ``IterableDataset`` with a length read by several workers gives each worker's share its own short last
    batch, so it yields more batches than ``len(dataloader)``, after which Lightning stops: the last samples are
    never read, silently. Refused when a whole pass read fewer samples than the dataset's length (one process; a
    batch limit such as ``limit_train_batches`` reads fewer batches and is said elsewhere)."""
    dataset = getattr(loader, "dataset", None)
    if world_size() > 1 or not isinstance(dataset, IterableDataset) or getattr(loader, "num_workers", 0) < 2:
        return
    length, batches = sized_len(dataset), sized_len(loader)
    if length is None or batches is None or reading.samples >= length:
        return
    if getattr(getattr(loader, "batch_sampler", None), "drop_last", False):  # each worker drops its own remainder
        rank_zero_warn(
            f"the {what} dataloader has drop_last=True and {loader.num_workers} workers, each dropping the remainder "
            f"of its share: {length - reading.samples} of the IterableDataset's {length} samples were not read (with "
            "any batch limit's). Use drop_last=False (DN2 needs every sample, and any batch size works)."
        )
        return
    if reading.batches < batches:
        return  # a batch limit (limit_train_batches, max_steps, ...) stopped the pass: said elsewhere
    raise ValueError(
        f"the {what} dataloader read {reading.samples} of its IterableDataset's {length} samples: its "
        f"{loader.num_workers} workers each end their share with a short batch, which makes more batches than "
        f"len(dataloader) = {batches}, and Lightning stops there. Use num_workers=1 (or 0), a map-style Dataset, or "
        "an IterableDataset without __len__."
    )


def warn_if_workers_repeat_unnumbered_samples(loader: Any) -> None:
    """An ``IterableDataset`` read by several workers yields every sample once per worker unless it splits them
    (``torch.utils.data.get_worker_info``); samples without an ``index`` cannot show it."""
    dataset = getattr(loader, "dataset", None)
    workers = getattr(loader, "num_workers", 0)
    if isinstance(dataset, IterableDataset) and workers > 1:
        rank_zero_warn(
            f"an IterableDataset read by {workers} workers, whose samples carry no 'index': unless it splits its "
            "samples across the workers (torch.utils.data.get_worker_info), each worker yields all of them, so every "
            f"sample is embedded {workers} times and every score is wrong (a sample's copy is its nearest neighbour). "
            "Give samples an 'index' (copies are then refused), split them per worker, or use num_workers <= 1."
        )
