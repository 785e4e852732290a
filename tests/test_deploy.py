"""Deploying a fitted module: the embedder exported from forward, scored against the bank, gives score_images's
scores; casts and exports that cannot work are refused clearly (README: Deploying)."""

from __future__ import annotations

import pytest
import torch
from helpers import BlobDataModule, linear_backbone, quiet_trainer
from lightning.pytorch import Callback

from dn2_lightning import DN2Detector, DN2Module


def fitted(precision: str = "32-true") -> tuple[DN2Module, torch.Tensor]:
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    quiet_trainer(precision=precision).fit(model, datamodule=dm)
    return model.eval(), dm.test_images


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_exported_embedder_scored_against_the_bank_gives_score_images_scores(precision):
    """forward embedded in float32 whatever the bank was embedded under: after a bf16-mixed fit, its embeddings (and
    any export of it) scored up to 7 away from score_images on a threshold of 7 (a reviewer, efficientnet_lite0)."""
    model, images = fitted(precision)
    expected = model.score_images(images)
    assert model.bank.spec["autocast"] == (None if precision == "32-true" else "bfloat16")
    exported = torch.export.export(model, (images,)).module()
    detector = DN2Detector(k=model.hparams.k).fit(model.bank.embeddings)
    for embeddings in (model(images), exported(images)):
        torch.testing.assert_close(torch.as_tensor(detector.decision_function(embeddings)), expected.scores)
    assert detector.threshold_ == pytest.approx(float(model.threshold), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.backbone(images)  # the bank's autocast, which forward applies
    if precision == "bf16-mixed":
        assert not torch.equal(model.backbone(images), model(images)) and torch.equal(under_autocast, model(images))


def test_forward_embeds_as_the_bank_after_a_refit_that_stopped_part_way():
    """A refit stopped by an error left its collector behind, which forward took for a pass under way: it embedded
    in float32 instead of the bank's bfloat16 (1.3e-3 away from score_images)."""
    model, images = fitted("bf16-mixed")
    expected = model(images)

    class Stop(Callback):
        def on_train_batch_end(self, *args) -> None:
            raise RuntimeError("stopped part-way")

    with pytest.raises(RuntimeError, match="stopped part-way"):
        quiet_trainer(callbacks=[Stop()]).fit(model, datamodule=BlobDataModule())
    assert model.bank.spec["autocast"] == "bfloat16"  # the bank that stayed
    assert torch.equal(model(images), expected)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_float16", "type_float16"])
def test_a_16_bit_cast_is_refused_before_the_bank_is_rounded(cast):
    """model.half() cast the bank too: score_images then failed deep in the backbone, and .float() afterwards scored
    with a rounded bank (scores moved by up to 3.3, the threshold with them)."""
    model, images = fitted()
    before, bank = model.score_images(images), model.bank.embeddings.clone()
    do = {
        "half": model.half,
        "bfloat16": model.bfloat16,
        "to_float16": lambda: model.to(torch.float16),
        "type_float16": lambda: model.type(torch.float16),
    }[cast]
    with pytest.raises(ValueError, match=r"DN2Module cannot be cast to torch\.(b?float16).*bf16-mixed"):
        do()
    assert model.dtype == torch.float32 and torch.equal(model.bank.embeddings, bank)
    with pytest.raises(ValueError, match="cannot be cast"):
        model.to("meta", torch.float16)  # left Lightning's model.device at "meta" while nothing had moved
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert torch.equal(model.score_images(images).scores, before.scores)
    model.double()  # float64 is exact enough: allowed
    torch.testing.assert_close(model.score_images(images).scores.float(), before.scores, rtol=1e-5, atol=1e-6)


def test_exports_that_cannot_work_are_refused_naming_the_one_that_does():
    model, images = fitted()
    for method in ("script", "trace"):  # scripting failed deep in torch; a trace kept the example's dtype and size
        with pytest.raises(NotImplementedError, match=r"torch\.export\.export\(model\.eval\(\), \(images,\)\)"):
            model.to_torchscript(method=method, example_inputs=images)
    with pytest.raises(ValueError, match=r"dynamo=False.*Leave dynamo at its default"):
        model.to_onnx(None, images, dynamo=False)  # an AttributeError about a dict, 11 frames deep, before


def test_a_checkpoint_of_other_weights_is_refused_naming_the_weight(tmp_path):
    """Weights of another shape were torch's "Error(s) in loading state_dict", listing every tensor; under DDP a
    node whose copy of the checkpoint path held such a file stopped alone, the others waiting in a collective."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(dim=32), reports=False)
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "wide.ckpt")
    match = (
        r"weights do not fit this model: backbone\.trunk\.1\.weight is \[32, 192\] in the checkpoint but \[16, 192\]"
    )
    with pytest.raises(ValueError, match=match):
        DN2Module.load_from_checkpoint(tmp_path / "wide.ckpt", backbone=linear_backbone())
    with pytest.raises(ValueError, match=match):
        quiet_trainer().test(
            DN2Module(k=2, backbone=linear_backbone()), datamodule=dm, ckpt_path=tmp_path / "wide.ckpt"
        )


def test_a_module_pickles_after_scoring_with_its_bank_caches_filled():
    """The bank's caches (its search copy, its summary for the ranks' comparison) are keyed by the tensors
    themselves, so a new tensor at a freed one's address is never taken for the old bank; they are left out of
    pickles (ddp_spawn, torch.save(model)) and rebuilt."""
    import pickle

    model, images = fitted()
    expected = model.score_images(images).scores
    model.bank.summary()
    copy = pickle.loads(pickle.dumps(model))
    assert copy.bank._prepared is None and copy.bank._summary is None
    assert torch.equal(copy.score_images(images).scores, expected)
    model.bank.embeddings = model.bank.embeddings * 2  # a new tensor: both caches follow it
    assert model.bank.summary()[2] == pytest.approx(2 * copy.bank.summary()[2])
    assert not torch.equal(model.score_images(images).scores, expected)


def test_forward_hooks_run_in_fit_test_and_score_images():
    """Bank rows and queries were embedded past forward (to keep the bank's autocast apart), so a user's forward hooks
    (and model.compile()) no longer ran in fit, test or score_images: 0 calls instead of 7, 5 and 2."""
    calls = []
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    model.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    quiet_trainer().fit(model, datamodule=dm)
    assert sum(calls) == len(dm.train_images)
    calls.clear()
    quiet_trainer().test(model, datamodule=dm)
    assert sum(calls) == len(dm.test_images)
    calls.clear()
    model.score_images(dm.test_images)
    assert sum(calls) == len(dm.test_images)


def test_a_16_bit_cast_of_a_backbone_without_weights_leaves_the_module_as_it_was():
    """The refusal restored Lightning's device and dtype from the first weight: with a backbone without any,
    model.to("meta", torch.float16) was refused but left device meta and dtype float16 (then an unsupported-scalar
    crash in score_images)."""
    dm = BlobDataModule()
    model = DN2Module(k=2, backbone=torch.nn.Flatten(), reports=False)
    quiet_trainer().fit(model, datamodule=dm)
    expected = model.score_images(dm.test_images).scores
    with pytest.raises(ValueError, match="cannot be cast"):
        model.to("meta", torch.float16)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert torch.equal(model.score_images(dm.test_images).scores, expected)


def test_a_partial_state_dict_load_leaves_the_bank_as_it_is():
    """load_state_dict(backbone weights only, strict=False) emptied the bank's record of how it was built (15 keys to
    0, the bf16 autocast among them), its removed rows and leave-one-out scores: scores drifted without a word."""
    model, images = fitted("bf16-mixed")
    expected, spec = model.score_images(images).scores, dict(model.bank.spec)
    weights = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    model.load_state_dict(weights, strict=False)
    assert model.bank.spec == spec and torch.equal(model.score_images(images).scores, expected)


def test_a_module_pickled_without_the_threshold_hooks_gets_them_back():
    """A module pickled by the previous version had no state-dict hooks once unpickled: its fixed threshold no longer
    travelled with its state dict (a fresh module loading it scored with the quantile threshold)."""
    import pickle

    model, images = fitted()
    model.set_threshold(value=0.123)
    model._state_dict_hooks.clear()  # as a module pickled before the hooks existed
    model._load_state_dict_post_hooks.clear()
    del model.bank.__dict__["loaded_threshold"], model.bank.__dict__["_summary"]
    restored = pickle.loads(pickle.dumps(model))
    fresh = DN2Module(k=2, backbone=linear_backbone(), reports=False)
    fresh.load_state_dict(restored.state_dict())
    assert float(fresh.threshold) == pytest.approx(0.123)
