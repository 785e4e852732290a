"""Reports of an evaluation: per-sample CSV and PNG figures, from :class:`AnomalyScores` only.

matplotlib is imported lazily (extra ``reports``), so the core library does not need it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from dn2_lightning.metrics import AnomalyScores


def write_scores_csv(
    scores: AnomalyScores,
    path: str | Path,
    paths: Sequence[str] | None = None,
    threshold: float | None = None,
) -> Path:
    """One row per sample: index, path (when known), label, score, is_anomaly, neighbour indices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = scores.neighbours.shape[1]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "label", "score", "is_anomaly", *[f"neighbour_{j}" for j in range(k)]])
        for i in range(len(scores)):
            index = int(scores.indices[i])
            score = float(scores.scores[i])
            flag = "" if threshold is None or threshold != threshold else int(score > threshold)
            writer.writerow(
                [
                    index,
                    paths[index] if paths is not None else "",
                    int(scores.labels[i]),
                    f"{score:.9g}",
                    flag,
                    *scores.neighbours[i].tolist(),
                ]
            )
    return path


def save_figures(
    scores: AnomalyScores,
    out_dir: str | Path,
    threshold: float | None = None,
    image_of: Callable[[int], Tensor] | None = None,
    n_top: int = 16,
) -> dict[str, Path]:
    """ROC curve (with AUROC), score histograms normal vs anomalous (with the threshold), and a grid of the
    most anomalous samples (when ``image_of(index) -> uint8 [C, H, W]`` is given). Returns name -> PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels, values = scores.labels.numpy(), scores.scores.numpy()
    written: dict[str, Path] = {}
    labelled = (labels >= 0).all() and len(set(labels.tolist())) == 2

    if labelled:
        fpr, tpr, _ = roc_curve(labels, values)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"AUROC = {roc_auc_score(labels, values):.4f}")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        ax.legend(loc="lower right")
        written["roc"] = _save(fig, out_dir / "roc.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    groups = [("normal", labels == 0), ("anomalous", labels == 1)] if labelled else [("all", labels == labels)]
    for name, mask in groups:
        ax.hist(values[mask], bins=50, alpha=0.6, label=name)
    if threshold is not None and threshold == threshold:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="DN2 score", ylabel="samples", title="Score distribution")
    ax.legend()
    written["histogram"] = _save(fig, out_dir / "score_histogram.png")

    if image_of is not None:
        top = torch.argsort(scores.scores, descending=True)[:n_top].tolist()
        cols = min(8, len(top))
        rows = (len(top) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, top, strict=False):
            image = image_of(int(scores.indices[i]))
            ax.imshow(image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy(), cmap="gray")
            ax.set_title(f"{float(scores.scores[i]):.3g}" + (" (A)" if labels[i] == 1 else ""), fontsize=8)
        fig.suptitle("Most anomalous samples (score; A = labelled anomalous)", fontsize=9)
        written["top_anomalies"] = _save(fig, out_dir / "top_anomalies.png")
    return written


def _save(fig: object, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class EvaluationReport(Callback):
    """Writes the reports of ``DN2Module(reports=True)`` into the run's log dir (rank 0 only).

    After ``test``: ``scores.csv`` and ``figures/*.png`` (also logged to TensorBoard when that logger is
    active). After ``predict``: ``predictions.csv`` with path, score, is_anomaly, label and neighbours.
    """

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank reads it
        scores = getattr(pl_module, "test_scores", None)
        if not trainer.is_global_zero or scores is None:
            return
        threshold = float(pl_module.threshold)
        datamodule = trainer.datamodule
        paths = datamodule.source_paths("test") if hasattr(datamodule, "source_paths") else None
        write_scores_csv(scores, out / "scores.csv", paths, threshold)
        dataset = getattr(datamodule, "test_dataset", None)
        image_of = (lambda i: dataset[i]["image"]) if dataset is not None and scores.labels.numel() else None
        if image_of is not None and dataset[0]["image"].ndim != 3:
            image_of = None  # groups: no single image to show
        figures = save_figures(scores, out / "figures", threshold, image_of)
        _log_to_tensorboard(trainer, figures)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank reads it
        if not trainer.is_global_zero or not trainer.predict_loop.predictions:
            return
        predictions = trainer.predict_loop.predictions
        if predictions and isinstance(predictions[0], list):  # several dataloaders
            predictions = [p for loader in predictions for p in loader]
        write_predictions_csv(predictions, out / "predictions.csv")


def write_predictions_csv(predictions: Sequence[dict], path: str | Path) -> Path:
    """One row per predicted sample: index, path, score, is_anomaly, label, neighbour indices."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = predictions[0]["neighbours"].shape[1]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "path", "score", "is_anomaly", "label", *[f"neighbour_{j}" for j in range(k)]])
        for batch in predictions:
            paths = batch.get("path") or [""] * len(batch["score"])
            for i in range(len(batch["score"])):
                writer.writerow(
                    [
                        int(batch["index"][i]),
                        paths[i],
                        f"{float(batch['score'][i]):.9g}",
                        "" if batch["is_anomaly"] is None else int(batch["is_anomaly"][i]),
                        int(batch["label"][i]),
                        *batch["neighbours"][i].tolist(),
                    ]
                )
    return path


def _log_to_tensorboard(trainer: Trainer, figures: dict[str, Path]) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            for name, png in figures.items():
                image = np.asarray(Image.open(png).convert("RGB"))
                logger.experiment.add_image(f"dn2/{name}", image, trainer.global_step, dataformats="HWC")
