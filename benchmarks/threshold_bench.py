"""How many normal test samples the decision threshold flags, against the ``1 - threshold_quantile`` it
promises, in the unimodal, unsupervised and group settings.

Digits (scikit-learn's, offline) embedded once with EfficientNet-Lite0 at 32 px (``protocol.embed_split``,
cached); every class in turn is normal (its train images, plus ``contamination`` drawn from the other
classes as ``OneClassDataModule`` draws them); ``DN2Detector`` (the module's kNN, cleaning and threshold code)
fits the bank and sets the threshold; the test split is scored. Columns: the share of normal and of anomalous
test images flagged, and the median normalised score of normal test images (0.5 when calibrated), each the
mean over the 10 classes.

Groups: ``DN2Module`` (lite0 at 32 px) tested on ``GroupDataModule("digits", anomaly="hard", n_test_groups=400,
seed=0)`` with the point-wise baseline and mean pooling: the share of normal test groups flagged.

    python benchmarks/threshold_bench.py
"""

from __future__ import annotations

import tempfile

import torch
from lightning import Trainer

from dn2_lightning import DN2Detector, DN2Module, GroupDataModule
from dn2_lightning.data.classes import draw_contaminants
from dn2_lightning.protocol import embed_split


def images() -> None:
    train, train_labels = embed_split("digits", "train", input_size=32)
    test, test_labels = embed_split("digits", "test", input_size=32)
    header = "contamination | clean_fraction | quantile | normal flagged | anomalies flagged | median normalised"
    print(f"| {header} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for contamination in (0.0, 0.1):
        for clean_fraction in (0.0, 0.5):
            for quantile in (0.99, 0.9):
                normal_flagged, anomalies_flagged, medians = [], [], []
                for c in range(10):
                    normal = (train_labels == c).nonzero().flatten()
                    extra = draw_contaminants(train_labels, c, contamination, 0) if contamination else normal[:0]
                    detector = DN2Detector(k=2, threshold_quantile=quantile, clean_fraction=clean_fraction)
                    detector.fit(train[torch.cat([normal, extra])])
                    flagged = detector.predict(test).bool()
                    is_normal = test_labels == c
                    normal_flagged.append(flagged[is_normal].float().mean())
                    anomalies_flagged.append(flagged[~is_normal].float().mean())
                    medians.append(detector.predict_proba(test)[is_normal, 1].median())
                row = [torch.stack(v).mean().item() for v in (normal_flagged, anomalies_flagged, medians)]
                print(
                    f"| {contamination} | {clean_fraction} | {quantile} | {100 * row[0]:.1f}% | {100 * row[1]:.1f}% "
                    f"| {row[2]:.2f} |"
                )


def groups() -> None:
    print("\n| M | train groups | quantile | pooling | normal groups flagged | threshold |")
    print("|---:|---:|---:|---|---:|---:|")
    for m, n_train, quantile in ((4, 200, 0.95), (5, 300, 0.9)):
        data = GroupDataModule("digits", group_size=m, n_train_groups=n_train, n_test_groups=400, seed=0)
        for pooling in ("none", "mean"):
            model = DN2Module(
                k=2,
                backbone="efficientnet_lite0",
                input_size=32,
                group_pooling=pooling,
                threshold_quantile=quantile,
                reports=False,
            )
            trainer = Trainer(
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                default_root_dir=tempfile.mkdtemp(),
            )
            trainer.test(model, data, verbose=False)
            scores = model.test_scores
            normal = scores.labels == 0
            flagged = 100 * scores.is_anomaly[normal].float().mean().item()
            print(f"| {m} | {n_train} | {quantile} | {pooling} | {flagged:.1f}% | {scores.threshold:.2f} |")


def main() -> None:
    images()
    groups()


if __name__ == "__main__":
    main()
