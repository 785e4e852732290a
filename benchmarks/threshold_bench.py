"""How many normal test images the decision threshold flags, against the ``1 - threshold_quantile`` it
promises, in the unimodal and unsupervised settings.

Digits (scikit-learn's, offline) embedded once with EfficientNet-Lite0 at 32 px (``protocol.embed_split``,
cached); every class in turn is normal (its train images, plus ``contamination`` drawn from the other
classes as ``OneClassDataModule`` draws them); ``DN2Detector`` (the module's kNN, cleaning and threshold code)
fits the bank and sets the threshold; the test split is scored. Columns: the share of normal and of anomalous
test images flagged, and the median normalised score of normal test images (0.5 when calibrated), each the
mean over the 10 classes.

    python benchmarks/threshold_bench.py
"""

from __future__ import annotations

import torch

from dn2_lightning import DN2Detector
from dn2_lightning.data.classes import draw_contaminants
from dn2_lightning.protocol import embed_split


def main() -> None:
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


if __name__ == "__main__":
    main()
