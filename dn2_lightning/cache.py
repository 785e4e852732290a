"""On-disk caches that cannot serve wrong or broken content: keyed files, atomic writes, bad files recomputed.

A cache file holds ``{"key": key, ...payload}``. :func:`load_cached` returns the payload only when the stored key
equals the expected one (everything the content depends on); a file that cannot be read (cut short by a kill,
disk error) gives a warning naming it and a miss, so the caller recomputes and overwrites it. :func:`save_atomic`
writes to a temporary file in the same folder and renames it into place (``os.replace``), so a reader never sees
a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch


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


def save_atomic(obj: Any, path: str | Path) -> bool:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file in the same folder, fsynced, then ``os.replace``.

    Returns:
        ``True`` once written; ``False`` (with a warning naming the path) when the folder cannot be written, so
        a read-only cache never stops a run. An interruption leaves the previous file (or none) in place.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as err:
        warnings.warn(f"could not write cache file {path} ({type(err).__name__}: {err}); continuing.", stacklevel=2)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
