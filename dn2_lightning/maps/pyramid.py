"""Multi-stage patch features of a backbone: global embeddings and a feature pyramid in one forward pass.

SPADE (Cohen & Hoshen, 2020) describes each image position by the concatenated activations of several
backbone stages, resized to the resolution of the first one. The stages are submodules of the
backbone's trunk, read with forward hooks that exist only during :func:`embed_with_patches`:

* torchvision ResNets: ``layer1``, ``layer2``, ``layer3`` (strides 4, 8, 16);
* EfficientNet-Lite: the last block at each of strides 4, 8 and 16 (``model._blocks.2``, ``.4`` and ``.10``
  for lite0: 24 + 40 + 112 = 176 channels);
* any other trunk: name its submodules (``layers=[...]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dn2_lightning.backbones import FeatureExtractor

RESNET_LAYERS = ("layer1", "layer2", "layer3")
PYRAMID_STRIDES = (4, 8, 16)
_PROBE_SIZE = 64


def pyramid_layers(backbone: FeatureExtractor) -> list[str]:
    """Default stage names (submodules of ``backbone.trunk``) for the patch pyramid.

    Raises:
        ValueError: the trunk is neither a ResNet nor an EfficientNet-Lite; the message lists its submodules.
    """
    trunk = backbone.trunk
    if all(hasattr(trunk, name) for name in RESNET_LAYERS):
        return list(RESNET_LAYERS)
    blocks = getattr(getattr(trunk, "model", None), "_blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return _last_block_per_stride(backbone, "model._blocks", blocks)
    names = [name for name, _ in trunk.named_modules() if name][:30]
    raise ValueError(
        f"no default patch pyramid for a {type(trunk).__name__} trunk: pass map_layers=[names of trunk "
        f"submodules, highest resolution first], e.g. from {names}."
    )


def _last_block_per_stride(backbone: FeatureExtractor, prefix: str, blocks: nn.ModuleList) -> list[str]:
    """The last block at each stride of :data:`PYRAMID_STRIDES`, found with one small probe forward."""
    heights: list[int] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: heights.append(out.shape[-2])) for b in blocks]
    device = next(backbone.parameters()).device
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone.trunk(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train(was_training)
    names = []
    for stride in PYRAMID_STRIDES:
        at_stride = [i for i, h in enumerate(heights) if h * stride == _PROBE_SIZE]
        if not at_stride:
            raise ValueError(f"the trunk has no block at stride {stride}; pass map_layers=[...] explicitly.")
        names.append(f"{prefix}.{at_stride[-1]}")
    return names


def check_layers(backbone: FeatureExtractor, layers: Sequence[str]) -> list[str]:
    """Validate stage names against the trunk's submodules."""
    available = dict(backbone.trunk.named_modules())
    if isinstance(layers, str) or not layers:
        raise ValueError(f"map_layers={layers!r} must be a non-empty list of trunk submodule names.")
    missing = [name for name in layers if name not in available]
    if missing:
        raise ValueError(
            f"map_layers {missing} are not submodules of the backbone trunk; some valid names: "
            f"{[n for n in available if n][:30]}."
        )
    repeated = sorted({name for name in layers if list(layers).count(name) > 1})
    if repeated:  # a stage twice would weigh its patch distances twice
        raise ValueError(f"map_layers={list(layers)!r} names {repeated} more than once; list each stage once.")
    return list(layers)


def embed_with_patches(backbone: FeatureExtractor, images: Tensor, layers: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Global embeddings and patch features of ``images`` from one forward pass of ``backbone``.

    Args:
        backbone: the DN2 feature extractor (its ``forward`` gives the global embedding).
        images: ``[B, C, H, W]`` uint8 or [0, 1] float images.
        layers: names of ``backbone.trunk`` submodules, highest resolution first.

    Returns:
        ``(embeddings [B, D], patches [B, sum of stage channels, h, w])``, float32, where ``h, w`` is the
        first stage's resolution; later stages are upsampled to it bilinearly.
    """
    modules = dict(backbone.trunk.named_modules())
    outputs: dict[str, Tensor] = {}
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
        for name in layers
    ]
    try:
        embeddings = backbone(images)
    finally:
        for hook in hooks:
            hook.remove()
    first = outputs[layers[0]]
    size = tuple(first.shape[-2:])
    stages = [
        outputs[name].float()
        if outputs[name].shape[-2:] == size
        else F.interpolate(outputs[name].float(), size=size, mode="bilinear", align_corners=False)
        for name in layers
    ]
    return embeddings, torch.cat(stages, 1).contiguous()
