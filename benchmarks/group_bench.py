"""Group anomaly detection on FashionMNIST: point-wise, mean and composition-histogram poolings, AUROC (%).

Works on cached per-image embeddings (``dn2_lightning.protocol.embed_split``) and draws groups with
``dn2_lightning.data.group.draw_group_sets`` (as ``GroupDataModule`` does), so no image is re-embedded.
Pooling and scoring go through the functions ``DN2Module`` calls: ``GroupPooling`` (fit on the training
groups' members, then forward on train and test groups), ``knn_distances`` and ``knn_scores``; the point-wise
baseline scores every member against the training members and takes the max, as
``DN2Module(group_pooling="none")`` does.

Settings: normal groups hold M images of M different classes. Hard anomaly: one class twice, another
missing (all ten classes normal). Easy anomaly: one member from held-out class 9 (ankle boot; classes 0-8
normal, so M <= 9: M = 10 runs as M = 9).

    python benchmarks/group_bench.py --input_size 64
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_args import at_least, positive_float
from torchmetrics.functional.classification import binary_auroc

from dn2_lightning.data.group import draw_group_sets
from dn2_lightning.group_pooling import GroupPooling
from dn2_lightning.knn import knn_distances
from dn2_lightning.protocol import embed_split
from dn2_lightning.scoring import knn_scores, to_unit_interval

HELD_OUT = 9


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float(binary_auroc(to_unit_interval(scores.cpu()), labels.long().cpu()))


def make_groups(train_labels, test_labels, m, n_train, n_test, kind, seed=0):
    """Train groups, test groups and test labels (1 = anomalous) of one setting."""
    held_out = [HELD_OUT] if kind == "easy" else []
    classes = [c for c in range(10) if c not in held_out]
    m = min(m, len(classes))
    train, test, labels = draw_group_sets(
        train_labels, test_labels, classes, m, n_train, n_test, kind, 0.5, seed, held_out
    )
    return train, test, labels, m


def pooled_auroc(pooling: GroupPooling, train_members, test_members, labels, k=2) -> float:
    bank = pooling(train_members)
    return auroc(knn_scores(knn_distances(pooling(test_members), bank, k)), labels)


def pointwise_auroc(train, train_groups, test, test_groups, labels, k=2) -> float:
    """Every member scored against the training members (one bank row per member, as DN2Module keeps them),
    group score = max over members. A member's score depends only on its image: each distinct test image
    is searched once."""
    bank = train[train_groups.flatten()]
    images, inverse = test_groups.unique(return_inverse=True)
    members = knn_scores(knn_distances(test[images], bank, k))[inverse]
    return auroc(members.max(1).values, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashionmnist", help="a 10-class dataset (digits: a quick smoke run)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--input_size", type=int, default=None)
    parser.add_argument("--group_sizes", type=at_least(2), nargs="+", default=[3, 5, 10])
    parser.add_argument("--n_train_groups", type=int, nargs="+", default=[2000, 5000])
    parser.add_argument("--n_test_groups", type=at_least(2), default=2000)
    parser.add_argument("--anomalies", nargs="+", default=["hard", "easy"], choices=["hard", "easy"])
    parser.add_argument("--clusters", type=int, nargs="+", default=[5, 10, 20, 40], help="K swept")
    parser.add_argument("--temperatures", type=positive_float, nargs="+", default=[0.1, 0.3, 0.5, 1.0], help="T swept")
    parser.add_argument(
        "--sweep_train_groups", type=int, nargs="*", default=[2000], help="train-group counts that get the K x T sweep"
    )
    parser.add_argument("--default_clusters", type=int, default=10)
    parser.add_argument("--default_temperature", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the groups")
    parser.add_argument(
        "--kmeans_seeds", type=int, nargs="*", default=[], help="also report the histogram at these k-means seeds"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    train, train_labels = embed_split(args.dataset, "train", args.backbone, args.input_size)
    test, test_labels = embed_split(args.dataset, "test", args.backbone, args.input_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    train, test = train.to(device), test.to(device)
    print(f"{args.dataset}, {args.backbone} @ {args.input_size or 'native'} px, k=2, device {name}")
    k0, t0 = args.default_clusters, args.default_temperature
    grid = [(k, t) for k in args.clusters for t in args.temperatures]
    main_rows, sweep_rows, seed_rows = [], [], []
    for kind in args.anomalies:
        for m in args.group_sizes:
            for n_train in args.n_train_groups:
                train_groups, test_groups, labels, m_used = make_groups(
                    train_labels, test_labels, m, n_train, args.n_test_groups, kind, args.seed
                )
                train_members, test_members = train[train_groups.to(device)], test[test_groups.to(device)]
                setting = f"| {kind} | {m_used} | {n_train:,} |"
                train_groups, test_groups = train_groups.to(device), test_groups.to(device)
                point = pointwise_auroc(train, train_groups, test, test_groups, labels)
                mean = pooled_auroc(GroupPooling("mean"), train_members, test_members, labels)
                sweep = {}
                for k in args.clusters if n_train in args.sweep_train_groups else []:
                    tic = time.perf_counter()
                    pooling = GroupPooling("histogram", clusters=k, temperature=t0)
                    pooling.fit(train_members)  # k-means once per K; the temperature only changes forward
                    fit_s = time.perf_counter() - tic
                    for t in args.temperatures:
                        pooling.temperature = t
                        sweep[k, t] = pooled_auroc(pooling, train_members, test_members, labels)
                    print(f"  {kind} M={m_used} n={n_train} K={k}: k-means fit {fit_s:.1f} s", flush=True)
                if (k0, t0) not in sweep:
                    pooling = GroupPooling("histogram", clusters=k0, temperature=t0)
                    pooling.fit(train_members)
                    sweep[k0, t0] = pooled_auroc(pooling, train_members, test_members, labels)
                if args.kmeans_seeds:
                    per_seed = []
                    for seed in args.kmeans_seeds:
                        pooling = GroupPooling("histogram", clusters=k0, temperature=t0, seed=seed)
                        pooling.fit(train_members)
                        per_seed.append(pooled_auroc(pooling, train_members, test_members, labels))
                    seed_rows.append(f"{setting} {point:.1f} | {mean:.1f} |" + "".join(f" {a:.1f} |" for a in per_seed))
                main_rows.append(f"{setting} {point:.1f} | {mean:.1f} | {sweep[k0, t0]:.1f} |")
                if n_train in args.sweep_train_groups:
                    sweep_rows.append(setting + "".join(f" {sweep[key]:.1f} |" for key in grid))
                print(main_rows[-1], flush=True)
    print(f"\n### Group anomaly detection, AUROC (%), histogram at K={k0}, T={t0}\n")
    print("| anomaly | M | train groups | point-wise (max of members) | mean (paper) | histogram |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(main_rows))
    if sweep_rows:
        print("\n### Histogram pooling sweep, AUROC (%): K clusters, T temperature\n")
        print("| anomaly | M | train groups |" + "".join(f" K={k}, T={t} |" for k, t in grid))
        print("|---|---:|---:|" + "---:|" * len(grid))
        print("\n".join(sweep_rows))
    if seed_rows:
        print(f"\n### Histogram pooling (K={k0}, T={t0}) across k-means seeds, AUROC (%)\n")
        seeds = "".join(f" histogram, k-means seed {seed} |" for seed in args.kmeans_seeds)
        print("| anomaly | M | train groups | point-wise | mean (paper) |" + seeds)
        print("|---|---:|---:|---:|---:|" + "---:|" * len(args.kmeans_seeds))
        print("\n".join(seed_rows))
    total = time.perf_counter() - start
    print(f"\n{args.n_test_groups:,} test groups (half anomalous), seed {args.seed}; total {total:.0f} s")


if __name__ == "__main__":
    main()
