"""Small synthetic data and models for fast, exact tests."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from lightning import LightningDataModule
from torch import nn
from torch.utils.data import DataLoader, Dataset


class DictDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


class MemberGroups(Dataset):
    """Group samples drawn from a pool of images: group ``i`` holds ``pool[members[i]]``, with its members' source
    indices (``members``) so that copies of one image in other groups can be told apart; all normal."""

    def __init__(self, pool: torch.Tensor, members: torch.Tensor) -> None:
        self.pool, self.members = pool, members

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> dict:
        members = self.members[i]
        return {"image": self.pool[members], "label": torch.tensor(0), "index": torch.tensor(i), "members": members}


class BlobDataModule(LightningDataModule):
    """Normal images are dim noise, anomalies bright noise; sizes chosen not to divide by 2 or 16."""

    def __init__(
        self,
        n_train: int = 101,
        n_normal: int = 41,
        n_anomalous: int = 30,
        with_val: bool = False,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.train_images = torch.rand(n_train, 3, 8, 8, generator=g) * 0.6
        normal = torch.rand(n_normal, 3, 8, 8, generator=g) * 0.6
        anomalous = torch.rand(n_anomalous, 3, 8, 8, generator=g) * 0.6 + 0.04
        self.test_images = torch.cat([normal, anomalous])
        self.test_labels = torch.cat([torch.zeros(n_normal), torch.ones(n_anomalous)]).long()
        self.with_val, self.batch_size = with_val, batch_size

    def train_dataloader(self) -> DataLoader:
        labels = torch.zeros(len(self.train_images), dtype=torch.long)
        return DataLoader(DictDataset(self.train_images, labels), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.test_images, self.test_labels), batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class BlobWithValDataModule(BlobDataModule):
    def val_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def linear_backbone(seed: int = 0, in_features: int = 192, dim: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, dim))


def brute_force_scores(backbone: nn.Module, bank_images: torch.Tensor, images: torch.Tensor, k: int) -> np.ndarray:
    """DN2 scores of ``images`` against a bank of ``bank_images``, both embedded by ``backbone`` directly, by a
    float64 brute force: the reference the module's scores are checked against."""
    with torch.no_grad():
        bank = backbone(bank_images).double().numpy()
        queries = backbone(images).double().numpy()
    distances = ((queries[:, None] - bank[None]) ** 2).sum(-1)
    return np.sort(distances, axis=1)[:, :k].mean(1)


def ddp_trainer_settings(devices: int, root: str, **overrides: object) -> dict:
    """The DDP scripts' quiet CPU Trainer settings: ``devices`` processes (DDP beyond one), reports under ``root``."""
    return (
        dict(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        | overrides
    )


def quiet_trainer(**kwargs):
    from lightning import Trainer

    defaults = dict(
        default_root_dir=tempfile.mkdtemp(prefix="dn2-test-"),  # reports never land in the working directory
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        enable_checkpointing=False,
        devices=1,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


@contextlib.contextmanager
def dn2_messages() -> Iterator[list[str]]:
    """The messages of the ``dn2_lightning`` logger while the block runs (whatever its handlers)."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("dn2_lightning")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def say(line: str) -> None:
    """One write per line: DDP ranks share the pipe, and print's separate newline let their lines run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def rank_verdict(trainer, refusal: type[BaseException]) -> Iterator[None]:
    """For the 2-rank DDP scripts: say "rank R: accepted" if the block ran, "rank R: refused: ..." if it raised
    ``refusal``; then leave the process group (the test reads every rank's line)."""
    try:
        yield
        say(f"rank {trainer.global_rank}: accepted")
    except refusal as error:
        say(f"rank {trainer.global_rank}: refused: {error}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def brute_force_pro(
    maps: torch.Tensor,
    masks: torch.Tensor,
    fpr_limit: float = 0.3,
    regions: list[tuple[int, np.ndarray]] | None = None,
) -> float:
    """PRO by its definition: every distinct score as a threshold, every region measured directly. ``regions``:
    ``(image, bool [H, W])`` pairs; default the masks' 8-connected components (scipy)."""
    from scipy.ndimage import label

    m, gt = maps.double().numpy(), masks.numpy() != 0
    if regions is None:
        regions = []
        for i in range(len(m)):
            labels, count = label(gt[i], structure=np.ones((3, 3)))
            regions += [(i, labels == r) for r in range(1, count + 1)]
    normal = ~gt
    points = [(0.0, 0.0)]
    for t in np.unique(m)[::-1]:
        positive = m >= t
        fpr = (positive & normal).sum() / normal.sum()
        pro = np.mean([(positive[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    x, y = np.array(points).T
    inside = x <= fpr_limit
    xs = np.append(x[inside], fpr_limit)
    ys = np.append(y[inside], np.interp(fpr_limit, x, y))  # x ascending; ties keep the last point's order
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # (numpy 1.x has only trapz)
    return float(trapezoid(ys, xs) / fpr_limit)
