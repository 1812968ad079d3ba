"""Atomic file writes: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    If the body raises (or the process dies), ``path`` keeps its old content and
    the temporary file is removed, so a reader never sees a truncated file.
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {target}: the folder {folder} does not exist")
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below, before the rename)
        mode=mode, dir=folder, prefix=f".{target.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(handle.name, _mode_for(target))
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(handle.name)
        raise


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Files that belong together (a table and its plot): the body writes each to the
    temporary path given for it; on success all are renamed into place, one after the
    other, so an error or a Ctrl-C in the body leaves none of them half-done or alone.

    Example:
        >>> with atomic_files(["results.csv", "results.png"]) as (csv, png):
        ...     write_table(csv); draw_plot(png)
    """
    targets = [Path(path) for path in paths]
    pending = [target.with_name(f".{target.name}.pending") for target in targets]
    try:
        yield pending
        for temporary, target in zip(pending, targets, strict=True):
            os.replace(temporary, target)
    finally:
        for temporary in pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)


def _mode_for(target: Path) -> int:
    """The permission bits of an existing ``target``, else those the umask gives a new file."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
