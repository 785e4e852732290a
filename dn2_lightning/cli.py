"""The ``dn2`` command: LightningCLI over DN2Module and any LightningDataModule.

dn2 test --config configs/fashionmnist.yaml --data.normal_class=3
dn2 fit --config configs/digits.yaml && dn2 test --config configs/digits.yaml --ckpt_path=...

Compared with a plain LightningCLI, ``dn2``:

- explains itself in DN2 terms: one line per subcommand, ``dn2 test --help`` fits on a screen (Trainer
  options one line each, the registered backbones and the DataModules' options listed);
- configures Lightning for a model with nothing to train: no model summary, a progress bar without ``v_num``,
  ``log_every_n_steps=1``, ``max_epochs=1``, and no ModelCheckpoint in ``test``/``validate``/``predict``
  (nothing to save there; it would only warn that its ``dirpath`` changed);
- prints what a run produced: the checkpoint after ``fit``, the saved config and log folder after every
  subcommand (the report callback prints the report files, the module the bank size and threshold);
- silences, while it runs and nowhere else, known-harmless Lightning messages that no setting avoids: the
  warnings in :data:`SILENCED_WARNINGS`, the "Tip" advertisements (:data:`SILENCED_INFO`), and in
  ``validate``/``test``/``predict`` the notice that the fit checkpoint's ModelCheckpoint state has no callback
  to restore into.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import logging
import os
import shutil
import textwrap
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden

from dn2_lightning.backbones import BackboneWeightsNotFoundError, list_backbones
from dn2_lightning.checkpointing import absolute_checkpoint_path, lightning_finds_it, readable_checkpoint
from dn2_lightning.console import info
from dn2_lightning.data import GroupDataModule, OneClassDataModule, list_datasets
from dn2_lightning.help_format import DN2HelpFormatter, SuggestingParserMixin, plain_text
from dn2_lightning.module import CUSTOM_BACKBONE, DN2Module

try:  # how jsonargparse defers --print_config (no public API): without it, it prints before --ckpt_path applies
    from jsonargparse._actions import _ActionPrintConfig as _PrintConfig
except ImportError:  # pragma: no cover
    _PrintConfig = None

SUBCOMMAND_HELP = {
    "fit": "Build the memory bank: embed the train set once with the frozen backbone, set the threshold from the "
    "training images' leave-one-out scores, and save both in a checkpoint.",
    "validate": "Score a datamodule's validation set (its val_dataloader) against the memory bank; report AUROC.",
    "test": "Score the test set against the memory bank and report AUROC; write scores.csv, summary.json and figures.",
    "predict": "Score images (e.g. a folder) against the memory bank and write predictions.csv, summary.json "
    "(n scored, n flagged, threshold) and figures.",
}
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")
TRAINER_DOCS = "https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags"
# Lightning messages that no Trainer setting avoids, silenced only while the CLI runs (regexes):
SILENCED_WARNINGS = (
    # DN2Module defines validation_step for datamodules with validation data; most have none
    r"You defined a `validation_step` but have no `val_dataloader`",
    # lightning 2.6 vs torch >= 2.10 (lightning/pytorch/utilities/_pytree.py), nothing a user can act on
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # DDP test/validate: DN2 drops the DistributedSampler's padded duplicates (by sample index), so every sample
    # counts once, which this warning says it would not
    r"Using `DistributedSampler` with the dataloaders",
)
SILENCED_INFO = ("💡 Tip:",)  # advertisements for litlogger / litmodels, printed by every Trainer
# The Trainer options that matter to DN2, shown one per line with a hint; the others (optimisation, epochs,
# validation schedule...) are listed by name only: they are accepted but a one-pass model rarely needs them.
TRAINER_HINTS = {
    "accelerator": "cpu, gpu, mps, auto",
    "strategy": "auto, ddp, ddp_spawn, ...",
    "devices": "count, list of ids, or auto",
    "num_nodes": "machines, for multi-node DDP",
    "precision": "32-true, bf16-mixed, 16-mixed, 64-true",
    "logger": "true = TensorBoard or CSV; false = none",
    "callbacks": "extra Lightning callbacks",
    "default_root_dir": "logs, checkpoints, dn2_reports/",
    "limit_train_batches": "a partial pass = a partial bank",
    "limit_val_batches": "int = batches, float = fraction",
    "limit_test_batches": "int = batches, float = fraction",
    "limit_predict_batches": "int = batches, float = fraction",
    "enable_checkpointing": "null: on in fit, off otherwise",
    "enable_progress_bar": "",
    "fast_dev_run": "one batch of each stage, as a check",
    "profiler": "simple, advanced, pytorch",
}
METHOD_ARGUMENT_HELP = {
    "ckpt_path": "a checkpoint of `dn2 fit` (memory bank + threshold); without one the bank is built from the train "
    "set first.",
    "weights_only": "torch.load(weights_only=...) for ckpt_path.",
    "verbose": "print the metric table.",
    "return_predictions": "keep the per-batch outputs in memory.",
}


class _NoVersionMixin:
    def get_metrics(self, trainer: Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)  # the logger's version number means nothing to a DN2 user
        return items


class DN2RichProgressBar(_NoVersionMixin, RichProgressBar):
    """Lightning's rich progress bar without ``v_num``."""


class DN2TQDMProgressBar(_NoVersionMixin, TQDMProgressBar):
    """Lightning's tqdm progress bar without ``v_num``."""


# the decision threshold a checkpoint carries (DN2Module.set_threshold): used when the run sets neither
THRESHOLD_HPARAMS = ("threshold", "threshold_quantile")
# settings of the run and its machine, not of the model: a run that leaves them out gets the defaults, not the fit's
RUN_HPARAMS = ("reports", "max_memory_bytes", "knn_backend", "bank_sharding")
# settings that define the bank: a run's other value is refused against the checkpoint's, never used
BANK_HPARAMS = (
    "backbone", "pretrained", "input_size", "clean_fraction", "clean_k", "group_pooling", "group_clusters",
    "group_temperature",
)  # fmt: skip


class DN2ArgumentParser(SuggestingParserMixin, LightningArgumentParser):
    """Lightning's parser with :class:`DN2HelpFormatter` by default, also for the parsers jsonargparse makes
    from it (``--data.help CLASS`` builds ``type(parser)(...)``), and "did you mean --model.k?" after an unknown
    option."""

    def __init__(self, *args: Any, formatter_class: type[argparse.HelpFormatter] = DN2HelpFormatter, **kwargs: Any):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


class DN2CLI(LightningCLI):
    """LightningCLI for DN2: specific help, quiet Lightning defaults, and the paths of what a run wrote."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with quiet_lightning():  # the filters of the before_* hooks also end with the command
            super().__init__(*args, **kwargs)

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        main_kwargs.setdefault(
            "description",
            "DN2 anomaly detection: kNN distance to a memory bank of frozen "
            "ImageNet features (Bergman, Cohen & Hoshen, 2020).",
        )
        main_kwargs.setdefault("prog", "dn2")
        main_kwargs.setdefault("formatter_class", DN2HelpFormatter)
        for name, text in SUBCOMMAND_HELP.items():
            kwargs = subparser_kwargs.setdefault(name, {})
            kwargs.setdefault("description", "\n".join(_wrap(text, _help_width())))
            kwargs.setdefault("formatter_class", DN2HelpFormatter)
            indent = " " * len(f"usage: dn2 {name} ")
            kwargs.setdefault(
                "usage",
                f"dn2 {name} [-h] [-c CONFIG] [--print_config] [--ckpt_path PATH]\n{indent}[--trainer.NAME V] "
                "[--model.NAME V] [--data.NAME V]",
            )
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            _tidy_help(self.parser)
            return
        for parser in self._subcommand_parsers.values():
            _tidy_help(parser)
        for action in self.parser._actions:
            for choice in getattr(action, "_choices_actions", []):
                choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        _ints_before_floats(parser)

    def instantiate_classes(self) -> None:
        """Lightning's, with a setting that DN2 refuses while building the model or the data said as a command
        line error (usage, the message, exit code 2), as a value outside a choice is, not as a traceback."""
        with self._refusals_as_usage_errors():
            super().instantiate_classes()
        self._save_absolute_paths()

    def _save_absolute_paths(self) -> None:
        """The run's saved config.yaml files (the log dir's, the report folder's) name the folder the run read: this
        package's datamodules read a relative ``root`` (``--data.root=parts``) from the working directory, so it is
        saved absolute, as reports and checkpoints name files; else ``--config`` of it from another directory
        would read another folder. So is a ``--ckpt_path`` file. ``--print_config`` (printed before this) keeps the
        text as given."""
        config = self.config.get(str(self.subcommand), self.config)  # (what SaveConfigCallback holds and saves)
        # a checkpoint given by a relative path too (not Lightning's "best"/"last"/"hpc"..., nor a URL)
        ckpt = config.get("ckpt_path") if "ckpt_path" in config else None
        if isinstance(ckpt, str):
            config["ckpt_path"] = absolute_checkpoint_path(ckpt)
        if not isinstance(self.datamodule, OneClassDataModule | GroupDataModule):
            return  # another datamodule's root may mean something else
        root = config.get("data.init_args.root")
        if isinstance(root, str) and not os.path.isabs(root):
            config["data.init_args.root"] = os.path.abspath(root)  # as the datamodules resolve it

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, with a setting that DN2 refuses while the run starts (a checkpoint's bank against other
        data, an input size the checkpoint was not built at, missing weights) said as a command line error, as
        :meth:`instantiate_classes` says those found while building the model or the data."""
        with self._refusals_as_usage_errors():
            super()._run_subcommand(subcommand)

    @contextlib.contextmanager
    def _refusals_as_usage_errors(self) -> Iterator[None]:
        try:
            yield
        except Exception as error:
            refusal = _dn2_refusal(error)
            if refusal is None:
                raise
            self._subcommand_parser().error(str(refusal), ex=error)  # JSONARGPARSE_DEBUG=true shows the whole chain

    def _subcommand_parser(self) -> LightningArgumentParser:
        subcommand = getattr(self, "subcommand", None) or self.config.get("subcommand")  # (set after parsing)
        return getattr(self, "_subcommand_parsers", {}).get(subcommand, self.parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing, plus which model settings the run gives itself (its config files and flags, without
        the defaults), so that ``--ckpt_path`` can tell "left out" from "given as the default value".

        ``--print_config`` prints after the checkpoint's settings are applied (:meth:`_parse_ckpt_path`), so the
        printed file reruns what the run would do (jsonargparse would print before them)."""
        with _print_config_deferred():
            super().parse_arguments(parser, args)
            self._given_model: set[str] | None = None
            subcommand = self.config.get("subcommand")
            if subcommand and not isinstance(args, dict | Namespace):
                with contextlib.suppress(Exception, SystemExit):  # a form jsonargparse cannot re-read: defaults
                    given = parser.parse_args(args, defaults=False)[subcommand].get("model")
                    self._given_model = set(vars(given)) if isinstance(given, Namespace) else set()
        if _PrintConfig is not None and _PrintConfig.is_print_config_requested(parser):
            self._parse_ckpt_path()
            _PrintConfig.print_config_if_requested(parser, self.config)

    def _parse_ckpt_path(self) -> None:
        """With ``--ckpt_path``, Lightning replaces every model setting by the checkpoint's, so ``--model.k=50``
        would silently run with the saved k. DN2 keeps the settings the run gives (``k``, kNN backend, memory
        budget, reports, map settings; a bank setting given another value is refused when the checkpoint loads,
        ``DN2Module.on_load_checkpoint``, naming both values) and takes the model's other settings from the
        checkpoint, as ``DN2Module.load_from_checkpoint(path, **given)`` does: a run that leaves out the fit's
        ``--model.k=5`` scores with k = 5 (and says so). Settings of the run and its machine (:data:`RUN_HPARAMS`:
        reports, memory budget, kNN backend, bank sharding) are never the fit's. The decision threshold
        (``threshold``, ``threshold_quantile``, e.g. from ``set_threshold``) comes from the checkpoint only when the
        run sets neither. "Given" means set by the
        run's config files or flags (:meth:`parse_arguments`), even to the default value."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or lightning_finds_it(ckpt_path):
            return
        with self._refusals_as_usage_errors():
            self._apply_checkpoint_settings(subcommand, ckpt_path)

    def _apply_checkpoint_settings(self, subcommand: str, ckpt_path: str) -> None:
        ckpt_path = str(Path(ckpt_path).expanduser())  # `--ckpt_path=~/...`: no shell expands it (Lightning does)
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(_no_checkpoint_file(Path(ckpt_path)))
        try:
            with readable_checkpoint(ckpt_path):
                # memory-mapped where torch can (zip files): only the hyperparameters are read here, not the bank
                with open(ckpt_path, "rb") as file:  # torch's zip format (what mmap needs) starts with a zip entry
                    mmap = file.read(4) == b"PK\x03\x04"
                checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=mmap)
                if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
                    raise KeyError("state_dict")
        except ValueError as error:  # no checkpoint file (the run's config.yaml, a state_dict file): the ones nearby
            raise ValueError(f"{error}{_checkpoints_near(Path(ckpt_path))}") from error
        if not any(str(name).startswith("bank.") for name in checkpoint["state_dict"]):  # every DN2Module's has
            raise ValueError(
                f"--ckpt_path={ckpt_path} is not a checkpoint of DN2 (its state holds no memory bank, bank.*): another "
                "model's? Give the .ckpt file that `dn2 fit` printed, or run `dn2 fit` first."
                f"{_checkpoints_near(Path(ckpt_path))}"
            )
        saved = checkpoint.get("hyper_parameters", {})
        model = self.config[subcommand].get("model")
        if model is None:
            return
        defaults = {n: p.default for n, p in inspect.signature(DN2Module.__init__).parameters.items()}
        if self._given_model is not None:
            left_at_default = {name for name in defaults if name in model and name not in self._given_model}
        else:
            left_at_default = {name for name, default in defaults.items() if name in model and model[name] == default}
        restored = [name for name in defaults if name not in (*THRESHOLD_HPARAMS, *RUN_HPARAMS)]
        if left_at_default.issuperset(THRESHOLD_HPARAMS):  # the checkpoint's threshold, unless the run sets one
            restored += THRESHOLD_HPARAMS
        taken = []
        for name in restored:
            if name not in saved or str(saved[name]).startswith(CUSTOM_BACKBONE):
                continue
            if name in left_at_default and model[name] != saved[name]:
                model[name] = saved[name]
                taken.append(f"{name}={saved[name]!r}")
        if taken:
            info(f"DN2: from the checkpoint (this run leaves them out): {', '.join(taken)}")
        # and what the run's config files (e.g. a shipped config's k: 2) or flags set in place of the checkpoint's
        # scoring settings (bank settings are equal or refused), a fixed threshold dropped for a quantile included
        replaced = [
            f"{name}={model[name]!r} (the checkpoint's: {saved[name]!r})"
            for name in defaults
            if name not in (*RUN_HPARAMS, *BANK_HPARAMS) and name in model and name in saved
            and model[name] != saved[name] and (name not in left_at_default or name == "threshold")
            and isinstance(model[name], bool | int | float | str | list | tuple | type(None))
        ]  # fmt: skip
        if replaced:
            listing = ", ".join(replaced)
            info(f"DN2: set by this run's config files or flags, in place of the checkpoint's values: {listing}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if self.subcommand in EVALUATION_SUBCOMMANDS and config.get("enable_checkpointing") is None:
            kwargs.setdefault("enable_checkpointing", False)  # nothing to save; spares "dirpath has changed"
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, default_progress_bar()])
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as error:
            # the Trainer refusing its settings (--trainer.devices=abc, an accelerator this machine lacks): a usage
            # error, as DN2's own refusals are, not Lightning's traceback
            self._subcommand_parser().error(f"the Trainer refused its settings (--trainer.*): {error}", ex=error)

    def after_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        path = (callback.best_model_path or callback.last_model_path) if callback is not None else ""
        if not self.model.fit_built_bank:
            info(f"DN2: the bank is --ckpt_path's ({self.trainer.ckpt_path}); no new checkpoint was written.")
        elif callback is not None and callback.dirpath and self.model.checkpoints_missing:
            # ModelCheckpoint saved nothing (e.g. check_val_every_n_epoch=2 on DN2's one epoch): save the bank here
            path = str(Path(callback.dirpath) / "bank.ckpt")
            self.trainer.save_checkpoint(path)
            info(f"DN2: checkpoint (memory bank + threshold) written to {path} (ModelCheckpoint saved none)")
            info(f"DN2: reuse it with: dn2 test|predict --config ... --ckpt_path={path}")
        elif path:
            path = self._checkpoint_with_bank(path)
            info(f"DN2: checkpoint (memory bank + threshold) written to {path}")
            info(f"DN2: reuse it with: dn2 test|predict --config ... --ckpt_path={path}")
        else:
            info("DN2: no checkpoint written (enable_checkpointing=false): the bank is not saved.")
        self._print_run_files()

    def _checkpoint_with_bank(self, path: str) -> str:
        """``path``, or a checkpoint saved now beside it (``bank.ckpt``) when no ModelCheckpoint save holds this
        fit's bank (``DN2Module.checkpoints_lack_the_bank``: ``every_n_train_steps=N`` missing the pass's final step,
        or a fit resumed from a partial bank that read its pass again after Lightning's last save)."""
        if not self.model.checkpoints_lack_the_bank:  # the same on every rank
            return path
        fresh = str(Path(path).with_name("bank.ckpt"))
        self.trainer.save_checkpoint(fresh)
        return fresh

    def before_fit(self) -> None:
        # after_fit saves a checkpoint holding the bank when ModelCheckpoint's last one does not (and says so)
        warnings.filterwarnings("ignore", message="no checkpoint of this fit holds its memory bank")
        warnings.filterwarnings("ignore", message="ModelCheckpoint saved no checkpoint in this fit")

    def before_validate(self) -> None:
        datamodule = self.datamodule
        has_split = is_overridden("val_dataloader", self.model, DN2Module) or (
            datamodule is not None and is_overridden("val_dataloader", datamodule, LightningDataModule)
        )
        if datamodule is not None and not has_split:
            self._subcommand_parser().error(
                f"{type(datamodule).__name__} has no validation split (no val_dataloader): score its test split with "
                "`dn2 test`, or use a datamodule of your own that defines val_dataloader."
            )
        _ignore_fit_callback_states()

    def before_test(self) -> None:
        _ignore_fit_callback_states()

    def before_predict(self) -> None:
        _ignore_fit_callback_states()

    def after_validate(self) -> None:
        self._print_run_files()

    def after_test(self) -> None:
        self._print_run_files()

    def after_predict(self) -> None:
        self._print_run_files()

    def _print_run_files(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank reads it
        config = Path(log_dir or self.trainer.default_root_dir) / "config.yaml"
        if self.save_config_callback is not None and config.is_file():
            info(f"DN2: run config written to {config} (rerun with --config)")
        if self.trainer.loggers:
            info(f"DN2: logs in {log_dir}")


def _print_config_deferred() -> contextlib.AbstractContextManager:
    """jsonargparse's ``--print_config`` held back while parsing (printed by ``DN2CLI.parse_arguments``)."""
    return _PrintConfig.skip_print_config() if _PrintConfig is not None else contextlib.nullcontext()


def _ignore_fit_callback_states() -> None:
    # validate/test/predict run without ModelCheckpoint (see instantiate_trainer); Lightning then warns that the
    # fit checkpoint's ModelCheckpoint state has no callback to go to, which is harmless: it only records the
    # fit run's own checkpoint paths. Inside DN2CLI's catch_warnings, so the filter ends with the command.
    warnings.filterwarnings("ignore", message=r".*Be aware that when using `ckpt_path`, callbacks used to create")


def default_progress_bar() -> ProgressBar:
    """The progress bar Lightning would pick (rich when installed), without ``v_num``."""
    return DN2RichProgressBar() if _RICH_AVAILABLE else DN2TQDMProgressBar()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence :data:`SILENCED_WARNINGS` and :data:`SILENCED_INFO` inside the block only."""

    class DropInfo(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(SILENCED_INFO)

    drop = DropInfo()
    loggers = [
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message in SILENCED_WARNINGS:
                warnings.filterwarnings("ignore", message=f".*{message}")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI behind ``dn2``; ``args``/``run`` as in LightningCLI (for tests and notebooks)."""
    return DN2CLI(
        DN2Module,
        LightningDataModule,
        parser_class=DN2ArgumentParser,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "max_epochs": 1,  # DN2's fit is one pass and stops by itself; this spares "max_epochs not set"
            "enable_model_summary": False,  # a frozen backbone: "Trainable params: 0" says nothing
            "log_every_n_steps": 1,  # nothing is logged per step; spares "fewer batches than log interval"
        },
        auto_configure_optimizers=False,
    )


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``dn2``."""
    build_cli(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the process group up; gloo's threads can then abort the exit (SIGABRT) of a run
        # that finished its work
        torch.distributed.destroy_process_group()


def _ints_before_floats(parser: LightningArgumentParser) -> None:
    """Parse the Trainer's ``int | float`` settings (``limit_*_batches``, ``overfit_batches``,
    ``val_check_interval``: an int counts batches, a float is a fraction) int first, whatever was imported before.

    ``typing`` caches ``Optional[Union[int, float]]`` under a key equal to ``Optional[Union[float, int]]`` (a Union
    compares without order), so once a module has built the latter (``rich``, ``sklearn.metrics``), Lightning's
    hint reads float first and jsonargparse parses ``--trainer.limit_train_batches=1`` as 1.0: every batch, not one.
    A flat ``Union[int, float, ...]`` is cached by its members in order, so it keeps int first."""
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)  # (jsonargparse's ActionTypeHint)
        members = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else ()
        if int in members and float in members:
            action._typehint = typing.Union[(int, float, *(m for m in members if m not in (int, float)))]


# ------------------------------------------------------------------------------------------------ help


def _tidy_help(parser: LightningArgumentParser) -> None:
    """Make ``--help`` short and DN2-specific: Trainer options one line each, the backbones and data options
    listed, generic Lightning texts replaced."""
    groups = parser.groups or {}
    others: list[str] = []
    for action in parser._actions:
        dest = action.dest or ""
        if dest.endswith(".help") and dest != "data.help":
            action.help = argparse.SUPPRESS  # "--trainer.logger.help CLASS" etc.: Lightning's class docs
        elif dest.startswith("trainer."):
            name = dest.split(".", 1)[1]
            if name in TRAINER_HINTS:
                hint = TRAINER_HINTS[name]
                action.one_line = f"{_default_text(parser.get_default(dest)):<6}" + (f" {hint}" if hint else "")
            else:  # listed by name only; not SUPPRESS, which would also drop it from --print_config and config.yaml
                action.dn2_hidden = True
                others.append(name)
        elif dest == "model.backbone":
            action.help = (
                f"a registered backbone name: {', '.join(list_backbones())}; or (config/Python) an nn.Module mapping "
                "images [B, 3, H, W] in [0, 1] to embeddings [B, D]."
            )
        elif dest == "ckpt_path" and getattr(parser, "subcommand", None) == "fit":
            action.help = "a checkpoint to resume from (DN2's fit is one pass; rarely needed)."
        elif dest in METHOD_ARGUMENT_HELP:
            action.help = METHOD_ARGUMENT_HELP[dest]
        elif dest == "seed_everything":
            action.help = "seed of seed_everything; true = a random seed."
    if "trainer" in groups:
        groups["trainer"].title = "Trainer (Lightning; --trainer.NAME VALUE)"
        width = _help_width() - 2
        groups["trainer"].description = "\n".join(
            _wrap(f"Option, default and hint. Also accepted: {', '.join(others)}.", width)
            + _wrap(f"Descriptions: {TRAINER_DOCS}", width)
        )
    if "model" in groups:
        groups["model"].title = "DN2 model (--model.NAME VALUE)"
        groups["model"].description = None
    for group in parser._action_groups:
        if any(a.dest == "ckpt_path" for a in group._group_actions):
            group.title = f"Run (dn2 {getattr(parser, 'subcommand', '')})"
            group.description = None
    if "data" in groups:
        groups["data"].title = "Data (--data.NAME VALUE)"
        groups["data"].description = _data_help(_help_width() - 2)  # the group indents by 2


def _data_help(width: int = 100) -> str:
    """The options of this library's DataModules, one entry each (a subclass-mode group lists none)."""
    lines = _wrap(
        "The config's data.class_path (or --data CLASS) picks the DataModule: dn2_lightning.OneClassDataModule, "
        "dn2_lightning.GroupDataModule, or any LightningDataModule. --data.help CLASS shows all its options. "
        f"Datasets: {', '.join(list_datasets())}, or folder (your own images).",
        width,
    )
    shared = _documented_params(OneClassDataModule)
    lines += ["", "OneClassDataModule (one normal class; dataset=folder for your own images):"]
    lines += _param_lines(shared, width)
    group = {n: v for n, v in _documented_params(GroupDataModule).items() if n not in shared}
    lines += ["", "GroupDataModule (group setting, paper §3.3), also:"]
    lines += _param_lines(group, width)
    return "\n".join(lines) + "\n"


def _documented_params(cls: type) -> dict[str, tuple[Any, str]]:
    """``name -> (default, description)`` from ``cls.__init__``'s signature and Google-style docstring."""
    import inspect

    from docstring_parser import parse

    descriptions: dict[str, str] = {}
    for param in parse(cls.__doc__ or "").params:
        for name in param.arg_name.split(","):
            descriptions[name.strip()] = plain_text(param.description or "")
    params = inspect.signature(cls.__init__).parameters
    return {n: (p.default, descriptions.get(n, "")) for n, p in params.items() if n != "self"}


def _param_lines(params: dict[str, tuple[Any, str]], width: int) -> list[str]:
    lines = []
    for name, (default, description) in params.items():
        head = f"  --data.{name:<17}"
        text = f"{description} (default: {_default_text(default)})".strip()
        lines += textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * len(head))
    return lines


def _no_checkpoint_file(path: Path) -> str:
    """Why ``--ckpt_path`` names no checkpoint file, with the ones nearby."""
    what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
    return f"--ckpt_path={path} {what}: give the .ckpt file that `dn2 fit` printed.{_checkpoints_near(path)}"


def _checkpoints_near(path: Path) -> str:
    """The first ``.ckpt`` files in a folder (its runs' too) or beside a file (the run's config.yaml sits beside
    ``checkpoints/``), as a sentence; empty when none."""
    folder = path if path.is_dir() else path.parent
    # a folder of runs: lightning_logs/version_0/checkpoints/*.ckpt
    if path.is_dir():
        patterns: tuple[str, ...] = ("*.ckpt", "*/*.ckpt", "*/*/*.ckpt", "*/*/*/*.ckpt")
    else:
        patterns = ("*.ckpt", "*/*.ckpt") if path.is_file() else ("*.ckpt",)
    found = (p for pattern in patterns for p in folder.glob(pattern) if p != path) if folder.is_dir() else iter(())
    found = sorted(map(str, itertools.islice(found, 5)))  # (the first found: a whole disk is not walked)
    return f" Checkpoints under {folder}: {', '.join(found)}." if found else ""


def _dn2_refusal(error: BaseException) -> BaseException | None:
    """The ``ValueError``/``OSError``/:class:`BackboneWeightsNotFoundError` raised by this package's own checks in
    ``error``'s chain (jsonargparse wraps
    a class's refusal into "Does not validate against any of the Union subtypes"). A ``TypeError`` (a wrong call
    inside the package) keeps its traceback."""
    package = Path(__file__).parent
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frame = current.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        raised_here = frame is not None and Path(frame.tb_frame.f_code.co_filename).is_relative_to(package)
        if raised_here and isinstance(current, ValueError | OSError | BackboneWeightsNotFoundError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _help_width() -> int:
    return min(max(shutil.get_terminal_size().columns - 2, 60), 100)


def _default_text(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width)


if __name__ == "__main__":
    cli_main()
