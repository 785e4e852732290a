"""Which data feeds the Trainer call that is running: its datamodule, if any, and its one dataloader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning import LightningDataModule, Trainer
from lightning.pytorch.utilities import CombinedLoader


def running_datamodule(trainer: Trainer | None) -> LightningDataModule | None:
    """``trainer.datamodule`` when the running call reads its dataloaders, else ``None``.

    A Trainer keeps the datamodule of an earlier call: ``trainer.predict(model, dataloaders=...)`` after
    ``trainer.fit(model, datamodule=dm)`` still has ``trainer.datamodule is dm``, whose files, settings and
    images belong to other samples than the ones being read.
    """
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return None
    fn = trainer.state.fn
    loop = getattr(trainer, f"{fn.value}_loop", None) if fn is not None else None  # fit_loop, ..., predict_loop
    source: Any = getattr(loop, "_data_source", None)  # Lightning's record of what the call was given
    if source is None or not hasattr(source, "instance"):
        return datamodule  # another Lightning version: keep the attached datamodule
    return datamodule if source.instance is datamodule else None


ONE_LOADER = (
    "DN2Module reads one dataloader per trainer.{fn}() call (its bank, scores, AUROC and reports describe one set, "
    "matched by dataset index); call trainer.{fn}() once per dataloader."
)


def one_loader(loaders: Any, fn: str) -> Any:
    """The DataLoader behind what Lightning keeps for a stage: what it was given, a loader or a list, dict or
    CombinedLoader of them. One wrapped loader is that loader (its checks must see it); several are refused."""
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.flattened
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, list | tuple):
        if len(loaders) != 1:
            raise ValueError(ONE_LOADER.format(fn=fn))
        return loaders[0]
    return loaders


def one_batch(batch: Any, loaders: Any) -> Any:
    """A batch of one wrapped dataloader, unwrapped: Lightning gives ``[batch]`` or ``{name: batch}`` for a train
    loader in a list or dict, or a CombinedLoader of one in a non-sequential mode."""
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables
    if isinstance(loaders, Mapping) and isinstance(batch, Mapping) and batch.keys() == loaders.keys():
        return next(iter(batch.values()))
    if isinstance(loaders, list | tuple) and isinstance(batch, list | tuple) and len(batch) == len(loaders) == 1:
        return batch[0]
    return batch
