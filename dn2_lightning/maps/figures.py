"""Anomaly-map figures: heatmap overlays with ground-truth contours, and one map PNG per predicted image.

matplotlib is imported lazily, when figures are drawn, as in :mod:`dn2_lightning.reports`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from dn2_lightning.batch import check_pixels
from dn2_lightning.data_source import running_datamodule
from dn2_lightning.distributed import run_by_process_zero_too, writes_files
from dn2_lightning.pixel_metrics import PixelResults


def _hwc(image: Tensor) -> np.ndarray:
    """uint8 or [0, 1] float ``[C, H, W]`` -> float ``[H, W, 3]`` in [0, 1]."""
    x = image.detach().cpu().float()
    if image.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).clamp(0, 1).numpy()


def save_map_figure(
    results: PixelResults,
    image_scores: Tensor,
    image_of: Callable[[int], Tensor],
    path: str | Path,
    n_top: int = 8,
) -> Path:
    """For the ``n_top`` test images with the highest image scores: the image (top) and the anomaly map over
    it with the ground-truth mask's contour in green (bottom); one colour scale for the whole figure.

    Args:
        results: test maps and masks (``AnomalyMaps.test_results``).
        image_scores: ``[N]`` image scores aligned with ``results.indices``.
        image_of: dataset index -> image ``[C, H, W]`` (uint8 or [0, 1] float), the maps' size.
        path: PNG file to write.
        n_top: images shown.

    Returns:
        ``path``.
    """
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, no figure registry

    top = torch.argsort(image_scores, descending=True)[:n_top].tolist()
    maps = results.maps[top]
    low, high = float(results.maps.min()), float(maps.max())
    fig = Figure(figsize=(1.9 * len(top), 4.1))
    axes = fig.subplots(2, len(top), squeeze=False)
    for column, row in enumerate(top):
        image = _hwc(image_of(int(results.indices[row])))
        mask = results.masks[row].numpy()
        for ax in axes[:, column]:
            ax.imshow(image)
            ax.axis("off")
        overlay = axes[1, column].imshow(results.maps[row].numpy(), cmap="jet", alpha=0.5, vmin=low, vmax=high)
        if mask.any():
            axes[1, column].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
        axes[0, column].set_title(f"score {float(image_scores[row]):.3g}", fontsize=8)
    fig.colorbar(overlay, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01)
    fig.suptitle("Most anomalous test images: anomaly map (jet), ground truth (green)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def map_overlay(image: Tensor, anomaly_map: Tensor) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the image blended with its map in the jet colour map, scaled to the map's own
    range (colours compare positions within one image, not across images).

    Maps come at the loaded size (``load_size`` square, the backbone's view); an ``image`` of another size,
    e.g. the original file, gets the map resized to it (bilinear), so it can be drawn over the original."""
    from matplotlib import colormaps

    for name, value in (("image", image), ("anomaly_map", anomaly_map)):
        if not isinstance(value, Tensor):
            raise ValueError(
                f"map_overlay's {name} must be a tensor, got a {type(value).__name__}: give torch.from_numpy(array) "
                "(an [H, W, C] image permuted to [C, H, W]: .permute(2, 0, 1)), or pil_to_tensor(image) for a PIL one."
            )
    m = anomaly_map.detach().cpu().float()
    if image.ndim != 3 or m.ndim != 2 or image.shape[0] not in (1, 3):
        last = " (channels last? image.permute(2, 0, 1))" if image.ndim == 3 and image.shape[-1] in (1, 3) else ""
        raise ValueError(
            f"map_overlay takes one image [C, H, W] and its map [H, W], C = 1 or 3; got {tuple(image.shape)} and "
            f"{tuple(m.shape)}{last}."
        )
    try:
        check_pixels(image[None])  # as the backbone reads it: a [0, 255] float image would be drawn white
    except ValueError as err:
        raise ValueError(f"map_overlay's image: {err}") from None
    if tuple(m.shape) != tuple(image.shape[-2:]):
        m = torch.nn.functional.interpolate(m[None, None], size=image.shape[-2:], mode="bilinear")[0, 0]
    m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
    heat = colormaps["jet"](m.numpy())[..., :3]
    return np.round((0.5 * _hwc(image) + 0.5 * heat) * 255).astype(np.uint8)


def write_map_pngs(images: Tensor, maps: Tensor, names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """One overlay PNG per image (``out_dir/<name>.png``); ``images [B, C, H, W]``, ``maps [B, H, W]``."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image, anomaly_map, name in zip(images, maps, names, strict=True):
        path = out_dir / f"{name}.png"
        Image.fromarray(map_overlay(image, anomaly_map)).save(path)
        written.append(path)
    return written


MAX_NAME_BYTES = 200  # of a map's file stem: room for ".png" and a file system's 255-byte limit


def map_png_name(index: int, path: str | None = None) -> str:
    """File stem of a predicted image's map: ``<index>_<folder>_<stem>``, or ``<index>`` without a path.

    The dataset index (the CSV's ``index`` column) makes it unique: ``part.png`` and ``part.jpg``, or
    ``a/x/0.png`` and ``b/x/0.png``, get a map each; folder and stem keep it readable, cut to
    :data:`MAX_NAME_BYTES` in UTF-8 (file systems take 255 bytes per name).

    >>> map_png_name(7, "/data/test/scratch/000.png"), map_png_name(8, "part.jpg"), map_png_name(9)
    ('7_scratch_000', '8_part', '9')
    """
    if not path:
        return str(index)
    source = Path(path)
    name = "_".join(part for part in (str(index), source.parent.name, source.stem) if part)
    return name.encode()[:MAX_NAME_BYTES].decode(errors="ignore")  # a character cut in two is dropped


def _run_dir(trainer: Trainer) -> Path:
    """The folder the run's :class:`~dn2_lightning.reports.EvaluationReport` reserved (``dn2_reports/<stage>_<N>``),
    else the log dir."""
    from dn2_lightning.reports import EvaluationReport

    reserved = [c.run_dir for c in trainer.callbacks if isinstance(c, EvaluationReport) and c.run_dir is not None]
    return reserved[0] if reserved else Path(trainer.log_dir or trainer.default_root_dir)


def _list_with_report(trainer: Trainer, name: str, path: Path) -> None:
    """Have the run's :class:`~dn2_lightning.reports.EvaluationReport` list ``path`` among the files it prints."""
    from dn2_lightning.reports import EvaluationReport

    for callback in trainer.callbacks:
        if isinstance(callback, EvaluationReport):
            callback.list_file(name, path)


class MapReport(Callback):
    """Map reports of ``DN2Module(anomaly_maps=True, reports=True)`` in the run's report folder
    (``dn2_reports/<stage>_<N>/``, beside the CSVs), so no run overwrites another's.

    After ``test``: ``figures/anomaly_maps.png`` (also logged to TensorBoard). During ``predict``:
    ``anomaly_maps/<index>_<folder>_<image stem>.png`` (or ``<index>.png`` without paths; :func:`map_png_name`),
    one overlay per image. Both are listed with the run's other report files when it ends.
    """

    def __init__(self, n_top: int = 8) -> None:
        self.n_top = n_top
        self._predict_dir: Path | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out = _run_dir(trainer)
        results = getattr(pl_module.maps, "test_results", None)
        scores = getattr(pl_module, "test_scores", None)
        dataset = getattr(running_datamodule(trainer), "test_dataset", None)
        if not writes_files(trainer) or results is None or scores is None or dataset is None:
            return
        if not torch.equal(scores.indices, results.indices):
            return  # image and pixel results of different samples: nothing sensible to draw
        png = save_map_figure(
            results, scores.scores, lambda i: dataset[i]["image"], out / "figures" / "anomaly_maps.png"
        )
        from dn2_lightning.reports import _log_to_tensorboard

        _log_to_tensorboard(trainer, {"anomaly_maps": png})
        _list_with_report(trainer, "anomaly_maps", png)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if run_by_process_zero_too(trainer):  # its maps are written there
            self._predict_dir = None
            return
        self._predict_dir = _run_dir(trainer) / "anomaly_maps"
        _list_with_report(trainer, "anomaly_map_pngs", self._predict_dir)  # listed with its count, if written

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "anomaly_map" not in outputs or self._predict_dir is None:
            return
        images = batch["image"] if isinstance(batch, dict) else batch[0] if isinstance(batch, list | tuple) else batch
        indices = [int(i) for i in outputs["index"]]
        paths = outputs.get("path") or [None] * len(indices)
        names = [map_png_name(i, p) for i, p in zip(indices, paths, strict=True)]
        write_map_pngs(images, outputs["anomaly_map"], names, self._predict_dir)  # one dataloader per predict call
