"""Atomic file writing: a reader never sees a half-written output.

Every output is written to a temporary file in the destination folder and moved into place with
:func:`os.replace`, which is atomic on POSIX and Windows when both paths are on one file system.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutputError

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "check_writable", "output_errors", "output_error"]


def _file_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: mkstemp creates private (0600) files; outputs get the usual permissions instead.
FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination. Its parent folder is created when missing.

    Yields
    ------
    pathlib.Path
        Where the caller writes. On an exception the temporary file is removed and ``path`` is untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, FILE_MODE)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def output_error(exc: OSError, fallback: str | os.PathLike, *, setting: str | None = "output_root") -> OutputError:
    """The :class:`~dwarf3gpu.errors.OutputError` for an OSError met while writing: the path, the cause, the fix."""
    path = exc.filename or fallback
    code = exc.errno
    cause = exc.strerror or str(exc)
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", None):
        fix = "the disk is full; free some space (e.g. remove old outputs or caches) or write to another disk"
    elif code in (errno.EACCES, errno.EPERM):
        fix = f"no permission to write there ({cause}); choose a folder you can write to"
    elif code == errno.EROFS:
        fix = "the disk is read-only; choose a folder on a writable disk"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        fix = f"a file is in the way of a folder ({cause}); move that file or choose another folder"
    else:
        fix = f"{cause}; check the disk, or choose another folder"
    return OutputError(path, fix, setting=setting)


@contextlib.contextmanager
def output_errors(where: str | os.PathLike, *, setting: str | None = "output_root") -> Iterator[None]:
    """Turn an OSError raised in the block while writing under ``where`` into an :class:`OutputError`.

    Only errors about a path under ``where`` (or the file ``where`` itself), or write errors that name no path
    (a full, read-only or forbidden disk), are converted: an error reading an input passes through unchanged.
    """
    try:
        yield
    except OSError as exc:
        if not _is_output_error(exc, Path(where)):
            raise
        raise output_error(exc, where, setting=setting) from exc


_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _is_output_error(exc: OSError, where: Path) -> bool:
    """True when ``exc`` concerns writing under ``where`` (see :func:`output_errors`)."""
    if exc.filename is None:
        return exc.errno in _WRITE_ERRNOS
    target, root = Path(exc.filename).absolute(), where.absolute()
    return target == root or root in target.parents or (exc.errno in (errno.ENOTDIR, errno.EEXIST)
                                                          and (target in root.parents))


def check_writable(folder: str | os.PathLike, *, setting: str | None = "output_root") -> Path:
    """Create ``folder`` (and its parents) and write and remove a probe file in it, so that a run that could not
    save its results fails at once, before any work, with an :class:`OutputError` saying why."""
    path = Path(folder)
    with output_errors(path, setting=setting):
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".part", dir=path)
        os.close(fd)
        os.unlink(probe)
    return path
