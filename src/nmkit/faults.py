"""Fault injection for the reliability tests: ``NMKIT_FAULT=<point>`` stops the process at a named point.

A documented test hook, not a debug mode: nothing happens unless the variable names the point being
passed. ``NMKIT_FAULT=after-commit-0`` SIGKILLs the process (as ``kill -9`` would) right after block 0's
checkpoint is committed; ``NMKIT_FAULT=during-save:enospc`` raises ``OSError(ENOSPC)`` there instead,
as a full disk would, and ``...:interrupt`` raises ``KeyboardInterrupt`` (Ctrl-C). ``NMKIT_FAULT_RANK=R``
limits the fault to rank R of a torchrun run. The points are listed
in docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "NMKIT_FAULT"


def point(name: str) -> None:
    """Die (SIGKILL), raise a disk-full ``OSError`` or a ``KeyboardInterrupt`` here when ``$NMKIT_FAULT``
    names this point."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    where, _, kind = wanted.partition(":")
    if where != name:
        return
    rank = os.environ.get(ENV + "_RANK")  # only this torch.distributed rank (RANK, set by torchrun) stops
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected by {ENV}={wanted})")
    if kind == "interrupt":
        raise KeyboardInterrupt(f"injected by {ENV}={wanted}")
    if kind not in ("", "kill"):
        raise ValueError(f"{ENV}={wanted}: unknown fault {kind!r}; use kill (default), enospc or interrupt")
    os.kill(os.getpid(), signal.SIGKILL)
