"""Output files: checked before any work, written atomically, never over an input.

`check_output` is called at the boundary (the CLI, `save_compressed`) before a model is
loaded or an image read, so a bad output path costs nothing. `write_atomic` writes
beside the target, flushes and fsyncs, then renames into place: a reader sees the old
file or the whole new one, and an error leaves nothing behind. New files get the mode
an ordinary `open()` would give them (0666 less the umask, usually 0644), not the
0600 of a temporary file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from renorm.errors import RenormError


def check_output(path: str | Path | None, flag: str, inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise a RenormError unless `path` can be written as a new or replaced file.

    It must not be a folder, its folder must exist and take new files, and it must not
    be one of `inputs` (the files the run reads).
    """
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise RenormError(f"{flag} {path} is a folder; give a file name")
    for item in inputs:
        if item and _same_file(target, Path(item).expanduser()):
            raise RenormError(f"{flag} {path} is an input of this run ({item}); write to a new file")
    folder = target.parent
    if not folder.is_dir():
        raise RenormError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as error:
        raise RenormError(f"{flag} {path}: cannot write in {folder} ({error.strerror or error})") from None
    os.close(fd)
    os.unlink(probe)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_atomic(path: str | Path, writer: Callable[[BinaryIO], None]) -> int:
    """Call writer(handle) on a temporary file beside `path`, fsync, rename it to `path`; return its size."""
    path = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path.stat().st_size


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
