"""Anomaly maps: exact patch search vs brute force, smoothing vs scipy, pyramids, masks, synthetic data,
and DN2Module(anomaly_maps=True) end to end against an independent reference."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import dn2_messages, quiet_trainer
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist
from torch import nn
from torch.utils.data import DataLoader

from dn2_lightning import DN2Module, OneClassDataModule, build_backbone
from dn2_lightning.data.masks import MaskedImageDataset, mvtec_mask_path
from dn2_lightning.data.synthetic import DEFECT_KINDS, add_defect, texture, write_synthetic_defects
from dn2_lightning.maps import (
    PatchBank,
    all_patch_scores,
    embed_with_patches,
    gaussian_blur,
    nearest_image_patch_scores,
    pyramid_layers,
    to_image_maps,
)
from dn2_lightning.maps.bank import ensure_room
from dn2_lightning.maps.figures import map_png_name
from dn2_lightning.pixel_metrics import pixel_auroc, pro_score
from dn2_lightning.reports import read_report

# ------------------------------------------------------------------------------- exact patch search


def brute_force_patch_scores(queries: torch.Tensor, bank: torch.Tensor, kappa: int) -> torch.Tensor:
    """float64 distance matrix by differences, mean of the kappa smallest."""
    d = ((queries.double()[:, None, :] - bank.double()[None, :, :]) ** 2).sum(-1)
    return d.topk(kappa, dim=1, largest=False).values.mean(1)


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("budget", [2**16, None])  # at these shapes both fit all four images in one chunk
def test_nearest_image_patch_scores_are_exact(kappa, budget):
    g = torch.Generator().manual_seed(kappa)
    train = torch.randn(9, 20, 6, generator=g) * 3 + 10  # offset: exactness must not depend on centring
    queries = torch.randn(3, 20, 6, generator=g) * 3 + 10
    train[4, 7] = queries[1, 2]  # an exact duplicate: distance 0
    neighbours = torch.tensor([[0, 4, 8, 2], [4, 1, 3, 5], [8, 7, 6, 0]])
    scores = nearest_image_patch_scores(queries, train, neighbours, kappa, max_memory_bytes=budget)
    for i in range(3):
        expected = brute_force_patch_scores(queries[i], train[neighbours[i]].reshape(-1, 6), kappa)
        torch.testing.assert_close(scores[i].double(), expected, rtol=1e-5, atol=1e-5)
    if kappa == 1:
        assert scores[1, 2] == 0


def test_nearest_image_patch_scores_merge_every_chunk_of_neighbour_images(monkeypatch):
    """64 positions x 64 channels: at 64 KiB a chunk holds one neighbour image, so each test image is searched in
    four chunks whose top-kappa lists are merged. Guards the chunk loop: stopping one chunk early dropped the
    last neighbour image's patches (scores up to 20 too high)."""
    import dn2_lightning.maps.spade as spade

    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(9, 64, 64, generator=g), torch.randn(3, 64, 64, generator=g)
    neighbours = torch.tensor([[0, 4, 8, 2], [4, 1, 3, 5], [8, 7, 6, 0]])
    searched, search = [], spade.knn_distances

    def spy(queries, bank, *args, **kwargs):
        searched.append(len(bank))
        return search(queries, bank, *args, **kwargs)

    monkeypatch.setattr(spade, "knn_distances", spy)
    scores = nearest_image_patch_scores(queries, train, neighbours, 1, max_memory_bytes=2**16)
    assert max(searched) < 4 * 64  # fewer images per chunk than neighbours
    for i in range(3):
        bank = train[neighbours[i]].reshape(-1, 64).double().numpy()
        expected = cdist(queries[i].double().numpy(), bank, "sqeuclidean").min(1)
        np.testing.assert_allclose(scores[i].double().numpy(), expected, rtol=1e-6)


def test_all_patch_scores_are_exact_and_equal_nearest_images_with_every_image():
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(7, 16, 5, generator=g), torch.randn(2, 16, 5, generator=g)
    scores = all_patch_scores(queries, train.reshape(-1, 5), kappa=2, max_memory_bytes=2**16)
    expected = torch.stack([brute_force_patch_scores(q, train.reshape(-1, 5), 2) for q in queries])
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    every = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(nearest_image_patch_scores(queries, train, every, kappa=2), scores)


def test_kappa_larger_than_the_neighbour_positions_is_refused():
    with pytest.raises(ValueError, match="map_kappa=9"):
        nearest_image_patch_scores(torch.zeros(1, 4, 2), torch.zeros(3, 4, 2), torch.tensor([[0, 1]]), kappa=9)


def test_map_settings_of_the_wrong_kind_and_maps_from_a_model_without_them_are_refused():
    with pytest.raises(ValueError, match=r"map_sigma=True must be a finite number >= 0"):
        DN2Module(backbone=nn.Flatten(), anomaly_maps=True, map_sigma=True)
    model = DN2Module(backbone=nn.Flatten())  # anomaly_maps=False: before, an AttributeError on None
    with pytest.raises(ValueError, match=r"score_with_maps needs a model built with anomaly_maps=True"):
        model.score_with_maps(None)


# ---------------------------------------------------------------------------------- upsample and blur


@pytest.mark.parametrize(
    ("shape", "sigma"),
    [((2, 30, 41), 4.0), ((1, 5, 7), 4.0), ((1, 12, 12), 1.5), ((1, 12, 12), 0.7)],  # 0.7: radius 2.8 rounds to 3
)
def test_gaussian_blur_matches_scipy_reflect(shape, sigma):
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    expected = np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in maps.double().numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_to_image_maps_upsamples_to_the_image_size():
    maps = to_image_maps(torch.rand(3, 8, 8), (32, 40), sigma=4.0)
    assert maps.shape == (3, 32, 40) and maps.dtype == torch.float32
    with pytest.raises(ValueError, match="map_sigma"):
        gaussian_blur(maps, -1.0)


# -------------------------------------------------------------------------------------------- pyramids


def test_resnet_pyramid_is_layer1_to_layer3_at_stride_4():
    backbone = build_backbone("resnet18", pretrained=False, image_size=64).eval()
    layers = pyramid_layers(backbone)
    assert layers == ["layer1", "layer2", "layer3"]
    images = torch.rand(2, 3, 50, 50)
    with torch.no_grad():
        embeddings, patches = embed_with_patches(backbone, images, layers)
        assert torch.equal(embeddings, backbone(images))
    assert patches.shape == (2, 64 + 128 + 256, 16, 16)


def test_efficientnet_lite_pyramid_takes_the_last_block_at_strides_4_8_16():
    backbone = build_backbone("efficientnet_lite0", pretrained=False, image_size=64).eval()
    layers = pyramid_layers(backbone)
    assert layers == ["model._blocks.2", "model._blocks.4", "model._blocks.10"]
    with torch.no_grad():
        _, patches = embed_with_patches(backbone, torch.rand(1, 3, 64, 64), layers)
    assert patches.shape == (1, 24 + 40 + 112, 16, 16)


def test_unknown_trunk_needs_map_layers_and_bad_names_are_listed():
    with pytest.raises(ValueError, match="map_layers"):
        DN2Module(backbone=tiny_conv(), anomaly_maps=True)
    with pytest.raises(ValueError, match="not submodules"):
        DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["7"])
    with pytest.raises(ValueError, match=r"names \['1'\] more than once"):  # was accepted: its distances weighed twice
        DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "1"])
    with pytest.raises(ValueError, match="patch_bank='some'"):
        DN2Module(backbone=tiny_conv(), patch_bank="some")
    with pytest.raises(ValueError, match="bank_sharding='replicate'"):
        DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1"], bank_sharding="shard")


# ---------------------------------------------------------------------------------------- patch bank


def test_patch_bank_round_trips_through_a_state_dict_and_maps_indices_to_rows():
    bank = PatchBank()
    patches = torch.randn(4, 3, 2, 5)
    bank.set(patches, torch.tensor([9, 2, 5, 7]))
    restored = PatchBank()
    restored.load_state_dict(bank.state_dict())
    assert restored.grid == (2, 5) and torch.equal(restored.patches, bank.patches)
    assert restored.rows_of(torch.tensor([[7, 2]])).tolist() == [[2, 0]]
    # rows are centred, the centre is kept: the original features come back
    row = restored.patches[restored.rows_of(torch.tensor([9]))[0]] + restored.center
    torch.testing.assert_close(row, patches[0].permute(1, 2, 0).reshape(10, 3))
    with pytest.raises(ValueError, match="not in the patch bank"):
        restored.rows_of(torch.tensor([3]))


def test_a_bank_larger_than_the_machine_fails_before_the_search_with_its_size():
    with pytest.raises(MemoryError, match=r"needs 1024\.00 GiB .*patch_bank='nearest_images'"):
        ensure_room(2**40, torch.device("cpu"), "the patch bank")
    ensure_room(2**20, torch.device("cpu"), "the patch bank")  # fits: no error


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="the reference is Linux's /proc/meminfo")
def test_the_host_memory_figure_is_what_the_kernel_calls_available():
    """The check once read /proc/meminfo itself and knew nothing on Windows (no check at all) and only the
    physical memory on macOS; psutil reports the available memory on all three. On Linux it must be the
    kernel's MemAvailable (the figure moves while the test runs: 64 MiB of slack)."""
    from dn2_lightning.maps.bank import _host_available_bytes

    with open("/proc/meminfo") as f:
        kernel = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(_host_available_bytes() - kernel) < 2**26
    with pytest.raises(MemoryError, match=r"only [0-9.]+ GiB are available"):
        ensure_room(kernel + 2**30, torch.device("cpu"), "the patch bank")


# ----------------------------------------------------------------------------- masks and synthetic data


def test_synthetic_defects_are_deterministic_and_masks_are_exactly_the_painted_pixels(tmp_path):
    for kind in DEFECT_KINDS:
        rng = np.random.default_rng(3)
        image = texture(rng, 64)
        out, mask = add_defect(image, kind, rng)
        changed = np.abs(out - image).max(-1) > 0
        assert mask.any() and not (changed & ~mask).any()
        assert changed[mask].mean() > 0.9  # (a painted value may equal the old one by chance)
    a = write_synthetic_defects(tmp_path / "a", n_train=2, n_test_good=1, n_test_per_kind=1, image_size=32)
    b = write_synthetic_defects(tmp_path / "b", n_train=2, n_test_good=1, n_test_per_kind=1, image_size=32)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 + 1 + 3 * 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _synthetic_pngs(root: Path, folder: str) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / folder).glob("*.png"))}


def test_synthetic_test_images_are_new_textures_not_copies_of_training_or_normal_test_images(tmp_path):
    """test/good images drawn from the train streams would be copies of training images; defect kinds numbered from
    0 would paint the first kind's defects on the normal test images."""
    root = write_synthetic_defects(tmp_path / "set", n_train=3, n_test_good=3, n_test_per_kind=2, image_size=32)
    train, good = _synthetic_pngs(root, "train/good"), _synthetic_pngs(root, "test/good")
    assert len(train) == 3 and len(good) == 3
    for name, image in good.items():
        assert not any(np.array_equal(image, seen) for seen in train.values()), f"test/good/{name} is a train image"
    for kind in DEFECT_KINDS:
        for name, image in _synthetic_pngs(root, f"test/{kind}").items():
            mask = np.asarray(Image.open(root / "ground_truth" / kind / name.replace(".png", "_mask.png"))) > 0
            for seen in [*train.values(), *good.values()]:  # outside its defect, a defective image is its own texture
                assert not np.array_equal(image[~mask], seen[~mask]), f"test/{kind}/{name} copies a normal image"


def test_synthetic_masks_are_written_as_mvtec_ad_masks_255_on_0(tmp_path):
    """The library reads any non-zero value as defect, so its own metrics cannot tell 0/1 masks, but the files must
    follow the MVTec AD format (255 = defect, 0 = normal) that other tools read."""
    root = write_synthetic_defects(tmp_path / "set", n_train=1, n_test_good=1, n_test_per_kind=2, image_size=32)
    for kind in DEFECT_KINDS:
        for path in sorted((root / "ground_truth" / kind).glob("*_mask.png")):
            mask = Image.open(path)
            assert mask.mode == "L" and set(np.unique(np.asarray(mask)).tolist()) == {0, 255}, path


def test_folder_data_reads_mvtec_masks_resized_to_the_images(tmp_path):
    root = write_synthetic_defects(tmp_path / "set", n_train=2, n_test_good=2, n_test_per_kind=1, image_size=32)
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=48, batch_size=4)
    dm.setup()
    assert isinstance(dm.test_dataset, MaskedImageDataset) and dm.source_paths("test")
    for i in range(len(dm.test_dataset)):
        sample = dm.test_dataset[i]
        mask = sample["gt_mask"]
        assert mask.shape == (48, 48) and mask.dtype == torch.uint8 and set(mask.unique().tolist()) <= {0, 1}
        assert bool(mask.any()) == bool(sample["label"])  # normal images: all zero; defects: a mask
        if sample["label"]:
            saved = np.asarray(Image.open(mvtec_mask_path(root, sample["path"]))) > 0
            nearest = F.interpolate(torch.from_numpy(saved)[None, None].float(), size=(48, 48), mode="nearest-exact")
            assert torch.equal(mask.bool(), nearest[0, 0].bool())
    batch = next(iter(dm.test_dataloader()))
    assert batch["gt_mask"].shape == (4, 48, 48)
    (root / "ground_truth" / "blob" / "000_mask.png").unlink()
    with pytest.raises(ValueError, match="1 ground-truth mask"):
        OneClassDataModule(dataset="folder", root=str(root)).setup()


def _mvtec_folder(
    root: Path, kind: str = "hole", size: tuple[int, int] = (40, 60), counts: tuple[int, int] = (3, 1), levels=(0, 255)
) -> Path:
    """train/good (3 noise PNGs), test/good (1), and empty test/<kind> and ground_truth/<kind> folders."""
    rng = np.random.default_rng(0)
    for folder, n in zip(("train/good", "test/good"), counts, strict=True):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(*levels, (*size, 3), dtype=np.uint8)).save(root / folder / f"{i:03d}.png")
    (root / "test" / kind).mkdir(parents=True)
    (root / "ground_truth" / kind).mkdir(parents=True)
    return root


def _exif_rotated_jpeg(path: Path, stored: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95)


def test_a_mask_drawn_on_the_stored_grid_of_an_exif_rotated_photo_is_refused_an_upright_one_aligns(tmp_path):
    """A phone photo stored 60 x 40 with EXIF orientation 6 is loaded upright (40 x 60); a mask made with
    np.array(Image.open(photo)) follows the stored grid and would be squashed onto the upright image unrotated."""
    root = _mvtec_folder(tmp_path / "set")
    stored = np.full((40, 60, 3), 40, np.uint8)
    stored[5:15, 40:55] = 250  # the defect, in stored (unrotated) pixels
    _exif_rotated_jpeg(root / "test" / "hole" / "000.jpg", stored, 6)
    stored_mask = np.zeros((40, 60), np.uint8)
    stored_mask[5:15, 40:55] = 255
    Image.fromarray(stored_mask).save(root / "ground_truth" / "hole" / "000_mask.png")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=48)
    with pytest.raises(ValueError, match=r"60 x 40 mask for a 40 x 60 .*EXIF orientation 6.*ROTATE_270"):
        dm.setup()
    upright_mask = Image.fromarray(stored_mask).transpose(Image.Transpose.ROTATE_270)
    upright_mask.save(root / "ground_truth" / "hole" / "000_mask.png")
    dm.setup()  # the same datamodule, set up again after the error: with its masks this time
    sample = next(dm.test_dataset[i] for i in range(len(dm.test_dataset)) if dm.test_dataset[i]["label"] == 1)
    bright = sample["image"].float().mean(0) > 150
    assert (bright & sample["gt_mask"].bool()).sum() > 0.8 * sample["gt_mask"].sum() > 0  # mask on the defect
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(root / "ground_truth" / "hole" / "000_mask.png")
    with pytest.raises(ValueError, match="50 x 50 mask for a 40 x 60 .*not the image's shape"):
        OneClassDataModule(dataset="folder", root=str(root), load_size=48).setup()


@pytest.mark.parametrize("orientation, size, said", [(3, (40, 60), True), (2, (40, 60), True), (6, (50, 50), True),
                                                     (6, (60, 40), False), (1, (40, 60), False)])  # fmt: skip
def test_a_mask_whose_shape_cannot_confirm_the_exif_orientation_is_said(tmp_path, orientation, size, said):
    """A half turn or a flip (or a quarter turn of a square photo) keeps the shape: a mask drawn on the stored pixels
    would land elsewhere, and its shape cannot show it. A quarter turn of a 40 x 60 photo is checked by the shape."""
    root = _mvtec_folder(tmp_path / "set")
    _exif_rotated_jpeg(root / "test" / "hole" / "000.jpg", np.full((*size, 3), 40, np.uint8), orientation)
    upright = size[::-1] if orientation in (5, 6, 7, 8) else size
    Image.fromarray(np.full(upright, 255, np.uint8)).save(root / "ground_truth" / "hole" / "000_mask.png")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    messages = [str(w.message) for w in caught if "EXIF orientation that turns them" in str(w.message)]
    assert len(messages) == (1 if said else 0)
    if said:
        assert f"000.jpg: orientation {orientation}" in messages[0]


def test_a_full_size_mask_of_a_downscaled_image_is_accepted_and_a_ground_truth_in_capitals_warned(tmp_path):
    root = _mvtec_folder(tmp_path / "set")
    Image.fromarray(np.full((68, 100, 3), 90, np.uint8)).save(root / "test" / "hole" / "000.png")  # 1024 x 700 / 10.24
    Image.fromarray(np.zeros((700, 1024), np.uint8)).save(root / "ground_truth" / "hole" / "000_mask.png")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=32)
    dm.setup()
    assert isinstance(dm.test_dataset, MaskedImageDataset)
    (root / "ground_truth").rename(root / "Ground_Truth")
    with pytest.warns(UserWarning, match=r"no ground_truth folder but has \['Ground_Truth'\]"):
        OneClassDataModule(dataset="folder", root=str(root)).setup()


def test_pro_weighs_a_thin_scratch_as_one_defect_not_as_the_pieces_a_resize_leaves(tmp_path):
    """A 3 px scratch drawn on 256 px images falls apart into pieces when the mask is resized to the 32 px the maps
    have: PRO's regions are those of the drawn mask (one per scratch), not every piece as a defect of its own."""
    from PIL import ImageDraw
    from scipy.ndimage import label

    root = _mvtec_folder(tmp_path / "set", "scratch", size=(256, 256), counts=(4, 2), levels=(90, 110))
    rng = np.random.default_rng(1)
    for i, line in enumerate([(10, 20, 245, 100), (40, 230, 200, 10)]):
        image, mask = Image.fromarray(rng.integers(90, 110, (256, 256, 3), dtype=np.uint8)), Image.new("L", (256, 256))
        ImageDraw.Draw(image).line(line, fill=(255, 255, 255), width=9)
        ImageDraw.Draw(mask).line(line, fill=255, width=3)
        image.save(root / "test" / "scratch" / f"{i:03d}.png")
        mask.save(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=32, batch_size=3)
    dm.setup()
    for sample in (dm.test_dataset[i] for i in range(len(dm.test_dataset))):
        if sample["label"] == 1:  # one region, in pieces after the resize
            assert sample["gt_regions"].unique().tolist() == [0, 1]
            assert torch.equal(sample["gt_mask"], (sample["gt_regions"] != 0).to(torch.uint8))
            assert label(sample["gt_mask"].numpy(), structure=np.ones((3, 3)))[1] > 2
        else:
            assert not sample["gt_regions"].any() and not sample["gt_mask"].any()

    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False)
    results = quiet_trainer().test(model, datamodule=dm)[0]
    maps = model.maps.test_results
    # the reference: each image's anomalous pixels as one region, as drawn
    one_per_scratch = pro_score(maps.maps, maps.masks, thresholds=1000, regions=maps.masks.int())
    pieces = pro_score(maps.maps, maps.masks, thresholds=1000)
    assert results["test/pro"] == pytest.approx(one_per_scratch, abs=1e-6)
    assert abs(one_per_scratch - pieces) > 1e-3, (one_per_scratch, pieces)  # same thresholds: the regions differ
    assert torch.equal(maps.regions != 0, maps.masks)


@pytest.mark.parametrize("saved_as", ["000_mask.PNG", "000.png"])
def test_a_mask_saved_under_a_near_miss_of_its_name_is_named_in_the_missing_mask_error(tmp_path, saved_as):
    """A mask saved as 000_mask.PNG or 000.png was reported "missing .../000_mask.png" with no word of the file
    that is there (a reviewer looked for the fault in the image folder)."""
    root = _mvtec_folder(tmp_path / "set")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "test" / "hole" / "000.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(root / "ground_truth" / "hole" / saved_as)
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(root / "test" / "hole" / "0001.png")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(root / "ground_truth" / "hole" / "0001_mask.png")  # 0001's
    expected = re.escape(f"hole/000_mask.png (in {root / 'ground_truth' / 'hole'}, found instead: {saved_as}).")
    with pytest.raises(ValueError, match=f"1 ground-truth mask\\(s\\) missing: .*{expected} Every anomalous"):
        OneClassDataModule(dataset="folder", root=str(root), load_size=40).setup()


def test_masks_of_images_in_subfolders_mirror_them_and_a_shared_mask_is_refused(tmp_path):
    root = _mvtec_folder(tmp_path / "set")
    for line, (top, left) in (("lineA", (2, 2)), ("lineB", (25, 45))):
        image = np.full((40, 60, 3), 40, np.uint8)
        image[top : top + 10, left : left + 10] = 250
        (root / "test" / "hole" / line).mkdir()
        Image.fromarray(image).save(root / "test" / "hole" / line / "000.png")
    with pytest.raises(ValueError, match="2 ground-truth mask"):  # each missing mirrored mask listed once
        OneClassDataModule(dataset="folder", root=str(root), load_size=40).setup()
    flat = np.zeros((40, 60), np.uint8)
    flat[2:12, 2:12] = 255  # lineA's defect only
    Image.fromarray(flat).save(root / "ground_truth" / "hole" / "000_mask.png")
    with pytest.raises(ValueError, match=r"000_mask.png for \[.*lineA/000.png.*lineB/000.png"):
        OneClassDataModule(dataset="folder", root=str(root), load_size=40).setup()  # was: both took lineA's
    for line, (top, left) in (("lineA", (2, 2)), ("lineB", (25, 45))):
        mask = np.zeros((40, 60), np.uint8)
        mask[top : top + 10, left : left + 10] = 255
        (root / "ground_truth" / "hole" / line).mkdir()
        Image.fromarray(mask).save(root / "ground_truth" / "hole" / line / "000_mask.png")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=40)
    dm.setup()
    defects = [dm.test_dataset[i] for i in range(len(dm.test_dataset)) if dm.test_dataset[i]["label"] == 1]
    assert len(defects) == 2
    for sample in defects:  # each image's own defect: IoU of the mask with the bright square
        bright, mask = sample["image"].float().mean(0) > 150, sample["gt_mask"].bool()
        assert (bright & mask).sum() / (bright | mask).sum() > 0.7, sample["path"]


def test_part_png_and_part_jpg_cannot_share_one_mask(tmp_path):
    root = _mvtec_folder(tmp_path / "set")
    for suffix in ("png", "jpg"):
        Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(root / "test" / "hole" / f"part.{suffix}")
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(root / "ground_truth" / "hole" / "part_mask.png")
    with pytest.raises(ValueError, match="part.png and part.jpg share one"):
        OneClassDataModule(dataset="folder", root=str(root)).setup()


def test_a_misnamed_ground_truth_folder_is_named_in_a_warning(tmp_path):
    root = _mvtec_folder(tmp_path / "set")
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(root / "test" / "hole" / "000.png")
    (root / "ground_truth").rename(root / "groundtruth")
    with pytest.warns(UserWarning, match=r"no ground_truth folder but has \['groundtruth'\]"):
        OneClassDataModule(dataset="folder", root=str(root)).setup()


# ------------------------------------------------------------------------------------ DN2Module + maps


def tiny_conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 10, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "set"
    return write_synthetic_defects(root, n_train=12, n_test_good=3, n_test_per_kind=2, image_size=32)


def reference_maps(model: DN2Module, dm: OneClassDataModule, num_images: int, kappa: int, sigma: float) -> np.ndarray:
    """SPADE computed independently: stages by slicing the Sequential, float64 numpy distances, scipy blur."""
    backbone = model.backbone

    def features(dataset):
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        with torch.no_grad():
            x = backbone.preprocess(images)
            f1, f2 = backbone.trunk[:2](x), backbone.trunk[:4](x)
            f2 = F.interpolate(f2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
            patches = torch.cat([f1, f2], 1).permute(0, 2, 3, 1).flatten(1, 2)
            return backbone.trunk(x).double().numpy(), patches.double().numpy(), f1.shape[-2:], images.shape[-2:]

    train_emb, train_patches, _, _ = features(dm.train_dataset)
    test_emb, test_patches, grid, size = features(dm.test_dataset)
    out = []
    for emb, patches in zip(test_emb, test_patches, strict=True):
        nearest = np.argsort(((train_emb - emb) ** 2).sum(1), kind="stable")[:num_images]
        bank = train_patches[nearest].reshape(-1, patches.shape[-1])
        d = ((patches[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
        scores = np.sort(d, axis=1)[:, :kappa].mean(1).reshape(tuple(grid))
        up = F.interpolate(torch.from_numpy(scores)[None, None], size=tuple(size), mode="bilinear")[0, 0]
        out.append(gaussian_filter(up.numpy(), sigma, mode="reflect", truncate=4.0))
    return np.stack(out)


def test_test_logs_pixel_metrics_of_maps_equal_to_an_independent_reference(small_set):
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, map_kappa=2)
    results = quiet_trainer().test(model, datamodule=dm)[0]
    maps = model.maps.test_results
    assert maps.maps.shape == (len(dm.test_dataset), 32, 32)
    expected = reference_maps(model, dm, num_images=4, kappa=2, sigma=4.0)
    np.testing.assert_allclose(maps.maps.numpy(), expected, rtol=1e-4, atol=1e-5 * expected.max())
    assert results["test/pixel_auroc"] == pytest.approx(pixel_auroc(maps.maps, maps.masks), abs=1e-6)
    assert results["test/pro"] == pytest.approx(pro_score(maps.maps, maps.masks, thresholds=1000), abs=1e-6)
    assert "test/auroc" in results

    every = DN2Module(
        backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_kappa=2, patch_bank="all", reports=False
    )
    quiet_trainer().test(every, datamodule=dm)
    with_all_images = reference_maps(model, dm, num_images=len(dm.train_dataset), kappa=2, sigma=4.0)
    np.testing.assert_allclose(every.maps.test_results.maps.numpy(), with_all_images, rtol=1e-4, atol=1e-5)


def test_a_test_set_without_masks_says_why_it_has_no_pixel_metrics(small_set, tmp_path):
    import shutil

    root = shutil.copytree(small_set, tmp_path / "set")
    shutil.rmtree(root / "ground_truth")
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False)
    with dn2_messages() as messages:
        results = quiet_trainer().test(model, datamodule=dm)[0]
    assert "test/auroc" in results and "test/pixel_auroc" not in results
    assert any("pixel AUROC and PRO are not computed" in m for m in messages)


def test_fit_checkpoint_predict_returns_the_same_maps_and_writes_pngs(small_set, tmp_path):
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    options = dict(anomaly_maps=True, map_layers=["1", "3"], map_images=3)
    model = DN2Module(backbone=tiny_conv(), **options)
    trainer = quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    assert len(model.maps.bank) == len(dm.train_dataset) and model.maps.bank.grid == (16, 16)
    trainer.test(model, datamodule=dm)
    assert (tmp_path / "dn2_reports" / "test_0" / "figures" / "anomaly_maps.png").is_file()  # beside the CSV
    tested = model.maps.test_results.maps

    restored = DN2Module.load_from_checkpoint(trainer.checkpoint_callback.best_model_path, backbone=tiny_conv(1))
    assert torch.equal(restored.maps.bank.patches, model.maps.bank.patches)
    predict_dir = tmp_path / "predict"
    batches = quiet_trainer(default_root_dir=predict_dir).predict(restored, datamodule=dm)
    predicted = torch.cat([b["anomaly_map"] for b in batches])
    torch.testing.assert_close(predicted, tested)
    pngs = sorted((predict_dir / "dn2_reports" / "predict_0" / "anomaly_maps").glob("*.png"))
    assert len(pngs) == len(dm.test_dataset) and pngs[0].name == "0_blob_000.png"
    # one image at a time, from its file, as a user without a datamodule does: the same scores and maps
    result = restored.score_images(dm.source_paths("test"))
    torch.testing.assert_close(result.anomaly_maps, predicted)
    torch.testing.assert_close(result.scores, torch.cat([b["score"] for b in batches]))


def test_predicted_maps_get_one_file_per_image_and_every_map_file_is_listed(small_set, tmp_path):
    new = tmp_path / "new"  # same stem in one folder; same folder name and file name under two parents
    for i, name in enumerate(["a/x/0.png", "b/x/0.png", "x/part.png", "x/part.jpg"]):
        (new / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 50 * i, dtype=np.uint8)).save(new / name)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3)
    trainer = quiet_trainer(default_root_dir=tmp_path / "runs")
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    trainer.fit(model, datamodule=dm)
    with dn2_messages() as messages:
        trainer.test(model, datamodule=dm)
        trainer.predict(model, datamodule=OneClassDataModule(dataset="folder", root=str(new), load_size=32))
    text = "\n".join(messages)
    run = tmp_path / "runs" / "dn2_reports" / "predict_0"
    rows = read_report(run / "predictions.csv")
    assert len(rows) == 4
    expected = {f"{r['index']}_{Path(r['path']).parent.name}_{Path(r['path']).stem}.png" for r in rows}
    assert {p.name for p in (run / "anomaly_maps").iterdir()} == expected  # one map per CSV row
    assert f"{run / 'anomaly_maps'}{os.sep} (4 PNG files)" in text
    assert str(tmp_path / "runs" / "dn2_reports" / "test_0" / "figures" / "anomaly_maps.png") in text


def test_the_reports_of_a_model_with_maps_give_pixel_auroc_pro_and_the_map_files(small_set, tmp_path):
    """summary.json and the report line printed at the end of a test gave the image AUROC only: no pixel AUROC or
    PRO (logged as test/pixel_auroc, test/pro), and summary.json named no anomaly-map file."""
    import json

    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    with dn2_messages() as messages:
        results = trainer.test(model, datamodule=dm)[0]
        trainer.predict(model, datamodule=dm)
    tested, predicted = tmp_path / "dn2_reports" / "test_0", tmp_path / "dn2_reports" / "predict_0"
    summary = json.loads((tested / "summary.json").read_text())
    assert summary["pixel_auroc"] == pytest.approx(results["test/pixel_auroc"], abs=1e-6)
    assert summary["pro"] == pytest.approx(results["test/pro"], abs=1e-6)
    assert summary["files"]["anomaly_maps"] == str(tested / "figures" / "anomaly_maps.png")
    line = next(m for m in messages if m.startswith("DN2 test report: "))
    expected = f", AUROC {summary['auroc']:.4f}, pixel AUROC {summary['pixel_auroc']:.4f}, PRO {summary['pro']:.4f}."
    assert expected in line, line
    assert str(tested / "figures" / "anomaly_maps.png") in line
    summary = json.loads((predicted / "summary.json").read_text())
    assert summary["files"]["anomaly_map_pngs"] == str(predicted / "anomaly_maps")
    assert "pixel_auroc" not in summary and "pro" not in summary  # no masks to measure against

    plain = DN2Module(backbone=tiny_conv())  # no maps: the summary's keys and the line as before
    quiet_trainer(default_root_dir=tmp_path / "plain").test(plain, datamodule=dm)
    summary = json.loads((tmp_path / "plain" / "dn2_reports" / "test_0" / "summary.json").read_text())
    assert "pixel_auroc" not in summary and "pro" not in summary and "anomaly_maps" not in summary["files"]


def test_a_run_ended_by_an_exception_leaves_nothing_in_the_next_runs_summary(small_set, tmp_path):
    """Lightning calls no callback teardown after an exception: a test that failed after its reports were written
    left its report pending, and the next run's summary.json named the failed run's anomaly-map figure."""
    import json

    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)

    def interrupted() -> None:
        raise RuntimeError("interrupted after the reports")

    model.on_test_end = interrupted
    with pytest.raises(RuntimeError, match="interrupted after the reports"):
        trainer.test(model, datamodule=dm)
    del model.on_test_end
    trainer.predict(model, datamodule=dm)
    predicted = tmp_path / "dn2_reports" / "predict_0"
    files = json.loads((predicted / "summary.json").read_text())["files"]
    assert "anomaly_maps" not in files, files  # the failed test's figure
    assert files["anomaly_map_pngs"] == str(predicted / "anomaly_maps")


def test_out_of_memory_with_anomaly_maps_names_what_to_lower(small_set):
    """The maps' backbone pass (embeddings and patch features at once, the most memory) gave torch's message alone."""
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=3, reports=False)
    quiet_trainer().fit(model, datamodule=dm)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB.")

    model.backbone.forward = out_of_memory
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)GiB.*a batch of 2 images.*--data.batch_size"):
        model.score_images(images)
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)GiB.*a batch of 5 images.*--data.batch_size"):
        quiet_trainer().test(model, datamodule=dm)


def test_a_map_is_drawn_over_the_original_image_at_its_own_size():
    from dn2_lightning.maps import map_overlay

    anomaly_map = torch.zeros(224, 224)
    anomaly_map[:, 168:] = 5.0  # hot in the right quarter of the loaded (squashed) image
    original = torch.full((3, 200, 300), 128, dtype=torch.uint8)  # H x W = 200 x 300
    overlay = map_overlay(original, anomaly_map)
    assert overlay.shape == (200, 300, 3)
    red = overlay[..., 0].astype(int) - overlay[..., 2].astype(int)
    assert (red[:, 230:] > 50).all() and (red[:, :220] < 0).all()  # the hot quarter lands on the right quarter
    with pytest.raises(ValueError, match=r"one image \[C, H, W\] and its map"):
        map_overlay(original[None], anomaly_map)


def test_map_png_names_are_unique_and_readable():
    # two legal 150-byte names made one of 300+: "File name too long", and predict wrote no predictions.csv
    long = map_png_name(12, "/data/" + "é" * 75 + "/" + "x" * 150 + ".png")
    assert long.startswith("12_é") and len(long.encode()) <= 200 and long.isprintable()
    odd = map_png_name(13, "/" + "é" * 150 + ".png")  # "13_" + 2-byte characters: byte 200 splits one
    assert len(odd.encode()) == 199 and odd == "13_" + "é" * 98
    assert map_png_name(3, "/data/test/scratch/000.png") == "3_scratch_000"
    assert map_png_name(4, "part.png") == "4_part" and map_png_name(5) == "5"
    names = [map_png_name(i, p) for i, p in enumerate(["x/part.png", "x/part.jpg", "a/x/0.png", "b/x/0.png"])]
    assert len(set(names)) == 4


def test_group_batches_have_no_maps():
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1"])
    with pytest.raises(ValueError, match="group batches have no map"):
        model.maps.embed(model.backbone, torch.zeros(2, 3, 3, 8, 8))


def test_efficientnet_maps_find_the_synthetic_defects(tmp_path):
    """The real thing, small: ImageNet features put the pasted defects where the masks are."""
    root = write_synthetic_defects(tmp_path / "set", n_train=30, n_test_good=4, n_test_per_kind=4, image_size=64)
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=64, batch_size=16)
    model = DN2Module(backbone="efficientnet_lite0", input_size=96, anomaly_maps=True, map_images=10, reports=False)
    results = quiet_trainer().test(model, datamodule=dm)[0]
    assert results["test/pixel_auroc"] > 0.9
    assert results["test/pro"] > 0.7


def test_cli_synthetic_config_logs_pixel_metrics_and_writes_map_pngs(tmp_path):
    from dn2_lightning.cli import build_cli

    root = write_synthetic_defects(tmp_path / "set", n_train=20, n_test_good=3, n_test_per_kind=2, image_size=64)
    common = [
        "--config",
        "configs/synthetic_defects.yaml",
        f"--data.root={root}",  # a set already there is used as it is
        "--model.input_size=64",
        "--model.map_images=5",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    cli = build_cli(["test", *common, f"--trainer.default_root_dir={tmp_path / 'test'}"])
    metrics = cli.trainer.callback_metrics
    assert 0.5 < metrics["test/pixel_auroc"].item() <= 1.0 and 0.0 < metrics["test/pro"].item() <= 1.0
    assert next((tmp_path / "test").rglob("anomaly_maps.png"), None) is not None
    cli = build_cli(["predict", *common, f"--trainer.default_root_dir={tmp_path / 'predict'}"])
    assert cli.trainer.predict_loop.predictions[0]["anomaly_map"].shape[-2:] == (224, 224)  # folder load size
    assert len(list((tmp_path / "predict").rglob("anomaly_maps/*.png"))) == 3 + 3 * 2
    build_cli(["predict", *common, f"--trainer.default_root_dir={tmp_path / 'predict'}"])  # a second run
    runs = sorted(str(p.parent.parent) for p in (tmp_path / "predict").rglob("anomaly_maps/*.png"))
    assert len(runs) == 2 * (3 + 3 * 2) and len(set(runs)) == 2, "each run keeps its own maps"


def test_building_a_patch_bank_too_large_for_the_host_fails_before_any_search(small_set, monkeypatch):
    import dn2_lightning.maps.bank as patch_bank_module

    monkeypatch.setattr(patch_bank_module, "_host_available_bytes", lambda: 10_000)  # a 10 kB machine
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], patch_bank="all", reports=False)
    # 12 images x 16 x 16 positions x 16 channels x 4 bytes, + norms + the 512 MiB search budget
    with pytest.raises(MemoryError, match=r"patch bank \(12 images x 16x16 positions x 16 channels\) needs 0\.50 GiB"):
        quiet_trainer().test(model, datamodule=dm)
    assert not model.maps.bank.is_fitted


def test_maps_of_a_test_run_that_stopped_on_an_error_never_join_the_next_runs_metrics(small_set):
    # they did: the next run's pixel AUROC / PRO mixed the stopped run's maps in (0.9797 -> 0.9758 in a review)
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False)
    first = quiet_trainer().test(model, datamodule=dm)[0]

    class MirroredThenVanished(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(dm.test_dataset)

        def __getitem__(self, i: int) -> dict:
            if i == 7:
                raise RuntimeError("file vanished")
            sample = dict(dm.test_dataset[i])
            sample["image"] = sample["image"].flip(-1)  # other maps, the same masks
            return sample

    with pytest.raises(RuntimeError, match="file vanished"):
        quiet_trainer().test(model, dataloaders=torch.utils.data.DataLoader(MirroredThenVanished(), batch_size=5))
    again = quiet_trainer().test(model, datamodule=dm)[0]
    assert again["test/pixel_auroc"] == first["test/pixel_auroc"] and again["test/pro"] == first["test/pro"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_maps_are_float32_under_mixed_precision_autocast(dtype):
    patch_maps = torch.rand(2, 8, 8) * 1e5  # beyond float16's 65504
    expected = to_image_maps(patch_maps, (32, 32), sigma=4.0)
    with torch.autocast("cpu", dtype=dtype):
        maps = to_image_maps(patch_maps, (32, 32), sigma=4.0)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected)


def test_a_synthetic_set_another_job_wrote_meanwhile_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two jobs creating dataset="synthetic" at once: the later one must not delete the set the first one
    finished and is reading (a reviewer's run: FileNotFoundError in the first job, 3 of 3 trials)."""
    import dn2_lightning.data.synthetic as synthetic

    root, small = tmp_path / "set", dict(n_train=2, n_test_good=1, n_test_per_kind=1, image_size=32)
    real_render, other_job = synthetic._render, []

    def render_while_another_job_finishes(folder, settings):
        real_render(folder, settings)
        if not other_job:
            other_job.append(1)
            write_synthetic_defects(root, **small)  # the other job: done first
            other_job.append((root / "train" / "good" / "000.png").stat().st_ino)

    monkeypatch.setattr(synthetic, "_render", render_while_another_job_finishes)
    assert write_synthetic_defects(root, **small) == root
    assert (root / "train" / "good" / "000.png").stat().st_ino == other_job[1]  # the same files, not replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    monkeypatch.setattr(synthetic, "_render", real_render)
    write_synthetic_defects(root, **{**small, "n_train": 3})  # other settings: replaced in one rename
    assert len(list((root / "train" / "good").iterdir())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_synthetic_set_never_replaces_a_folder_it_did_not_write(tmp_path):
    """dataset="synthetic" with root at the user's own images moved the folder aside and deleted it."""
    mine = tmp_path / "my_bottle"
    (mine / "train" / "good").mkdir(parents=True)
    (mine / "train" / "good" / "000.png").write_bytes(b"the user's image")
    (mine / "notes.txt").write_text("annotations")
    dm = OneClassDataModule(dataset="synthetic", root=str(mine))
    with pytest.raises(FileExistsError, match=r"my_bottle.*not a synthetic set.*dataset='folder'"):
        dm.setup("test")
    assert (mine / "notes.txt").read_text() == "annotations"
    assert (mine / "train" / "good" / "000.png").read_bytes() == b"the user's image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_bottle"]  # nothing moved aside
    empty = tmp_path / "empty"
    empty.mkdir()
    small = dict(n_train=2, n_test_good=1, n_test_per_kind=1, image_size=32)
    assert len(list((write_synthetic_defects(empty, **small) / "train" / "good").iterdir())) == 2


def test_a_patch_bank_of_other_map_layers_is_refused_even_with_the_same_shapes(small_set, tmp_path):
    # layers "0" (conv) and "1" (its ReLU) give the same [6, 16, 16] patches: only the shape was compared, so maps
    # of a bank built from other layers were silently wrong (a reviewer: up to 2255 of a 4709 maximum)
    dm = OneClassDataModule(dataset="folder", root=str(small_set), load_size=32, batch_size=5)
    model = DN2Module(backbone=tiny_conv(), anomaly_maps=True, map_layers=["1"], map_images=3, reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "maps.ckpt")
    with pytest.raises(ValueError, match=r"map_layers=\['1'\] \(checkpoint\) vs map_layers=\['0'\] \(this model\)"):
        DN2Module.load_from_checkpoint(tmp_path / "maps.ckpt", backbone=tiny_conv(), map_layers=["0"])
    restored = DN2Module.load_from_checkpoint(tmp_path / "maps.ckpt", backbone=tiny_conv(), map_layers=["1"])
    assert restored.bank.spec["map_layers"] == ["1"]
    images = DN2Module.load_from_checkpoint(tmp_path / "maps.ckpt", backbone=tiny_conv(), anomaly_maps=False)
    assert len(images.score_images(dm.source_paths("test")).scores) == len(dm.test_dataset)  # no maps: no check


def test_test_images_of_two_sizes_are_refused_at_the_batch_that_changes_size():
    # with input_size the backbone sees one size, but the maps keep each image's: the pass ran to its end and
    # stopped in torch.cat ("Sizes of tensors must match"), losing test/auroc
    g = torch.Generator().manual_seed(0)

    def sample(i: int, h: int, w: int) -> dict:
        image = (torch.rand(3, h, w, generator=g) * 100).to(torch.uint8)
        return {"image": image, "label": torch.tensor(i % 2), "index": torch.tensor(i), "gt_mask": torch.zeros(h, w)}

    train = [sample(i, 32, 32) | {"label": torch.tensor(0)} for i in range(8)]
    test = [sample(i, *size) for i, size in enumerate([(32, 32), (32, 32), (40, 48), (40, 48)])]
    model = DN2Module(
        backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_images=4, reports=False, input_size=32
    )
    quiet_trainer().fit(model, train_dataloaders=DataLoader(train, batch_size=4))
    seen = []
    model.on_test_batch_end = lambda outputs, batch, batch_idx, dataloader_idx=0: seen.append(batch_idx)
    with pytest.raises(ValueError, match=r"maps of \(40, 48\) pixels after maps of \(32, 32\).*load_size"):
        quiet_trainer().test(model, dataloaders=DataLoader(test, batch_size=2))
    assert seen == [0]  # refused at the second batch, not after the pass


def test_patch_bank_all_leaves_out_the_training_images_cleaning_removed(tmp_path):
    # the patch bank kept every collected training image: with patch_bank="all" the contaminants that cleaning
    # took out of the image bank still scored every test pixel
    import types

    from torch.utils.data import Subset

    root = write_synthetic_defects(tmp_path / "set", n_train=12, n_test_good=2, n_test_per_kind=1, image_size=32)
    dm = OneClassDataModule(dataset="folder", root=str(root), load_size=32, batch_size=5)
    model = DN2Module(
        backbone=tiny_conv(), anomaly_maps=True, map_layers=["1", "3"], map_kappa=2, patch_bank="all",
        clean_fraction=0.25, clean_k=3, reports=False,
    )  # fmt: skip

    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    kept = sorted(model.bank.sample_indices.tolist())
    assert len(kept) == 9
    trainer.test(model, datamodule=dm)
    only_kept = types.SimpleNamespace(train_dataset=Subset(dm.train_dataset, kept), test_dataset=dm.test_dataset)
    expected = reference_maps(model, only_kept, num_images=len(kept), kappa=2, sigma=4.0)
    np.testing.assert_allclose(model.maps.test_results.maps.numpy(), expected, rtol=1e-4, atol=1e-5)
