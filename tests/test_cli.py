"""The `dn2` LightningCLI: every shipped config parses, and fit/test/predict run from a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dn2_lightning import DN2Module
from dn2_lightning.cli import build_cli

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
FAST = ["--model.input_size=32", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_builds_model_and_datamodule(config, tmp_path):
    extra = [f"--data.root={tmp_path}"] if config.stem in ("folder", "mvtec") else []
    cli = build_cli(["--config", str(config), "--model.pretrained=false", *extra], run=False)
    assert isinstance(cli.model, DN2Module)
    assert cli.model.hparams.k >= 1


def test_cli_test_runs_digits_config_offline(tmp_path):
    args = [
        "test",
        "--config",
        "configs/digits.yaml",
        "--data.normal_class=3",
        f"--trainer.default_root_dir={tmp_path}",
        *FAST,
    ]
    cli = build_cli(args)
    auroc = cli.trainer.callback_metrics["test/auroc"].item()
    assert 0.8 < auroc <= 1.0
    assert cli.datamodule.normal_class_index == 3


def test_cli_fit_writes_a_checkpoint_that_test_and_predict_reuse(tmp_path):
    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", *FAST]
    fit = build_cli(["fit", *common])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file()
    test = build_cli(["test", *common, f"--ckpt_path={ckpt}"])
    assert len(test.model.bank) == len(fit.model.bank)
    assert test.trainer.callback_metrics["test/auroc"].item() == pytest.approx(
        build_cli(["test", *common]).trainer.callback_metrics["test/auroc"].item(), abs=1e-6
    )
    predict = build_cli(["predict", *common, f"--ckpt_path={ckpt}"])
    assert predict.trainer.predict_loop.predictions


def test_print_config_reruns_the_same_experiment(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_cli(["test", "--config", "configs/digits.yaml", "--data.normal_class=5", "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["data"]["init_args"]["normal_class"] == 5 and config["model"]["backbone"] == "efficientnet_lite0"
    path = tmp_path / "config.yaml"
    path.write_text(printed)
    cli = build_cli(["test", "--config", str(path), f"--trainer.default_root_dir={tmp_path}", *FAST])
    assert cli.datamodule.normal_class_index == 5
    assert "test/auroc" in cli.trainer.callback_metrics


def test_cli_runs_the_unsupervised_and_group_configs_offline(tmp_path):
    common = [f"--trainer.default_root_dir={tmp_path}", "--model.reports=false", *FAST]
    cli = build_cli(["test", "--config", "configs/digits_unsupervised.yaml", *common])
    metrics = cli.trainer.callback_metrics
    assert 0.5 < metrics["test/auroc"].item() <= 1.0
    assert metrics["bank/contaminants_before"].item() == cli.datamodule.train_is_contaminant.sum().item() > 0
    assert metrics["bank/removed"].item() == round(0.5 * metrics["bank/size_before_cleaning"].item())
    cli = build_cli(["test", "--config", "configs/digits_group.yaml", *common])
    assert cli.datamodule.hparams.group_size == 5
    assert 0.0 <= cli.trainer.callback_metrics["test/auroc"].item() <= 1.0


def test_cli_fit_needs_no_epoch_setting_and_keeps_the_users():
    assert build_cli(["--config", "configs/digits.yaml"], run=False).trainer.max_epochs == 1
    cli = build_cli(["--config", "configs/digits.yaml", "--trainer.max_epochs=3"], run=False)
    assert cli.trainer.max_epochs == 3
