"""Write an output directory all-or-nothing: build it beside the target, rename it into place at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory (or any file) unless the user asked to overwrite."""
    if path.exists() and not overwrite:
        if path.is_file() or any(path.iterdir()):
            raise UserError(f"output {path} already exists; choose another path or pass --overwrite")


def chmod_as_new(path: Path) -> None:
    """Give a file or folder made private by mkstemp/mkdtemp the mode a plain new one would have (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the body finishes without an exception."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    chmod_as_new(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    tmp.rename(path)
