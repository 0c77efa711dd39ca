"""Write output directories atomically: into a temporary sibling, renamed into place at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nmkit.errors import UserError


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any heavy work) when ``out`` cannot be written."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"output directory {str(out)!r} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {str(out)!r} exists and is not a directory")
    return out


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any error it is removed.

    A failed or interrupted run never leaves a half-written ``out`` (nor clobbers an old one).
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
