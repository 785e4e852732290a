"""What a fit interrupted or capped, then resumed from its checkpoint, leaves as the memory bank, beside a clean
fit (benchmarks/RESULTS.md section 11).

digits, normal class 0, EfficientNet-Lite0 at 32 px, batch 32 (4 training batches), k = 2; each row tests the
resulting module on the digits test set. Rows: a clean fit; a fit that crashes after its second batch, resumed
from its step-1 checkpoint (`ModelCheckpoint(every_n_train_steps=1)`); a fit capped by `limit_train_batches=2`,
resumed without the cap; and the bank rows in the checkpoints of `ModelCheckpoint(every_n_train_steps=N,
save_last=True)`: N = 4 saves at the pass's last step, N = 3 at step 3 of 4 only (then `dn2 fit` saves
`bank.ckpt`, and the Python API warns).

    python benchmarks/resume_bench.py
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
from lightning import Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dn2_lightning import DN2Module, OneClassDataModule


class CrashAfterSecondBatch(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            raise RuntimeError("simulated crash")


def trainer(root: Path, **kwargs) -> Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    return Trainer(accelerator="cpu", default_root_dir=root, **quiet, **kwargs)


def new_model() -> DN2Module:
    return DN2Module(k=2, backbone="efficientnet_lite0", input_size=32, reports=False)


def datamodule() -> OneClassDataModule:
    return OneClassDataModule("digits", normal_class=0, batch_size=32)


def row(name: str, model: DN2Module, root: Path) -> str:
    auroc = trainer(root).test(model, datamodule=datamodule(), verbose=False)[0]["test/auroc"]
    flagged = int((model.test_scores.scores > model.threshold).sum())
    return f"| {name} | {len(model.bank)} | {float(model.threshold):.4f} | {flagged} | {auroc:.5f} |"


def main() -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # DN2's and Lightning's progress lines: only the table is printed
    scratch = tempfile.TemporaryDirectory(prefix="dn2-resume-")  # removed when the script ends
    tmp = Path(scratch.name)
    print("| run | bank rows | threshold | flagged (of 723) | AUROC |")
    print("|---|---:|---:|---:|---:|")
    clean = new_model()
    trainer(tmp / "clean").fit(clean, datamodule=datamodule())
    print(row("clean fit", clean, tmp / "clean"))

    every_step = ModelCheckpoint(dirpath=tmp / "crash", every_n_train_steps=1, save_top_k=-1)
    crashing = trainer(tmp / "crash", enable_checkpointing=True, callbacks=[every_step, CrashAfterSecondBatch()])
    try:
        crashing.fit(new_model(), datamodule=datamodule())
    except RuntimeError:
        pass
    resumed = new_model()
    trainer(tmp / "resumed").fit(resumed, datamodule=datamodule(), ckpt_path=tmp / "crash" / "epoch=0-step=1.ckpt")
    print(row("crashed after batch 2, resumed from step 1", resumed, tmp / "resumed"))

    capped = trainer(tmp / "capped", enable_checkpointing=True, limit_train_batches=2)
    capped.fit(new_model(), datamodule=datamodule())
    uncapped = new_model()
    partial = capped.checkpoint_callback.best_model_path
    trainer(tmp / "uncapped").fit(uncapped, datamodule=datamodule(), ckpt_path=partial)
    print(row("capped at 2 batches, resumed without the cap", uncapped, tmp / "uncapped"))

    for steps in (4, 3):  # a save on the pass's last step, and none
        saver = ModelCheckpoint(dirpath=tmp / f"every{steps}", every_n_train_steps=steps, save_last=True)
        trainer(tmp / "steps", enable_checkpointing=True, callbacks=[saver]).fit(new_model(), datamodule=datamodule())
        for name in (f"epoch=0-step={steps}.ckpt", "last.ckpt"):
            bank = torch.load(tmp / f"every{steps}" / name, weights_only=True)["state_dict"]["bank.embeddings"]
            print(f"| every_n_train_steps={steps}: {name} | {bank.shape[0]} | | | |")


if __name__ == "__main__":
    main()
