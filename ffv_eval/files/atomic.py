"""Writing files so that a failed or interrupted write leaves nothing half-written, and only
where a job may write (never into the installed package)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ffv_eval.errors import FFVError


class UnwritableOutput(FFVError, ValueError):
    """An output path inside the installed package, or in a folder that cannot be written."""


def check_writable(path: str | os.PathLike, option: str = "--out") -> None:
    """Raise UnwritableOutput, naming `path` and the `option` that picks another place, if
    `path` lies inside the installed ffv_eval package (shipped files are read-only) or its
    folder cannot be created or written. Call it before any model work."""
    import ffv_eval

    path = Path(path).absolute()
    package = Path(ffv_eval.__file__).resolve().parent
    if path.resolve().is_relative_to(package):
        raise UnwritableOutput(f"{path}: inside the installed ffv-eval package ({package}), which jobs never write; "
                               f"pass {option} with a path elsewhere, or run from a directory of your own "
                               f"(outputs default to ./vectors there)")
    folder = next(p for p in path.parents if p.exists())  # the folder, or the ancestor it will be made in
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UnwritableOutput(f"{path}: cannot write there ({folder} is not a writable folder); pass {option} with a "
                               f"path elsewhere")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(temporary path) beside `path`, then rename it into place; on failure the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
