"""The all-classes protocol equals DN2Module class by class, validates like it, and its embedding cache is safe."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dn2_lightning.backbones as backbones
import dn2_lightning.protocol as protocol
from dn2_lightning import DN2Module, OneClassDataModule
from dn2_lightning.backbones import build_backbone
from dn2_lightning.data.datasets import ArrayImageDataset
from dn2_lightning.data.sources import load_split
from dn2_lightning.protocol import embed_split, extract_embeddings, main, run_protocol

FAST = dict(backbone="efficientnet_lite0", input_size=32, device="cpu")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> str:
    """One embedding cache for the digits runs of this module (each split is extracted once)."""
    return str(tmp_path_factory.mktemp("digits-cache"))


@pytest.fixture
def no_extraction(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been used (or the arguments refused first)")

    monkeypatch.setattr(protocol, "build_backbone", refuse)


def test_protocol_auroc_equals_dn2module_for_each_class(tmp_path, digits_cache):
    from helpers import quiet_trainer

    result = run_protocol("digits", k=2, classes=[0, 4], cache_dir=digits_cache, out=str(tmp_path / "out"), **FAST)
    for row in result.classes:
        model = DN2Module(k=2, backbone="efficientnet_lite0", input_size=32, reports=False)
        metrics = quiet_trainer().test(model, datamodule=OneClassDataModule("digits", normal_class=row.normal_class))
        assert row.auroc == pytest.approx(metrics[0]["test/auroc"], abs=1e-6)
    assert result.input_size == 32
    assert (tmp_path / "out" / "protocol.md").read_text().count("\n") == 5
    assert (tmp_path / "out" / "protocol.csv").read_text().startswith("normal_class,name,auroc")


def test_protocol_unsupervised_row_equals_dn2module_with_the_same_contaminants_and_cleaning(tmp_path):
    """The unsupervised setting against DN2Module + OneClassDataModule (an independent path to the same AUROC, bank
    and contaminants), with a seed other than 0: guards contaminants_kept counting the normal rows kept, n_train
    leaving the contaminants out and the contaminants drawn with seed 0 whatever ``seed`` says."""
    from helpers import quiet_trainer

    settings = dict(contamination=0.1, clean_fraction=0.3, clean_k=10)
    result = run_protocol("digits", k=2, classes=[3], seed=1, cache_dir=str(tmp_path / "cache"), **settings, **FAST)
    (row,) = result.classes
    dm = OneClassDataModule("digits", normal_class=3, contamination=0.1, seed=1)
    model = DN2Module(k=2, backbone="efficientnet_lite0", input_size=32, clean_fraction=0.3, clean_k=10, reports=False)
    metrics = quiet_trainer().test(model, datamodule=dm)
    assert row.auroc == pytest.approx(metrics[0]["test/auroc"], abs=1e-6)
    assert row.n_train == len(dm.train_dataset) == int((~dm.train_is_contaminant).sum()) + 12  # 109 threes + 12
    assert row.n_bank == len(model.bank)
    kept = int(dm.train_is_contaminant[model.bank.sample_indices.cpu()].sum())  # contaminants left in the bank
    assert row.contaminants_kept == kept < 12


def test_embedding_cache_is_reused_and_stale_keys_are_recomputed(digits_cache, monkeypatch):
    first, labels = embed_split("digits", "test", cache_dir=digits_cache, **FAST)
    [cached] = list(Path(digits_cache).glob("digits-test-efficientnet_lite0-*.pt"))
    monkeypatch.setattr(protocol, "build_backbone", lambda *a, **k: pytest.fail("the cache should have been used"))
    again, _ = embed_split("digits", "test", cache_dir=digits_cache, **FAST)
    assert torch.equal(first, again) and len(first) == len(labels) == 723
    monkeypatch.undo()

    stale = torch.load(cached, weights_only=True)
    stale["key"]["input_size"] = 999  # the file no longer describes what it holds
    torch.save(stale, cached)
    recomputed, _ = embed_split("digits", "test", cache_dir=digits_cache, **FAST)
    assert torch.equal(recomputed, first) and torch.load(cached, weights_only=True)["key"]["input_size"] == 32


# ------------------------------------------------------------------------------------------------------
# The batched in-memory extraction gives the per-sample DataLoader's embeddings, bit for bit (issue 13)


def dataloader_embeddings(extractor, images: ArrayImageDataset, batch_size: int) -> torch.Tensor:
    """The reference: a plain DataLoader over the dataset (per-sample items, default collation), as before."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size)
    with torch.inference_mode():
        return torch.cat([extractor(batch["image"]) for batch in loader])


@pytest.fixture(scope="module")
def small_extractor():
    torch.manual_seed(0)
    return build_backbone("efficientnet_lite0", pretrained=False, image_size=32).eval()


@pytest.mark.parametrize("batch_size", [64, 300, 512])  # 64 does not divide 300; 512 > N: one short batch
def test_batched_extraction_equals_the_per_sample_dataloader(small_extractor, batch_size):
    source = load_split("digits", "test")
    images = ArrayImageDataset(source.images[:300], source.labels[:300])
    benchmark = torch.backends.cudnn.benchmark
    got = extract_embeddings(small_extractor, images, batch_size, "cpu")
    assert torch.backends.cudnn.benchmark == benchmark  # restored (and untouched on the CPU)
    assert got.dtype == torch.float32 and got.shape == (300, 1280) and not got.is_inference()
    assert torch.equal(got, dataloader_embeddings(small_extractor, images, batch_size))


def test_a_padded_last_batch_changes_neither_the_order_nor_the_full_batches(small_extractor):
    source = load_split("digits", "test")
    images = ArrayImageDataset(source.images[:300], source.labels[:300])
    reference = dataloader_embeddings(small_extractor, images, 64)
    padded = extract_embeddings(small_extractor, images, 64, "cpu", pad_last_batch=True)  # 44 rows padded to 64
    assert padded.shape == reference.shape and torch.equal(padded[:256], reference[:256])
    torch.testing.assert_close(padded[256:], reference[256:])


@pytest.mark.parametrize("load_size", [None, 20])  # 20: resized on the CPU in one call per batch
def test_batched_extraction_of_rgb_images_with_a_load_size_is_bit_identical(small_extractor, load_size):
    rgb = torch.randint(0, 256, (70, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images = ArrayImageDataset(rgb, torch.zeros(70), load_size)
    got = extract_embeddings(small_extractor, images, 32, "cpu")
    assert torch.equal(got, dataloader_embeddings(small_extractor, images, 32))


def test_embed_split_keeps_the_order_and_labels_of_the_split(small_extractor, monkeypatch):
    monkeypatch.setattr(protocol, "build_backbone", lambda *a, **k: small_extractor)
    embeddings, labels = embed_split("digits", "test", batch_size=100, use_cache=False, **FAST)
    source = load_split("digits", "test")
    assert torch.equal(labels, source.labels)
    reference = dataloader_embeddings(small_extractor, ArrayImageDataset(source.images, source.labels), 100)
    assert torch.equal(embeddings, reference) and len(embeddings) == 723


# ------------------------------------------------------------------------------------------------------
# What the cache key covers (issue 11, item 4) and how the cache survives a kill (item 11)


def write_mnist_test_split(root: Path, seed: int, n: int = 24) -> Path:
    """MNIST's two test IDX files under ``root/MNIST/raw``: n random 8x8 images, labels 0..9 in turn."""
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in [("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)]:
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
        (raw / name).write_bytes(gzip.compress(header + array.tobytes()))
    return root


def test_cache_key_covers_data_location_content_and_weights(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    a, b = write_mnist_test_split(tmp_path / "A", seed=1), write_mnist_test_split(tmp_path / "B", seed=2)
    from_a, _ = embed_split("mnist", "test", root=str(a), cache_dir=cache, **FAST)
    from_b, _ = embed_split("mnist", "test", root=str(b), cache_dir=cache, **FAST)  # same count, other data
    truth_b, _ = embed_split("mnist", "test", root=str(b), use_cache=False, **FAST)
    assert torch.allclose(from_b, truth_b, atol=1e-5) and not torch.allclose(from_a, from_b, atol=1e-2)

    write_mnist_test_split(a, seed=3)  # same place, new content
    truth_a, _ = embed_split("mnist", "test", root=str(a), use_cache=False, **FAST)
    again_a, _ = embed_split("mnist", "test", root=str(a), cache_dir=cache, **FAST)
    assert torch.allclose(again_a, truth_a, atol=1e-5) and not torch.allclose(again_a, from_a, atol=1e-2)

    extractions = []
    build = protocol.build_backbone
    monkeypatch.setattr(protocol, "build_backbone", lambda *a, **k: extractions.append(1) or build(*a, **k))
    embed_split("mnist", "test", root=str(a), cache_dir=cache, **FAST)
    assert extractions == []  # nothing changed: served from the cache
    spec = backbones.get_backbone_spec("efficientnet_lite0")
    monkeypatch.setitem(backbones._REGISTRY, spec.name, dataclasses.replace(spec, weights_id=lambda: "other weights"))
    embed_split("mnist", "test", root=str(a), cache_dir=cache, **FAST)
    assert extractions == [1]  # other weights: recomputed


def test_a_backbone_name_with_slashes_keeps_its_cache_file_in_the_cache_folder(tmp_path, monkeypatch):
    """A registered name went into the file name as it was: "org/net" made a subfolder, "../../x" a file outside
    ``cache_dir``."""
    root = write_mnist_test_split(tmp_path / "data", seed=1)
    spec = backbones.get_backbone_spec("efficientnet_lite0")
    for name in ("org/net", "../../escaped"):
        monkeypatch.setitem(backbones._REGISTRY, name, dataclasses.replace(spec, name=name))
        embed_split(
            "mnist", "test", root=str(root), cache_dir=str(tmp_path / "a" / "b" / "cache"), **{**FAST, "backbone": name}
        )
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt"))
    assert len(files) == 2 and all(f.startswith("a/b/cache/mnist-test-") and f.count("/") == 3 for f in files), files


def test_cache_key_names_the_device_type(tmp_path):
    """CUDA's kernels (TF32 convolutions by default) round otherwise than the CPU's: a cache written on one is not
    served to a run on the other (the key had no device)."""
    from dn2_lightning.data import load_split

    root = write_mnist_test_split(tmp_path / "A", seed=1)
    source = load_split("mnist", "test", str(root))
    args = (source, "mnist", "test", "efficientnet_lite0", 32, True, "32")
    on_cpu, on_cuda = protocol.embedding_cache_key(*args, "cpu"), protocol.embedding_cache_key(*args, "cuda")
    assert on_cpu["device"] == "cpu" and on_cuda["device"] == "cuda"
    assert {k: v for k, v in on_cpu.items() if k != "device"} == {k: v for k, v in on_cuda.items() if k != "device"}


def test_a_bf16_extraction_is_never_served_the_float32_cache(tmp_path):
    """The precision is part of the cache key: a bf16 run served the float32 embeddings cached by an earlier run
    (or the reverse) would report the AUROC of the other precision."""
    root, cache = str(write_mnist_test_split(tmp_path / "data", seed=1)), str(tmp_path / "cache")
    fp32, _ = embed_split("mnist", "test", root=root, cache_dir=cache, **FAST)
    bf16, _ = embed_split("mnist", "test", root=root, cache_dir=cache, precision="bf16", **FAST)
    fresh, _ = embed_split("mnist", "test", root=root, use_cache=False, precision="bf16", **FAST)  # the reference
    assert torch.equal(bf16, fresh) and not torch.allclose(bf16, fp32, rtol=0, atol=1e-6)
    again, _ = embed_split("mnist", "test", root=root, cache_dir=cache, **FAST)
    assert torch.equal(again, fp32)


def test_a_cache_file_cut_short_warns_with_its_name_and_is_recomputed(tmp_path):
    root = write_mnist_test_split(tmp_path / "data", seed=4)
    first, _ = embed_split("mnist", "test", root=str(root), cache_dir=str(tmp_path), **FAST)
    [path] = list(tmp_path.glob("mnist-test-*.pt"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # what a kill during the save used to leave
    with pytest.warns(UserWarning, match=rf"cache file .*{path.name} is unreadable.*recomputing"):
        again, _ = embed_split("mnist", "test", root=str(root), cache_dir=str(tmp_path), **FAST)
    assert torch.allclose(again, first, atol=1e-5)
    assert torch.equal(torch.load(path, weights_only=True)["embeddings"], again)  # repaired on disk


def test_an_interrupted_cache_write_leaves_no_file_behind(tmp_path, monkeypatch):
    root = write_mnist_test_split(tmp_path / "data", seed=5)
    cache = tmp_path / "cache"

    def killed_mid_write(obj, f, *args, **kwargs):
        handle = open(f, "wb") if isinstance(f, str | Path) else f  # noqa: SIM115
        handle.write(b"PK\x03\x04 half a zip archive")
        handle.flush()
        raise RuntimeError("killed during the save")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(RuntimeError, match="killed during the save"):
        embed_split("mnist", "test", root=str(root), cache_dir=str(cache), **FAST)
    assert list(cache.iterdir()) == []  # neither a half-written cache file nor a temporary one


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """A SIGKILL mid-write leaves `.<name>.<id>.tmp` (a reviewer: ~300 MB per kill for FashionMNIST's train
    embeddings); the next write of that file removes those an hour old, never a fresh one (a writer at work)."""
    import os
    import time

    from dn2_lightning.cache import save_atomic

    target = tmp_path / "train.pt"
    killed, working = tmp_path / ".train.pt.0123456789ab.tmp", tmp_path / ".train.pt.ba9876543210.tmp"
    other = tmp_path / ".test.pt.0123456789ab.tmp"  # another file's: not this write's business
    for leftover in (killed, working, other):
        leftover.write_bytes(b"half")
    hours_ago = time.time() - 7200
    for old in (killed, other):
        os.utime(old, (hours_ago, hours_ago))
    assert save_atomic({"key": 1}, target)
    assert not killed.exists() and working.exists() and other.exists()
    assert torch.load(target, weights_only=True) == {"key": 1}


# ------------------------------------------------------------------------------------------------------
# Validation: the module's and the datamodule's rules, before any extraction (issue 11, item 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"contamination": -0.5}, r"contamination=-0.5 must be in \[0, 1\)"),
        ({"contamination": 1.0}, r"contamination=1.0 must be in \[0, 1\)"),
        ({"clean_fraction": 1.5}, r"clean_fraction=1.5 must be in \[0, 1\)"),
        ({"clean_fraction": -1}, r"clean_fraction=-1 must be in \[0, 1\)"),
        ({"classes": [12]}, r"classes\[0\]=12 is out of range 0..9; classes: 0='0'"),
        ({"classes": [0, "seven"]}, r"classes\[1\]='seven' is not a class name"),
        ({"classes": []}, r"classes=\[\] must be None \(every class\) or a non-empty list"),
        ({"classes": [3, 3]}, r"classes=\[3, 3\] names a class twice"),
        ({"k": 0}, r"k=0 must be an integer >= 1"),
        ({"clean_k": 0}, r"clean_k=0 must be an integer >= 1"),
        ({"input_size": 4}, r"input_size=4 must be None \(the backbone.s own\) or an integer >= 8"),
        ({"knn_backend": "annoy"}, r"knn_backend='annoy' is not one of"),
        ({"precision": "16"}, r"precision='16' is not one of \['32', 'bf16'\]"),
        ({"dataset": "svhn"}, r"dataset='svhn' is not one of"),
        ({"contamination": 0.95, "classes": [2]}, r"contamination=0.95 needs \d+ anomalies"),
        ({"contamination": 0.001}, r"contamination=0.001 of a train set of \d+ normal samples rounds to 0"),
        ({"k": 200, "classes": [1, 0]}, r"k=200 exceeds the 109 training embeddings of class 1 \('1'\)"),
        ({"k": 60, "clean_fraction": 0.5}, r"k=60 exceeds the 53 training embeddings after cleaning 0.5 of 106 "),
        # were torch's messages after the data had loaded, and a FileNotFoundError after every class was scored
        ({"device": "gpu"}, r"device='gpu' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"seed": 1.5}, r"seed=1.5 must be an integer"),
        ({"out": "/proc/dn2-results"}, r"out='/proc/dn2-results': cannot create the results folder"),
        ({"root": 123}, r"root=123 must be a folder's path"),  # was pathlib's TypeError when the data loaded
    ],
)
def test_bad_settings_are_refused_before_any_extraction(kwargs, match, no_extraction, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_protocol(**({"dataset": "digits", "cache_dir": str(tmp_path)} | FAST | kwargs))


def test_a_clean_fraction_that_removes_no_row_says_so_before_any_extraction(no_extraction, tmp_path):
    # digits' train split holds 106 zeros and 109 ones: 0.004 of either rounds to none removed, 0.005 to one
    match = r"clean_fraction=0.004 rounds to none removed .* 2 classes \('0': 106, '1': 109\), so their banks"
    run = functools.partial(run_protocol, "digits", classes=[0, 1], cache_dir=str(tmp_path), use_cache=False, **FAST)
    with pytest.warns(UserWarning, match=match), pytest.raises(AssertionError, match="the cache should have been"):
        run(clean_fraction=0.004)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="the cache should have been"):
            run(clean_fraction=0.005)


def test_validation_is_shared_with_the_module_and_datamodule():
    for bad in ({"clean_fraction": 1.5}, {"k": 0}, {"input_size": 4}):
        with pytest.raises(ValueError) as from_module:
            DN2Module(backbone=torch.nn.Flatten(), **bad)
        with pytest.raises(ValueError) as from_protocol:
            run_protocol("digits", **bad)
        assert str(from_module.value) == str(from_protocol.value)
    with pytest.raises(ValueError) as from_datamodule:
        OneClassDataModule("digits", contamination=-0.5)
    with pytest.raises(ValueError) as from_protocol:
        run_protocol("digits", contamination=-0.5)
    assert str(from_datamodule.value) == str(from_protocol.value)


# ------------------------------------------------------------------------------------------------------
# The command line: space-separated classes, progress bars only on a terminal (issue 12)


def test_command_line_takes_space_separated_classes_and_input_size(digits_cache, capsys, monkeypatch):
    embed_split("digits", "train", cache_dir=digits_cache, **FAST)  # warm (already, if run after the first test)
    embed_split("digits", "test", cache_dir=digits_cache, **FAST)
    monkeypatch.setattr(protocol, "build_backbone", lambda *a, **k: pytest.fail("the cache should have been used"))
    args = ["--dataset", "digits", "--input_size", "32", "--device", "cpu", "--cache_dir", digits_cache]
    main([*args, "--classes", "0", "4", "--k", "2"])
    table = capsys.readouterr().out
    assert "| 0 | 0 |" in table and "| 4 | 4 |" in table and "| 1 | 1 |" not in table
    assert "@ 32px" in table and "━" not in table  # no progress bar: stdout is not a terminal
    main([*args, "--classes", "[7]"])
    assert "| 7 | 7 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"classes\[1\]=12 is out of range"):
        main([*args, "--classes", "3", "12"])
    # --classes=3 was a type error, and a repeated --classes kept its last list only (class 3 silently dropped)
    main([*args, "--classes=3", "--k", "2", "--classes", "5"])
    table = capsys.readouterr().out
    assert "| 3 | 3 |" in table and "| 5 | 5 |" in table and table.count("| 5 | 5 |") == 1
    with pytest.raises(SystemExit) as shown:  # -h ends the list of classes (it was read as a class name)
        main([*args, "--classes", "3", "-h"])
    assert shown.value.code == 0 and "--classes" in capsys.readouterr().out
    main([*args, "--classes=null", "--classes", "6"])  # null (every class) is replaced by a later list
    table = capsys.readouterr().out
    assert "| 6 | 6 |" in table and "| 0 | 0 |" not in table
    for bad in (["--classes", "1", "--classes"], ["--classes", "[0, 1", "2"]):  # refused, not dropped or a traceback
        with pytest.raises(SystemExit) as refused:
            main([*args, *bad])
        assert refused.value.code != 0 and "classes" in capsys.readouterr().err
    # an input below the smallest is refused before any image is read (it stopped in a convolution)
    with pytest.raises(ValueError, match=r"input_size=4 must be None \(the backbone's own\) or an integer >= 8"):
        main([*args[:2], "--input_size", "4", *args[4:], "--backbone", "efficientnet_lite0", "--classes", "3"])


def test_a_mistyped_option_is_refused_with_the_closest_known_one(capsys, no_extraction, tmp_path):
    """``--bakcbone x`` got "unrecognized arguments" and no more; ``--backbon`` (a prefix) is expanded by
    jsonargparse 4, so it is no error."""
    with pytest.raises(SystemExit) as refused:
        main(["--dataset", "digits", "--bakcbone", "resnet18"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "usage: dn2-protocol" in err
    assert err.splitlines()[-1] == "error: unrecognized arguments: --bakcbone resnet18 (did you mean --backbone?)"
    (tmp_path / "typo.yaml").write_text("bakcbone: resnet18\n")  # the same typo in a --config file
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "typo.yaml"), "--dataset", "digits"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "error: Option 'bakcbone' is not accepted (did you mean --backbone?)"


def test_progress_bars_on_request(tmp_path, digits_cache, capsys):
    root = write_mnist_test_split(tmp_path / "data", seed=6)
    embed_split("mnist", "test", root=str(root), use_cache=False, progress=True, **FAST)
    assert "embedding mnist test (24 images)" in capsys.readouterr().out
    embed_split("mnist", "test", root=str(root), use_cache=False, **FAST)  # default: only on a terminal
    assert capsys.readouterr().out == ""
    run_protocol("digits", classes=[1], cache_dir=digits_cache, progress=True, **FAST)
    assert "scoring each class as the normal one" in capsys.readouterr().out


def test_off_a_terminal_each_phase_says_one_line_on_stderr_and_the_table_is_unchanged(tmp_path, digits_cache, capsys):
    """Progress bars are shown on a terminal only, so a job's log showed nothing for minutes of extraction; now one
    line per phase on stderr (none with progress=False), stdout as it was."""
    root = write_mnist_test_split(tmp_path / "data", seed=7)
    embed_split("mnist", "test", root=str(root), use_cache=False, **FAST)
    out, err = capsys.readouterr()
    assert out == "" and re.fullmatch(
        r"embedding mnist test \(24 images\) on cpu \.\.\.\nembedding mnist test: done in \d+\.\d s\n", err
    ), err
    embed_split("mnist", "test", root=str(root), use_cache=False, progress=False, **FAST)
    assert capsys.readouterr() == ("", "")
    for split in ("train", "test"):  # warm (already, if run after the first test)
        embed_split("digits", split, cache_dir=digits_cache, **FAST)
    capsys.readouterr()
    args = ["--dataset", "digits", "--input_size", "32", "--device", "cpu", "--cache_dir", digits_cache]
    main([*args, "--classes", "1"])
    out, err = capsys.readouterr()
    assert out.startswith("| class | name | AUROC (%) | train | bank |\n") and "| 1 | 1 |" in out and "━" not in out
    lines = err.splitlines()
    assert [re.sub(r"\d+(\.\d+)?", "N", line) for line in lines] == [
        "embedding digits train (N images): from the cache",
        "embedding digits test (N images): from the cache",
        "scoring N class as the normal one ...",
        "scoring: done in N s",
    ], err


@pytest.mark.parametrize(
    "kwargs, match",
    [({"precision": "16"}, "precision='16'"), ({"batch_size": 0}, "batch_size=0")],
)
def test_extract_embeddings_names_a_bad_setting(small_extractor, kwargs, match):
    images = ArrayImageDataset(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4))
    settings = {"batch_size": 2, "precision": "32", **kwargs}
    with pytest.raises(ValueError, match=match):
        extract_embeddings(small_extractor, images, settings["batch_size"], "cpu", settings["precision"])


def _result(classes: list[int], contamination: float = 0.0, clean_fraction: float = 0.0) -> protocol.ProtocolResult:
    rows = [protocol.ClassResult(c, f"c{c}", 0.9, 100, 100) for c in classes]
    settings = {"contamination": contamination, "clean_fraction": clean_fraction}
    return protocol.ProtocolResult("fashionmnist", "efficientnet_lite0", 64, 2, settings, rows)


def test_the_papers_mean_is_shown_only_beside_the_papers_setting():
    assert "paper (ResNet) | | 94.4" in _result(list(range(10))).to_markdown()
    assert "paper" not in _result([0, 3]).to_markdown()  # a 2-class mean is not the paper's 10-class one
    assert "paper" not in _result(list(range(10)), contamination=0.05).to_markdown()  # nor an unsupervised run
    assert "paper" not in _result(list(range(10)), clean_fraction=0.5).to_markdown()  # nor a cleaned bank


def test_the_markdown_table_lists_the_contaminants_cleaning_kept_as_the_csv_does():
    result = _result([0, 3], contamination=0.05, clean_fraction=0.5)
    result.classes[0].contaminants_kept, result.classes[1].contaminants_kept = 4, 0
    lines = result.to_markdown().splitlines()
    assert lines[0].endswith("| bank | contaminants kept |") and lines[2].endswith("| 100 | 100 | 4 |")
    assert lines[3].endswith("| 0 |") and {line.count("|") for line in lines} == {7}
    assert "contaminants" not in _result([0, 3]).to_markdown()  # a clean training set: no column


def test_a_run_killed_while_saving_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    _result([0, 1]).save(tmp_path)
    before = {name: (tmp_path / name).read_text() for name in ("protocol.md", "protocol.json", "protocol.csv")}

    real_write = protocol.atomic_write
    calls = []

    def killed_on_the_second_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(protocol, "atomic_write", killed_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        _result([2]).save(tmp_path)
    assert (tmp_path / "protocol.json").read_text() == before["protocol.json"]
    assert (tmp_path / "protocol.csv").read_text() == before["protocol.csv"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_result_file_held_open_elsewhere_is_named_with_the_fix_and_the_old_file_kept(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program holds open (protocol.csv in a spreadsheet); the
    error must name the file and say what to do, and leave the previous file and no temporary behind."""
    _result([0, 1]).save(tmp_path)
    before = (tmp_path / "protocol.csv").read_text()
    real_replace = os.replace

    def held_open(src, dst):
        if Path(dst).name == "protocol.csv":
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", held_open)
    with pytest.raises(PermissionError, match=r"cannot replace the file .*close it and run again: .*protocol.csv"):
        _result([2]).save(tmp_path)
    assert (tmp_path / "protocol.csv").read_text() == before and not list(tmp_path.glob(".*.tmp"))


def test_a_split_rewritten_on_disk_is_read_again_in_the_same_process(tmp_path):
    """load_split keeps splits in memory; a notebook or service whose data files change between runs gets the
    new images, with or without the embedding cache (a reviewer saw the old AUROCs with use_cache=False)."""
    root = write_mnist_test_split(tmp_path / "data", seed=1)
    first = load_split("mnist", "test", str(root))
    assert load_split("mnist", "test", str(root)) is first  # unchanged: served from memory
    write_mnist_test_split(root, seed=2)
    second = load_split("mnist", "test", str(root))
    assert not torch.equal(second.images, first.images)
    truth = np.random.default_rng(2).integers(0, 256, (24, 8, 8), dtype=np.uint8)
    assert np.array_equal(second.images.numpy(), truth)


def test_the_command_line_starts_without_lightning_torchvision_or_torchmetrics():
    """Each of them cost seconds of start-up on the H200 (section 8 of RESULTS.md); `dn2-protocol` needs none."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from dn2_lightning.protocol import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('lightning', 'torchvision', 'torchmetrics', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "--backbone" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-300:]


def test_extraction_out_of_memory_names_batch_size_and_input_size(small_extractor):
    """An out-of-memory inside the backbone said only torch's words; it now names what to lower, same exception type."""
    images = ArrayImageDataset(torch.zeros(10, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB.")

    small_extractor.forward = out_of_memory
    with pytest.raises(
        torch.OutOfMemoryError,
        match=r"(?s)Tried to allocate.*batch of 4 images on cpu: lower "
        r"batch_size \(--batch_size\) or input_size \(--input_size\)",
    ):
        extract_embeddings(small_extractor, images, 4, "cpu")
