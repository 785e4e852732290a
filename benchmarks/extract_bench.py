"""Feature-extraction throughput: the whole data -> embedding path against the bare backbone forward.

    python benchmarks/extract_bench.py --bf16                      # GPU: 224 px, batch 512, 60,000 images, 2 rounds
    python benchmarks/extract_bench.py --preset cpu --json r.json  # a laptop CPU: 64 px, 512 images, 1 round

Six measurements per backbone and precision (random weights: speed does not depend on them):

* "bare forward": random, already normalised, channels_last tensors that live on the device, fed to the trunk
  alone, with cuDNN's autotuner on (``torch.backends.cudnn.benchmark = True``): the ceiling.
* "preprocess only": the extractor's resize + normalise alone (``FeatureExtractor.preprocess``) on the FashionMNIST
  uint8 batches already on the device: its own throughput.
* "on-device input": the FashionMNIST uint8 batches already on the device, fed to the whole extractor (resize +
  normalise on the device + trunk): what the preprocessing costs, without any host-to-device path.
* "protocol path": exactly what ``embed_split`` (``dn2-protocol``) runs, minus the disk cache:
  :func:`dn2_lightning.protocol.extract_embeddings` over FashionMNIST's uint8 28x28 images (batches sliced
  from the in-memory array, pinned and uploaded one ahead, the last one padded to a full batch on CUDA ->
  resize + normalise on the device -> trunk -> float32 embeddings kept on the device, one copy to the CPU at the
  end). Padded images count as work, not as images.
* "DataLoader path": what ``DN2Module`` runs with the datamodules: a DataLoader with workers and pinned memory
  over ``ArrayImageDataset`` (per-sample items, default collation) -> device -> the same extractor, embeddings
  kept on the device.
* "DN2Module fit": the same DataLoader through ``Trainer.fit(DN2Module(...))`` (one device, the precision as
  ``Trainer(precision="bf16-mixed")`` sets it): the pass that builds the memory bank, Lightning's loop and the
  module's per-batch work included (unpacking, dataset indices, the embeddings' finiteness check, collecting the
  rows, the bank made at the last batch), from the first batch's start to the epoch's end. A fixed threshold, so
  no leave-one-out scores follow the pass.

The protocol, DataLoader and on-device paths run with cuDNN's autotuner as ``extract_embeddings`` sets it (off by
default: see its docstring), so they differ only in where the images come from.

Each timing follows a warm-up on the same batch shapes (cuDNN autotuning, allocator, workers) and is bracketed by
``torch.cuda.synchronize()``. The images are FashionMNIST's train split, all 60,000 on a GPU: the pass
``dn2-protocol`` spends most of its extraction on, long enough (about 4 s in float32 on an H200) that a run is not
at the mercy of one-off stalls and clock changes as a sub-second one is (10,000 images gave 87% and 91% for the
same code in two runs). The paths are timed in rounds (``--repeats``), each round running every path once in turn
(a slow patch of time hits them all), and the table gives each path's median over the rounds (for two rounds,
their mean). Prints a markdown table; ``--json PATH`` also writes every figure, each round's too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import inspect
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning import Trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from bench_args import at_least, require_device

from dn2_lightning import DN2Module  # noqa: E402
from dn2_lightning.backbones import build_backbone  # noqa: E402
from dn2_lightning.data.datasets import ArrayImageDataset  # noqa: E402
from dn2_lightning.data.sources import load_split  # noqa: E402
from dn2_lightning.protocol import extract_embeddings  # noqa: E402

#: cuDNN's autotuner in the three pipelines: what ``extract_embeddings`` (hence ``embed_split``) uses by default.
PIPELINE_CUDNN_BENCHMARK = inspect.signature(extract_embeddings).parameters["cudnn_benchmark"].default
PRESETS = {
    "gpu": {"input_size": 224, "images": 60_000, "batch_size": 512, "workers": 8, "repeats": 2},
    "cpu": {"input_size": 64, "images": 512, "batch_size": 128, "workers": 2, "repeats": 1},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(extractor, device, images: int, batch_size: int, size: int, bf16: bool) -> float:
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    batches = max(1, images // batch_size)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        extractor.trunk(x)  # warm-up (cuDNN autotuning, allocator)
        sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            extractor.trunk(x)
        sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def warm_up(extractor, device, dataset: ArrayImageDataset, batch_size: int, bf16: bool) -> None:
    """The pipelines' settings on every batch shape they meet: a full batch (on CUDA; on the CPU the bare forward
    warmed it up) and, unpadded, one of the last batch's size if that is shorter (the protocol path pads it to a
    full batch on CUDA, the other two do not)."""
    n = min(len(dataset), len(dataset) % batch_size + (batch_size if device.type == "cuda" else 0))
    if n:
        head = ArrayImageDataset(dataset.images[:n], dataset.labels[:n])
        extract_embeddings(extractor, head, batch_size, device, "bf16" if bf16 else "32", pad_last_batch=False)


@contextlib.contextmanager
def pipeline_settings(device: torch.device, bf16: bool) -> Iterator[None]:
    """The library's extraction settings (cuDNN benchmark as in ``extract_embeddings``, inference mode,
    optional bf16 autocast), restored afterwards."""
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = PIPELINE_CUDNN_BENCHMARK
    try:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark


def on_device_input(extractor, device, dataset: ArrayImageDataset, batch_size: int, bf16: bool, step=None) -> float:
    """Images per second of ``step`` (default: the whole extractor) over the dataset's batches, already on the
    device."""
    step = extractor if step is None else step
    batches = [dataset.batch(i, i + batch_size).to(device) for i in range(0, len(dataset), batch_size)]
    with pipeline_settings(device, bf16):
        step(batches[0])  # warm-up
        sync(device)
        start = time.perf_counter()
        done = sum(len(step(batch)) for batch in batches)
        sync(device)
    return done / (time.perf_counter() - start)


def protocol_path(extractor, device, dataset: ArrayImageDataset, batch_size: int, bf16: bool) -> float:
    sync(device)
    start = time.perf_counter()
    embeddings = extract_embeddings(extractor, dataset, batch_size, device, "bf16" if bf16 else "32")
    seconds = time.perf_counter() - start  # extract_embeddings ends with the copy to the CPU: synchronised
    return len(embeddings) / seconds


def dataloader_path(extractor, device, loader: DataLoader, bf16: bool) -> float:
    next(iter(loader))  # warm-up: the persistent workers start (and stay); the shapes are warm already
    with pipeline_settings(device, bf16):
        sync(device)
        start = time.perf_counter()
        chunks = [extractor(batch["image"].to(device, non_blocking=True)) for batch in loader]
        done = len(torch.cat(chunks))
        sync(device)
    return done / (time.perf_counter() - start)


class PassClock(Callback):
    """Seconds from the training pass's first batch to its epoch's end, and the images it read."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.seconds, self.images = device, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            sync(self.device)
            self.start = time.perf_counter()
        self.images += len(batch["image"])

    def on_train_epoch_end(self, trainer, module) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def module_fit(backbone: str, device, loader: DataLoader, size: int, bf16: bool) -> float:
    clock = PassClock(device)
    model = DN2Module(k=2, backbone=backbone, pretrained=False, input_size=size, threshold=1.0, reports=False)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "dn2_lightning")]  # the table alone on stdout
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice (workers, no optimizer) is not the figure
            trainer.fit(model, train_dataloaders=loader)
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return clock.images / clock.seconds


def time_paths(
    backbone: str, extractor, device, dataset: ArrayImageDataset, loader: DataLoader, p: dict, bf16: bool
) -> dict:
    """Images per second of every path, ``p["repeats"]`` rounds of each, the paths taking turns within a round."""
    size, batch = p["input_size"], p["batch_size"]
    warm_up(extractor, device, dataset, batch, bf16)
    paths = {
        "bare": functools.partial(bare_forward, extractor, device, len(dataset), batch, size, bf16),
        "preprocess": functools.partial(on_device_input, extractor, device, dataset, batch, bf16, extractor.preprocess),
        "on_device_input": functools.partial(on_device_input, extractor, device, dataset, batch, bf16),
        "protocol": functools.partial(protocol_path, extractor, device, dataset, batch, bf16),
        "dataloader": functools.partial(dataloader_path, extractor, device, loader, bf16),
        "module_fit": functools.partial(module_fit, backbone, device, loader, size, bf16),
    }
    rounds = {name: [] for name in paths}
    for _ in range(p["repeats"]):
        for name, path in paths.items():
            rounds[name].append(path())
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--bf16", action="store_true", help="also measure bfloat16 autocast")
    parser.add_argument("--batch_size", type=at_least(1), help="override the preset's batch size")
    parser.add_argument("--images", type=at_least(1), help="override the preset's image count (at most 60,000)")
    parser.add_argument("--repeats", type=at_least(1), help="override the preset's rounds (the table gives medians)")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    overrides = {"batch_size": args.batch_size, "images": args.images, "repeats": args.repeats}
    p.update({k: v for k, v in overrides.items() if v is not None})
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    require_device(parser, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    source = load_split("fashionmnist", "train")
    n = min(p["images"], len(source))
    dataset = ArrayImageDataset(source.images[:n], torch.zeros(n, dtype=torch.long))  # all normal, as a bank's
    loader = DataLoader(
        dataset,
        batch_size=p["batch_size"],
        num_workers=p["workers"],
        pin_memory=device.type == "cuda",
        persistent_workers=p["workers"] > 0,
    )
    print(
        f"device: {name}, torch {torch.__version__}, {p['input_size']} px, batch {p['batch_size']}, "
        f"{n} FashionMNIST train images, {p['workers']} DataLoader workers, median of {p['repeats']} rounds\n"
    )
    print(
        "| backbone | precision | bare forward (img/s) | preprocess only (img/s) | on-device input (img/s) | "
        "protocol path (img/s) | protocol / bare | DataLoader path (img/s) | DataLoader / bare | "
        "DN2Module fit (img/s) | fit / bare |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for backbone in args.backbones:
        extractor = build_backbone(backbone, pretrained=False, image_size=p["input_size"]).to(device).eval()
        for bf16 in [False, True] if args.bf16 else [False]:
            rounds = time_paths(backbone, extractor, device, dataset, loader, p, bf16)
            rate = {name: statistics.median(values) for name, values in rounds.items()}
            bare, preprocess, resident = rate["bare"], rate["preprocess"], rate["on_device_input"]
            protocol, loaded, fitted = rate["protocol"], rate["dataloader"], rate["module_fit"]
            precision = "bf16 autocast" if bf16 else "fp32"
            rows.append(
                {
                    "backbone": backbone,
                    "precision": precision,
                    "bare_img_per_s": bare,
                    "preprocess_img_per_s": preprocess,
                    "on_device_input_img_per_s": resident,
                    "protocol_img_per_s": protocol,
                    "dataloader_img_per_s": loaded,
                    "protocol_over_bare": protocol / bare,
                    "dataloader_over_bare": loaded / bare,
                    "on_device_input_over_bare": resident / bare,
                    "module_fit_img_per_s": fitted,
                    "module_fit_over_bare": fitted / bare,
                    "rounds_img_per_s": rounds,
                }
            )
            print(
                f"| {backbone} | {precision} | {bare:,.0f} | {preprocess:,.0f} | {resident:,.0f} | {protocol:,.0f} | "
                f"{100 * protocol / bare:.0f}% | "
                f"{loaded:,.0f} | {100 * loaded / bare:.0f}% | {fitted:,.0f} | {100 * fitted / bare:.0f}% |",
                flush=True,
            )
    if args.json is not None:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": name,
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "preset": args.preset,
            "settings": {**p, "images": n, "dataset": "fashionmnist train"},
            "cudnn_benchmark": {"bare": device.type == "cuda", "pipelines": PIPELINE_CUDNN_BENCHMARK},
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
