"""Audit of the command lines as users reach them (``dn2``, ``dn2-protocol``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dn2_lightning.protocol import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "0"], "error: k=0 must be an integer >= 1"),
        (["--classes", "12"], "error: classes[0]=12 is out of range 0..9"),
        (["--precision", "16"], "error: precision='16' is not one of"),
    ],
)
def test_protocol_command_line_refusal_is_a_usage_error(flags, message, monkeypatch, capsys):
    """``dn2-protocol --k 0`` printed a 25-line traceback: a refused setting is a usage error (exit code 2, the
    message on the last line), as ``dn2`` says it; ``main(args)`` from Python still raises the ValueError."""
    argv = ["dn2-protocol", "--dataset", "digits", "--input_size", "32", "--device", "cpu", "--progress", "false"]
    monkeypatch.setattr(sys, "argv", [*argv, *flags])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(message)
    with pytest.raises(ValueError):
        main(argv[1:] + flags)


def test_ckpt_path_of_another_model_is_a_usage_error(tmp_path, capsys):
    """``dn2 test --ckpt_path=<another model's checkpoint>`` stopped in load_state_dict with a 44-line traceback
    listing every missing key: it is a usage error naming --ckpt_path and the fix."""
    import torch

    from dn2_lightning.cli import cli_main

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(3)}, "hyper_parameters": {"lr": 0.1}}, other)
    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    with pytest.raises(SystemExit) as refused:
        cli_main(["test", "--config", str(config), f"--ckpt_path={other}", "--trainer.logger=false"])
    assert refused.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: --ckpt_path={other} is not a checkpoint of DN2") and "dn2 fit" in last


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--trainer.devices=abc", "`devices` selected with `CPUAccelerator` should be an int > 0"),
        ("--trainer.strategy=nonsense", "You selected an invalid strategy name: `strategy='nonsense'`"),
    ],
)
def test_a_trainer_setting_the_trainer_refuses_is_a_usage_error(flag, message, tmp_path, capsys):
    """``dn2 test --trainer.devices=abc`` ended in a 20-line traceback from inside Lightning: the Trainer's refusal
    is a usage error (exit code 2) with Lightning's message on the last line."""
    from dn2_lightning.cli import cli_main

    config = Path(__file__).parents[1] / "configs" / "digits.yaml"
    with pytest.raises(SystemExit) as refused:
        cli_main(["test", "--config", str(config), flag, f"--trainer.default_root_dir={tmp_path}"])
    assert refused.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: the Trainer refused its settings (--trainer.*): ") and message in last
