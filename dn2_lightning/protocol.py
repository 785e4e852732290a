"""Paper-style protocol: every class of a dataset as the normal class in turn, one AUROC table.

Each image is embedded once per (dataset, split, backbone, preprocessing), and the embeddings are cached
on disk, so the 10-class protocol costs one pass over the data and a rerun costs none. The per-class
evaluation uses the same pieces as :class:`DN2Module` (cleaning, exact kNN, DN2 score, AUROC).

    dn2-protocol --dataset fashionmnist --backbone efficientnet_lite0 --out outputs/fmnist
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from dn2_lightning.backbones import build_backbone, get_backbone_spec
from dn2_lightning.data.datasets import ArrayImageDataset
from dn2_lightning.data.one_class import draw_contaminants
from dn2_lightning.data.sources import default_data_root, load_split
from dn2_lightning.knn import knn_distances
from dn2_lightning.scoring import cleaning_mask, knn_scores, to_unit_interval

# DN2's published mean AUROC (%) with its ResNet backbone (Bergman et al. 2020, Table 1), shown beside ours.
PAPER_MEAN_AUROC = {"cifar10": 92.5, "fashionmnist": 94.4, "cifar100": 89.3}
CACHE_FORMAT = 1


@dataclass
class ClassResult:
    normal_class: int
    name: str
    auroc: float
    n_train: int
    n_bank: int
    contaminants_kept: int | None = None


@dataclass
class ProtocolResult:
    dataset: str
    backbone: str
    image_size: int
    k: int
    settings: dict
    classes: list[ClassResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_auroc(self) -> float:
        return sum(c.auroc for c in self.classes) / len(self.classes)

    def to_markdown(self) -> str:
        paper = PAPER_MEAN_AUROC.get(self.dataset)
        lines = ["| class | name | AUROC (%) | train | bank |", "|---:|---|---:|---:|---:|"]
        lines += [
            f"| {c.normal_class} | {c.name} | {100 * c.auroc:.1f} | {c.n_train} | {c.n_bank} |" for c in self.classes
        ]
        lines.append(f"| **mean** | | **{100 * self.mean_auroc:.1f}** | | |")
        if paper is not None:
            lines.append(f"| paper (ResNet) | | {paper:.1f} | | |")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "protocol.md").write_text(self.to_markdown() + "\n")
        (out / "protocol.json").write_text(json.dumps({**asdict(self), "mean_auroc": self.mean_auroc}, indent=2))
        with (out / "protocol.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(self.classes[0])))
            writer.writeheader()
            writer.writerows(asdict(c) for c in self.classes)


def embed_split(
    dataset: str,
    split: str,
    backbone: str = "efficientnet_lite0",
    image_size: int | None = None,
    pretrained: bool = True,
    root: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    cache_dir: str | None = None,
    use_cache: bool = True,
    precision: str = "32",
) -> tuple[Tensor, Tensor]:
    """Embeddings ``[N, D]`` (float32, CPU) and class labels ``[N]`` of a whole split, cached on disk.

    The cache key holds everything the embeddings depend on (dataset, split, sample count, backbone,
    weights, resolution, normalisation, precision, library cache format); a file whose stored key differs
    is recomputed, never reused. ``precision="bf16"`` runs the backbone under bfloat16 autocast.
    """
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision={precision!r} must be '32' or 'bf16'.")
    source = load_split(dataset, split, root)
    spec = get_backbone_spec(backbone)
    key = {
        "format": CACHE_FORMAT,
        "dataset": dataset,
        "split": split,
        "n": len(source),
        "backbone": backbone,
        "pretrained": pretrained,
        "image_size": image_size or spec.image_size,
        "mean": spec.mean,
        "std": spec.std,
    }
    if precision != "32":  # float32 keys predate this field; they stay valid
        key["precision"] = precision
    key = json.loads(json.dumps(key))  # the form it has after a save and load (tuples become lists)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_data_root() / "embeddings") / f"{dataset}-{split}-{backbone}-{digest}.pt"
    if use_cache and path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key and cached["embeddings"].shape[0] == len(source):
            return cached["embeddings"], source.labels
    target = _resolve_device(device)
    extractor = build_backbone(backbone, pretrained=pretrained, image_size=image_size).to(target).eval()
    loader = DataLoader(
        ArrayImageDataset(source.images, source.labels), batch_size=batch_size, pin_memory=target.type == "cuda"
    )
    chunks = []
    with torch.inference_mode(), torch.autocast(target.type, torch.bfloat16, enabled=precision == "bf16"):
        for batch in loader:
            chunks.append(extractor(batch["image"].to(target, non_blocking=True)).cpu())
    embeddings = torch.cat(chunks)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "embeddings": embeddings}, path)
    return embeddings, source.labels


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_protocol(
    dataset: str = "fashionmnist",
    backbone: str = "efficientnet_lite0",
    k: int = 2,
    image_size: int | None = None,
    classes: list[int] | None = None,
    contamination: float = 0.0,
    clean_fraction: float = 0.0,
    clean_k: int = 200,
    seed: int = 0,
    knn_backend: str = "auto",
    root: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    cache_dir: str | None = None,
    use_cache: bool = True,
    precision: str = "32",
    out: str | None = None,
) -> ProtocolResult:
    """Run DN2 with every class (or ``classes``) as the normal class; print and optionally save the table.

    Args:
        dataset: a name from :func:`dn2_lightning.data.list_datasets`.
        backbone, image_size: the feature extractor (registry name) and its input resolution.
        k: neighbours in the DN2 score.
        classes: normal classes to evaluate (default: all).
        contamination, seed: unsupervised setting, as in ``OneClassDataModule``.
        clean_fraction, clean_k: bank cleaning, as in ``DN2Module``.
        knn_backend: as in ``DN2Module``.
        root, batch_size, device: data location, extraction batch size, ``"auto"``/``"cpu"``/``"cuda"``.
        cache_dir, use_cache: the embedding cache (default ``<data root>/embeddings``).
        precision: ``"32"`` or ``"bf16"`` (bfloat16 autocast during extraction).
        out: folder for protocol.md/.csv/.json.
    """
    start = time.perf_counter()
    kwargs = dict(
        backbone=backbone,
        image_size=image_size,
        root=root,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        use_cache=use_cache,
        precision=precision,
    )
    train, train_labels = embed_split(dataset, "train", **kwargs)
    test, test_labels = embed_split(dataset, "test", **kwargs)
    names = load_split(dataset, "train", root).classes
    target = _resolve_device(device)
    train, test = train.to(target), test.to(target)
    settings = {
        "contamination": contamination,
        "clean_fraction": clean_fraction,
        "clean_k": clean_k,
        "seed": seed,
        "precision": precision,
    }
    result = ProtocolResult(dataset, backbone, image_size or get_backbone_spec(backbone).image_size, k, settings)
    for c in classes if classes is not None else range(len(names)):
        normal = (train_labels == c).nonzero().flatten()
        contaminants = draw_contaminants(train_labels, c, contamination, seed) if contamination else normal[:0]
        rows = torch.cat([normal, contaminants])
        is_contaminant = torch.cat([torch.zeros(len(normal)), torch.ones(len(contaminants))]).bool()
        bank = train[rows.to(target)]
        kept = None
        if clean_fraction > 0:
            keep = cleaning_mask(bank, clean_fraction, clean_k, knn_backend).cpu()
            bank, kept = bank[keep.to(target)], int(is_contaminant[keep].sum())
        scores = knn_scores(knn_distances(test, bank, k, knn_backend)).cpu()
        auroc = float(binary_auroc(to_unit_interval(scores), (test_labels != c).long()))
        result.classes.append(ClassResult(c, names[c], auroc, len(rows), len(bank), kept))
    result.seconds = time.perf_counter() - start
    print(result.to_markdown())
    print(
        f"\n{dataset}, {backbone} @ {result.image_size}px, k={k}, {settings}: mean AUROC "
        f"{100 * result.mean_auroc:.2f}% in {result.seconds:.1f} s"
    )
    if out is not None:
        result.save(out)
    return result


def main() -> None:
    from jsonargparse import CLI

    CLI(run_protocol, as_positional=False)


if __name__ == "__main__":
    main()
