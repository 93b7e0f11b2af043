"""Atomic file writes: everything goes to a temporary name in the same folder and is renamed.

A reader therefore sees either the previous file or the complete new one, never half of it.
Files get the usual mode (0666 less the umask); a killed writer's leftover temporary file is
removed by the next write of the same file.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the mode ``open()`` would give them (0666 less the umask), not mkstemp's private 0600.
_FILE_MODE = 0o666 & ~_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left behind; returns them.

    A process killed between creating its temporary file and renaming it (``kill -9``, a
    power cut) cannot clean up. Its leftovers match ``.NAME.*.tmp`` beside ``path``; the
    next write of the same file removes them (one writer per file is assumed).
    """
    path = Path(path)
    stale = list(path.parent.glob(f"{glob.escape(_temp_prefix(path))}*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def write_stream(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically by calling ``write(handle)`` on a binary handle of a temporary
    file beside it, then renaming (contents produced piece by piece need never be held whole);
    every writer below goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fchmod(handle.fileno(), _FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_stream(path, lambda h: h.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_file(src: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Copy the file ``src`` to ``path`` atomically, streamed (a file of any size, little memory)."""
    with open(src, "rb") as source:
        return write_stream(path, lambda h: shutil.copyfileobj(source, h, 1 << 20))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save one array in ``.npy`` format atomically (``path`` is used as given, no suffix added)."""
    return write_stream(path, lambda h: np.save(h, np.ascontiguousarray(array), allow_pickle=False))


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())
