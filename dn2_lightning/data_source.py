"""Which datamodule, if any, feeds the dataloaders of the Trainer call that is running."""

from __future__ import annotations

from typing import Any

from lightning import LightningDataModule, Trainer


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
