"""DDP audit cases (CPU, gloo): run with 1 or 2 processes; every rank saves what it saw to OUT.rankR.pt.

Usage: python tests/ddp_audit_run.py OUT DEVICES CASE replicate|shard [CKPT]
CASE: pw (point-wise padded groups with members, fit then test), pw_val (the same, val_check_interval=0.5),
pool (mean-pooled padded groups, shared one-image groups, fit then test), f64 (precision="64-true" fit then test),
limit (limit_test_batches=2 test), save / save_stale (1-process fit saving CKPT, with / without its leave-one-out
scores), ckpt (test of CKPT), ckpt_edit (CKPT loaded, bank.mul_(2), test); a _rank0 suffix: rank 0 alone reads
the threshold before the test
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import BlobDataModule, ddp_trainer_settings, linear_backbone  # noqa: E402
from lightning import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dn2_lightning import DN2Module  # noqa: E402


class PaddedGroups(Dataset):
    """Groups of 1-3 images drawn with replacement from a pool, padded to 3 slots (``mask``, padded slots -1 in
    ``members``): many groups hold one real image, some the same one."""

    def __init__(self, n: int, pool: torch.Tensor, seed: int, anomalous_from: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(1, 4, (n,), generator=g)
        self.mask = torch.arange(3)[None] < sizes[:, None]
        self.members = torch.where(self.mask, torch.randint(len(pool), (n, 3), generator=g), -1)
        self.images = torch.where(self.mask[..., None, None, None], pool[self.members.clamp(min=0)], 0.7)
        self.labels = torch.zeros(n, dtype=torch.long)
        if anomalous_from is not None:
            self.labels[anomalous_from:] = 1
            self.images[anomalous_from:, 0] += 0.3

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "label": self.labels[i],
            "index": torch.tensor(i),
            "mask": self.mask[i],
            "members": self.members[i],
        }


class PaddedGroupsDataModule(LightningDataModule):
    def __init__(self, with_val: bool = False) -> None:
        super().__init__()
        self.pool = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.6
        self.train, self.test = PaddedGroups(41, self.pool, 1), PaddedGroups(23, self.pool, 2, anomalous_from=12)
        self.with_val = with_val

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=4)


def datamodule(case: str) -> LightningDataModule:
    if case in ("pw", "pw_val", "pool"):
        return PaddedGroupsDataModule()
    return BlobDataModule(n_train=103, n_normal=41, n_anomalous=26, batch_size=8)


def main(out: str, devices: int, case: str, sharding: str, ckpt: str = "") -> None:
    dm = datamodule(case)
    settings = dict(k=2, bank_sharding=sharding, reports=case == "f64", threshold_samples=None)
    if case in ("pw", "pw_val"):
        settings["group_pooling"] = "none"
    root = str(Path(out).parent / f"{case}-{devices}-{sharding}")
    trainer_settings = ddp_trainer_settings(devices, root, enable_checkpointing=False, max_epochs=1)
    if case == "pw_val":
        trainer_settings["val_check_interval"] = 0.5
    if case == "f64":
        trainer_settings["precision"] = "64-true"
    if case == "limit":
        trainer_settings["limit_test_batches"] = 2
    trainer = Trainer(**trainer_settings)
    if case.startswith("ckpt"):
        model = DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone(), bank_sharding=sharding)
        if case.startswith("ckpt_edit"):
            model.bank.embeddings.mul_(2)
        if case.endswith("rank0") and trainer.global_rank == 0:  # rank 0 alone reads it before the test
            print(f"rank 0 threshold before test: {float(model.threshold):.6f}")
    else:
        model = DN2Module(**settings, backbone=linear_backbone())
    if case in ("pw", "pw_val", "pool", "f64", "save", "save_stale"):
        trainer.fit(model, datamodule=dm)
        if case.startswith("save"):
            if case == "save_stale":  # a checkpoint without the leave-one-out scores (as an earlier version's)
                model.bank.set_loo_scores(model.bank.loo_scores[:0], 0)
            trainer.save_checkpoint(ckpt)
            return
    fit_threshold = model.threshold.clone() if case in ("pw", "pw_val", "pool", "f64") else None
    fit_loo = model.bank.loo_scores.clone()
    trainer.test(model, datamodule=dm)
    scores = model.test_scores
    torch.save(
        {
            "rank": trainer.global_rank,
            "fit_threshold": fit_threshold,
            "fit_loo": fit_loo,
            "threshold": model.threshold,
            "loo_scores": model.bank.loo_scores,
            "indices": scores.indices,
            "scores": scores.scores,
            "score_dtype": str(scores.scores.dtype),
            "bank_rows": len(model.bank),
            "bank_dtype": str(model.bank.embeddings.dtype),
            "bank_min": float(model.bank.embeddings.min()),
            "spec_sources": model.bank.spec.get("member_sources"),
        },
        f"{out}.rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
