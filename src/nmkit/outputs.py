"""Write output directories atomically: into a temporary sibling, renamed into place at the end.

Temporary siblings are named ``.OUT.tmp-<pid>-<random>`` (and ``.OUT.old-<pid>-<random>`` for the
output being replaced), so a later run with the same ``--out`` can tell a dead run's leftovers from a
live one's and remove them (:func:`remove_stale`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nmkit.errors import UserError


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any heavy work) when ``out`` cannot be written."""
    if not str(out).strip():
        raise UserError("--out is empty; give the path of the output directory")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"output directory {str(out)!r} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {str(out)!r} exists and is not a directory")
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by runs that were killed; returns what was removed.

    A ``.OUT.old-*`` left by a run killed between its two renames holds the previous output: it is put
    back when ``out`` is missing, else removed. Leftovers of a live process are kept.
    """
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return []
    leftover = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-.*")
    removed = []
    for path in sorted(out.parent.iterdir()):
        m = leftover.fullmatch(path.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            path.rename(out)
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def temporary_sibling(out: Path, kind: str = "tmp") -> Path:
    """A new private directory beside ``out`` that :func:`remove_stale` recognises."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on any error it is removed.

    A failed or interrupted run never leaves a half-written ``out`` (nor clobbers an old one).
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out)
    try:
        yield tmp
        tmp.chmod(0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{tmp.name[-8:]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_failure(exc: BaseException) -> str | None:
    """What went wrong when writing failed with ``exc`` (e.g. "No space left on device"), or None when
    ``exc`` is not a write failure. safetensors and ``torch.save`` report a full disk as their own
    exception types, not as OSError."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "I/O error" in text:
        return text.split("I/O error:", 1)[1].split("(os error")[0].strip()
    if isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return f"torch.save failed ({text.strip().splitlines()[0][:120]}); the disk is probably full"
    return None
