"""The life of ``nmkit prune``'s checkpoint (``OUT.nmkit-ckpt``) around one run, so no work is lost.

* Before the run: leftovers of killed runs beside ``OUT`` are removed; a checkpoint whose output was
  already saved (the run was killed while cleaning up) is removed; a checkpoint of an unfinished run
  is never discarded silently: without ``--resume`` the run is refused.
* During the final save: just before the output is renamed into place, ``saved.json`` in the
  checkpoint records the run id written into the output's ``report.json``.
* After the rename: the checkpoint is removed. A kill between the two leaves a complete output and a
  checkpoint that names it; the next run with the same ``--out`` recognises that and cleans up.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from nmkit.errors import UserError
from nmkit.oneshot.sequential import STATE
from nmkit.outputs import remove_stale

SAVED = "saved.json"


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out).expanduser()
    return out.with_name(out.name + ".nmkit-ckpt")


def _run_id_of_output(out: Path) -> str | None:
    try:
        return json.loads((out / "report.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def output_saved(out: str | Path) -> bool:
    """True when the checkpoint beside ``out`` belongs to the output already saved there."""
    out = Path(out).expanduser()
    try:
        saved = json.loads((checkpoint_dir(out) / SAVED).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return False
    return saved is not None and saved == _run_id_of_output(out)


def tidy(out: str | Path, log: Callable[[str], None]) -> None:
    """Remove what killed runs left beside ``out`` (temporary directories, a finished run's checkpoint)."""
    for path in remove_stale(out):
        log(f"removed {path}, left by an interrupted run")
    if output_saved(out):
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
        log(f"removed {checkpoint_dir(out)}: its run had saved {out} before it was interrupted")


def check_checkpoint(out: str | Path, resume: bool, log: Callable[[str], None]) -> None:
    """Refuse to start over a committed checkpoint without ``--resume``; say when there is nothing to resume."""
    ckpt = checkpoint_dir(out)
    state = ckpt / STATE
    if not ckpt.exists():
        if resume:
            log(f"--resume: no checkpoint at {ckpt}; starting from the first block")
        return
    if not state.is_file():  # killed before its first block was committed: nothing to keep
        shutil.rmtree(ckpt, ignore_errors=True)
        log(f"removed {ckpt}: an interrupted run had committed no block yet")
        return
    if not resume:
        try:
            done = f"{json.loads(state.read_text())['next_block']} blocks done"
        except (OSError, ValueError, KeyError, TypeError):
            done = "unreadable"
        raise UserError(f"{ckpt} holds an interrupted run ({done}); rerun the same command with --resume to "
                        f"continue it, or delete {ckpt} to start over")


def mark_saved(out: str | Path, run_id: str) -> None:
    """Record, in the checkpoint, that the output carrying ``run_id`` is complete (before its rename)."""
    ckpt = checkpoint_dir(out)
    if ckpt.is_dir():
        (ckpt / SAVED).write_text(json.dumps({"run_id": run_id}) + "\n")


def remove(out: str | Path) -> None:
    shutil.rmtree(checkpoint_dir(out), ignore_errors=True)


NOT_RECORDED = {"func", "command", "debug", "resume", "json", "overwrite", "out"}


def run_arguments(flags: dict) -> dict:
    """A run's CLI flags (argparse's ``vars(args)``) as the checkpoint records them ("--calib-samples": 64,
    ...), so that --resume refuses a run with other flags and names them."""
    return {"--" + k.replace("_", "-"): v for k, v in sorted(flags.items()) if k not in NOT_RECORDED}
