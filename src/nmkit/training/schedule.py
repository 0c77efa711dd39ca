"""When things happen in sparse training: mask refresh interval, mask decay, structure decay, dense tail."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from nmkit.errors import UserError
from nmkit.patterns import NM


@dataclass(frozen=True)
class Schedule:
    """Time-dependent settings, in optimiser steps.

    - ``total_steps``: length of training; needed by anything expressed as a fraction.
    - ``update_interval``: recompute masks from ``|W|`` every this many steps (1 = every step).
    - ``decay``: pruning-mask decay for ``method="decay"``: ``"exp"`` (alpha = exp(-coef * t / T_d)) or
      ``"linear"`` (alpha = 1 - t / T_d), reaching 0 at ``decay_end * total_steps`` (T_d);
      ``None`` = hard mask.
    - ``structure``: sparse-structure decay, ``[(pattern, start), ...]`` with start a step (int) or a
      fraction of ``total_steps`` (float), e.g. ``[("4:8", 0.0), ("2:8", 0.2), ("1:8", 0.4)]``; the
      last pattern is the target.
    - ``dense_finetune``: fraction of ``total_steps`` at the end trained dense (Hu et al. use 1/6);
      ``dense_start="masked"`` zeroes the pruned master weights at the switch (safe at low LR),
      ``"master"`` continues from the dense master weights.
    """

    total_steps: int | None = None
    update_interval: int = 1
    decay: str | None = "exp"
    decay_coef: float = 7.0
    decay_end: float = 0.5
    structure: Sequence[tuple[str, float | int]] | None = None
    dense_finetune: float = 0.0
    dense_start: str = "masked"

    def __post_init__(self) -> None:
        if self.update_interval < 1:
            raise UserError(f"update_interval must be >= 1, got {self.update_interval}")
        if self.decay not in (None, "exp", "linear"):
            raise UserError(f"decay must be 'exp', 'linear' or None, got {self.decay!r}")
        if not 0.0 <= self.dense_finetune < 1.0:
            raise UserError(f"dense_finetune is a fraction of total_steps in [0, 1): {self.dense_finetune}")
        if self.dense_start not in ("masked", "master"):
            raise UserError(f"dense_start must be 'masked' or 'master', got {self.dense_start!r}")
        needs_total = self.dense_finetune > 0 or any(isinstance(s, float) for _, s in self.structure or ())
        if needs_total and not self.total_steps:
            raise UserError("this schedule is given in fractions of training: pass total_steps")

    def _at(self, start: float | int) -> int:
        return round(start * self.total_steps) if isinstance(start, float) else int(start)

    def alpha(self, step: int) -> float:
        """Weight given to pruned entries by mask decay at ``step`` (1 -> 0)."""
        if self.decay is None:
            return 0.0
        if not self.total_steps:
            raise UserError("mask decay needs Schedule(total_steps=...)")
        end = max(1.0, self.decay_end * self.total_steps)
        if step >= end:
            return 0.0
        if self.decay == "exp":
            return math.exp(-self.decay_coef * step / end)
        return 1.0 - step / end

    def pattern(self, step: int, target: NM) -> NM:
        """The N:M pattern in force at ``step`` (the target unless a structure schedule says otherwise)."""
        if not self.structure:
            return target
        current = NM.parse(self.structure[0][0])
        for spec, start in self.structure:
            if step >= self._at(start):
                current = NM.parse(spec)
        return current

    def dense_from(self) -> int | None:
        """First step of the dense fine-tune phase, or None."""
        if self.dense_finetune <= 0:
            return None
        return self.total_steps - round(self.dense_finetune * self.total_steps)
