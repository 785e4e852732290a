"""The `dn2` LightningCLI: every shipped config parses, and fit/test/predict run from a config."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from dn2_lightning import DN2Module, list_backbones
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


def test_print_config_keeps_trainer_options_that_help_lists_by_name_only(capsys):
    # --help lists most Trainer options by name only; hiding them with argparse.SUPPRESS also dropped them from
    # --print_config and the saved config.yaml, so a rerun lost e.g. max_epochs, max_steps, overfit_batches
    args = ["--trainer.max_epochs=3", "--trainer.log_every_n_steps=7", "--trainer.overfit_batches=2"]
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", "configs/digits.yaml", *args, "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["max_epochs"], trainer["log_every_n_steps"], trainer["overfit_batches"]) == (3, 7, 2)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--trainer.max_epochs" not in text and "max_epochs" in text  # named in the group's description only


def test_print_config_beside_ckpt_path_carries_the_checkpoints_threshold(tmp_path, capsys):
    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", *FAST]
    fit = build_cli(["fit", *common, "--model.reports=false"])
    saved = torch.load(fit.trainer.checkpoint_callback.best_model_path, weights_only=True)
    saved["hyper_parameters"]["threshold"] = 12.0  # what set_threshold(value=12) and a save leave
    ckpt = tmp_path / "fixed.ckpt"
    torch.save(saved, ckpt)
    direct = build_cli(["test", *common, f"--ckpt_path={ckpt}", "--model.reports=false"])
    assert float(direct.model.threshold) == 12.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_cli(["test", *common, f"--ckpt_path={ckpt}", "--print_config"])
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["threshold"] == 12.0
    (tmp_path / "rerun.yaml").write_text(printed)
    rerun = build_cli(["test", "--config", str(tmp_path / "rerun.yaml"), "--model.reports=false"])
    assert float(rerun.model.threshold) == 12.0
    assert torch.equal(rerun.model.test_scores.is_anomaly, direct.model.test_scores.is_anomaly)


def test_cli_runs_the_unsupervised_and_group_configs_offline(tmp_path):
    common = [f"--trainer.default_root_dir={tmp_path}", "--model.reports=false", *FAST]
    cli = build_cli(["test", "--config", "configs/digits_unsupervised.yaml", *common])
    metrics = cli.trainer.callback_metrics
    assert 0.5 < metrics["test/auroc"].item() <= 1.0
    assert metrics["bank/contaminants_before"].item() == cli.datamodule.train_is_contaminant.sum().item() > 0
    assert metrics["bank/removed"].item() == math.floor(0.5 * metrics["bank/size_before_cleaning"].item() + 0.5)
    cli = build_cli(["test", "--config", "configs/digits_group.yaml", *common])
    assert cli.datamodule.hparams.group_size == 5
    assert 0.0 <= cli.trainer.callback_metrics["test/auroc"].item() <= 1.0


def test_cli_fit_needs_no_epoch_setting_and_keeps_the_users():
    assert build_cli(["--config", "configs/digits.yaml"], run=False).trainer.max_epochs == 1
    cli = build_cli(["--config", "configs/digits.yaml", "--trainer.max_epochs=3"], run=False)
    assert cli.trainer.max_epochs == 3


# ------------------------------------------------------------------------------------------ help


def help_text(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_test_help_fits_on_a_screen_and_speaks_dn2(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # a standard terminal; argparse wraps to it
    text = help_text(["test", "--help"], capsys)
    lines = text.splitlines()
    assert len(lines) < 200, len(lines)
    assert max(len(line) for line in lines) <= 80
    backbone_help = text[text.index("--model.backbone") :].split("--model.pretrained")[0]
    assert all(name in backbone_help for name in list_backbones())
    for option in ("--data.dataset", "--data.root", "--data.normal_dir", "--data.on_corrupt", "--data.group_size"):
        assert option in text
    assert "folder" in text and "--ckpt_path" in text and "--trainer.devices" in text
    assert "\n    --data.dataset " in text and "\n    --data.on_corrupt " in text  # the data options, a table
    assert "torchvision" not in text and "known subclasses" not in text and "``" not in text
    assert "Score the test set" in text and "AUROC" in text
    assert "Perform one evaluation epoch" not in text and "A DataModule standardizes" not in text


def option_descriptions(text: str) -> dict[str, str]:
    """``--option -> its help text`` (unwrapped) from argparse's two-column layout."""
    options: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"  (--[\w.]+)\s*(.*)", line)
        if match:
            current = match.group(1)
            options[current] = match.group(2)
        elif current and line.startswith("    "):
            options[current] += " " + line.strip()
        else:
            current = None
    return options


@pytest.mark.parametrize(
    "args",
    [
        ["test", "--data.help", "OneClassDataModule"],
        ["test", "--data.help", "dn2_lightning.GroupDataModule"],
        ["dn2-protocol", "--help"],
    ],
    ids=["OneClassDataModule", "GroupDataModule", "dn2-protocol"],
)
def test_every_option_of_the_other_helps_is_described_in_plain_text(args, monkeypatch, capsys):
    """``--data.help CLASS`` was printed by jsonargparse's own formatter (raw ``Literal[...]``, reST markup),
    and options documented together in one docstring entry (``batch_size, num_workers: ...``) had no
    description there or in ``dn2-protocol --help``."""
    from dn2_lightning.protocol import main as protocol_main

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        protocol_main(args[1:]) if args[0] == "dn2-protocol" else build_cli(args)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = {name: help for name, help in option_descriptions(text).items() if name not in ("--help", "--config")}
    assert len(options) >= 10, text
    undescribed = sorted(name for name, help in options.items() if not help or help.startswith("(type:"))
    assert not undescribed, f"{' '.join(args)}: options without a description: {undescribed}"
    for raw in ("Literal[", "``", ":func:", ":class:"):
        assert raw not in text, f"{' '.join(args)} shows {raw!r}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config", "configs/folder.yaml", "--data.root=/nonexistent"], "root='/nonexistent' must be an existing"),
        (["--config", "configs/digits.yaml", "--model.k=0"], "k=0 must be an integer >= 1"),
        (["--config", "configs/digits.yaml", "--model.backbone=resnet"], "backbone='resnet' is not registered"),
    ],
    ids=["missing root", "k=0", "unknown backbone"],
)
def test_a_setting_dn2_refuses_is_a_command_line_error_not_a_traceback(flags, message, capsys):
    """A wrong --data.root printed 73 lines of traceback ending in jsonargparse's "Does not validate against any of
    the Union subtypes ... Expected a <class 'NoneType'>"; now usage, the refusal and exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["test", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "usage: dn2 test" in err
    assert "Traceback" not in err and "Union subtypes" not in err and len(err.splitlines()) < 10


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        (["--model.kk=3"], "unrecognized arguments: --model.kk=3 (did you mean --model.k?)"),
        (["--trainer.max_epohcs=3"], "(did you mean --trainer.max_epochs?)"),
        (["--model.kk=3", "--trainer.max_epohcs=3"], "(did you mean --model.k or --trainer.max_epochs?)"),
        (["--data.normal_clas=3"], "Option 'normal_clas' is not accepted"),  # the data class's options
    ],
    ids=["model", "trainer", "two", "data"],
)
def test_a_mistyped_option_is_refused_with_the_closest_known_one(flags, hint, capsys):
    """A typo got jsonargparse's "unrecognized arguments: --model.kk=3" and no more; now the closest option too.
    (``--trainer.max_epoch``, a prefix, is no error: jsonargparse 4 expands it, deprecated in 5.)"""
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["test", "--config", "configs/digits.yaml", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: dn2 test" in err and "Traceback" not in err
    assert hint in err, err
    if "data" in flags[0]:
        assert "(did you mean --data.normal_class?)" in err, err
    # nothing close: jsonargparse's message as it was (whole names shared the group prefix: --model.seed got "did you
    # mean --model.k?", --trainer.gpus "--trainer.plugins?")
    for unknown in ("--zzzzz=1", "--model.seed=1", "--trainer.gpus=1"):
        with pytest.raises(SystemExit):
            build_cli(["test", "--config", "configs/digits.yaml", unknown])
        assert capsys.readouterr().err.splitlines()[-1] == f"error: unrecognized arguments: {unknown}"


@pytest.mark.parametrize(
    "text, hint",
    [
        ("model:\n  kk: 3\n", "does not accept option 'model.kk' (did you mean --model.k?)"),
        ("data:\n  init_args:\n    normal_clas: 3\n", "(did you mean --data.normal_class?)"),
    ],
)
def test_a_mistyped_key_in_a_config_file_is_refused_with_the_closest_known_one(text, hint, tmp_path, capsys):
    """A typo in a --config file got jsonargparse's error alone; a class's key named the option without its prefix."""
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["test", "--config", "configs/digits.yaml", "--config", str(tmp_path / "typo.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and hint in err, err
    assert "--normal_class?" not in err.replace("--data.normal_class?", ""), err


def test_subcommands_are_described_in_dn2_terms(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    text = " ".join(help_text(["--help"], capsys).split())  # unwrapped
    assert "fit Build the memory bank" in text
    assert "validate Score a datamodule's validation set" in text
    assert "test Score the test set against the memory bank and report AUROC" in text
    assert "predict Score images" in text and "predictions.csv" in text
    assert "Runs the full optimization routine" not in text
    for subcommand in ("fit", "validate", "predict"):
        assert len(help_text([subcommand, "--help"], capsys).splitlines()) < 200


def test_options_hidden_from_help_still_parse():
    cli = build_cli(["--config", "configs/digits.yaml", "--trainer.gradient_clip_val=0.5"], run=False)
    assert cli.trainer.gradient_clip_val == 0.5


@pytest.mark.parametrize(
    ("option", "value", "choices"),
    [
        ("model.knn_backend", "faiss", "'auto', 'torch', 'keops'"),
        ("model.group_pooling", "max", "'mean', 'histogram', 'none'"),
        ("model.bank_sharding", "split", "'replicate', 'shard'"),
        ("model.patch_bank", "nearest", "'nearest_images', 'all'"),
        ("data.on_corrupt", "ignore", "'skip', 'raise'"),
    ],
)
def test_a_choice_outside_its_list_is_refused_by_the_parser_naming_key_and_choices(option, value, choices, capsys):
    with pytest.raises(SystemExit):
        build_cli(["test", "--config", "configs/digits.yaml", f"--{option}={value}", "--print_config"])
    error = " ".join(capsys.readouterr().err.split())
    name = option.split(".")[1]  # the data group names its class's key ("on_corrupt"), the model its full key
    assert f'{name}":' in error and f"Literal[{choices}]" in error and f"Got value: {value}" in error
    if option.startswith("model."):  # (--help shows the data options as a table of their own)
        listed = " | ".join(choice.strip("'") for choice in choices.split(", "))
        assert f"({listed}; default: " in " ".join(help_text(["test", "--help"], capsys).split())


# --------------------------------------------------------------------------------------- console


def run_recording(args: list[str]) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(args)
    return cli, [str(w.message) for w in caught]


def test_console_shows_checkpoint_and_report_paths_and_no_lightning_noise(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)  # rank_zero_info lines are log records (pytest's handler takes them)

    def console() -> str:
        text = "".join(capfd.readouterr()) + caplog.text
        caplog.clear()
        return text

    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", "--model.input_size=32"]
    fit, fit_warnings = run_recording(["fit", *common])
    out = console()
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file() and f"checkpoint (memory bank + threshold) written to {ckpt}" in out
    assert "memory bank of" in out and "config.yaml" in out
    for noise in ("Tip:", "Trainable params", "Total FLOPs", "v_num"):
        assert noise not in out, noise
    bar = fit.trainer.progress_bar_callback
    assert bar is not None and "v_num" not in bar.get_metrics(fit.trainer, fit.model)
    assert fit.trainer.loggers  # v_num would be shown by Lightning's own bar with this logger

    test, test_warnings = run_recording(["test", *common, f"--ckpt_path={ckpt}"])
    out = console()
    assert test.trainer.checkpoint_callback is None  # test saves nothing
    reports = sorted(Path(test.trainer.log_dir, "dn2_reports", "test_0").rglob("*.*"))
    assert {p.name for p in reports} >= {"scores.csv", "summary.json", "roc.png", "score_histogram.png"}
    assert all(str(p) in out for p in reports)
    assert "test/auroc" in out and "samples scored against a bank of" in out and "samples flagged anomalous" in out
    summary = json.loads(Path(test.trainer.log_dir, "dn2_reports", "test_0", "summary.json").read_text())
    anomalous, normal = summary["n_labelled_anomalous"], summary["n_scored"] - summary["n_labelled_anomalous"]
    caught, false_alarms = summary["n_flagged_anomalous"], summary["n_flagged_normal"]
    assert f"({caught} of {anomalous} = {100 * caught / anomalous:.1f}% anomalous, {false_alarms} of {normal} " in out

    predict, predict_warnings = run_recording(["predict", *common, f"--ckpt_path={ckpt}"])
    out = console()
    summary = Path(predict.trainer.log_dir, "dn2_reports", "predict_0", "summary.json")
    assert str(summary) in out and "samples scored" in out
    messages = " ".join(fit_warnings + test_warnings + predict_warnings)
    for noise in ("validation_step", "LeafSpec", "logging interval", "dirpath has changed", "callbacks used to create"):
        assert noise not in messages, noise


def test_evaluation_subcommands_turn_checkpointing_off_only_when_the_run_leaves_it_unset(tmp_path):
    """The help promises "null: on in fit, off otherwise": a setting given is the user's, so validate, test and
    predict keep checkpointing on when the run asks for it with --trainer.enable_checkpointing=true."""
    common = ["test", "--config", "configs/digits.yaml", "--model.input_size=32", "--model.reports=false"]
    common += ["--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=1"]
    left_out = build_cli([*common, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    assert left_out.trainer.checkpoint_callback is None
    asked = build_cli([*common, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.enable_checkpointing=true"])
    assert asked.trainer.checkpoint_callback is not None


def test_cli_leaves_warning_filters_as_it_found_them(tmp_path):
    from lightning import LightningDataModule

    from dn2_lightning.cli import DN2CLI

    before = list(warnings.filters)
    build_cli(["--config", "configs/digits.yaml"], run=False)
    assert warnings.filters == before
    # DN2CLI used directly, as a LightningCLI subclass: fit's hooks added filters that stayed after the command
    args = ["fit", "--config", "configs/digits.yaml", "--model.input_size=32", f"--trainer.default_root_dir={tmp_path}"]
    DN2CLI(DN2Module, LightningDataModule, subclass_mode_data=True, args=[*args, "--trainer.enable_progress_bar=false"])
    assert warnings.filters == before


def test_ckpt_path_keeps_the_users_scoring_settings_and_checks_the_bank_issue11_5(tmp_path, capsys):
    common = [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    fit = build_cli(["fit", "--config", "configs/digits.yaml", "--model.input_size=32", *common])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    data = ["--data=dn2_lightning.OneClassDataModule", "--data.dataset=digits"]
    # no --config: the bank settings (backbone, input size) come from the checkpoint; k from the user
    test = build_cli(["test", *data, f"--ckpt_path={ckpt}", "--model.k=5", "--model.threshold_quantile=0.8", *common])
    assert test.model.hparams.k == 5 and test.model.hparams.backbone == "efficientnet_lite0"
    assert test.model.hparams.input_size == 32
    direct = build_cli(["test", "--config", "configs/digits.yaml", "--model.input_size=32", "--model.k=5", *common])
    torch.testing.assert_close(test.model.test_scores.scores, direct.model.test_scores.scores)
    assert test.model.hparams.threshold_quantile == 0.8
    # found while the run starts: a command line error with DN2's message, not a 100-line traceback
    with pytest.raises(SystemExit) as stopped:
        build_cli(["test", *data, f"--ckpt_path={ckpt}", "--model.input_size=48", *common])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in error
    assert re.search(r"error: .*input_size=32 \(checkpoint\) vs input_size=48 \(this model\)", error), error


def test_fit_resumed_from_a_done_checkpoint_checks_its_data_and_says_it_wrote_nothing(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", *FAST]
    first = build_cli(["fit", *common, "--model.reports=false"])
    ckpt = first.trainer.checkpoint_callback.best_model_path
    caplog.clear()
    again = build_cli(["fit", *common, f"--ckpt_path={ckpt}"])  # the same data: the bank is kept, said so
    assert torch.equal(again.model.bank.embeddings, first.model.bank.embeddings) and not again.model.fit_built_bank
    assert f"the bank is --ckpt_path's ({ckpt}); no new checkpoint was written" in caplog.text
    assert "checkpoint (memory bank + threshold) written" not in caplog.text
    with pytest.raises(SystemExit):
        build_cli(["fit", *common, "--data.normal_class=3", f"--ckpt_path={ckpt}"])
    assert re.search(r"error: .*normal_class=0 \(bank\) vs normal_class=3 \(datamodule\)", capsys.readouterr().err)


def test_weights_that_cannot_be_fetched_are_a_command_line_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)  # offline whatever the machine has
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached torchvision weights
    with pytest.raises(SystemExit) as stopped:
        build_cli(["test", "--config", "configs/mvtec.yaml", f"--data.root={tmp_path}", "--model.backbone=resnet18"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in error, error[-2000:]
    assert re.search(r"error: .*resnet18", error) and "efficientnet_lite0" in error, error[-2000:]


def test_validate_with_a_datamodule_without_a_validation_split_says_so_and_one_with_it_scores(tmp_path, capsys):
    """``dn2 validate`` stopped with Lightning's "`val_dataloader` must be implemented" traceback for every
    datamodule DN2 ships (train and test splits only)."""
    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", *FAST]
    with pytest.raises(SystemExit) as stopped:
        build_cli(["validate", *common])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in error
    assert "OneClassDataModule has no validation split (no val_dataloader)" in error and "dn2 test" in error
    validate = build_cli(
        ["validate", "--data=helpers.BlobWithValDataModule", "--model.backbone=efficientnet_lite0", *common[2:]]
    )
    assert "val/auroc" in validate.trainer.callback_metrics


def test_dn2_fit_always_names_a_checkpoint_that_holds_the_bank(tmp_path, caplog):
    """every_n_train_steps=2 over 3 batches saves last at step 2, before the pass ends; a capped fit resumed
    without its cap reads its pass again after Lightning's last save: either way the checkpoint named holds
    the whole bank, and testing it gives the clean fit's AUROC."""
    caplog.set_level(logging.INFO)
    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", *FAST]
    common += ["--model.reports=false", "--data.batch_size=48"]  # 106 class-0 digits: 3 batches
    clean = build_cli(["fit", *common])
    steps = "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2"
    caplog.clear()
    stepped = build_cli(["fit", *common, *steps])
    ckpt = re.search(r"written to (\S+)", caplog.text).group(1)
    assert Path(ckpt).name == "bank.ckpt"
    loaded = DN2Module.load_from_checkpoint(ckpt)
    assert len(loaded.bank) == len(clean.model.bank) == 106 == len(stepped.model.bank)
    capped = build_cli(["fit", *common, "--trainer.limit_train_batches=1"])
    partial = capped.trainer.checkpoint_callback.best_model_path
    caplog.clear()
    resumed = build_cli(["fit", *common, f"--ckpt_path={partial}"])
    assert "built from 1 of 3 training batches: reading the training pass again" in caplog.text
    ckpt = re.search(r"written to (\S+)", caplog.text).group(1)
    assert len(DN2Module.load_from_checkpoint(ckpt).bank) == 106 == len(resumed.model.bank)
    torch.testing.assert_close(resumed.model.threshold, clean.model.threshold)


LOGGER_PROBE = """
import json
import logging
{before}
import dn2_lightning
from dn2_lightning.console import info

info("probe message")
print(logging.getLevelName(logging.getLogger("dn2_lightning").level))
"""


@pytest.mark.parametrize(
    "before, level, shown",
    [
        ("", "INFO", True),  # not configured: INFO messages printed, as Lightning does
        ('logging.getLogger("dn2_lightning").setLevel(logging.WARNING)', "WARNING", False),
        ('logging.getLogger("dn2_lightning").setLevel(logging.DEBUG)', "DEBUG", True),
    ],
)
def test_importing_keeps_the_log_level_the_application_set(before, level, shown):
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", LOGGER_PROBE.format(before=before)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [level]
    assert ("probe message" in proc.stderr) == shown


LIMIT_PROBE = """
{before}
from dn2_lightning.cli import build_cli

for value in ("1", "1.0", "0.25", "3"):
    cli = build_cli(["--config", "configs/digits.yaml", f"--trainer.limit_train_batches={{value}}"], run=False)
    print(repr(cli.config["trainer"]["limit_train_batches"]))
"""


@pytest.mark.parametrize("before", ["", "import rich.console", "from sklearn.metrics import roc_auc_score"])
def test_trainer_batch_limits_parse_as_written_whatever_was_imported_before(before):
    """typing caches Optional[Union[int, float]] under a key equal to Optional[Union[float, int]]: after rich or
    sklearn.metrics (which build the latter) --trainer.limit_train_batches=1 read as 1.0, the whole pass, not one
    batch (found as a test that failed when test_detector.py ran before test_cli.py)."""
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    probe = LIMIT_PROBE.format(before=before)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "1.0", "0.25", "3"]


def test_every_report_folder_keeps_its_runs_config_and_rerunning_it_gives_the_same_scores(tmp_path, monkeypatch):
    """With logger=false every run writes the same <default_root_dir>/config.yaml; each report folder keeps its own
    run's config (after --ckpt_path's settings), and --config of that file reruns the run."""
    from dn2_lightning.reports import read_report

    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", "--model.input_size=32"]
    common += ["--trainer.logger=false"]
    fit = build_cli(["fit", *common, "--model.threshold_quantile=0.9"])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "all")  # (else each is shown once per process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_cli(["test", *common, "--model.k=3"])
    # the report's config.yaml is not dumped with a parameter that jsonargparse 5 removes (Lightning's may be)
    ours = [w for w in caught if "dn2_lightning" in w.filename and "deprecated" in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno} {w.message}" for w in ours]
    build_cli(["test", *common, f"--ckpt_path={ckpt}"])  # the checkpoint's threshold_quantile 0.9
    first, second = (yaml.safe_load((tmp_path / "dn2_reports" / f"test_{n}" / "config.yaml").read_text()) for n in "01")
    assert (first["model"]["k"], first["model"]["threshold_quantile"]) == (3, 0.99)
    assert (second["model"]["k"], second["model"]["threshold_quantile"]) == (2, 0.9)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["threshold_quantile"] == 0.9  # the latest
    rerun_dir = tmp_path / "rerun"
    config = tmp_path / "dn2_reports" / "test_0" / "config.yaml"
    build_cli(["test", "--config", str(config), f"--trainer.default_root_dir={rerun_dir}"])
    before = read_report(tmp_path / "dn2_reports" / "test_0" / "scores.csv")
    after = read_report(rerun_dir / "dn2_reports" / "test_0" / "scores.csv")
    assert [row["score"] for row in after] == [row["score"] for row in before] and len(before) > 300
    assert "config" in json.loads((rerun_dir / "dn2_reports" / "test_0" / "summary.json").read_text())["files"]


def test_the_saved_configs_name_the_data_folder_the_run_read_from_any_directory(tmp_path, monkeypatch):
    """``--data.root=parts`` was saved as ``root: parts`` in the run's config.yaml files, so ``--config`` of one run
    from another directory read another folder, or none; they now name the folder the run read."""
    import numpy as np
    from PIL import Image

    from dn2_lightning.reports import read_report

    rng = np.random.default_rng(0)
    for folder, n in (("train", 4), ("test/good", 2), ("test/scratch", 2)):
        (tmp_path / "parts" / folder).mkdir(parents=True)
        for i in range(n):
            image = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
            image.save(tmp_path / "parts" / folder / f"{i}.png")
    config = Path("configs/folder.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    run = ["--trainer.logger=false", "--data.load_size=32", *FAST]
    build_cli(["test", "--config", str(config), "--data.root=parts", "--trainer.default_root_dir=run", *run])
    parts = os.path.join(os.getcwd(), "parts")
    saved = [Path("run") / "config.yaml", Path("run") / "dn2_reports" / "test_0" / "config.yaml"]
    for path in saved:
        assert yaml.safe_load(path.read_text())["data"]["init_args"]["root"] == parts, path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    build_cli(["test", "--config", str(tmp_path / saved[1]), f"--trainer.default_root_dir={tmp_path / 'rerun'}"])
    before = read_report(tmp_path / "run" / "dn2_reports" / "test_0" / "scores.csv")
    after = read_report(tmp_path / "rerun" / "dn2_reports" / "test_0" / "scores.csv")
    assert [row["score"] for row in after] == [row["score"] for row in before] and len(before) == 4

    # a run from a relative --ckpt_path: its saved config names the file too (it could not be found elsewhere)
    monkeypatch.chdir(tmp_path)
    fit = build_cli(["fit", "--config", str(config), "--data.root=parts", "--trainer.default_root_dir=fit", *run])
    ckpt = os.path.relpath(fit.trainer.checkpoint_callback.best_model_path)
    test_from_ckpt = ["test", "--config", str(config), "--data.root=parts", f"--ckpt_path={ckpt}"]
    build_cli([*test_from_ckpt, "--trainer.default_root_dir=from_ckpt", *run])
    saved = yaml.safe_load((tmp_path / "from_ckpt" / "config.yaml").read_text())
    assert saved["ckpt_path"] == str(tmp_path / ckpt)
    summary = json.loads((tmp_path / "from_ckpt" / "dn2_reports" / "test_0" / "summary.json").read_text())
    assert summary["ckpt_path"] == str(tmp_path / ckpt)  # as the config beside it names it
    monkeypatch.chdir(tmp_path / "elsewhere")
    build_cli(["test", "--config", str(tmp_path / "from_ckpt" / "config.yaml"), "--trainer.default_root_dir=again"])


def test_ckpt_path_takes_the_model_settings_a_run_leaves_out_from_the_checkpoint(tmp_path, caplog):
    # --ckpt_path dropped the checkpoint's threshold_samples (another draw of threshold images); and a scoring setting
    # left out (the fit's --model.k=5) went back to the library's default: k = 2, another threshold than
    # load_from_checkpoint gives for the same file, without a word. The run's own settings (reports, memory budget)
    # stay the run's: a fit without reports must not silence the test's
    caplog.set_level(logging.INFO)
    config = Path(__file__).parents[1].joinpath("configs", "digits.yaml").read_text().splitlines()
    (tmp_path / "digits.yaml").write_text("\n".join(line for line in config if not line.strip().startswith("k:")))
    common = ["--config", str(tmp_path / "digits.yaml"), f"--trainer.default_root_dir={tmp_path}", *FAST]
    run_settings = ["--model.reports=false", "--model.max_memory_bytes=70000"]
    fit = build_cli(["fit", *common, *run_settings, "--model.k=5", "--model.threshold_samples=40"])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    caplog.clear()
    predict = build_cli(["predict", *common, f"--ckpt_path={ckpt}"])
    loaded = DN2Module.load_from_checkpoint(ckpt)
    assert (predict.model.hparams.k, predict.model.hparams.threshold_samples) == (5, 40)
    assert (loaded.hparams.k, loaded.hparams.threshold_samples) == (5, 40)
    assert "from the checkpoint (this run leaves them out): k=5, threshold_samples=40" in caplog.text
    assert predict.model.hparams.reports is True and predict.model.hparams.max_memory_bytes is None
    assert list(tmp_path.glob("**/dn2_reports/predict_*/summary.json"))
    assert float(predict.model.threshold) == pytest.approx(float(loaded.threshold), rel=1e-6)
    assert float(loaded.threshold) != pytest.approx(float(DN2Module.load_from_checkpoint(ckpt, k=2).threshold))
    caplog.clear()
    given = build_cli(["predict", *common, f"--ckpt_path={ckpt}", "--model.k=2"])  # given, even the default: kept
    assert given.model.hparams.k == 2
    # and said: a shipped config's k: 2 replaced the fit's k=5 without a word (a README walk); bank settings, equal
    # or refused, are never listed
    assert (
        "set by this run's config files or flags, in place of the checkpoint's values: k=2 (the checkpoint's: 5)"
        in caplog.text
    )
    assert "input_size" not in caplog.text.split("in place of the checkpoint's values")[1]
    # a fixed threshold the run drops for a quantile is said too
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["threshold"] = 5.0
    torch.save(checkpoint, tmp_path / "fixed.ckpt")
    caplog.clear()
    build_cli(["predict", *common, f"--ckpt_path={tmp_path / 'fixed.ckpt'}", "--model.threshold_quantile=0.99"])
    assert "in place of the checkpoint's values: threshold=None (the checkpoint's: 5.0)" in caplog.text
    expected = DN2Module.load_from_checkpoint(ckpt, k=2).threshold
    assert float(given.model.threshold) == pytest.approx(float(expected), rel=1e-6)


def test_a_ckpt_path_that_is_no_checkpoint_is_a_usage_error_naming_the_ones_found(tmp_path, capsys, monkeypatch):
    """A missing file, a folder, the run's config.yaml or a state_dict file given as --ckpt_path stopped with a
    traceback of 10 to 21 frames from inside Lightning or the CLI's checkpoint reading."""
    common = ["--config", "configs/digits.yaml", f"--trainer.default_root_dir={tmp_path}", *FAST]
    fit = build_cli(["fit", *common])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    config = Path(ckpt).parents[1] / "config.yaml"
    torch.save(DN2Module(k=2, pretrained=False).state_dict(), tmp_path / "weights.pt")
    cases = {
        tmp_path / "missing.ckpt": r"missing\.ckpt does not exist: give the \.ckpt file",
        tmp_path: rf"is a folder, not a checkpoint file: .*Checkpoints under {re.escape(str(tmp_path))}: .*\.ckpt",
        config: r"config\.yaml",
        tmp_path / "weights.pt": r"weights\.pt",
    }
    assert config.is_file()
    # paths that Lightning resolves are left to it; `~` (not expanded after `=` by a shell) is the home folder
    from dn2_lightning.checkpointing import lightning_finds_it as _lightning_finds_it

    assert all(map(_lightning_finds_it, ["best", "last", "hpc", "registry", "registry:dn2:v1", "s3://b/x.ckpt"]))
    assert not any(map(_lightning_finds_it, ["registry_v2.ckpt", "registry/model.ckpt", "~/bank.ckpt"]))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / "bank.ckpt").write_bytes(Path(ckpt).read_bytes())  # the run's own stays beside its config.yaml
    tilde = build_cli(["test", *common, "--ckpt_path=~/bank.ckpt"])
    assert len(tilde.model.bank) == len(fit.model.bank) and "test/auroc" in tilde.trainer.callback_metrics
    for path, expected in cases.items():
        with pytest.raises(SystemExit) as stopped:
            build_cli(["test", *common, f"--ckpt_path={path}"])
        error = " ".join(capsys.readouterr().err.split())
        assert stopped.value.code == 2 and "Traceback" not in error, error
        assert re.search(rf"error: .*{expected}", error), error
        # README: each of them "listing the .ckpt files found there" (the run's config.yaml sits beside checkpoints/)
        if path != tmp_path / "missing.ckpt":
            assert re.search(r"Checkpoints under .*\.ckpt", error), error
