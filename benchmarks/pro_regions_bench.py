"""PRO of thin defects: regions labelled on the mask file (then resized) against regions labelled after the resize.

Masks: 1024 x 1024, each with one scratch of 1-3 px drawn across it, in 4 of 5 images. Maps: at the loaded size
(224 or 256 px), a blurred response along the scratch that fades from one end to the other (half found), plus
noise. Three PROs (exact, FPR limit 0.3):

* reference: MVTec AD's own evaluation, the maps upsampled (bilinear) to the masks' 1024 px, regions labelled there;
* regions labelled on the 1024 px mask and resized with it (nearest), as the library now does (``gt_regions``);
* regions labelled after the mask was resized, the 8-connected pieces (what the library did before).

    python benchmarks/pro_regions_bench.py      # prints a markdown table
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2.functional import resize

from dn2_lightning.data.masks import mask_regions
from dn2_lightning.maps.spade import gaussian_blur
from dn2_lightning.pixel_metrics import label_regions, pro_score

NATIVE = 1024


def scratches(width: int, seed: int, n: int = 5) -> torch.Tensor:
    """``[n, 1, 1024, 1024]`` uint8 masks with one straight scratch each, the last image without."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n):
        mask = Image.new("L", (NATIVE, NATIVE))
        if i < n - 1:
            ends = rng.integers(60, NATIVE - 60, 4).tolist()
            ImageDraw.Draw(mask).line(ends, fill=1, width=width)
        masks.append(torch.from_numpy(np.array(mask))[None])
    return torch.stack(masks)


def fading_maps(masks: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Maps at ``size`` px: the scratch's response, fading along x, blurred, plus noise."""
    g = torch.Generator().manual_seed(seed)
    near = F.max_pool2d(masks.float(), 9, stride=1, padding=4)  # a response a little wider than the scratch
    near = F.interpolate(near, size=(size, size), mode="area")[:, 0]
    fade = torch.linspace(1.0, -0.2, size).clamp_min(0)[None, None, :]
    return gaussian_blur(near * fade, 2.0) + 0.05 * torch.rand(len(masks), size, size, generator=g)


def main() -> None:
    print("| scratch width (px at 1024) | loaded size | pieces after resize / scratches | PRO reference (1024 px) "
          "| labelled at 1024, resized (now) | labelled after resize (before) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for width in (1, 2, 3):
        for size in (224, 256):
            masks = scratches(width, seed=width)
            maps = fading_maps(masks, size, seed=size)
            upsampled = F.interpolate(maps[:, None], size=(NATIVE, NATIVE), mode="bilinear")[:, 0]
            native = masks[:, 0] != 0
            reference = pro_score(upsampled, native)
            regions = torch.cat([mask_regions(mask) for mask in masks])
            resized = resize(regions, [size, size], interpolation=InterpolationMode.NEAREST_EXACT)
            now = pro_score(maps, resized != 0, regions=resized)
            before = pro_score(maps, resized != 0)
            pieces = label_regions(resized != 0)[1]
            print(f"| {width} | {size} | {pieces} / {len(masks) - 1} | {reference:.4f} | {now:.4f} | {before:.4f} |")


if __name__ == "__main__":
    main()
