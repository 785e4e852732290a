"""Paper-style protocol: every class of a dataset as the normal class in turn, one AUROC table.

Each image is embedded once per (data content, backbone weights, preprocessing), and the embeddings are cached
on disk, so the 10-class protocol costs one pass over the data and a rerun costs none. The per-class
evaluation uses the same pieces, and the same argument validators, as :class:`DN2Module` and
:class:`OneClassDataModule` (cleaning, exact kNN, DN2 score, AUROC).

    dn2-protocol --dataset fashionmnist --backbone efficientnet_lite0 --out outputs/fmnist
    dn2-protocol --dataset digits --input_size 64 --classes 0 1
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dn2_lightning.backbones import build_backbone, check_backbone_input_size, get_backbone_spec, out_of_memory_hint
from dn2_lightning.cache import atomic_write, load_cached, save_atomic
from dn2_lightning.data.classes import draw_contaminants, resolve_class
from dn2_lightning.data.datasets import ArrayImageDataset, iter_image_batches
from dn2_lightning.data.sources import (
    LabeledImages,
    default_data_root,
    known_classes,
    list_datasets,
    load_split,
    warn_if_root_unused,
)
from dn2_lightning.knn import KNNBackend, knn_distances
from dn2_lightning.scoring import cleaning_mask, knn_scores, rank_auroc, removed_count
from dn2_lightning.validation import (
    check_choice,
    check_clean_fraction,
    check_clean_k,
    check_contamination,
    check_data_root,
    check_input_size,
    check_k,
    check_knn_backend,
    check_positive_int,
    check_seed,
)

# DN2's published mean AUROC (%) with its ResNet backbone (Bergman et al. 2020, Table 1; unimodal, every class
# in turn), shown beside ours when a run is that setting.
PAPER_MEAN_AUROC = {"cifar10": 92.5, "fashionmnist": 94.4, "cifar100": 89.3}
CACHE_FORMAT = 2  # layout of the cache files and of their key
#: Version of the code that turns stored images into embeddings (dataset decoding, CPU resize, the backbone's
#: preprocessing); bump it when a change alters the embeddings, and every cached file is recomputed.
PREPROCESS_VERSION = 3  # 3: EfficientNet-Lite padded for the input_size used
PRECISIONS = ("32", "bf16")


@dataclass
class ClassResult:
    normal_class: int
    name: str
    auroc: float
    n_train: int
    n_bank: int
    contaminants_kept: int | None = None


@dataclass
class ProtocolResult:
    dataset: str
    backbone: str
    input_size: int
    k: int
    settings: dict
    classes: list[ClassResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_auroc(self) -> float:
        return sum(c.auroc for c in self.classes) / len(self.classes)

    def to_markdown(self) -> str:
        every_class = len({c.normal_class for c in self.classes}) == len(known_classes(self.dataset))
        unimodal = not self.settings.get("contamination") and not self.settings.get("clean_fraction")
        paper = PAPER_MEAN_AUROC.get(self.dataset) if every_class and unimodal else None
        # the contaminants cleaning kept in the bank, when the training set was contaminated (as the CSV and JSON)
        kept = any(c.contaminants_kept is not None for c in self.classes)
        lines = ["| class | name | AUROC (%) | train | bank |", "|---:|---|---:|---:|---:|"]
        lines += [
            f"| {c.normal_class} | {c.name} | {100 * c.auroc:.1f} | {c.n_train} | {c.n_bank} |" for c in self.classes
        ]
        lines.append(f"| **mean** | | **{100 * self.mean_auroc:.1f}** | | |")
        if paper is not None:
            lines.append(f"| paper (ResNet) | | {paper:.1f} | | |")
        if kept:
            lines[0], lines[1] = lines[0] + " contaminants kept |", lines[1] + "---:|"
            for row, c in enumerate(self.classes, start=2):
                lines[row] += f" {c.contaminants_kept} |"
            lines[2 + len(self.classes) :] = [line + " |" for line in lines[2 + len(self.classes) :]]
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> None:
        """``protocol.md``, ``protocol.json`` and ``protocol.csv`` in ``out_dir``, each written whole or not at
        all (a killed run leaves the previous run's file, never a cut one)."""
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(asdict(self.classes[0])))
        writer.writeheader()
        writer.writerows(asdict(c) for c in self.classes)
        texts = {  # all rendered first, so the files are replaced one right after another
            "protocol.md": self.to_markdown() + "\n",
            "protocol.json": json.dumps({**asdict(self), "mean_auroc": self.mean_auroc}, indent=2),
            "protocol.csv": table.getvalue(),
        }
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            with atomic_write(out / name, "w", newline="", encoding="utf-8") as f:
                f.write(text)


def embed_split(
    dataset: str,
    split: str,
    backbone: str = "efficientnet_lite0",
    input_size: int | None = None,
    pretrained: bool = True,
    root: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    cache_dir: str | None = None,
    use_cache: bool = True,
    precision: str = "32",
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Embeddings ``[N, D]`` (float32, CPU) and class labels ``[N]`` of a whole split, cached on disk.

    The cache key (:func:`embedding_cache_key`) holds everything the embeddings depend on: the data (resolved
    file paths and a fingerprint of the images and labels), the backbone and its weights (a file hash or a
    versioned file name), the resolution, normalisation, precision and :data:`PREPROCESS_VERSION`. A file with
    another key is recomputed, never reused; an unreadable one is recomputed with a warning naming it; files are
    written atomically. Backbones without pretrained weights (random initialisation) or without a
    ``weights_id`` are not cached. ``precision="bf16"`` runs the backbone under bfloat16 autocast.

    Args:
        dataset, split, root: the data, as in :func:`dn2_lightning.data.load_split`.
        backbone, input_size, pretrained: the feature extractor, its resolution on the device (``None`` = the
            backbone's own) and whether it loads ImageNet weights.
        batch_size, device: extraction batch size; ``"auto"``, ``"cpu"`` or ``"cuda"``.
        cache_dir, use_cache: the cache folder (default ``<data root>/embeddings``) and whether to use it.
        precision: ``"32"`` or ``"bf16"``.
        progress: show a progress bar; ``None`` = only when stdout is a terminal, else one line on stderr when
            the extraction starts and one when it ends (or one for a cache hit); ``False`` = nothing.
    """
    check_choice("precision", precision, PRECISIONS)
    check_input_size(input_size)
    check_backbone_input_size(backbone, input_size)
    check_positive_int("batch_size", batch_size)
    target = _resolve_device(device)
    source = load_split(dataset, split, root)
    key = None
    if use_cache:
        key = embedding_cache_key(source, dataset, split, backbone, input_size, pretrained, precision, target.type)
    path = None
    description = f"embedding {dataset} {split} ({len(source)} images)"
    if key is not None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        readable = re.sub(r"[^\w.-]", "_", backbone)  # a registered name may hold "/" (the digest keeps it apart)
        path = Path(cache_dir or default_data_root() / "embeddings") / f"{dataset}-{split}-{readable}-{digest}.pt"
        cached = (load_cached(path, key) or {}).get("embeddings")
        if isinstance(cached, Tensor) and cached.ndim == 2 and len(cached) == len(source):
            _say(progress, f"{description}: from the cache")
            return cached, source.labels
    start = time.perf_counter()
    _say(progress, f"{description} on {target} ...")
    extractor = build_backbone(backbone, pretrained=pretrained, image_size=input_size).to(target).eval()
    images = ArrayImageDataset(source.images, source.labels)
    embeddings = extract_embeddings(extractor, images, batch_size, target, precision, progress, description)
    if path is not None:
        save_atomic({"key": key, "embeddings": embeddings}, path)
    _say(progress, f"embedding {dataset} {split}: done in {time.perf_counter() - start:.1f} s")
    return embeddings, source.labels


def extract_embeddings(
    extractor: nn.Module,
    images: ArrayImageDataset,
    batch_size: int,
    device: torch.device | str,
    precision: str = "32",
    progress: bool | None = False,
    description: str = "embedding",
    cudnn_benchmark: bool = False,
    pad_last_batch: bool | None = None,
) -> Tensor:
    """Float32 CPU embeddings ``[N, D]`` of ``images``, in order: the extraction pass of :func:`embed_split`.

    Batches come from :func:`~dn2_lightning.data.datasets.iter_image_batches` (sliced from the uint8 array,
    pinned and uploaded one batch ahead on CUDA): the same uint8 batches a DataLoader over ``images`` collates,
    so without padding the embeddings equal that DataLoader path's bit for bit. They stay on ``device`` until
    the whole split is done and come to the CPU in one copy: nothing waits for the device between batches.

    Args:
        extractor: a :class:`~dn2_lightning.backbones.FeatureExtractor` (or any module mapping uint8
            ``[B, 3, H, W]`` to ``[B, D]``), already on ``device`` and in eval mode.
        images, batch_size, device: the images, the batch size and where the extractor runs.
        precision: ``"32"`` or ``"bf16"`` (bfloat16 autocast).
        progress, description: a progress bar (``None`` = only on a terminal) and its label.
        cudnn_benchmark: on CUDA, ``torch.backends.cudnn.benchmark`` during the pass (restored afterwards),
            whatever the global setting. Off by default: on an H200 (2026-11-27) it gained no throughput with
            EfficientNet-Lite0 or ResNet-50 (fp32 or bf16), and a cold ``dn2-protocol`` run at batch 512 spent
            about 9 s more with it (autotuning each new batch shape).
        pad_last_batch: pad a shorter last batch with blank images to ``batch_size`` (their embeddings are
            dropped), so the backbone meets one batch shape per split; ``None`` = on CUDA only, where the first
            call at each new shape costs seconds of one-off set-up (cuDNN plans, kernels loaded on first use:
            about 3 s per shape on an H200, up to 7 s). Rows of a padded batch may differ from unpadded ones in
            the last bits.
    """
    check_choice("precision", precision, PRECISIONS)
    check_positive_int("batch_size", batch_size)
    device = torch.device(device)
    pad = device.type == "cuda" if pad_last_batch is None else pad_last_batch
    benchmark = torch.backends.cudnn.benchmark
    chunks = []
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cudnn_benchmark
        with (
            _progress_bar(progress) as bar,
            torch.inference_mode(),
            torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"),
        ):
            task = bar.add_task(description, total=len(images))
            for batch in iter_image_batches(images, batch_size, device):
                n = len(batch)
                if pad and n < batch_size:
                    batch = torch.cat([batch, batch.new_zeros((batch_size - n, *batch.shape[1:]))])
                with out_of_memory_hint(functools.partial(_memory_hint, len(batch), device)):
                    chunks.append(extractor(batch)[:n])
                bar.advance(task, n)
        if not chunks:
            raise ValueError("images is empty: there is nothing to embed.")
        return torch.cat(chunks).cpu()  # the only wait for the device, one copy for the whole split
    finally:
        torch.backends.cudnn.benchmark = benchmark


def embedding_cache_key(
    source: LabeledImages,
    dataset: str,
    split: str,
    backbone: str,
    input_size: int | None,
    pretrained: bool,
    precision: str,
    device_type: str = "cpu",
) -> dict | None:
    """Everything a split's embeddings depend on, as a JSON-ready dict; ``None`` when they must not be cached
    (random weights, or a registered backbone without ``weights_id``). ``device_type`` is part of it: CUDA's
    kernels (TF32 convolutions by default) round otherwise than the CPU's, so a cache written by one is not
    served to a run on the other."""
    spec = get_backbone_spec(backbone)
    if not pretrained:
        return None  # a random initialisation is not reproducible: nothing to key it by
    if spec.weights_id is None:
        message = f"backbone={backbone!r} has no weights_id in its BackboneSpec: its embeddings are not cached."
        warnings.warn(message, stacklevel=3)
        return None
    key = {
        "format": CACHE_FORMAT,
        "preprocess": PREPROCESS_VERSION,
        "dataset": dataset,
        "split": split,
        "files": list(source.files),
        "fingerprint": source.fingerprint,
        "n": len(source),
        "backbone": backbone,
        "weights": spec.weights_id(),
        "input_size": input_size or spec.image_size,
        "mean": spec.mean,
        "std": spec.std,
        "precision": precision,
        "device": device_type,
    }
    return json.loads(json.dumps(key))  # the form it has after a save and load (tuples become lists)


def _resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or another torch device), refused
    with the fix when torch does not know it or sees no CUDA device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a torch device).") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA device here: use device='auto' or 'cpu'.")
    return target


def _progress_bar(enabled: bool | None):
    """A rich progress bar on stdout; ``enabled=None`` shows it only when stdout is a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = sys.stdout.isatty() if enabled is None else enabled
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, disable=not show)


def _memory_hint(batch_size: int, device: torch.device) -> str:
    """What to lower when the backbone ran out of memory on a batch (built only then)."""
    return (
        f"DN2 ran out of memory embedding a batch of {batch_size} images on {device}: lower batch_size "
        "(--batch_size) or input_size (--input_size), or use precision='bf16'."
    )


def _say(progress: bool | None, line: str) -> None:
    """``line`` on stderr when ``progress=None`` shows no bar (stdout is not a terminal, e.g. a job's log): one line
    per phase, so a log shows the run alive; stdout keeps the table alone."""
    if progress is None and not sys.stdout.isatty():
        print(line, file=sys.stderr, flush=True)


def resolve_classes(classes: Sequence[int | str] | None, names: Sequence[str]) -> list[int]:
    """Class indices to evaluate: all of ``names`` for ``None``, else each entry resolved like
    ``OneClassDataModule(normal_class=...)`` (an index or a case-insensitive name).

    Raises:
        ValueError: an empty list, an unknown class (naming the entry and listing the classes), or a repeat.
    """
    if classes is None:
        return list(range(len(names)))
    if isinstance(classes, str | int) or len(classes) == 0:
        raise ValueError(
            f"classes={classes!r} must be None (every class) or a non-empty list of class indices or names, "
            "e.g. --classes 0 1."
        )
    indices = [resolve_class(c, tuple(names), name=f"classes[{i}]") for i, c in enumerate(classes)]
    if len(set(indices)) != len(indices):
        raise ValueError(f"classes={list(classes)!r} names a class twice; list each class once.")
    return indices


def run_protocol(
    dataset: str = "fashionmnist",
    backbone: str = "efficientnet_lite0",
    k: int = 2,
    input_size: int | None = None,
    classes: list[int | str] | None = None,
    contamination: float = 0.0,
    clean_fraction: float = 0.0,
    clean_k: int = 200,
    seed: int = 0,
    knn_backend: KNNBackend = "auto",
    root: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    cache_dir: str | None = None,
    use_cache: bool = True,
    precision: str = "32",
    out: str | None = None,
    progress: bool | None = None,
) -> ProtocolResult:
    """Run DN2 with every class (or ``classes``) as the normal class; print and optionally save the table.

    Every argument is validated (by the validators ``DN2Module`` and ``OneClassDataModule`` use) before any
    image is embedded.

    Args:
        dataset: a name from :func:`dn2_lightning.data.list_datasets`.
        backbone: the feature extractor (registry name).
        k: neighbours in the DN2 score.
        input_size: the backbone's input resolution on the device (``None`` = its own), as ``DN2Module``'s.
        classes: normal classes to evaluate, indices or names (default: all); ``--classes 0 1`` on the command
            line.
        contamination: fraction of anomalies in the training set (unsupervised setting), as in
            ``OneClassDataModule``.
        clean_fraction: fraction of the bank removed before scoring (bank cleaning), as in ``DN2Module``.
        clean_k: neighbours of the cleaning's leave-one-out score, as in ``DN2Module``.
        seed: seeds the choice of contaminants.
        knn_backend: as in ``DN2Module``.
        root: where the data are (default ``$DN2_DATA_DIR`` or ``~/.cache/dn2_lightning/data``).
        batch_size: extraction batch size.
        device: where the backbone runs: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        cache_dir: the embedding cache folder (default ``<data root>/embeddings``).
        use_cache: read and write the embedding cache.
        precision: ``"32"`` or ``"bf16"`` (bfloat16 autocast during extraction).
        out: folder for protocol.md/.csv/.json.
        progress: progress bars for the extraction and the class loop; ``None`` = only when stdout is a
            terminal, else one line per phase on stderr (a job's log shows what runs); ``False`` = nothing.
    """
    start = time.perf_counter()
    check_choice("dataset", dataset, list_datasets())
    spec = get_backbone_spec(backbone)
    check_k(k)
    check_input_size(input_size)
    check_backbone_input_size(backbone, input_size)
    check_contamination(contamination)
    check_clean_fraction(clean_fraction)
    check_clean_k(clean_k)
    check_knn_backend(knn_backend)
    check_positive_int("batch_size", batch_size)
    check_choice("precision", precision, PRECISIONS)
    check_seed("seed", seed)
    _resolve_device(device)
    check_data_root(root)
    warn_if_root_unused(dataset, root)
    if out is not None:  # a folder that cannot be made fails now, not after every class is scored
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"out={out!r}: cannot create the results folder ({err}).") from None
    train_source = load_split(dataset, "train", root)
    names = train_source.classes
    chosen = resolve_classes(classes, names)
    train_labels = train_source.labels
    banks = {}  # bank rows per class, drawn before the (slow) extraction so that a bad setting fails at once
    uncleaned = []  # classes whose bank clean_fraction leaves whole
    for c in chosen:
        normal = (train_labels == c).nonzero().flatten()
        if len(normal) == 0:
            raise ValueError(f"class {c} ({names[c]!r}) has no training samples in {dataset}.")
        contaminants = draw_contaminants(train_labels, c, contamination, seed) if contamination else normal[:0]
        rows = len(normal) + len(contaminants)
        kept = rows - removed_count(clean_fraction, rows)
        if k > kept:
            after = f" after cleaning {clean_fraction:g} of {rows}" if kept < rows else ""
            raise ValueError(
                f"k={k} exceeds the {kept} training embeddings{after} of class {c} ({names[c]!r}); lower k."
            )
        banks[c] = (normal, contaminants)
        if clean_fraction > 0 and kept == rows:
            uncleaned.append(f"{names[c]!r}: {rows}")
    if uncleaned:  # said before the (slow) extraction, as DN2Module and DN2Detector say it
        warnings.warn(
            f"clean_fraction={clean_fraction} rounds to none removed of the training embeddings of "
            f"{len(uncleaned)} class{'es' if len(uncleaned) > 1 else ''} ({', '.join(uncleaned)}), so their banks "
            "are not cleaned: raise clean_fraction (or use 0 to say no cleaning).",
            stacklevel=2,
        )
    kwargs = dict(
        backbone=backbone,
        input_size=input_size,
        root=root,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        use_cache=use_cache,
        precision=precision,
        progress=progress,
    )
    train, _ = embed_split(dataset, "train", **kwargs)
    test, test_labels = embed_split(dataset, "test", **kwargs)
    target = _resolve_device(device)
    train, test = train.to(target), test.to(target)
    settings = {
        "contamination": contamination,
        "clean_fraction": clean_fraction,
        "clean_k": clean_k,
        "seed": seed,
        "precision": precision,
    }
    result = ProtocolResult(dataset, backbone, input_size or spec.image_size, k, settings)
    scoring = time.perf_counter()
    _say(progress, f"scoring {len(chosen)} class{'es' if len(chosen) > 1 else ''} as the normal one ...")
    with _progress_bar(progress) as bar:
        for c in bar.track(chosen, description="scoring each class as the normal one"):
            normal, contaminants = banks[c]
            rows = torch.cat([normal, contaminants])
            is_contaminant = torch.cat([torch.zeros(len(normal)), torch.ones(len(contaminants))]).bool()
            bank = train[rows.to(target)]
            kept = None
            if clean_fraction > 0:
                keep = cleaning_mask(bank, clean_fraction, clean_k, knn_backend).cpu()
                bank, kept = bank[keep.to(target)], int(is_contaminant[keep].sum())
            scores = knn_scores(knn_distances(test, bank, k, knn_backend)).cpu()
            auroc = rank_auroc(scores, test_labels != c)
            result.classes.append(ClassResult(c, names[c], auroc, len(rows), len(bank), kept))
    _say(progress, f"scoring: done in {time.perf_counter() - scoring:.1f} s")
    result.seconds = time.perf_counter() - start
    print(result.to_markdown())
    print(
        f"\n{dataset}, {backbone} @ {result.input_size}px, k={k}, {settings}: mean AUROC "
        f"{100 * result.mean_auroc:.2f}% in {result.seconds:.1f} s"
    )
    if out is not None:
        result.save(out)
    return result


def join_list_option(argv: Sequence[str], option: str = "--classes") -> list[str]:
    """Rewrite ``option a b c`` (values up to the next flag, ``-h`` included) as ``option=[a, b, c]`` for
    jsonargparse; ``option=a`` and ``option=[a, b]`` are read too, and repeated options are joined in order.

    ``null`` (every class) stands alone: a later occurrence replaces it, and it replaces the earlier ones. An
    occurrence without a value, or a list that does not parse, is passed on for jsonargparse to refuse.

    >>> join_list_option(["--classes", "0", "1", "--k", "2", "--classes=shirt"])
    ['--classes=[0, 1, "shirt"]', '--k', '2']
    """
    import yaml

    out: list[str] = []
    occurrences: list[list[str]] = []  # the value tokens of each occurrence, in order
    at = None  # where the joined option goes: the first occurrence
    i = 0
    while i < len(argv):
        if argv[i].startswith(option + "="):
            at = len(out) if at is None else at
            occurrences.append([argv[i][len(option) + 1 :]])
            i += 1
            continue
        if argv[i] != option:
            out.append(argv[i])
            i += 1
            continue
        at = len(out) if at is None else at
        j = i + 1
        while j < len(argv) and not (argv[j].startswith("-") and not argv[j].lstrip("-").isdigit()):
            j += 1
        occurrences.append(list(argv[i + 1 : j]))
        i = j
    if at is None:
        return out
    if any(not tokens for tokens in occurrences):
        return out[:at] + [option] + out[at:]  # jsonargparse: "expected one argument"
    values: list[object] | None = []
    for tokens in occurrences:
        if len(tokens) == 1 and tokens[0].strip() in ("null", "None"):
            values = None  # every class, until a later occurrence names some
            continue
        values = values or []
        for token in tokens:
            if token.strip().startswith("["):
                try:
                    parsed = yaml.safe_load(token)
                except yaml.YAMLError:
                    return out[:at] + [f"{option}={token}"] + out[at:]  # jsonargparse names the bad value
                if isinstance(parsed, list):
                    values += parsed
                    continue
            values.append(int(token) if token.lstrip("-").isdigit() else token)
    return out[:at] + [f"{option}={'null' if values is None else json.dumps(values)}"] + out[at:]


def main(args: list[str] | None = None) -> None:
    """Entry point of ``dn2-protocol`` (``args`` defaults to the command line).

    On the command line, a setting that DN2 refuses (``--k 0``, ``--classes 12``, a missing dataset) is said as a
    usage error (the message, exit code 2), as ``dn2`` says it, not as a traceback; called with ``args`` (Python,
    tests) it raises."""
    from jsonargparse import CLI, capture_parser

    from .help_format import DN2HelpFormatter, SuggestingArgumentParser

    arguments = join_list_option(sys.argv[1:] if args is None else args)
    kwargs: dict = dict(
        as_positional=False,
        args=arguments,
        prog="dn2-protocol",
        formatter_class=DN2HelpFormatter,
        parser_class=SuggestingArgumentParser,  # "did you mean --backbone?" after a mistyped option
    )
    try:
        CLI(run_protocol, **kwargs)
    except Exception as error:
        if args is not None:  # Python, tests: the error itself
            raise
        from .cli import _dn2_refusal  # (Lightning is imported only for an error on the command line)

        refusal = _dn2_refusal(error)
        if refusal is None:
            raise
        capture_parser(lambda: CLI(run_protocol, **kwargs)).error(str(refusal), ex=error)


if __name__ == "__main__":
    main()
