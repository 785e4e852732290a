"""The ``dn2`` command: LightningCLI over DN2Module and any LightningDataModule.

dn2 test --config configs/fashionmnist.yaml --data.normal_class=3
dn2 fit --config configs/digits.yaml && dn2 test --config configs/digits.yaml --ckpt_path=...
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from dn2_lightning.module import DN2Module


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI behind ``dn2``; ``args``/``run`` as in LightningCLI (for tests and notebooks)."""
    return LightningCLI(
        DN2Module,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # DN2's fit is one pass and stops by itself; this only spares Lightning's "max_epochs not set" notice
        trainer_defaults={"max_epochs": 1},
        auto_configure_optimizers=False,
    )


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``dn2``."""
    build_cli(args)


if __name__ == "__main__":
    cli_main()
