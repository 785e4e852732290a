"""DDP on CPU (gloo, 2 processes) gives the single-device scores, bank and AUROC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_run import main as run_ddp_script
from helpers import BlobDataModule, linear_backbone, quiet_trainer

from dn2_lightning import DN2Module

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(tmp_path: Path, devices: int, setting: str, mode: str, sharding: str = "replicate") -> dict:
    out = tmp_path / f"{devices}-{setting}-{mode}-{sharding}.pt"
    if devices == 1:
        run_ddp_script(str(out), 1, setting, mode, sharding)
    else:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(out), str(devices), setting, mode, sharding],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("setting, sharding", [("drawn", "replicate"), ("unsupervised_drawn", "shard")])
def test_ddp_threshold_draws_the_single_device_training_images(tmp_path, setting, sharding):
    # threshold_samples=30 of 103: every rank must draw the same images as one device does, whichever rank holds
    # them (the draw is made from every rank's ids), with the images cleaning removed drawn from the same set
    single = run(tmp_path, 1, setting, "fit")
    ddp = run(tmp_path, 2, setting, "fit", sharding)
    assert len(single["loo_scores"]) == 30
    torch.testing.assert_close(ddp["loo_scores"], single["loo_scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["threshold"], single["threshold"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "setting, mode, sharding",
    [
        ("unimodal", "fit", "replicate"),
        ("unimodal", "test", "replicate"),
        ("unsupervised", "fit", "replicate"),
        ("unimodal", "fit", "shard"),
        ("unsupervised", "test", "shard"),
        ("maps", "test", "replicate"),
    ],
)
def test_ddp_equals_single_device(tmp_path, setting, mode, sharding):
    single = run(tmp_path, 1, setting, mode)
    ddp = run(tmp_path, 2, setting, mode, sharding)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # 67 test samples over 2 ranks: the sampler pads one duplicate, which must not be scored twice
    assert torch.equal(ddp["indices"], torch.arange(67))
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)
    assert ddp["auroc"] == pytest.approx(single["auroc"], abs=1e-9)
    assert 0.5 < single["auroc"] < 1.0 or setting == "maps", "the data must make the AUROC informative"
    assert ddp["bank_rows"] == single["bank_rows"] == (82 if setting == "unsupervised" else 103)
    # anomaly maps gathered from both ranks, with their ground-truth regions: the same pixel AUROC and PRO
    assert ddp["pixel"] == pytest.approx(single["pixel"], abs=1e-6)
    assert len(ddp["pixel"]) == (2 if setting == "maps" else 0)
    torch.testing.assert_close(ddp["threshold"], single["threshold"], rtol=1e-5, atol=1e-6)
    if sharding == "replicate":
        assert torch.equal(ddp["bank_indices"], single["bank_indices"])
        torch.testing.assert_close(ddp["bank"], single["bank"], rtol=1e-5, atol=1e-6)
    else:  # rank 0 holds about half of the bank, and only its share
        assert 30 < len(ddp["bank_indices"]) < 70
        assert set(ddp["bank_indices"].tolist()) < set(single["bank_indices"].tolist())


@pytest.mark.parametrize(
    "where, sharding, setting",
    [("", "replicate", "unimodal"), ("", "shard", "unimodal"), ("_on_rank_zero", "replicate", "maps")],
)
def test_ddp_fit_then_a_single_device_test_scores_alone(tmp_path, where, sharding, setting):
    # Lightning's advice (test on one device, so that each sample is scored once) in a DDP script: every process,
    # or process 0 alone, runs Trainer(devices=1).test while the process group is still up. It must not gather with
    # the other process (each read every sample: "read by all 2 ranks"; or a hang), and its reports are written once.
    # (process 0 alone with anomaly maps: the pixel AUROC's torchmetrics state synced with the process group: a hang)
    single = run(tmp_path, 1, setting, "test")
    after = run(tmp_path, 2, setting, "fit_then_one_device" + where, sharding)
    if sharding == "shard":  # each process holds half of the bank: scoring against it would be silently wrong
        assert "holds rank 0's shard" in after["error"] and "load_from_checkpoint" in after["error"]
        assert after["saved_rows"] == 103  # the fix it names: trainer.save_checkpoint gathers the whole bank
        return
    assert torch.equal(after["indices"], torch.arange(67))
    torch.testing.assert_close(after["scores"], single["scores"], rtol=1e-5, atol=1e-6)
    assert after["auroc"] == pytest.approx(single["auroc"], abs=1e-9)
    torch.testing.assert_close(after["threshold"], single["threshold"], rtol=1e-5, atol=1e-6)
    assert after["pixel"] == pytest.approx(single["pixel"]) and len(after["pixel"]) == (2 if setting == "maps" else 0)
    assert len(list(tmp_path.glob("**/dn2_reports/test_*/scores.csv"))) == 1


@pytest.mark.parametrize(
    "setting, sharding", [("unimodal", "replicate"), ("unimodal", "shard"), ("unsupervised", "shard")]
)
def test_ddp_checkpoint_reloads_on_one_device(tmp_path, setting, sharding):
    ddp = run(tmp_path, 2, setting, "fit", sharding)
    model = DN2Module.load_from_checkpoint(tmp_path / f"2-{setting}-fit-{sharding}.ckpt", backbone=linear_backbone())
    # the whole bank, also when it was sharded, and the rows cleaning removed (for the threshold)
    assert (len(model.bank), len(model.bank.removed)) == ((103, 0) if setting == "unimodal" else (82, 21))
    model.bank.set_loo_scores(model.bank.loo_scores[:0], 0)  # recomputed here, from the checkpoint's rows
    torch.testing.assert_close(model.threshold, ddp["threshold"], rtol=1e-5, atol=1e-6)
    if setting == "unimodal":
        quiet_trainer().test(model, datamodule=BlobDataModule(n_train=103, n_normal=41, n_anomalous=26, batch_size=8))
        torch.testing.assert_close(model.test_scores.scores, ddp["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "setting, mode", [("noindex_no_sampler", "test"), ("iterable", "test"), ("custom_batch_sampler", "fit")]
)
def test_ddp_without_distributed_sampler_refuses_samples_without_index(tmp_path, setting, mode):
    # ranks may read every sample and number it differently (2x the bank), or a batch sampler may regroup or pad
    with pytest.raises(AssertionError, match=r"samples without an 'index' are numbered from the DistributedSampler"):
        run(tmp_path, 2, setting, mode)


def test_ddp_without_distributed_sampler_names_it_for_indexed_samples(tmp_path):
    # every rank read every sample: the error blamed a ConcatDataset's shared indices and suggested dropping them
    with pytest.raises(AssertionError, match=r"read by all 2 ranks: .*use_distributed_sampler=False"):
        run(tmp_path, 2, "index_no_sampler", "test")


@pytest.mark.parametrize("setting", ["shuffled_predict", "rank_seeded_shuffled_predict", "mixed_shuffled_predict"])
def test_ddp_predict_from_a_shuffling_dataloader_is_refused(tmp_path, setting):
    # each rank drew its own permutation: 537-542 of 723 samples scored, about 185 twice and 185 never, silently
    # (also with a generator seeded differently on each rank, or a shuffle on one rank only, which hung; one seeded
    # alike runs: test_ddp_edge_cases_...)
    with pytest.raises(AssertionError, match=r"RandomSampler draws its own order on every rank .* shuffle=False"):
        run(tmp_path, 2, setting, "predict")


def test_ddp_fit_resumed_mid_epoch_refuses_a_random_sampler_in_the_pass_it_reads_again(tmp_path):
    # Lightning skips on_train_epoch_start for a mid-epoch resume: the pass read again outside the loops was not
    # checked (a reviewer: 31 distinct of 40 bank rows, silently)
    with pytest.raises(AssertionError, match=r"SubsetRandomSampler draws its own order on every rank"):
        run(tmp_path, 2, "random_on_resume", "resume")


def test_ddp_bank_built_on_first_need_reads_the_train_loader_with_its_worker_setup(tmp_path):
    # under DDP the train loader is rebuilt with a DistributedSampler: its worker_init_fn (here: images x 0.5 in
    # each worker), spawn context, seeds and the rest must come along, or the bank is not the one fit builds
    single = run(tmp_path, 1, "worker_init", "test")
    ddp = run(tmp_path, 2, "worker_init", "test")
    rows = torch.empty_like(ddp["bank"])
    rows[ddp["bank_indices"]] = ddp["bank"]
    torch.testing.assert_close(rows, single["bank"][single["bank_indices"].argsort()])
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)


def test_ddp_bank_outside_fit_from_a_custom_batch_sampler_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError, match=r"building the memory bank under DDP outside fit .* OwnBatchSampler"):
        run(tmp_path, 2, "custom_batch_sampler", "test")


def test_ddp_sharded_bank_records_every_training_path(tmp_path):
    # rank 0's shard lacks the highest index: the paths (checkpointed from rank 0) must still reach it
    ddp = run(tmp_path, 2, "paths", "test", "shard")
    assert ddp["train_paths"] == [f"train/{i:03d}.png" for i in range(104)]
    assert 103 not in ddp["bank_indices"].tolist()


@pytest.mark.parametrize("sharding", ["replicate", "shard"])
def test_ddp_predict_gathers_every_sample_once(tmp_path, sharding):
    single = run(tmp_path, 1, "unimodal", "predict")
    ddp = run(tmp_path, 2, "unimodal", "predict", sharding)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # 67 samples: rank 0 reads 34, rank 1 33 (Lightning's predict sampler does not pad)
    assert torch.equal(ddp["indices"], torch.arange(67))
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "setting, mode, sharding, n",
    [
        ("noindex", "test", "replicate", 67),  # padded samples without an index must not count as new ones
        ("uneven", "predict", "shard", 5),  # ranks read 2 and 1 batches: the sharded searches still pair up
        ("group_none", "test", "replicate", 21),  # a padded group adds 3 member rows, all padding
        ("group_none", "test", "shard", 21),  # and member copies are skipped across shards
        ("group_none_clean", "test", "shard", 21),  # cleaning removes whole groups across shards
        ("noindex", "fit", "replicate", 67),  # fit's sampler shuffles under DDP: rows keep their dataset index
        ("noindex", "predict", "replicate", 67),  # predict's sampler sits in the batch sampler
        ("seeded_shuffled_predict", "predict", "replicate", 67),  # a seeded shuffle: one order on every rank
        ("outliers_on_rank_zero", "test", "shard", 19),  # cleaning empties rank 0's shard
        ("noindex", "resume", "replicate", 67),  # fit resumed from a mid-epoch checkpoint reads its pass again
        ("unsupervised", "resume", "shard", 67),
    ],
)
def test_ddp_edge_cases_equal_single_device(tmp_path, setting, mode, sharding, n):
    single = run(tmp_path, 1, setting, "fit" if mode == "resume" else mode, sharding)  # resumed: a clean fit's
    ddp = run(tmp_path, 2, setting, mode, sharding)
    assert torch.equal(ddp["indices"], torch.arange(n)) and torch.equal(single["indices"], torch.arange(n))
    torch.testing.assert_close(ddp["scores"], single["scores"], rtol=1e-5, atol=1e-6)
    if mode != "predict" and sharding == "replicate":
        assert torch.equal(ddp["bank_indices"], single["bank_indices"])
        torch.testing.assert_close(ddp["bank"], single["bank"], rtol=1e-5, atol=1e-6)
    if setting == "outliers_on_rank_zero":
        assert len(ddp["bank_indices"]) == 0 and ddp["bank_rows"] == 3  # the case: rank 0 holds no row
    if mode != "predict":
        assert ddp["bank_rows"] == single["bank_rows"]
        assert ddp["auroc"] == pytest.approx(single["auroc"], abs=1e-9)
        torch.testing.assert_close(ddp["threshold"], single["threshold"], rtol=1e-5, atol=1e-6)


def test_ddp_images_of_another_size_on_another_rank_than_zero_are_warned_about(tmp_path):
    """The warning of test images of another size than the bank's was rank 0's: the 12 px images that the sampler
    gave rank 1 only went unmentioned."""
    out = tmp_path / "other-size.pt"
    args = [sys.executable, str(SCRIPT), str(out), "2", "other_size_on_rank_one", "test", "replicate"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "memory bank was built from" in line]
    assert len(said) == 1 and "samples scored on rank 1 are 12x12 pixels" in said[0], said
    assert torch.equal(torch.load(out, weights_only=True)["indices"], torch.arange(9))  # every sample scored


@pytest.mark.parametrize("short_rank", [None, 1])
def test_ddp_patch_bank_memory_check_counts_every_rank(tmp_path, short_rank):
    """Each rank holds the gathered patch bank: the check before assembling it counted this rank's share only (7
    of 13 images: a bank of 212,992 bytes accepted under a 150,000-byte limit, then built on every rank). With one
    rank short of memory (``short_rank``), that rank refused alone and the other waited in the gather for ever."""
    from dn2_lightning.data.synthetic import write_synthetic_defects

    root = write_synthetic_defects(tmp_path / "set", n_train=13, n_test_good=3, n_test_per_kind=2, image_size=32)
    script = Path(__file__).with_name("ddp_maps_memory.py")
    args = [sys.executable, str(script), str(root), "150000"] + ([] if short_rank is None else [str(short_rank)])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert sorted(line[:16] for line in lines) == ["rank 0: refused:", "rank 1: refused:"], proc.stdout[-2000:]
    if short_rank is not None:
        assert all(f"on rank {short_rank}:" in line for line in lines), proc.stdout[-2000:]
    assert all("14 images" in line for line in lines)  # 13 and the DistributedSampler's padding copy


def test_ddp_cli_says_each_warning_once_and_not_lightnings_sampler_advice(tmp_path):
    """Under 2 ranks every DN2 warning was printed by each rank (the bank, the data and the AUROC are the same on
    both), and `dn2 test` repeated Lightning's advice to test on one device, which DN2's de-duplication makes moot."""
    common = ["--config", str(Path("configs/digits.yaml").resolve()), "--model.input_size=32", "--trainer.devices=2"]
    common += ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]
    outputs = {}
    for stage, extra in [("fit", ["--trainer.limit_train_batches=1", "--data.batch_size=32"]), ("test", [])]:
        proc = subprocess.run(
            [sys.executable, "-m", "dn2_lightning.cli", stage, *common, *extra],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[stage] = proc.stdout + proc.stderr
    assert outputs["fit"].count("the memory bank was built from 1 of") == 1, outputs["fit"][-3000:]
    assert "DistributedSampler" not in outputs["test"] and outputs["test"].count("AUROC") >= 1


def _run_node_local(mode: str, root: Path) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ddp_node_local.py")), mode, str(root)],
        capture_output=True,
        text=True,
        timeout=300,  # a hang (a collective only some ranks enter) fails the test instead of blocking it
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))


def test_ddp_ranks_reading_other_copies_of_the_data_or_the_checkpoint_are_refused(tmp_path):
    """Nodes with their own disks: a train image unreadable on one node's copy only (on_corrupt="skip" drops it
    there) numbered the files otherwise on that rank: 8 images twice in the bank, 8 missing, AUROC 0.571 -> 0.512
    (a reviewer, 2 emulated nodes), and a hang with bank_sharding="shard"; a checkpoint path holding another file on
    one node scored each rank against its own bank. Every rank now refuses; identical copies are accepted."""
    import shutil

    from test_user_paths import _digit_folder

    _digit_folder(tmp_path / "copy0", 0, 5)
    shutil.copytree(tmp_path / "copy0", tmp_path / "copy1")
    assert _run_node_local("data", tmp_path) == ["rank 0: accepted", "rank 1: accepted"]
    (tmp_path / "copy1" / "train" / "good" / "005.png").write_bytes(b"cut short")  # unreadable on rank 1 only
    refused = _run_node_local("data", tmp_path)
    assert [line[:16] for line in refused] == ["rank 0: refused:", "rank 1: refused:"], refused
    assert "rank 0: 40 samples" in refused[0] and "rank 1: 39 samples" in refused[0]

    from dn2_lightning import OneClassDataModule

    for seed in (0, 1):  # one checkpoint per "node": the same training files, embedded by other weights
        model = DN2Module(k=2, backbone=linear_backbone(seed, in_features=3 * 8 * 8), reports=False)
        trainer = quiet_trainer()
        trainer.fit(model, datamodule=OneClassDataModule("folder", root=str(tmp_path / "copy0"), load_size=8))
        trainer.save_checkpoint(tmp_path / f"bank{seed}.ckpt")
    refused = _run_node_local("bank", tmp_path)
    assert [line[:16] for line in refused] == ["rank 0: refused:", "rank 1: refused:"], refused
    assert "the ranks hold different memory banks" in refused[0]
    # one node's checkpoint holds no bank: each rank entered another collective, which paired them with each
    # other's payloads (a TypeError and an unrelated sampler error), or hung until the gloo timeout
    fresh = DN2Module(k=2, backbone=linear_backbone(1, in_features=3 * 8 * 8), reports=False)
    trainer = quiet_trainer()
    trainer.strategy.connect(fresh)
    trainer.save_checkpoint(tmp_path / "bank1.ckpt")
    refused = _run_node_local("bank", tmp_path)
    assert [line[:16] for line in refused] == ["rank 0: refused:", "rank 1: refused:"], refused
    assert "the ranks' memory banks differ" in refused[0] and "rank 1: (False, False, False)" in refused[0]


def test_ddp_fit_resumed_into_a_sharded_model_scores_as_one_process(tmp_path):
    """A complete checkpoint restored by fit into a bank_sharding="shard" model stayed whole on every rank, which
    then searched it as its shard: every row twice, the threshold 1.149 instead of 1.842 and score_images off by up
    to 0.014, without a word (a reviewer, k=3)."""
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(DN2Module(k=2, backbone=linear_backbone(), reports=False), datamodule=BlobDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "whole.ckpt")
    single = DN2Module.load_from_checkpoint(tmp_path / "whole.ckpt", k=3, backbone=linear_backbone())
    scores = ", ".join(f"{float(x):.6f}" for x in single.score_images(BlobDataModule().test_images[:4]).scores)
    expected = f"threshold {float(single.threshold):.6f}, scores {scores}"
    lines = ["rank 0: accepted", f"rank 0: {expected}", "rank 1: accepted", f"rank 1: {expected}"]
    assert _run_node_local("resume_shard", tmp_path) == lines


def test_ddp_sharded_bank_without_a_threshold_does_not_hang_rank_zeros_report(tmp_path):
    """A sharded bank of exactly k rows has no threshold; rank 0's report asked for it again, a collective the
    other rank never entered: rc=1, or a hang when that rank went on (test, then predict)."""
    assert _run_node_local("small_bank", tmp_path) == ["rank 0: accepted", "rank 1: accepted"]


def test_ddp_an_error_on_one_rank_stops_every_rank_together(tmp_path):
    """An error raised on one rank only (its node's copy of the folder holds another train file, its copy of the
    checkpoint path another backbone's weights, a NaN pixel in an image it reads) left the other ranks waiting in
    their next collective until the process group's timeout (30 min by default; 30 s in a reviewer's emulated 2
    nodes), to fail without the reason. Every rank now stops together, rank 0 naming rank 1's error. Modules built
    with another k on one rank scored each rank's share of the test set with its own k: now refused at set-up, as
    is fit resumed from a complete checkpoint on one node and from one saved before the pass on the other (a
    30 s gloo timeout in the emulated nodes: Lightning's loops ran different batches on each), or only on one node
    (ckpt_path="last" found on its disk only). A NaN in the training pass was forgotten by a validation inside the
    epoch (the bank built without the failed batches), and an error inside a sharded search paired the next
    search with the others' unfinished one (a gloo abort)."""
    import shutil

    from test_user_paths import _digit_folder

    from dn2_lightning import OneClassDataModule

    _digit_folder(tmp_path / "copy0", 0, 5)
    shutil.copytree(tmp_path / "copy0", tmp_path / "copy1")
    shutil.copy(tmp_path / "copy1" / "test" / "good" / "000.png", tmp_path / "copy1" / "train" / "good" / "999.png")
    for name, dim in (("bank", 16), ("bank0", 16), ("bank1", 32)):
        model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8, dim=dim), reports=False)
        trainer = quiet_trainer()
        trainer.fit(model, datamodule=OneClassDataModule("folder", root=str(tmp_path / "copy0"), load_size=8))
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    expected = {
        "one_node_differs": "rank 1 stopped: ValueError: the memory bank was built from other images",
        "bank": "rank 1 stopped: ValueError: the checkpoint's weights do not fit this model: backbone.trunk",
        "nan_on_one_rank": "rank 1 stopped: ValueError: NaN or Inf in input images",
        "nan_on_one_rank_shard": "rank 1 stopped: ValueError: NaN or Inf in input images",
        # a BasePredictionWriter got None for rank 1's batches after its error (a TypeError in the user's writer)
        "nan_on_one_rank_predict_writer": "rank 1 stopped: ValueError: NaN or Inf in input images",
        "other_k": "under DDP the ranks' DN2Module settings differ (k: rank 0: 2, rank 1: 3)",
        "resume_other": "the ranks' checkpoints to resume fit from differ ((epoch, global_step): rank 0: (1, ",
        "checkpoint_on_one_node": "checkpoints to resume fit from differ ((epoch, global_step): rank 0: (1, 13), rank "
        "1: None)",
        "nan_in_the_pass_then_validation": "rank 1 stopped: ValueError: NaN or Inf in input images",
        # embeddings are checked one batch later: the last batch's at the pass's end, every rank stopping there
        "nan_embeddings_on_one_rank": "rank 1 stopped: ValueError: NaN or Inf in embeddings of batch 12",
        "nan_embeddings_on_one_rank_shard": "rank 1 stopped: ValueError: NaN or Inf in embeddings of batch 12",
        "shard_search_fails": "rank 1 stopped: MemoryError: the local search cannot fit",
    }
    model = DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, datamodule=BlobDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "resume0.ckpt")  # the pass complete
    trainer = quiet_trainer()
    trainer.strategy.connect(DN2Module(k=2, backbone=linear_backbone(in_features=3 * 8 * 8), reports=False))
    trainer.save_checkpoint(tmp_path / "resume1.ckpt")  # saved before the pass began
    for mode, reason in expected.items():
        refused = _run_node_local(mode, tmp_path)
        assert [line[:16] for line in refused] == ["rank 0: refused:", "rank 1: refused:"], (mode, refused)
        assert reason in refused[0], (mode, refused)
