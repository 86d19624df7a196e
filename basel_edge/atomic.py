"""Write an output directory all-or-nothing: build it beside the target, rename it into place at the end."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def check_writable_parent(path: Path) -> None:
    """Before any work: `path`'s folder (or the nearest one of its parents that exists) must be a folder this
    process can create files in; otherwise the work would be lost at the end, when the output is written."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {parent} is not writable ({exc.strerror})") from None


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty directory (or any file) unless the user asked to overwrite, and an output
    that could not be written."""
    path = Path(path)
    check_writable_parent(path)
    if path.exists() and not overwrite:
        if path.is_file() or any(path.iterdir()):
            raise UserError(f"output {path} already exists; choose another path or pass --overwrite")


def chmod_as_new(path: Path) -> None:
    """Give a file or folder made private by mkstemp/mkdtemp the mode a plain new one would have (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def partial_prefix(path: Path) -> str:
    """Name prefix of a partial output for `path`; it carries the writer's PID so a later run can tell a
    killed writer's leftovers from a live one's."""
    return f".{path.name}.partial-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the partial outputs for `path` that a killed run (kill -9, power loss) left beside it: those whose
    writer process is gone. A live writer's partial output is left alone. Returns what was removed."""
    removed = []
    if not path.parent.is_dir():
        return removed
    for partial in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = partial.name.removeprefix(f".{path.name}.partial-").split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        removed.append(partial)
    return removed


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the body finishes without an exception."""
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(path), dir=path.parent))
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
