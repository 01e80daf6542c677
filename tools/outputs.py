"""Output files, all or nothing: checked before any work starts, written together at the end.

``check_outputs`` runs first (before importing torch, before tracing): every path a
command will write must be distinct, must not be one of the command's input files, must
not be an existing directory, and its folder must exist and be writable. ``Outputs``
then collects the files' bytes while the command works and ``commit`` writes them to
temporary files beside their targets, renaming only once all of them are written, so
a failure leaves nothing new behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from partitioner.tools.loading import ToolError

__all__ = ["check_outputs", "check_output_dir", "Outputs"]


def _where(p: Path) -> Path:
    return p.resolve() if p.exists() else p.parent.resolve() / p.name


def check_outputs(outputs: Iterable[tuple[str, str | None]], inputs: Iterable[str] = ()) -> None:
    """``outputs``: (flag, path or None) pairs, e.g. ("-o", "plan.json"). Raises ToolError."""
    seen: dict[Path, str] = {}
    read = {_where(Path(p)): p for p in inputs if p and Path(p).exists()}
    for flag, path in outputs:
        if not path:
            continue
        p = Path(path)
        where = _where(p)
        if where in seen:
            raise ToolError(f"{flag} {path} and {seen[where]} name the same file; give each output its own path")
        if where in read:
            raise ToolError(f"{flag} {path} would overwrite the input file {read[where]}; choose another path")
        seen[where] = f"{flag} {path}"
        if p.is_dir():
            raise ToolError(f"{flag} {path} is a directory; give a file path")
        folder = where.parent
        if not folder.is_dir():
            raise ToolError(f"{flag} {path}: folder {str(p.parent) or '.'} does not exist; create it first")
        if not _writable(folder) or (p.exists() and not os.access(p, os.W_OK)):
            raise ToolError(f"{flag} {path}: cannot write into {str(p.parent) or '.'}; choose a writable path")


def check_output_dir(flag: str, path: str) -> None:
    """A directory the command will create or fill: it or its nearest existing parent writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ToolError(f"{flag} {path} exists and is not a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent if probe.parent != probe else Path(".")
        if probe == Path("."):
            break
    if not _writable(probe):
        raise ToolError(f"{flag} {path}: cannot write into {probe}; choose a writable directory")


def _writable(folder: Path) -> bool:
    """Try it: os.access says yes to root on a read-only file system."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".partitioner-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    _remove(tmp)
    return True


class Outputs:
    """Files to write, kept in memory until ``commit``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, path: str | os.PathLike[str], data: str | bytes) -> None:
        self.files[str(path)] = data.encode() if isinstance(data, str) else data

    def commit(self) -> list[str]:
        """Write every file or none: temporaries first, then one rename each."""
        temps: list[tuple[str, str]] = []
        umask = os.umask(0)
        os.umask(umask)
        try:
            for path, data in self.files.items():
                folder = os.path.dirname(os.path.abspath(path))
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
                temps.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o666 & ~umask)  # what open() would have made
        except BaseException:
            for tmp, _ in temps:
                _remove(tmp)
            raise
        for tmp, path in temps:
            os.replace(tmp, path)
        return list(self.files)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
