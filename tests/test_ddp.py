"""DDP on CPU (gloo, 2 processes) gives the single-device scores, bank and AUROC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_run import main as run_ddp_script
from helpers import BlobDataModule, quiet_trainer

from dn2_lightning import DN2Module

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(tmp_path: Path, devices: int, setting: str, mode: str) -> dict:
    out = tmp_path / f"{devices}-{setting}-{mode}.pt"
    if devices == 1:
        run_ddp_script(str(out), 1, setting, mode)
    else:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), setting, mode],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("setting, mode", [("unimodal", "fit"), ("unimodal", "test"), ("unsupervised", "fit")])
def test_ddp_equals_single_device(tmp_path, setting, mode):
    single = run(tmp_path, 1, setting, mode)
    ddp = run(tmp_path, 2, setting, mode)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # 67 test samples over 2 ranks: the sampler pads one duplicate, which must not be scored twice
    assert torch.equal(ddp["indices"], torch.arange(67))
    assert torch.equal(ddp["bank_indices"], single["bank_indices"])
    torch.testing.assert_close(ddp["bank"], single["bank"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)
    assert ddp["auroc"] == pytest.approx(single["auroc"], abs=1e-9)
    assert 0.5 < single["auroc"] < 1.0, "the data must make the AUROC informative"


def test_ddp_checkpoint_reloads_on_one_device(tmp_path):
    ddp = run(tmp_path, 2, "unimodal", "fit")
    ckpt = tmp_path / "2-unimodal-fit.ckpt"
    from helpers import linear_backbone

    model = DN2Module.load_from_checkpoint(ckpt, backbone=linear_backbone())
    assert len(model.bank) == 103
    quiet_trainer().test(model, datamodule=BlobDataModule(n_train=103, n_normal=41, n_anomalous=26, batch_size=8))
    torch.testing.assert_close(model.test_scores.scores, ddp["scores"], rtol=1e-5, atol=1e-6)
