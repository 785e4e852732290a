"""The all-classes protocol equals DN2Module class by class, and its embedding cache is safe."""

from __future__ import annotations

import pytest
import torch

import dn2_lightning.protocol as protocol
from dn2_lightning import DN2Module, OneClassDataModule
from dn2_lightning.protocol import embed_split, run_protocol

FAST = dict(backbone="efficientnet_lite0", input_size=32, device="cpu")


def test_protocol_auroc_equals_dn2module_for_each_class(tmp_path):
    result = run_protocol("digits", k=2, classes=[0, 4], cache_dir=str(tmp_path), out=str(tmp_path / "out"), **FAST)
    for row in result.classes:
        model = DN2Module(k=2, backbone="efficientnet_lite0", input_size=32, reports=False)
        from helpers import quiet_trainer

        metrics = quiet_trainer().test(model, datamodule=OneClassDataModule("digits", normal_class=row.normal_class))
        assert row.auroc == pytest.approx(metrics[0]["test/auroc"], abs=1e-6)
    assert (tmp_path / "out" / "protocol.md").read_text().count("\n") == 5
    assert (tmp_path / "out" / "protocol.csv").read_text().startswith("normal_class,name,auroc")


def test_embedding_cache_is_reused_and_stale_keys_are_recomputed(tmp_path, monkeypatch):
    first, labels = embed_split("digits", "test", cache_dir=str(tmp_path), **FAST)
    [cached] = list(tmp_path.glob("digits-test-efficientnet_lite0-*.pt"))

    def no_backbone(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(protocol, "build_backbone", no_backbone)
    again, _ = embed_split("digits", "test", cache_dir=str(tmp_path), **FAST)
    assert torch.equal(first, again) and len(first) == len(labels) == 723

    stale = torch.load(cached, weights_only=True)
    stale["key"]["input_size"] = 999  # the file no longer describes what it holds
    torch.save(stale, cached)
    with pytest.raises(AssertionError, match="cache should have been used"):
        embed_split("digits", "test", cache_dir=str(tmp_path), **FAST)
