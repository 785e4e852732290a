"""Run one DN2 evaluation under `Trainer(strategy="ddp", devices=N)` on CPU and save what rank 0 saw.

Lightning's ddp launcher re-executes this script for every rank, so it is a script, not a test function.
Usage: python tests/ddp_run.py OUT.pt DEVICES SETTING fit|test|predict replicate|shard
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import BlobDataModule, linear_backbone  # noqa: E402
from lightning import Trainer  # noqa: E402

from dn2_lightning import DN2Module  # noqa: E402


def main(out: str, devices: int, setting: str, mode: str, sharding: str = "replicate") -> None:
    dm = BlobDataModule(n_train=103, n_normal=41, n_anomalous=26, batch_size=8)
    clean = 0.2 if setting == "unsupervised" else 0.0
    model = DN2Module(
        k=2, backbone=linear_backbone(), clean_fraction=clean, clean_k=3, bank_sharding=sharding, reports=False
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(Path(out).parent),
    )
    if mode == "fit":
        trainer.fit(model, datamodule=dm)
        ckpt = Path(out).with_suffix(".ckpt")
        trainer.save_checkpoint(ckpt)
    if mode == "predict":
        trainer.predict(model, datamodule=dm, return_predictions=False)
        if trainer.global_rank == 0:
            scores = model.predict_scores
            torch.save({"world_size": trainer.world_size, "indices": scores.indices, "scores": scores.scores}, out)
        return
    results = trainer.test(model, datamodule=dm)
    per_rank = trainer.strategy.all_gather(torch.tensor(len(model.bank))).view(-1).tolist()
    bank_rows = sum(per_rank) if sharding == "shard" else per_rank[0]
    if trainer.global_rank == 0:
        torch.save(
            {
                "world_size": trainer.world_size,
                "auroc": results[0]["test/auroc"],
                "indices": model.test_scores.indices,
                "scores": model.test_scores.scores,
                "bank": model.bank.embeddings,
                "bank_indices": model.bank.sample_indices,
                "bank_rows": bank_rows,
                "threshold": model.threshold,
            },
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], int(sys.argv[2]), *sys.argv[3:])
    if torch.distributed.is_initialized():  # gloo's threads can abort the interpreter's exit otherwise
        torch.distributed.destroy_process_group()
