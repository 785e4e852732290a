"""Anomaly-map benchmark (CPU): map throughput, peak memory, pixel AUROC and PRO on the synthetic-defect set.

For each input size the backbone features (global embeddings and the patch pyramid of efficientnet_lite0)
are extracted once; each configuration (patch bank, K) then runs in its own process, so its peak resident
memory is its own. Throughput counts the map stage only (image kNN for the K nearest images, exact patch
kNN, upsampling, smoothing), not the backbone.

    python benchmarks/maps_bench.py                       # prints a markdown table
    python benchmarks/maps_bench.py --figure benchmarks/results/maps_synthetic.png
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dn2_lightning.backbones import build_backbone
from dn2_lightning.data.one_class import OneClassDataModule
from dn2_lightning.data.synthetic import ensure_synthetic_defects
from dn2_lightning.knn import knn_distances
from dn2_lightning.maps import AnomalyMaps, embed_with_patches, pyramid_layers
from dn2_lightning.pixel_metrics import pixel_metrics

BACKBONE = "efficientnet_lite0"
# (input size, patch bank, K)
CONFIGS = [
    (128, "nearest_images", 10),
    (128, "nearest_images", 50),
    (128, "all", 0),
    (224, "nearest_images", 10),
]


def extract(root: Path, input_size: int, out: Path) -> None:
    """Embeddings, patches and masks of the synthetic set at ``input_size``, saved to ``out``."""
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=128, batch_size=32)
    dm.setup()
    backbone = build_backbone(BACKBONE, pretrained=True, image_size=input_size).eval()
    layers = pyramid_layers(backbone)
    result = {}
    for split, dataset in (("train", dm.train_dataset), ("test", dm.test_dataset)):
        loader = torch.utils.data.DataLoader(dataset, batch_size=32)
        parts = {"embeddings": [], "patches": [], "images": [], "masks": []}
        with torch.no_grad():
            for batch in loader:
                embeddings, patches = embed_with_patches(backbone, batch["image"], layers)
                parts["embeddings"].append(embeddings)
                parts["patches"].append(patches)
                parts["images"].append(batch["image"])
                if "gt_mask" in batch:
                    parts["masks"].append(batch["gt_mask"])
        result[split] = {name: torch.cat(values) for name, values in parts.items() if values}
    torch.save(result, out)


def run_one(features: Path, patch_bank: str, k: int, figure: str | None) -> dict:
    """One configuration in this process: build the patch bank, map every test image, score the maps."""
    data = torch.load(features, weights_only=True)
    train, test = data["train"], data["test"]
    backbone = build_backbone(BACKBONE, pretrained=False, image_size=8)  # only for the stage names
    head = AnomalyMaps(backbone, patch_bank=patch_bank, num_images=max(k, 1))
    head.start_collecting()
    head.collect(train["patches"], torch.arange(len(train["patches"])))
    head.finalize(torch.arange(len(train["patches"])))
    bank = train["embeddings"]

    def search(embeddings: torch.Tensor, count: int):  # neighbours as train indices, like DN2Module._search
        return knn_distances(embeddings, bank, count)

    size = tuple(test["images"].shape[-2:])
    start = time.perf_counter()
    maps = torch.cat(
        [
            head.maps_for(test["embeddings"][i : i + 8], test["patches"][i : i + 8], search, size)
            for i in range(0, len(test["patches"]), 8)
        ]
    )
    seconds = time.perf_counter() - start
    metrics = pixel_metrics(maps, test["masks"].bool())
    if figure:
        from dn2_lightning.maps.figures import save_map_figure
        from dn2_lightning.pixel_metrics import PixelResults

        results = PixelResults(torch.arange(len(maps)), maps, test["masks"].bool())
        scores = knn_distances(test["embeddings"], bank, 2).values.mean(1)
        save_map_figure(results, scores, lambda i: test["images"][i], figure)
    return {
        "images_per_s": len(maps) / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bank_rows": int(head.bank.patches.shape[0] * head.bank.patches.shape[1]),
        "channels": int(head.bank.patches.shape[2]),
        "grid": head.bank.grid,
        **{name: float(value) for name, value in metrics.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="synthetic set folder (default: the library's)")
    parser.add_argument("--figure", default=None, help="write the heatmap figure of the first configuration")
    parser.add_argument("--worker", nargs=3, metavar=("FEATURES", "PATCH_BANK", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.worker:
        features, patch_bank, k = args.worker
        print(json.dumps(run_one(Path(features), patch_bank, int(k), args.figure)))
        return
    root = ensure_synthetic_defects(args.root)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for input_size in sorted({c[0] for c in CONFIGS}):
            features = Path(tmp) / f"features-{input_size}.pt"
            extract(root, input_size, features)
            for size, patch_bank, k in CONFIGS:
                if size != input_size:
                    continue
                command = [sys.executable, __file__, "--worker", str(features), patch_bank, str(k)]
                if args.figure and not rows:
                    command += ["--figure", args.figure]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append((size, patch_bank, k, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"Synthetic-defect set at {root} ({BACKBONE}, kappa=1, sigma=4, maps at 128 x 128)\n")
    print("| input | grid | patch_bank | K | bank rows x C | maps/s | peak RSS (MiB) | pixel AUROC | PRO (0.3) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size, patch_bank, k, r in rows:
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        bank = f"{r['bank_rows']:,} x {r['channels']}"
        k_text = str(k) if patch_bank == "nearest_images" else "-"
        print(
            f"| {size} | {grid} | {patch_bank} | {k_text} | {bank} | {r['images_per_s']:.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r['pixel_auroc']:.4f} | {r['pro']:.4f} |"
        )


if __name__ == "__main__":
    main()
