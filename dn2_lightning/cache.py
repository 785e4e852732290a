"""On-disk caches that cannot serve wrong or broken content: keyed files, atomic writes, bad files recomputed.

A cache file holds ``{"key": key, ...payload}``. :func:`load_cached` returns the payload only when the stored key
equals the expected one (everything the content depends on); a file that cannot be read (cut short by a kill,
disk error) gives a warning naming it and a miss, so the caller recomputes and overwrites it. :func:`atomic_write`
(behind :func:`save_atomic` and the report files) writes to a temporary file in the same folder and renames it
into place (``os.replace``), so a reader never sees a half-written file; temporary files that killed writers left
behind are deleted by the next write of the same file once an hour old.
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


def file_stamp(path: str | Path) -> tuple[int, int, int, int]:
    """(inode, size, modification time, change time) of a file: rewriting or replacing it changes the stamp, also
    when a copy keeps the size and modification time (``cp -p``, ``rsync -a``, an unpacked archive)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def load_cached(path: str | Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached dict at ``path`` if its ``"key"`` equals ``key``, else ``None`` (also when there is no file).

    Raises nothing for a damaged file: it warns (``UserWarning`` naming the file and the error) and returns
    ``None`` so the caller recomputes; the next :func:`save_atomic` replaces the file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        warnings.warn(f"cache file {path} is unreadable ({type(err).__name__}: {err}); recomputing it.", stacklevel=2)
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    return cached


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file in ``path``'s folder for writing; on a clean exit it is fsynced and renamed onto
    ``path`` (``os.replace``). An exception (or a kill) leaves the previous file (or none) in place, never a
    half-written one. ``mode`` and ``open_kwargs`` (``encoding``, ``newline``) are :func:`open`'s.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(target, "w", encoding="utf-8") as f:
    ...     _ = f.write("done")
    >>> target.read_text(encoding="utf-8")
    'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # os.open, not mkstemp: the file gets the umask's permissions, as open() would give it
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except PermissionError as err:
            raise PermissionError(
                err.errno,
                f"cannot replace the file ({err.strerror}): if another program holds it open (a spreadsheet, a "
                "viewer; Windows refuses to replace such a file), close it and run again",
                str(path),
            ) from err
        _remove_stale_temporaries(path)
    finally:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


STALE_TEMPORARY_SECONDS = 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``path``'s temporary files left by killed writers (a SIGKILL skips the cleanup above): those not
    written to for an hour. A writer at work keeps touching its file, so it is never taken for one."""
    now = time.time()
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                stale.unlink()


def save_atomic(obj: Any, path: str | Path) -> bool:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`).

    Returns:
        ``True`` once written; ``False`` (with a warning naming the path) when the folder cannot be written, so
        a read-only cache never stops a run. An interruption leaves the previous file (or none) in place.
    """
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
        return True
    except OSError as err:
        warnings.warn(f"could not write cache file {path} ({type(err).__name__}: {err}); continuing.", stacklevel=2)
        return False
