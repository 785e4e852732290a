"""2-rank DDP fit with anomaly maps under a host-memory limit that one rank's share of the patch bank fits but the
gathered bank does not, on every rank or on one (run by tests/test_ddp.py): every rank must refuse it before
assembling it."""

from __future__ import annotations

import sys

import torch
from lightning import Trainer
from test_maps import tiny_conv

import dn2_lightning.maps.bank as patch_bank
from dn2_lightning import DN2Module, OneClassDataModule


def say(line: str) -> None:
    """One write per line: the ranks share the pipe, and print's separate newline let their lines run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(root: str, limit: int, only_rank: int | None = None) -> None:
    # only_rank: that rank alone lacks the memory (the others have plenty)
    patch_bank._host_available_bytes = lambda: limit if only_rank in (None, trainer.global_rank) else 2**40
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)  # fmt: skip
    try:
        trainer.fit(model, datamodule=OneClassDataModule(dataset="folder", root=root, load_size=32, batch_size=2))
        say(f"rank {trainer.global_rank}: accepted")
    except MemoryError as error:
        say(f"rank {trainer.global_rank}: refused: {error}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
