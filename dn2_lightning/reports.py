"""Reports of an evaluation: one CSV layout, a summary and PNG figures, built from :class:`AnomalyScores` only.

Every ``test`` or ``predict`` run writes a fresh folder ``<log dir>/dn2_reports/<stage>_<N>/`` (``<log dir>``
is the logger's version folder, or ``trainer.default_root_dir`` without a logger; ``N`` is the first free
number, so a run never overwrites an earlier one)::

    scores.csv | predictions.csv   one row per sample, columns CSV columns below (same order for both)
    config.yaml                    the run's config, for `dn2 ... --config` (runs of the `dn2` command only)
    summary.json                   k, ckpt_path, n_scored, n_flagged, threshold and how it was set (threshold_source:
                                   "value" or the quantile's, threshold_quantile), AUROC (labelled data),
                                   files (those of other report callbacks too, e.g. the anomaly maps), escaped
                                   paths; with anomaly maps, a test's pixel_auroc and pro (as logged)
    figures/roc.png                ROC with the operating point (labelled data only)
    figures/score_histogram.png    score distribution with the threshold
    figures/top_anomalies.png      the most anomalous images with their scores and file names

CSV columns: ``index, path, label, score, normalized_score, is_anomaly, threshold``, then ``neighbour_j,
distance_j`` for j < k. ``label`` is 1 anomalous, 0 normal, -1 unknown; ``normalized_score`` is the share of
the training images' leave-one-out scores below the score (empty when the model cannot tell); ``is_anomaly`` is
``score > threshold`` (empty when the threshold is undefined).

Text cells (file paths) follow two rules, so that no cell can act as a spreadsheet formula and the true path
can always be recovered (:func:`read_report` undoes both):

1. CSV injection (OWASP): a cell starting with ``=``, ``+``, ``-``, ``@``, a tab, a carriage return or a single
   quote gets one leading ``'``. Undo: drop the first character of a cell starting with ``'``.
2. File names that are not valid UTF-8 (POSIX bytes that :func:`os.fsdecode` turns into lone surrogates) are
   written with each undecodable byte as ``\\xNN``; the exact bytes are in ``summary.json`` under
   ``escaped_paths`` as ``{index: hex}``: ``os.fsdecode(bytes.fromhex(hex))`` is the true path.

Files are UTF-8 (``read_report`` also reads them saved back with a BOM). Numeric cells are never escaped; scores,
thresholds and distances keep every digit of their dtype (9 significant for float32, 17 for float64: a
``precision="64-true"`` run's scores stay float64), so that ``score > threshold`` of the cells read back is
``is_anomaly``. matplotlib (a dependency) is imported lazily, when figures are drawn.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import IterableDataset, Subset

from dn2_lightning.cache import atomic_write
from dn2_lightning.checkpointing import absolute_checkpoint_path
from dn2_lightning.console import info
from dn2_lightning.data.datasets import REPORTS_DIR
from dn2_lightning.data_source import one_loader, running_datamodule
from dn2_lightning.distributed import unique_by_index, writes_files
from dn2_lightning.metrics import AnomalyScores, kept_float
from dn2_lightning.samplers import reads_in_order
from dn2_lightning.scoring import exceeds, rank_auroc

CSV_NAMES = {"test": "scores.csv", "predict": "predictions.csv"}
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "'")

# ------------------------------------------------------------------------------------------ text cells


def is_utf8_safe(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (False for names with undecodable bytes, held as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_path(path: str) -> str:
    """``path`` as printable UTF-8 text: each byte that is not valid UTF-8 becomes ``\\xNN``.

    >>> display_path(os.fsdecode(b"\\xe9t\\xe9.png"))
    '\\\\xe9t\\\\xe9.png'
    """
    if is_utf8_safe(path):
        return path
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def escape_cell(text: str) -> str:
    """A text cell safe to open in a spreadsheet (rules 1 and 2 of the module docstring).

    >>> escape_cell("=HYPERLINK(1)"), escape_cell("'quoted"), escape_cell("/data/a.png")
    ("'=HYPERLINK(1)", "''quoted", '/data/a.png')
    """
    text = display_path(text)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def unescape_cell(cell: str) -> str:
    """Undo rule 1 of :func:`escape_cell` (the formula guard).

    >>> unescape_cell(escape_cell("-rf.png"))
    '-rf.png'
    """
    return cell[1:] if cell.startswith("'") else cell


def escaped_paths(paths: Sequence[str] | None, indices: Tensor) -> dict[str, str]:
    """``{index: hex of the path's bytes}`` for the scored samples whose path is not valid UTF-8."""
    if paths is None:
        return {}
    out = {}
    for i in indices.tolist():
        if not is_utf8_safe(paths[i]):
            out[str(i)] = os.fsencode(paths[i]).hex()
    return out


# ------------------------------------------------------------------------------------------------ CSV


def csv_columns(k: int) -> list[str]:
    """The column order of ``scores.csv`` and ``predictions.csv`` for ``k`` neighbours."""
    pairs = [name for j in range(k) for name in (f"neighbour_{j}", f"distance_{j}")]
    return ["index", "path", "label", "score", "normalized_score", "is_anomaly", "threshold", *pairs]


def write_scores_csv(
    scores: AnomalyScores,
    path: str | Path,
    paths: Sequence[str] | None = None,
    threshold: float | None = None,
    normalized: Tensor | None = None,
) -> Path:
    """Write one row per sample in the :func:`csv_columns` order (UTF-8, text cells escaped).

    Args:
        scores: the evaluation's per-sample records.
        path: the CSV file to write (its folder is created), atomically: a temporary file renamed into place.
        paths: file path of each dataset index (``paths[index]``), or ``None`` (empty column).
        threshold: the decision threshold; ``None`` or NaN leaves ``is_anomaly`` and ``threshold`` empty.
        normalized: ``[N]`` normalized scores in [0, 1], or ``None`` (empty column).

    Returns:
        ``path``.
    """
    path = Path(path)
    k = scores.neighbours.shape[1]
    defined = threshold is not None and not math.isnan(threshold)
    score_text, distance_text = _exact_text(scores.scores), _exact_text(scores.distances)
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:  # a crash leaves no half-written CSV
        writer = csv.writer(f)
        writer.writerow(csv_columns(k))
        for i in range(len(scores)):
            index, score = int(scores.indices[i]), float(scores.scores[i])
            pairs = [v for j in range(k) for v in (int(scores.neighbours[i, j]), distance_text(scores.distances[i, j]))]
            share = float(normalized[i]) if normalized is not None else math.nan
            writer.writerow(
                [
                    index,
                    escape_cell(paths[index]) if paths is not None else "",
                    int(scores.labels[i]),
                    score_text(score),
                    "" if math.isnan(share) else f"{share:.6g}",  # NaN: the model cannot tell
                    int(score > threshold) if defined else "",
                    _number_text(threshold) if defined else "",
                    *pairs,
                ]
            )
    return path


def _number_text(value: float) -> str:
    """``value`` printed so that it reads back as the same number: 9 significant digits for a float32 value, 17 for
    any other (a float64 threshold or score), so that ``score > threshold`` of the cells read back is ``is_anomaly``
    and no two scores are printed alike."""
    value = float(value)
    return f"{value:.9g}" if float(torch.tensor(value, dtype=torch.float32)) == value else f"{value:.17g}"


def _exact_text(values: Tensor) -> Callable[[Any], str]:
    """The cell text of one element of ``values``: every digit its dtype holds (9 for float32, 17 for float64)."""
    digits = 17 if values.dtype == torch.float64 else 9
    return lambda value: f"{float(value):.{digits}g}"


def read_report(csv_path: str | Path) -> list[dict[str, str]]:
    """Rows of a report CSV with the true file paths restored (both escaping rules undone, using the
    ``summary.json`` beside it for names that are not valid UTF-8).

    Raises:
        ValueError: naming the file when it is incomplete (cut short: copied while being written, or written
            by a run that was killed): its last row lacks cells or its line end, it is not valid UTF-8, or its
            row count differs from ``n_scored`` in the ``summary.json`` beside it.
    """
    csv_path = Path(csv_path)
    summary_path = csv_path.with_name("summary.json")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    except json.JSONDecodeError as err:  # (edited by hand)
        raise ValueError(
            f"{display_path(str(summary_path))} beside the report is not valid JSON ({err}): restore it as the run "
            "wrote it, or move it away to read the report without it (paths that are not valid UTF-8 stay escaped)."
        ) from None
    raw = summary.get("escaped_paths", {})
    data = csv_path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # less a BOM (Excel's "CSV UTF-8"); a "\r" in a quoted path stays one
    except UnicodeDecodeError as err:
        _incomplete(csv_path, f"it is not valid UTF-8 at byte {err.start} of {len(data)}")
    if not text.endswith("\n"):  # csv.writer ends every row, the header included, with "\r\n"
        _incomplete(csv_path, "its last row is cut short")
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), strict=True))
    except csv.Error as err:  # e.g. a quoted cell still open at the end of the file
        _incomplete(csv_path, f"it is not well-formed CSV: {err}")
    header = next(csv.reader(io.StringIO(text, newline="")), [])
    missing = [name for name in ("index", "path") if name not in header]
    if missing:  # e.g. saved again by a spreadsheet with ";" separators, or a column deleted
        raise ValueError(
            f"report {display_path(str(csv_path))} has no {', '.join(map(repr, missing))} "
            f"column{'s' if len(missing) > 1 else ''} (its columns: {header}): read the CSV as dn2 wrote it, "
            "comma-separated with the columns of csv_columns(k) (a spreadsheet saves it so as 'CSV UTF-8 (comma "
            "delimited)')."
        )
    if any(None in row or None in row.values() for row in rows):  # DictReader's marks of extra / missing cells
        _incomplete(csv_path, "a row has the wrong number of cells")
    expected = summary.get("n_scored")
    if expected is not None and len(rows) != expected:
        _incomplete(csv_path, f"it holds {len(rows)} rows but {summary_path.name} says {expected} samples were scored")
    for row in rows:
        exact = raw.get(row["index"])
        row["path"] = os.fsdecode(bytes.fromhex(exact)) if exact is not None else unescape_cell(row["path"])
    return rows


def _incomplete(csv_path: Path, reason: str) -> NoReturn:
    raise ValueError(
        f"report {display_path(str(csv_path))} is incomplete ({reason}): the run that wrote it did not finish. "
        "Rerun `dn2 test` / `dn2 predict` (or trainer.test / trainer.predict) to write a complete report."
    )


# -------------------------------------------------------------------------------------------- summary


def summarize(stage: str, scores: AnomalyScores, threshold: float | None) -> dict[str, Any]:
    """Counts of a run: ``stage``, ``n_scored``, ``n_flagged`` (score > threshold), ``threshold``,
    ``n_labelled_anomalous``, of the labelled samples those flagged (``n_flagged_anomalous``: anomalies caught;
    ``n_flagged_normal``: false alarms) and ``auroc`` (exact, from the scores in float64; ``None`` where
    undefined)."""
    defined = threshold is not None and not math.isnan(threshold)
    labels = scores.labels
    labelled = bool((labels >= 0).all()) and len(labels) > 0
    auroc = None
    if labelled and labels.unique().numel() == 2:
        auroc = rank_auroc(scores.scores, labels)  # the logged test/auroc is torchmetrics' float32 value
    flagged = exceeds(scores.scores, threshold) if defined else None
    return {
        "stage": stage,
        "n_scored": len(scores),
        "n_flagged": int(flagged.sum()) if flagged is not None else None,
        "threshold": float(threshold) if defined else None,
        "n_labelled_anomalous": int((labels == 1).sum()) if labelled else None,
        "n_flagged_anomalous": int(flagged[labels == 1].sum()) if labelled and defined else None,
        "n_flagged_normal": int(flagged[labels == 0].sum()) if labelled and defined else None,
        "auroc": auroc,
    }


def write_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """Write ``summary`` as indented UTF-8 JSON (ASCII-escaped, so any reader can load it), atomically."""
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return path


def next_run_dir(base: str | Path, stage: str) -> Path:
    """Create and return ``base/dn2_reports/<stage>_<N>`` with the first free ``N`` (never an existing folder)."""
    root = Path(base) / REPORTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    n = sum(1 for p in root.iterdir() if p.name.startswith(f"{stage}_"))
    while True:
        folder = root / f"{stage}_{n}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            n += 1


# -------------------------------------------------------------------------------------------- figures


def save_figures(
    scores: AnomalyScores,
    out_dir: str | Path,
    threshold: float | None = None,
    image_of: Callable[[int], Tensor] | None = None,
    name_of: Callable[[int], str] | None = None,
    n_top: int = 16,
) -> dict[str, Path]:
    """Write the PNG figures of an evaluation.

    Args:
        scores: the evaluation's per-sample records.
        out_dir: folder for the PNGs (created).
        threshold: the decision threshold, marked on the histogram and (as the operating point) on the ROC.
        image_of: ``index -> [C, H, W]`` image (uint8, or float in [0, 1]); ``None`` skips the top grid.
        name_of: ``index -> file name`` shown under each top image, or ``None``.
        n_top: images in the top grid.

    Returns:
        ``{"roc" (labelled data only), "histogram", "top_anomalies" (with image_of): PNG path}``.
    """
    import numpy as np
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, no figure registry
    from sklearn.metrics import roc_auc_score, roc_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels, values = scores.labels.numpy(), scores.scores.numpy()
    defined = threshold is not None and not math.isnan(threshold)
    flagged = exceeds(scores.scores, threshold).numpy() if defined else None  # one reading for both figures
    written: dict[str, Path] = {}
    labelled = bool((labels >= 0).all()) and len(set(labels.tolist())) == 2

    if labelled:
        fpr, tpr, _ = roc_curve(labels, values)
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.plot(fpr, tpr, label=f"AUROC = {roc_auc_score(labels, values):.4f}")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        if flagged is not None:
            op_fpr, op_tpr = flagged[labels == 0].mean(), flagged[labels == 1].mean()
            ax.plot(op_fpr, op_tpr, "ro", label=f"threshold {threshold:.3g}: FPR {op_fpr:.2f}, TPR {op_tpr:.2f}")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        ax.legend(loc="lower right", fontsize=7)
        written["roc"] = _save(fig, out_dir / "roc.png")

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    groups = [("normal", labels == 0), ("anomalous", labels == 1)] if labelled else [("all", labels == labels)]
    bins = np.histogram_bin_edges(values, bins=50)  # one set of bins, so the groups compare bar for bar
    for name, mask in groups:
        ax.hist(values[mask], bins=bins, alpha=0.6, label=name)
    if flagged is not None:
        n_flagged = int(flagged.sum())
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g} ({n_flagged} above)")
    ax.set(xlabel="DN2 score", ylabel="samples", title="Score distribution")
    ax.legend(fontsize=7)
    written["histogram"] = _save(fig, out_dir / "score_histogram.png")

    top = torch.argsort(scores.scores, descending=True)[:n_top].tolist()
    try:
        images = [image_of(int(scores.indices[i])) for i in top] if image_of is not None else []
    except LookupError as err:  # an index that is no dataset position: no figure, not other samples' images
        warnings.warn(f"the report's top anomalies are not drawn ({type(err).__name__}: {err}).", stacklevel=2)
        images = []
    if images:
        cols = min(8, len(top))
        rows = (len(top) + cols - 1) // cols
        fig = Figure(figsize=(1.7 * cols, 2.1 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i, image in zip(axes.flat, top, images, strict=False):
            index = int(scores.indices[i])
            shown = image.permute(1, 2, 0) if image.shape[0] == 3 else image[0]
            ax.imshow(shown.numpy(), cmap="gray")
            title = f"{float(scores.scores[i]):.3g}" + (" (A)" if labels[i] == 1 else "")
            if name_of is not None:
                title += "\n" + _short(display_path(name_of(index)))
            ax.set_title(title, fontsize=7)
        marker = "; A = labelled anomalous" if any(labels[i] >= 0 for i in top[: len(images)]) else ""
        fig.suptitle(f"Most anomalous samples (score{marker})", fontsize=9)
        written["top_anomalies"] = _save(fig, out_dir / "top_anomalies.png")
    return written


def _short(name: str, width: int = 18) -> str:
    name = os.path.basename(name)
    return name if len(name) <= width else name[: width - 1] + "…"


def _save(fig: object, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------- callback


class EvaluationReport(Callback):
    """Writes the reports of ``DN2Module(reports=True)`` after ``test`` and ``predict`` (rank 0 only) and prints
    the path of every file written.

    Each run gets its own folder ``<out_dir>/dn2_reports/<stage>_<N>/`` (see the module docstring for the
    files and the CSV rules); figures are also logged to TensorBoard when that logger is active.

    Args:
        out_dir: parent of ``dn2_reports/``; ``None`` = the trainer's ``log_dir`` (the logger's version folder,
            or ``default_root_dir`` without a logger).
    """

    def __init__(self, out_dir: str | Path | None = None) -> None:
        self.out_dir = out_dir
        self._report: tuple[dict[str, Any], Path, dict[str, Path]] | None = None  # printed at teardown, after
        self._listed: dict[str, Path] = {}  # Lightning's metric table, with the files other callbacks listed
        self._predictions: list | None = None
        self.run_dir: Path | None = None  # this run's folder, reserved at the start (other reports write there too)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run_dir = self._reserve(trainer, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run_dir = self._reserve(trainer, "predict")

    def _reserve(self, trainer: Trainer, stage: str) -> Path | None:
        self._report, self._listed = None, {}  # nothing of an earlier run that ended by an exception
        base = self._base(trainer)  # a collective under DDP: every rank reads it
        folder = next_run_dir(base, stage) if writes_files(trainer) else None
        folder = trainer.strategy.broadcast(str(folder) if folder else None)
        return Path(folder) if folder else None  # None: another process writes this run's files

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a run that stopped before writing (e.g. a bank refused at the epoch's start) leaves no empty folder
        if writes_files(trainer) and self.run_dir is not None and self.run_dir.is_dir():
            for folder in (self.run_dir, self.run_dir.parent):  # and dn2_reports/ if this run had made it
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: a run that wrote some files keeps them
        # Lightning calls no teardown after an exception: this run's report must not reach the next run's summary
        self.run_dir, self._report, self._listed = None, None, {}

    def list_file(self, name: str, path: str | Path) -> None:
        """Print ``path`` with this run's report files: a file, or a folder (printed with its PNG count). For
        report callbacks writing into :attr:`run_dir`, e.g. :class:`~dn2_lightning.maps.figures.MapReport`."""
        self._listed[name] = Path(path)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._report is not None:
            summary, out, files = self._report
            listed = {name: path for name, path in self._listed.items() if _listing(path)}
            if listed:  # written after the summary (e.g. the anomaly maps): recorded in it too
                summary["files"].update({name: display_path(str(p)) for name, p in listed.items()})
                write_summary(summary, files["summary"])
            info(_describe(summary, out, {**files, **self._listed}))  # the dn2_lightning logger, as README says
        self._report, self._listed = None, {}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        base = self._base(trainer)  # a collective under DDP: every rank reads it
        scores = getattr(pl_module, "test_scores", None)
        if writes_files(trainer) and scores is not None:
            self._write("test", trainer, pl_module, scores, base)  # AUROC from the scores, in float64

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the module's own on_predict_epoch_end (gathering ``predict_scores`` from every rank) runs after the
        # callbacks' hook, so the report is written in on_predict_end; Lightning drops its predictions list
        # before that hook unless return_predictions, so it is kept here for the fallback
        self._predictions = trainer.predict_loop.predictions

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        base = self._base(trainer)  # a collective under DDP: every rank reads it
        predictions, self._predictions = self._predictions, None
        if not writes_files(trainer):
            return
        scores, batch_paths = getattr(pl_module, "predict_scores", None), None
        if scores is None and predictions:  # a module without predict_scores: rank 0's own predictions
            scores, batch_paths = scores_from_predictions(predictions)
        if scores is not None and len(scores):
            self._write("predict", trainer, pl_module, scores, base, paths=batch_paths)

    def _base(self, trainer: Trainer) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path(trainer.log_dir or trainer.default_root_dir)

    def _write(
        self,
        stage: str,
        trainer: Trainer,
        pl_module: LightningModule,
        scores: AnomalyScores,
        base: Path,
        paths: Sequence[str] | None = None,
    ) -> None:
        threshold = _threshold_of(pl_module)
        source_paths = getattr(running_datamodule(trainer), "source_paths", None)
        if scores.paths is not None:  # per row, gathered by the module from the batches: index them
            by_index = [""] * (int(scores.indices.max()) + 1 if len(scores) else 0)
            for i, path in zip(scores.indices.tolist(), scores.paths, strict=True):
                by_index[i] = path
            paths = by_index
        elif callable(source_paths):
            paths = source_paths(stage) or paths
        dataset, loader = _dataset_of(trainer, stage)
        if paths is None:  # e.g. a plain DataLoader over torchvision's ImageFolder, whose batches are tuples
            paths = _folder_files(dataset, loader)
        normalized = scores.normalized
        normalize = getattr(pl_module, "normalized", None)
        if normalized is None and callable(normalize):
            normalized = normalize(scores.scores).detach().float().cpu()

        out = self.run_dir or next_run_dir(base, stage)
        files = {"csv": write_scores_csv(scores, out / CSV_NAMES[stage], paths, threshold, normalized)}
        image_of = _image_reader(dataset, loader)
        name_of = (lambda i: paths[i]) if paths is not None else None
        for name, png in save_figures(scores, out / "figures", threshold, image_of, name_of).items():
            files[name] = png
        config = _run_config(trainer)
        if config is not None:  # the CLI run's config, beside its results (the log dir's copy is overwritten)
            with atomic_write(out / "config.yaml", "w", encoding="utf-8") as f:
                f.write(config)
            files["config"] = out / "config.yaml"
        summary = summarize(stage, scores, threshold)
        summary.update(threshold_source(pl_module, threshold))
        summary.update(pixel_summary(trainer, pl_module, stage))
        hparams = getattr(pl_module, "hparams", {})
        summary["k"] = hparams.get("k")  # what the scores were computed with, beside the checkpoint they came from
        summary["ckpt_path"] = absolute_checkpoint_path(str(trainer.ckpt_path)) if trainer.ckpt_path else None
        summary["escaped_paths"] = escaped_paths(paths, scores.indices)
        summary["files"] = {name: display_path(str(p)) for name, p in files.items()}
        files["summary"] = write_summary(summary, out / "summary.json")
        _log_to_tensorboard(trainer, {n: p for n, p in files.items() if p.suffix == ".png"})
        self._report = (summary, out, files)


def scores_from_predictions(predictions: Sequence[Any]) -> tuple[AnomalyScores, list[str] | None]:
    """The :class:`AnomalyScores` of ``trainer.predict`` outputs (dicts of ``DN2Module.predict_step``, one list
    per dataloader if several), sorted by index, and the samples' paths by index when the batches carry them."""
    batches = [b for loader in predictions for b in loader] if isinstance(predictions[0], list) else predictions
    cat = {key: torch.cat([torch.as_tensor(b[key]).cpu() for b in batches]) for key in ("index", "score", "label")}
    neighbours = torch.cat([b["neighbours"].cpu() for b in batches])
    distances = torch.cat([b["distances"].cpu() for b in batches])
    indices, scores, labels, neighbours, distances = unique_by_index(
        cat["index"].long(), kept_float(cat["score"]), cat["label"].long(), neighbours.long(), kept_float(distances)
    )
    paths = None
    if all("path" in b for b in batches):
        by_index = {int(i): p for b in batches for i, p in zip(b["index"], b["path"], strict=True)}
        paths = [by_index.get(i, "") for i in range(int(indices.max()) + 1)]
    return AnomalyScores(indices, scores, labels, neighbours, distances), paths


def _run_config(trainer: Trainer) -> str | None:
    """The config of a ``dn2`` (LightningCLI) run as YAML, from its ``SaveConfigCallback``; ``None`` otherwise."""
    from lightning.pytorch.cli import SaveConfigCallback

    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            return callback.parser.dump(callback.config, **{_keep_none_entries_name(): False})
    return None


@functools.cache
def _keep_none_entries_name() -> str:
    """jsonargparse 4.49 renamed ``dump``'s ``skip_none`` to ``skip_unset`` (the old name goes in 5.0)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("jsonargparse").split(".")[:2])
    return "skip_unset" if (major, minor) >= (4, 49) else "skip_none"


def _threshold_of(pl_module: LightningModule) -> float | None:
    threshold = getattr(pl_module, "threshold", None)
    if threshold is None:
        return None
    value = float(threshold)
    return None if math.isnan(value) else value


QUANTILE_SOURCE = "quantile of the training images' leave-one-out scores"


def threshold_source(pl_module: LightningModule, threshold: float | None) -> dict[str, Any]:
    """How the threshold was set, for ``summary.json``: ``threshold_source`` is ``"value"`` (a fixed
    ``threshold=`` / ``set_threshold(value=...)``, ``threshold_quantile`` then ``None``) or
    :data:`QUANTILE_SOURCE` (with its ``threshold_quantile``); both ``None`` without a threshold or when the
    module records neither."""
    hparams = getattr(pl_module, "hparams", {})
    if threshold is None:
        return {"threshold_source": None, "threshold_quantile": None}
    if hparams.get("threshold") is not None:
        return {"threshold_source": "value", "threshold_quantile": None}
    quantile = hparams.get("threshold_quantile")
    return {"threshold_source": QUANTILE_SOURCE if quantile is not None else None, "threshold_quantile": quantile}


PIXEL_METRICS = ("pixel_auroc", "pro")  # logged as test/<name> by DN2Module(anomaly_maps=True)


def pixel_summary(trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Any]:
    """A test's pixel metrics, for ``summary.json``: ``pixel_auroc`` and ``pro`` as logged (``None`` when the masks
    had no anomalous pixel) for a model with anomaly maps; ``{}`` otherwise (no key added)."""
    if stage != "test" or getattr(pl_module, "maps", None) is None:
        return {}
    metrics = trainer.callback_metrics
    return {name: float(metrics[f"test/{name}"]) if f"test/{name}" in metrics else None for name in PIXEL_METRICS}


def _dataset_of(trainer: Trainer, stage: str) -> tuple[Any, Any]:
    """(the stage's dataset, the dataloader that read it); either ``None`` where there is no one."""
    loaders = trainer.test_dataloaders if stage == "test" else trainer.predict_dataloaders
    loader = None
    with contextlib.suppress(ValueError):  # several loaders: no one dataset to draw from
        loader = one_loader(loaders, stage)
    dataset = getattr(running_datamodule(trainer), f"{stage}_dataset", None)
    return (dataset if dataset is not None else getattr(loader, "dataset", None)), loader


def _image_reader(dataset: Any, loader: Any = None) -> Callable[[int], Tensor] | None:
    """``index -> image`` for datasets of dicts holding one ``[C, H, W]`` image (not groups) or of ``(image, label)``
    tuples, else ``None``.

    An index is a dataset position only where the sample there carries it (a ``Subset`` is read through the dataset
    it wraps) or, for samples without an ``index``, where the loader read in order; any other index raises
    ``LookupError`` (:func:`save_figures` then draws no top anomalies, rather than other samples' images)."""
    if isinstance(dataset, IterableDataset) or sized_len(dataset) in (None, 0) or not hasattr(dataset, "__getitem__"):
        return None  # (an iterable has no positions to read samples back from)
    first = dataset[0]
    sources = [dataset]
    while isinstance(sources[-1], Subset):
        sources.append(sources[-1].dataset)
    if isinstance(first, tuple | list) and first and isinstance(first[0], Tensor) and first[0].ndim == 3:
        # (image, label) tuples, as torchvision's datasets give, numbered by their position when read in order; or
        # (image, label, index) tuples, which carry it
        carried = len(first) >= 3
        if not carried and loader is not None and not reads_in_order(loader):
            return None

        def tuple_image(index: int) -> Tensor:
            return _carrying(sources, index, carried)[0]

        return tuple_image
    if not isinstance(first, dict) or not isinstance(first.get("image"), Tensor) or first["image"].ndim != 3:
        return None
    if "index" not in first and loader is not None and not reads_in_order(loader):
        return None  # numbered as read (warn_if_out_of_order said so): no position to read them back from

    def image_of(index: int) -> Tensor:
        return _carrying(sources, index, carried="index" in first)["image"]

    return image_of


def _carrying(sources: list[Any], index: int, carried: bool) -> Any:
    """The sample numbered ``index``: at that position of the first of ``sources`` (a dataset, then the datasets
    its ``Subset`` wraps) whose sample there carries it, or (``carried`` false) at that position of the first."""
    for source in sources if carried else sources[:1]:
        if 0 <= index < len(source):
            sample = source[index]
            if not carried or _carried_index(sample) == index:
                return sample
    raise LookupError(f"no sample of the {type(sources[0]).__name__} at position {index} carries index {index}")


def _folder_files(dataset: Any, loader: Any = None) -> list[str] | None:
    """The file of each row's index for a torchvision ``DatasetFolder`` (``ImageFolder``), or a ``Subset`` of one:
    by position for samples read in order; for samples that carry their own index (``(image, label, index)`` or a
    dict's ``"index"``), by whichever that index counts, this dataset's positions or (under a ``Subset``) the
    folder's, told by its first and last samples. Else ``None``."""
    from torchvision.datasets import DatasetFolder

    positions, base = list(range(sized_len(dataset) or 0)), dataset
    while isinstance(base, Subset):  # each position's position in the dataset the Subset wraps, down to the folder
        positions, base = [int(base.indices[p]) for p in positions], base.dataset
    if not positions or not isinstance(base, DatasetFolder) or len(base.samples) != len(base):
        return None
    files = [str(path) for path, _ in base.samples]
    by_position = [files[p] for p in positions]
    ends = sorted({0, len(positions) - 1})
    carried = [_carried_index(dataset[p]) for p in ends]
    if carried[0] is None:  # numbered by their position as read
        return by_position if loader is None or reads_in_order(loader) else None
    if carried == [positions[p] for p in ends]:  # the folder's positions: what an ImageFolder subclass carries
        return files
    if carried == ends:
        return by_position
    return None  # an index of something else: no file is named rather than another sample's


def _carried_index(sample: Any) -> int | None:
    """The index a sample carries: the third item of a tuple, or a dict's ``"index"``; ``None`` without one."""
    value = sample[2] if isinstance(sample, tuple | list) and len(sample) >= 3 else None
    if isinstance(sample, dict):
        value = sample.get("index")
    if isinstance(value, Tensor) and value.numel() == 1 or isinstance(value, Integral):
        return int(value)
    return None


def _describe(summary: dict[str, Any], out: Path, files: dict[str, Path]) -> str:
    threshold = summary["threshold"]
    line = f"DN2 {summary['stage']} report: "  # the module's line before it gave the bank and the threshold
    if threshold is not None:
        line += f"{summary['n_flagged']} of {summary['n_scored']} samples flagged anomalous"
        if summary.get("n_flagged_anomalous") is not None:
            anomalous = summary["n_labelled_anomalous"]
            normal = summary["n_scored"] - anomalous
            line += (
                f" ({_share(summary['n_flagged_anomalous'], anomalous)} anomalous, "
                f"{_share(summary['n_flagged_normal'], normal)} normal)"
            )
    else:
        line += f"{summary['n_scored']} samples, none flagged (no threshold: the bank is too small)"
    if summary["auroc"] is not None:
        line += f", AUROC {summary['auroc']:.4f}"
    if summary.get("pixel_auroc") is not None:
        line += f", pixel AUROC {summary['pixel_auroc']:.4f}"
    if summary.get("pro") is not None:
        line += f", PRO {summary['pro']:.4f}"
    listing = "\n".join(entry for p in files.values() if (entry := _listing(p)))
    return f"{line}.\nDN2 reports written to {display_path(str(out))}:\n{listing}"


def _share(part: int, whole: int) -> str:
    return f"{part} of {whole}" + (f" = {100 * part / whole:.1f}%" if whole else "")


def _listing(path: Path) -> str:
    """One line of the printed file list: a file, a folder with its PNG count, nothing if neither exists."""
    if path.is_dir():
        n = sum(1 for _ in path.rglob("*.png"))
        return f"  {display_path(str(path))}{os.sep} ({n} PNG files)" if n else ""
    return f"  {display_path(str(path))}" if path.is_file() else ""


def _log_to_tensorboard(trainer: Trainer, figures: dict[str, Path]) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            for name, png in figures.items():
                image = np.asarray(Image.open(png).convert("RGB"))
                logger.experiment.add_image(f"dn2/{name}", image, trainer.global_step, dataformats="HWC")
