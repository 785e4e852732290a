"""Feature-extraction throughput: the whole data -> embedding path against the bare backbone forward.

    python benchmarks/extract_bench.py                   # GPU: 224 px, the issue's setting
    python benchmarks/extract_bench.py --preset cpu      # a laptop CPU: 64 px, fewer images

"bare forward" feeds random, already normalised, channels_last tensors that live on the device to the
trunk: the ceiling. "pipeline" is what ``DN2Module`` and ``embed_split`` run: FashionMNIST uint8 28x28
images from a DataLoader (workers, pinned memory) -> device -> resize + normalise on the device ->
trunk -> float32 embeddings. Random weights (speed does not depend on them). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from dn2_lightning.backbones import build_backbone
from dn2_lightning.data.datasets import ArrayImageDataset
from dn2_lightning.data.sources import load_split

PRESETS = {
    "gpu": {"input_size": 224, "images": 20_000, "batch_size": 512, "workers": 8},
    "cpu": {"input_size": 64, "images": 2_048, "batch_size": 256, "workers": 2},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(extractor, device, images: int, batch_size: int, size: int, bf16: bool) -> float:
    x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        extractor.trunk(x)  # warm-up (cuDNN autotuning, allocator)
        sync(device)
        start = time.perf_counter()
        for _ in range(images // batch_size):
            extractor.trunk(x)
        sync(device)
    return (images // batch_size) * batch_size / (time.perf_counter() - start)


def pipeline(extractor, device, images: int, batch_size: int, workers: int, bf16: bool) -> float:
    source = load_split("fashionmnist", "test")
    n = min(images, len(source))
    dataset = ArrayImageDataset(source.images[:n], source.labels[:n])
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for batch in loader:  # warm-up epoch: starts the workers
            extractor(batch["image"].to(device, non_blocking=True))
            break
        sync(device)
        start = time.perf_counter()
        done = 0
        for batch in loader:
            extractor(batch["image"].to(device, non_blocking=True)).cpu()
            done += len(batch["image"])
        sync(device)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--bf16", action="store_true", help="also measure bfloat16 autocast")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    device = torch.device("cuda" if args.preset == "gpu" else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}, torch {torch.__version__}, {p['input_size']} px, batch {p['batch_size']}, "
        f"{p['images']} images, {p['workers']} workers\n"
    )
    print("| backbone | precision | bare forward (img/s) | pipeline (img/s) | pipeline / bare |")
    print("|---|---|---:|---:|---:|")
    for backbone in args.backbones:
        extractor = build_backbone(backbone, pretrained=False, image_size=p["input_size"]).to(device).eval()
        for bf16 in [False, True] if args.bf16 else [False]:
            bare = bare_forward(extractor, device, p["images"], p["batch_size"], p["input_size"], bf16)
            full = pipeline(extractor, device, p["images"], p["batch_size"], p["workers"], bf16)
            print(
                f"| {backbone} | {'bf16 autocast' if bf16 else 'fp32'} | {bare:,.0f} | {full:,.0f} | "
                f"{100 * full / bare:.0f}% |"
            )


if __name__ == "__main__":
    main()
