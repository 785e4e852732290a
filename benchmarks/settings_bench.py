"""Accuracy of the unsupervised (contaminated) and group settings on FashionMNIST, mean over 10 classes.

Works on cached per-image embeddings (``dn2_lightning.protocol.embed_split``), with the same functions
DN2Module uses (``cleaning_mask``, ``knn_distances``, ``knn_scores``, ``pool_groups``, ``draw_group_sets``):
a group embedding is the mean of its members' embeddings, exactly what ``DN2Module.forward`` computes.

    python benchmarks/settings_bench.py --input_size 64
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_args import at_least, unit_fraction
from torchmetrics.functional.classification import binary_auroc

from dn2_lightning.data.classes import draw_contaminants
from dn2_lightning.data.group import draw_group_sets
from dn2_lightning.knn import knn_distances
from dn2_lightning.protocol import embed_split
from dn2_lightning.scoring import cleaning_mask, knn_scores, pool_groups, to_unit_interval


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float(binary_auroc(to_unit_interval(scores), labels.long()))


def unsupervised(train, train_labels, test, test_labels, fractions, clean_ks, k=2, seed=0) -> None:
    print("\n### Unsupervised: contaminated train set, mean AUROC over the 10 normal classes (%)\n")
    header = "| contamination | no cleaning | " + " | ".join(f"clean 50%, clean_k={ck}" for ck in clean_ks) + " |"
    print(header)
    print("|---:|---:|" + "---:|" * len(clean_ks))
    for fraction in fractions:
        plain, cleaned, survived = [], {ck: [] for ck in clean_ks}, {ck: [] for ck in clean_ks}
        for c in range(10):
            normal = (train_labels == c).nonzero().flatten()
            bad = draw_contaminants(train_labels, c, fraction, seed)
            bank = train[torch.cat([normal, bad])]
            is_bad = torch.cat([torch.zeros(len(normal)), torch.ones(len(bad))]).bool()
            target = test_labels != c
            plain.append(auroc(knn_scores(knn_distances(test, bank, k)), target))
            for ck in clean_ks:
                keep = cleaning_mask(bank, 0.5, ck)
                cleaned[ck].append(auroc(knn_scores(knn_distances(test, bank[keep], k)), target))
                survived[ck].append(float(is_bad[keep].sum()) / max(1, len(bad)))
        cells = " | ".join(f"{sum(cleaned[ck]) / 10:.1f} ({100 * sum(survived[ck]) / 10:.0f}% kept)" for ck in clean_ks)
        print(f"| {100 * fraction:.0f}% | {sum(plain) / 10:.1f} | {cells} |")
    print("\n(x% kept) = share of the contaminants that survived the cleaning.")


def groups(train, train_labels, test, test_labels, sizes, n_train, n_test, k=2, seed=0) -> None:
    print("\n### Group, hard anomalies (one class twice, one missing), AUROC (%)\n")
    print("| group size M | mean pooling (DN2) | point-wise baseline (max of member scores) |")
    print("|---:|---:|---:|")
    classes = list(range(10))
    for m in sizes:
        train_groups, test_groups, labels = draw_group_sets(
            train_labels, test_labels, classes, m, n_train, n_test, "hard", 0.5, seed
        )
        pooled = knn_scores(knn_distances(pool_groups(test[test_groups]), pool_groups(train[train_groups]), k))
        members = knn_scores(knn_distances(test[test_groups.flatten()], train[train_groups.flatten()], k))
        pointwise = members.view(len(test_groups), m).max(1).values
        print(f"| {m} | {auroc(pooled, labels):.1f} | {auroc(pointwise, labels):.1f} |")
    print(f"\n{n_train} normal train groups, {n_test} test groups (half hard anomalies), seed {seed}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--input_size", type=int, default=None)
    parser.add_argument(
        "--fractions", type=unit_fraction, nargs="*", default=[0.05, 0.1, 0.2], help="none: skip cleaning"
    )
    parser.add_argument("--clean_ks", type=at_least(1), nargs="+", default=[2, 5, 10, 20, 50])
    parser.add_argument("--group_sizes", type=at_least(2), nargs="*", default=[3, 5, 10], help="none: skip groups")
    parser.add_argument("--n_train_groups", type=int, default=2000)
    parser.add_argument("--n_test_groups", type=at_least(2), default=2000)
    args = parser.parse_args()
    start = time.perf_counter()
    train, train_labels = embed_split("fashionmnist", "train", backbone=args.backbone, input_size=args.input_size)
    test, test_labels = embed_split("fashionmnist", "test", backbone=args.backbone, input_size=args.input_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    train, test = train.to(device), test.to(device)
    print(f"FashionMNIST, {args.backbone} @ {args.input_size or 'native'} px, k=2, device {name}")
    if args.fractions:
        unsupervised(train, train_labels.to(device), test, test_labels.to(device), args.fractions, args.clean_ks)
    if args.group_sizes:
        groups(train, train_labels, test, test_labels, args.group_sizes, args.n_train_groups, args.n_test_groups)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
