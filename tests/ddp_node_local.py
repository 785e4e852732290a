"""2-rank DDP runs in which each rank reads its own copy of the data or of a checkpoint, as nodes with their own
disks do (run by tests/test_ddp.py): copies that differ must be refused on every rank, never mixed silently;
and a sharded bank without a threshold must not hang rank 0's report."""

from __future__ import annotations

import os
import sys

from helpers import BlobDataModule, BlobWithValDataModule, linear_backbone, rank_verdict, say
from lightning import Trainer

from dn2_lightning import DN2Module, OneClassDataModule


def trainer(root: str, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                   max_epochs=1, **kwargs)  # fmt: skip


def main(mode: str, root: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # set for the rank Lightning launches; 0 for this process
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=mode == "small_bank")
    run = trainer(root)
    with rank_verdict(run, (ValueError, MemoryError)):
        if mode == "data":  # each rank its own copy of the folder
            dm = OneClassDataModule("folder", root=os.path.join(root, f"copy{rank}"), load_size=8, batch_size=8)
            run.test(model, datamodule=dm, verbose=False)
        elif mode == "bank":  # each rank its own copy of the checkpoint path
            dm = OneClassDataModule("folder", root=os.path.join(root, "copy0"), load_size=8, batch_size=8)
            run.test(model, datamodule=dm, ckpt_path=os.path.join(root, f"bank{rank}.ckpt"), verbose=False)
        elif mode == "one_node_differs":  # one checkpoint; rank 1's copy of the folder holds one more train file
            dm = OneClassDataModule("folder", root=os.path.join(root, f"copy{rank}"), load_size=8, batch_size=8)
            run.test(model, datamodule=dm, ckpt_path=os.path.join(root, "bank.ckpt"), verbose=False)
        elif mode in ("nan_on_one_rank", "nan_on_one_rank_shard"):  # a NaN pixel in a test image rank 1 reads
            sharding = "shard" if mode.endswith("shard") else "replicate"
            model = DN2Module(k=2, backbone=linear_backbone(), bank_sharding=sharding, reports=False)
            dm = BlobDataModule(batch_size=4)
            dm.test_images[5, 0, 0, 0] = float("nan")  # an unshuffled DistributedSampler deals index 5 to rank 1
            run.test(model, datamodule=dm, verbose=False)
        elif mode == "nan_on_one_rank_predict_writer":  # the same in predict, with a writer reading each batch's rows
            from lightning.pytorch.callbacks import BasePredictionWriter

            class ScoreWriter(BasePredictionWriter):
                def write_on_batch_end(self, trainer, module, prediction, indices, batch, batch_idx, loader_idx):
                    assert len(prediction["score"]) == len(prediction["index"]) == len(prediction["neighbours"])

            model = DN2Module(k=2, backbone=linear_backbone(), reports=False)
            dm = BlobDataModule(batch_size=2)
            dm.test_images[5, 0, 0, 0] = float("nan")  # rank 1's third sample: two more batches follow on its side
            trainer(root, callbacks=[ScoreWriter("batch")]).predict(model, datamodule=dm, return_predictions=False)
        elif mode == "other_k":  # rank 1's module built with another k: each rank would score its share with its own
            model = DN2Module(k=2 + rank, backbone=linear_backbone(), reports=False)
            run.test(model, datamodule=BlobDataModule(batch_size=8), verbose=False)
        elif mode == "resume_other":  # each node resumes fit from its own copy of the path: complete / not started
            run.fit(model, datamodule=BlobDataModule(batch_size=8), ckpt_path=os.path.join(root, f"resume{rank}.ckpt"))
        elif mode == "nan_in_the_pass_then_validation":  # a NaN pixel in a train image rank 1 reads
            dm = BlobWithValDataModule(batch_size=4)
            dm.train_images[5, 0, 0, 0] = float("nan")
            trainer(root, val_check_interval=0.5, num_sanity_val_steps=0).fit(model, datamodule=dm)
        elif mode in ("nan_embeddings_on_one_rank", "nan_embeddings_on_one_rank_shard"):
            # rank 1's backbone gives NaN in its pass's last batch (51 rows a rank by 4: batch 12), read at the end
            import torch

            class NaNOnLastBatch(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.linear, self.calls = linear_backbone(in_features=3 * 8 * 8), 0

                def forward(self, x):
                    out, self.calls = self.linear(x), self.calls + 1
                    return out.clone().fill_(float("nan")) if rank == 1 and self.calls == 13 else out

            sharding = "shard" if mode.endswith("shard") else "replicate"
            model = DN2Module(k=2, backbone=NaNOnLastBatch(), bank_sharding=sharding, reports=False)
            run.fit(model, datamodule=BlobDataModule(batch_size=4))
        elif mode == "checkpoint_on_one_node":  # ckpt_path="last" found on rank 0's disk only
            path = os.path.join(root, "resume0.ckpt") if rank == 0 else None
            run.fit(model, datamodule=BlobDataModule(batch_size=8), ckpt_path=path)
        elif mode == "shard_search_fails":  # rank 1's part of a test batch's sharded search runs out of memory
            from lightning.pytorch import Callback

            import dn2_lightning.sharding

            def out_of_memory(*args, **kwargs):
                raise MemoryError("the local search cannot fit")

            class FailsOnRankOne(Callback):
                def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
                    if rank == 1 and batch_idx == 1:  # its second batch
                        dn2_lightning.sharding.knn_distances = out_of_memory

            model = DN2Module(k=2, backbone=linear_backbone(), bank_sharding="shard", reports=False)
            run = trainer(root, callbacks=[FailsOnRankOne()])
            run.test(model, datamodule=BlobDataModule(batch_size=8), ckpt_path=os.path.join(root, "resume0.ckpt"))
        elif mode == "resume_shard":  # both ranks resume fit from one complete checkpoint into a sharded model
            model = DN2Module(k=3, backbone=linear_backbone(), bank_sharding="shard", reports=False)
            dm = BlobDataModule(batch_size=8)
            run.fit(model, datamodule=dm, ckpt_path=os.path.join(root, "whole.ckpt"))
            scores = ", ".join(f"{float(x):.6f}" for x in model.score_images(dm.test_images[:4]).scores)
            say(f"rank {rank}: threshold {float(model.threshold):.6f}, scores {scores}")
        else:  # a sharded bank of k rows: no threshold, reports on; then predict on the same Trainer
            model = DN2Module(k=4, backbone=linear_backbone(), bank_sharding="shard", reports=True)
            dm = BlobDataModule(n_train=4, n_normal=5, n_anomalous=4, batch_size=2)
            run.test(model, datamodule=dm, verbose=False)
            run.predict(model, datamodule=dm, return_predictions=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
