"""score_images' inputs as users hold them: every form of one image scores as trainer.predict scores its file, and
the forms it cannot read (or would read as another image) are named with a fix that gives the same score."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from PIL import Image

from dn2_lightning import DN2Module, OneClassDataModule
from dn2_lightning.data import load_image


def _pooled_conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )


def _photo(path: Path, rng: np.random.Generator, grey: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8)).resize((48, 40), Image.BILINEAR)
    (image.convert("L") if grey else image).save(path)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A folder bank at load_size 32 (files of 40 x 48), its test files (the last one grey) and their predict scores."""
    root = tmp_path_factory.mktemp("set")
    rng = np.random.default_rng(0)
    for i in range(9):
        _photo(root / "train" / "good" / f"{i}.png", rng)
    tests = [_photo(root / "test" / "good" / f"{i}.png", rng) for i in range(3)]
    tests.append(_photo(root / "test" / "good" / "grey.png", rng, grey=True))
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=32, batch_size=4)
    model = DN2Module(k=2, backbone=_pooled_conv(), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    predicted = torch.cat([out["score"] for out in trainer.predict(model, datamodule=dm)])
    assert [Path(p) for p in dm.predict_dataloader().dataset.paths] == tests
    return model, tests, predicted


def _close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=msg)


def test_tensor_layouts_and_dtypes_of_one_image_score_as_its_file(fitted):
    # (agreed before this audit; kept as a guard) channels-last and strided tensors, float16/float64, a tensor that
    # requires grad, a grey [1, H, W] tensor of a grey file, and a list mixing the forms
    model, tests, predicted = fitted
    uint8 = [load_image(path) for path in tests]
    forms = {
        "channels last": [u[None].contiguous(memory_format=torch.channels_last) for u in uint8],
        "strided": [torch.cat([u, u], -1)[..., : u.shape[-1]] for u in uint8],
        "float16": [u.half() / 255 for u in uint8],
        "float64": [u.double() / 255 for u in uint8],
        "requires grad": [(u.float() / 255).requires_grad_() for u in uint8],
        "mixed": [str(tests[0]), Image.open(tests[1]), uint8[2], uint8[3].float() / 255],
    }
    for name, images in forms.items():
        _close(model.score_images(images, batch_size=3).scores, predicted, msg=name)
    grey = torch.from_numpy(np.array(Image.open(tests[3])))[None]
    assert grey.shape[0] == 1
    _close(model.score_images(grey).scores, predicted[3:])
    _close(model.score_images(grey.float() / 255).scores, predicted[3:])


def test_a_uint8_tensor_of_zeros_and_ones_is_said_to_read_as_a_black_image(fitted):
    # a mask, or [0, 1] floats cast with .to(torch.uint8), was scored as a nearly black 0..255 image without a word
    model, tests, _ = fitted
    image = load_image(tests[0])
    mask = (image > 128).to(torch.uint8)
    with pytest.warns(UserWarning, match=r"images\[1\]: a uint8 tensor of 0s and 1s .* multiply 0/1 values by 255"):
        model.score_images([image, mask])
    with pytest.warns(UserWarning, match=r"a uint8 tensor of 0s and 1s"):
        model.score_images((image.float() / 255).round().to(torch.uint8))  # (truncated, all 0 here: a black frame)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*0s and 1s")
        as_white = model.score_images(mask * 255).scores  # the fix
        _close(as_white, model.score_images(mask.float()).scores)
        model.score_images(torch.zeros(3, 8, 8, dtype=torch.uint8))  # a black frame is an image


def test_a_bool_tensor_is_refused_with_a_fix_that_keeps_its_white(fitted):
    # the dtype message's images.to(torch.uint8) turned True into 1 of 255: the image read as black
    model, tests, _ = fitted
    mask = load_image(tests[0]) > 128
    with pytest.raises(ValueError, match=r"images\[0\]: a bool tensor .*item.to\(torch.uint8\) \* 255"):
        model.score_images(mask)
    _close(model.score_images(mask.to(torch.uint8) * 255).scores, model.score_images(mask.float()).scores)


def test_channels_last_tensors_and_numpy_arrays_are_refused_with_a_fix_that_scores_as_the_file(fitted):
    model, tests, predicted = fitted
    hwc = np.array(Image.open(tests[0]))  # [40, 48, 3]
    with pytest.raises(ValueError, match=r"images\[0\]: .*got \(40, 48, 3\) \(channels last .*permute\(2, 0, 1\)\)"):
        model.score_images(torch.from_numpy(hwc))
    _close(model.score_images(torch.from_numpy(hwc).permute(2, 0, 1)).scores, predicted[:1])
    batch = torch.from_numpy(np.stack([np.array(Image.open(path)) for path in tests[:3]]))
    with pytest.raises(ValueError, match=r"channels last .*permute\(0, 3, 1, 2\)"):
        model.score_images(batch)
    _close(model.score_images(batch.permute(0, 3, 1, 2)).scores, predicted[:3])
    with pytest.raises(ValueError, match=r"images\[0\]: cannot read a NumPy array; .*permute\(2, 0, 1\)"):
        model.score_images(hwc)
    grey = np.array(Image.open(tests[3]))  # [40, 48]
    with pytest.raises(ValueError, match=r"one grayscale image \[H, W\]\? item\[None\]"):
        model.score_images(torch.from_numpy(grey))
    _close(model.score_images(torch.from_numpy(grey)[None]).scores, predicted[3:])


def test_a_generator_is_refused_as_what_it_is_with_the_fix(fitted):
    # it was read as one item: "images[0]: cannot read a generator", as if its first image were at fault
    model, tests, predicted = fitted
    with pytest.raises(ValueError, match=r"^images is a generator; .*list\(images\)"):
        model.score_images(str(path) for path in tests)
    _close(model.score_images(list(str(path) for path in tests)).scores, predicted)
