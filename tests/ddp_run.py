"""Run one DN2 evaluation under `Trainer(strategy="ddp", devices=N)` on CPU and save what rank 0 saw.

Lightning's ddp launcher re-executes this script for every rank, so it is a script, not a test function.
Usage: python tests/ddp_run.py OUT.pt DEVICES SETTING MODE replicate|shard
(MODE: fit, resume, test, predict, fit_then_one_device[_on_rank_zero])
(resume: a fit stopped after 2 steps with a mid-epoch checkpoint, then fit resumed from it, then test)
(SETTING: unimodal, unsupervised, noindex, noindex_no_sampler, index_no_sampler, uneven, group_none[_clean], paths,
outliers_on_rank_zero, other_size_on_rank_one, iterable, custom_batch_sampler,
[seeded_|rank_seeded_|mixed_]shuffled_predict, random_on_resume)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import BlobDataModule, DictDataset, ddp_trainer_settings, linear_backbone  # noqa: E402
from lightning import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import (  # noqa: E402
    BatchSampler,
    DataLoader,
    IterableDataset,
    SequentialSampler,
    TensorDataset,
)

from dn2_lightning import DN2Module  # noqa: E402


class NoIndexDataModule(BlobDataModule):
    """Tuples without an 'index': samples are numbered in the order read (the sampler's padding included)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train_images, torch.zeros(len(self.train_images))), batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test_images, self.test_labels), batch_size=8)


class ShuffledPredictDataModule(BlobDataModule):
    """Indexed samples whose predict dataloader shuffles: Lightning wraps its RandomSampler, drawn on every rank."""

    def __init__(self, seeded: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seeded = seeded

    def predict_dataloader(self) -> DataLoader:
        # "seeded": one order on every rank; "rank_seeded": each rank its own; "mixed": only rank 0 shuffles
        seed = torch.distributed.get_rank() if self.seeded == "rank_seeded" else 0
        generator = torch.Generator().manual_seed(seed) if self.seeded else None
        shuffle = self.seeded != "mixed" or torch.distributed.get_rank() == 0
        dataset = DictDataset(self.test_images, self.test_labels)
        return DataLoader(dataset, batch_size=8, shuffle=shuffle, generator=generator if shuffle else None)


class RandomOnResumeDataModule(BlobDataModule):
    """Reads its train set in order for the first fit, then (the resumed fit) through an unseeded random sampler,
    which Lightning wraps: the resumed pass, read again outside the loops, must be refused too."""

    calls = 0

    def train_dataloader(self) -> DataLoader:
        RandomOnResumeDataModule.calls += 1
        if RandomOnResumeDataModule.calls == 1:
            return super().train_dataloader()
        sampler = torch.utils.data.SubsetRandomSampler(range(len(self.train_images)))
        return DataLoader(DictDataset(self.train_images, torch.zeros(len(self.train_images))), 8, sampler=sampler)


class _WorkerScaled(DictDataset):
    """Images scaled by what the loader's worker_init_fn set in its worker (1 without it)."""

    scale = 1.0

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "image": self.images[i] * _WorkerScaled.scale}


def _scale_images_in_this_worker(worker_id: int) -> None:
    _WorkerScaled.scale = 0.5


class WorkerInitDataModule(BlobDataModule):
    """A train loader whose workers are set up by a worker_init_fn: the bank built on first need under DDP (its
    loader rebuilt with a DistributedSampler) must be embedded as that loader embeds, through the same set-up."""

    def train_dataloader(self) -> DataLoader:
        dataset = _WorkerScaled(self.train_images, torch.zeros(len(self.train_images)))
        return DataLoader(dataset, batch_size=8, num_workers=1, worker_init_fn=_scale_images_in_this_worker)


class PathsDataModule(BlobDataModule):
    """Training samples that name their files (``path``), so the bank records every sample's path."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_WithPaths(self.train_images, torch.zeros(len(self.train_images))), batch_size=8)


class _WithPaths(DictDataset):
    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "path": f"train/{i:03d}.png"}


class RankSplitSamples(IterableDataset):
    """(image, label) tuples without an index that split themselves across ranks (sample i to rank i % world): DN2
    cannot know that they do, so it refuses them under DDP."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __iter__(self):
        ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for i in range(rank, len(self.images), ranks):
            yield self.images[i], self.labels[i]


class IterableTestDataModule(BlobDataModule):
    def test_dataloader(self) -> DataLoader:
        return DataLoader(RankSplitSamples(self.test_images, self.test_labels), batch_size=8)


class OwnBatchSampler(BatchSampler):
    """A custom batch sampler: Lightning rebuilds it around its DistributedSampler, which it may regroup or pad."""


class CustomBatchSamplerDataModule(NoIndexDataModule):
    def train_dataloader(self) -> DataLoader:
        dataset = DictDataset(self.train_images, torch.zeros(len(self.train_images)))
        return DataLoader(dataset, batch_sampler=OwnBatchSampler(SequentialSampler(dataset), 8, False))

    def test_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.test_images, self.test_labels)
        return DataLoader(dataset, batch_sampler=OwnBatchSampler(SequentialSampler(dataset), 8, False))


class OutliersOnRankZero(BlobDataModule):
    """Six training images, the even ones far out (white, a stripe pattern, black) from the dim odd ones: cleaning
    half removes them, and an unshuffled DistributedSampler of two ranks deals them all to rank 0, whose shard of
    the cleaned bank is then empty."""

    def __init__(self) -> None:
        super().__init__(n_train=6, n_normal=11, n_anomalous=8, batch_size=4)
        self.train_images[1::2] = self.train_images[1::2] * 0.2 + 0.2
        self.train_images[0] = 1.0
        self.train_images[2] = (torch.arange(64).view(8, 8) % 2).float()
        self.train_images[4] = 0.0


class SharedMemberGroups(DictDataset):
    """Groups whose members are drawn from a pool, so groups share images; samples name them (``members``)."""

    def __init__(self, pool: torch.Tensor, members: torch.Tensor) -> None:
        super().__init__(pool[members], torch.zeros(len(members)))
        self.members = members

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "members": self.members[i]}


class GroupsDataModule(LightningDataModule):
    """37 groups of 3 members from a pool of 60 images (odd: the sampler pads a whole group; shared images:
    the threshold skips copies), half the test groups with a bright member."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pool = torch.rand(60, 3, 8, 8, generator=g) * 0.6
        self.members = torch.randint(60, (37, 3), generator=g)
        self.test = torch.rand(21, 3, 3, 8, 8, generator=g) * 0.6
        self.labels = (torch.arange(21) >= 11).long()
        self.test[11:, 0] += 0.3

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SharedMemberGroups(self.pool, self.members), batch_size=4)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.test, self.labels), batch_size=4)


class MapsDataModule(BlobDataModule):
    """Blob images with pixel masks (a bright square in the anomalous ones) for anomaly maps; no prepare_data. The
    square is two ground-truth regions (its top row and the rest), as if labelled before a resize joined them."""

    def test_dataloader(self) -> DataLoader:
        images, regions = self.test_images.clone(), torch.zeros(len(self.test_images), 8, 8, dtype=torch.int32)
        anomalous = self.test_labels == 1
        images[anomalous, :, 2:5, 3:6], regions[anomalous, 2, 3:6], regions[anomalous, 3:5, 3:6] = 1.0, 1, 2
        samples = [
            {"image": x, "label": y, "index": torch.tensor(i), "gt_mask": (r != 0).float(), "gt_regions": r}
            for i, (x, y, r) in enumerate(zip(images, self.test_labels, regions, strict=True))
        ]
        return DataLoader(samples, batch_size=self.batch_size)


class OtherSizeOnRankOne(BlobDataModule):
    """Test images of the training size (8 px) at even indices and of 12 px at odd ones: the distributed sampler
    gives rank 1 the odd ones only."""

    def test_dataloader(self) -> DataLoader:
        big = torch.nn.functional.interpolate(self.test_images, size=(12, 12), mode="bilinear")
        samples = [
            {"image": big[i] if i % 2 else x, "label": y, "index": torch.tensor(i)}
            for i, (x, y) in enumerate(zip(self.test_images, self.test_labels, strict=True))
        ]
        return DataLoader(samples, batch_size=1)


def conv_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )


def datamodule(setting: str) -> LightningDataModule:
    if setting == "maps":
        return MapsDataModule(n_train=103, n_normal=41, n_anomalous=26)
    if setting in ("noindex", "noindex_no_sampler"):
        return NoIndexDataModule(n_train=103, n_normal=41, n_anomalous=26)
    if setting == "uneven":  # 5 samples in batches of 2: rank 0 reads 2 batches, rank 1 one (predict does not pad)
        return BlobDataModule(n_train=103, n_normal=3, n_anomalous=2, batch_size=2)
    if setting in ("group_none", "group_none_clean"):
        return GroupsDataModule()
    if setting == "custom_batch_sampler":
        return CustomBatchSamplerDataModule(n_train=103, n_normal=41, n_anomalous=26)
    if setting == "iterable":
        return IterableTestDataModule(n_train=103, n_normal=41, n_anomalous=26)
    if setting == "worker_init":
        return WorkerInitDataModule(n_train=103, n_normal=41, n_anomalous=26)
    if setting == "paths":
        return PathsDataModule(n_train=104, n_normal=41, n_anomalous=26)  # rank 0 reads 0, 2, ..., 102: not 103
    if setting == "outliers_on_rank_zero":
        return OutliersOnRankZero()
    if setting == "other_size_on_rank_one":
        return OtherSizeOnRankOne(n_train=103, n_normal=5, n_anomalous=4)
    if setting == "random_on_resume":
        return RandomOnResumeDataModule(n_train=103, n_normal=41, n_anomalous=26)
    if setting.endswith("shuffled_predict"):
        seeded = setting.removesuffix("shuffled_predict").rstrip("_")
        return ShuffledPredictDataModule(seeded, n_train=103, n_normal=41, n_anomalous=26)
    return BlobDataModule(n_train=103, n_normal=41, n_anomalous=26, batch_size=8)


def main(out: str, devices: int, setting: str, mode: str, sharding: str = "replicate") -> None:
    dm = datamodule(setting)
    clean = {"unsupervised": 0.2, "outliers_on_rank_zero": 0.5, "group_none_clean": 0.3}.get(setting, 0.0)
    clean = 0.2 if setting == "unsupervised_drawn" else clean
    settings = dict(
        threshold_samples=30 if setting.endswith("drawn") else 20_000,  # a draw of 30 of the 103 training images
        k=2,
        clean_fraction=clean,
        clean_k=3,
        bank_sharding=sharding,
        reports=False,
        group_pooling="none" if setting.startswith("group_none") else "mean",
    )
    if setting == "maps":
        settings.update(anomaly_maps=True, map_layers=["1", "3"], map_images=4)
    backbone = conv_backbone if setting in ("maps", "other_size_on_rank_one") else linear_backbone
    model = DN2Module(**settings, backbone=backbone())
    trainer_settings = ddp_trainer_settings(
        devices,
        str(Path(out).parent),
        use_distributed_sampler=setting not in ("noindex_no_sampler", "index_no_sampler"),
    )
    trainer = Trainer(**trainer_settings)
    if mode == "resume":
        from lightning.pytorch.callbacks import ModelCheckpoint

        folder = Path(out).with_suffix(".ckpts")
        every2 = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
        stopped = Trainer(**trainer_settings, max_steps=2, callbacks=[every2], enable_checkpointing=True)
        stopped.fit(DN2Module(**settings, backbone=linear_backbone()), datamodule=dm)
        trainer.fit(model, datamodule=dm, ckpt_path=folder / "epoch=0-step=2.ckpt")
    if mode.startswith("fit_then_one_device"):  # Lightning's advice: test on one device after a DDP fit
        settings["reports"] = True
        model = DN2Module(**settings, backbone=backbone())
        trainer.fit(model, datamodule=dm)
        if mode.endswith("on_rank_zero") and torch.distributed.get_rank() != 0:
            return  # "if trainer.global_rank == 0:" around the test; otherwise every process runs it
        ddp, trainer = trainer, Trainer(**{**trainer_settings, "devices": 1, "strategy": "auto"})
        try:
            results = trainer.test(model, datamodule=datamodule(setting))
        except RuntimeError as error:  # a shard of the bank: refused; the fix it names saves the whole bank
            ckpt = Path(out).with_suffix(".ckpt")
            ddp.save_checkpoint(ckpt)
            if torch.distributed.get_rank() == 0:
                saved = torch.load(ckpt, weights_only=True)["state_dict"]["bank.embeddings"]
                torch.save({"error": str(error), "saved_rows": len(saved)}, out)
            return
        if torch.distributed.get_rank() == 0:
            torch.save(
                {
                    "auroc": results[0]["test/auroc"],
                    "indices": model.test_scores.indices,
                    "scores": model.test_scores.scores,
                    "threshold": model.threshold,
                    "pixel": {k: v for k, v in results[0].items() if k in ("test/pixel_auroc", "test/pro")},
                },
                out,
            )
        return
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
                "loo_scores": model.bank.loo_scores,
                "train_paths": model.bank.spec.get("train_paths", []),
                "pixel": {k: v for k, v in results[0].items() if k in ("test/pixel_auroc", "test/pro")},
            },
            out,
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], int(sys.argv[2]), *sys.argv[3:])
    if torch.distributed.is_initialized():  # gloo's threads can abort the interpreter's exit otherwise
        torch.distributed.destroy_process_group()
