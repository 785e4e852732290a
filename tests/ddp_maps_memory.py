"""2-rank DDP fit with anomaly maps under a host-memory limit that one rank's share of the patch bank fits but the
gathered bank does not, on every rank or on one (run by tests/test_ddp.py): every rank must refuse it before
assembling it."""

from __future__ import annotations

import sys

from helpers import rank_verdict
from lightning import Trainer
from test_maps import tiny_conv

import dn2_lightning.maps.bank as patch_bank
from dn2_lightning import DN2Module, OneClassDataModule


def main(root: str, limit: int, only_rank: int | None = None) -> None:
    # only_rank: that rank alone lacks the memory (the others have plenty)
    patch_bank._host_available_bytes = lambda: limit if only_rank in (None, trainer.global_rank) else 2**40
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)  # fmt: skip
    with rank_verdict(trainer, MemoryError):
        trainer.fit(model, datamodule=OneClassDataModule(dataset="folder", root=root, load_size=32, batch_size=2))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
