"""Host memory and wall time of each stage of a large memory bank on the CPU (benchmarks/RESULTS.md section 15).

The bank is made cheap to build: a custom backbone (a fixed random ``Linear`` from a 3 x 4 x 4 uint8 image to
``--dim`` features) over a ``TensorDataset``, so every figure is the bank's own cost, not the backbone's. Each
stage's peak is the process's resident-set high-water mark (Linux ``VmHWM``, reset before the stage through
``/proc/self/clear_refs``) above its resident size when the stage starts; ``x bank`` divides it by the bank's
size (rows x dim x 4 bytes).

Stages: ``fit`` (collect, de-duplicate, set the bank, the threshold's leave-one-out scores of at most
``threshold_samples`` = 20,000 training images; ``--every_threshold_image`` adds a fit that scores all of them),
``save`` and ``load`` of its checkpoint, the first ``test`` of the loaded module (which prepares the bank for
search), a ``fit`` with ``clean_fraction=0.5`` on ``--clean_rows`` rows (the leave-one-out search over
``clean_k=200`` neighbours), and ``DN2Detector`` (``fit``, then three ``decision_function`` calls).

    python benchmarks/memory_bench.py --every_threshold_image   # 40k x 1280 (195 MiB bank), ~5 min on 2 cores
    python benchmarks/memory_bench.py --rows 10000 --clean_rows 4000 --queries 500   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_args import at_least
from lightning import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from dn2_lightning import DN2Detector, DN2Module

ROWS: list[str] = []
_LIBC = ctypes.CDLL("libc.so.6")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


@contextlib.contextmanager
def stage(name: str, rows: int, dim: int) -> Iterator[None]:
    gc.collect()
    _LIBC.malloc_trim(0)  # hand freed heap back, so that an earlier stage's leftovers do not hide this one's peak
    start = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size
    began = time.perf_counter()
    yield
    seconds = time.perf_counter() - began
    bank = rows * dim * 4 / 2**20
    rise = _status_mib("VmHWM") - start
    ROWS.append(f"| {name} | {rows:,} | {bank:.0f} | {rise:.0f} | {rise / bank:.2f} | {seconds:.1f} |")


class RandomFeatures(nn.Module):
    """A fixed random map from a 3 x 4 x 4 image to ``dim`` features (the same for every instance)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(48, dim)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(dim, 48, generator=generator) / 48**0.5)
            self.linear.bias.zero_()

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(images.flatten(1))


def images(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=generator)
    return TensorDataset(pixels, torch.zeros(n, dtype=torch.long))


def trainer(root: Path) -> Trainer:
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=root, **quiet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=at_least(3), default=40_000, help="training rows of the bank")
    parser.add_argument("--dim", type=at_least(1), default=1280, help="embedding dimension")
    parser.add_argument("--clean_rows", type=at_least(4), default=12_000, help="training rows of the cleaning fit")
    parser.add_argument("--queries", type=at_least(1), default=2000, help="test images")
    parser.add_argument(
        "--every_threshold_image",
        action="store_true",
        help="also fit with threshold_samples=None (every training image scored for the threshold: O(N^2))",
    )
    args = parser.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        parser.error("this benchmark reads Linux's /proc/self/status and /proc/self/clear_refs")
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    scratch = tempfile.TemporaryDirectory(prefix="dn2-memory-")
    root = Path(scratch.name)
    n, dim = args.rows, args.dim

    # one-time costs (imports, Lightning's first Trainer) before any measured stage
    trainer(root).fit(DN2Module(k=2, backbone=RandomFeatures(dim), reports=False), DataLoader(images(64, 0)))
    model = DN2Module(k=2, backbone=RandomFeatures(dim), reports=False)
    fit_trainer = trainer(root)
    with stage("fit", n, dim):
        fit_trainer.fit(model, DataLoader(images(n, 1), batch_size=1024))
    if args.every_threshold_image:
        every = DN2Module(k=2, backbone=RandomFeatures(dim), reports=False, threshold_samples=None)
        with stage("fit, threshold_samples=None", n, dim):
            trainer(root).fit(every, DataLoader(images(n, 1), batch_size=1024))
        del every
    ckpt = root / "bank.ckpt"
    with stage("save checkpoint", n, dim):  # as ModelCheckpoint saves: the fit's Trainer
        fit_trainer.save_checkpoint(ckpt)
    del model, fit_trainer
    with stage("load_from_checkpoint", n, dim):
        model = DN2Module.load_from_checkpoint(ckpt, backbone=RandomFeatures(dim))
    test = images(args.queries, 2)
    test.tensors = (test.tensors[0], torch.arange(args.queries) % 2)
    with stage(f"first test ({args.queries:,} images)", n, dim):
        trainer(root).test(model, DataLoader(test, batch_size=256), verbose=False)
    del model

    cleaning = DN2Module(k=2, backbone=RandomFeatures(dim), clean_fraction=0.5, reports=False)
    with stage("fit, clean_fraction=0.5", args.clean_rows, dim):
        trainer(root).fit(cleaning, DataLoader(images(args.clean_rows, 3), batch_size=1024))
    del cleaning

    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(4))
    queries = torch.randn(args.queries, dim, generator=torch.Generator().manual_seed(5))
    with stage("DN2Detector.fit", n, dim):
        detector = DN2Detector(k=2).fit(features)
    with stage(f"DN2Detector.decision_function x 3 ({args.queries:,} rows)", n, dim):
        for _ in range(3):
            detector.decision_function(queries)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    print("| stage | bank rows | bank MiB | peak above start, MiB | x bank | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
