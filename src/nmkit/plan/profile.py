"""The measured CPU cost model: nmkit's lean runtime timed on this machine, cached per machine.

A profile holds, for one model architecture, thread count, batch and weight kind:

- per-matrix seconds of every (shape, pattern), timed with ``nmr_matmul`` on enough copies of the
  matrix that they stream from memory as in a real decode step (a single hot copy would sit in cache),
  placed on 2 MiB pages as the engine places its weights;
- the runtime's whole-step seconds (``Engine.forward``) for the dense model and for each pattern applied
  to every planned layer (timed in interleaved rounds, as ratios to dense), which fix the step's fixed
  part (``overhead``: head, attention, norms) and one scale per pattern that maps isolated matrix time
  to time inside the step.

A mixed plan is then predicted as overhead + sum over layers of scale[pattern] * matrix[shape, pattern]:
exact for the uniform plans it was fitted on (up to timing noise), additive in between.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nmkit.errors import UserError
from nmkit.jsonout import dumps
from nmkit.models import cache_dir
from nmkit.patterns import NM
from nmkit.plan.cost import CANDIDATES, DENSE, ModelShape
from nmkit.runtime import native
from nmkit.runtime.arena import Arena, nbytes
from nmkit.runtime.engine import Engine
from nmkit.runtime.pack import SUPPORTED_GROUPS, native_matmul, pack
from nmkit.solvers.nm import nm_mask

STREAM_BYTES = 128 << 20  # copies of a matrix per timing sweep: several times any last-level cache
VERSION = 4  # 2: whole steps timed interleaved; 3: matrices on huge pages, interleaved; 4: integer 2:8/4:8 tiles


@dataclass
class CpuModel:
    """Cost model over a measured profile (see the module docstring)."""

    profile: dict
    name: str = "cpu"

    @property
    def dtype(self) -> str:
        return self.profile["kind"]

    def supports(self, shape: tuple[int, int], pattern: str) -> bool:
        if shape[1] % 64:  # the runtime packs 64-input blocks
            return False
        return pattern == DENSE or NM.parse(pattern).group in SUPPORTED_GROUPS

    def cost(self, shape: tuple[int, int], batch: int, pattern: str, dtype: str | None = None) -> float:
        self._check(batch, dtype)
        key = f"{shape[0]}x{shape[1]}"
        try:
            seconds = self.profile["matrices"][key][pattern]
        except KeyError:
            raise UserError(f"the CPU profile has no timing of a {key} layer at {pattern}; rerun "
                            "`nmkit plan MODEL --profile`") from None
        return self.profile["scale"][pattern] * seconds

    def overhead(self, model: ModelShape, batch: int, dtype: str | None = None) -> float:
        self._check(batch, dtype)
        return self.profile["overhead_s"]

    def _check(self, batch: int, dtype: str | None) -> None:
        if batch != self.profile["batch"] or (dtype is not None and dtype != self.profile["kind"]):
            raise UserError(f"the CPU profile was measured at batch {self.profile['batch']}, "
                            f"{self.profile['kind']} weights; profile again for batch {batch}")


def machine_id(threads: int, batch: int, kind: str, arch: str) -> str:
    """Which profile fits: this CPU, its ISA level, the thread count, batch, weight kind and architecture."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{VERSION}|{cpu}|{native.best_isa()}|{threads}|{batch}|{kind}|{arch}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(ident: str) -> Path:
    return cache_dir() / "plan" / f"cpu-{ident}.json"


def load_cached(ident: str) -> dict | None:
    path = cache_path(ident)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a damaged cache entry is measured again


def save(ident: str, profile: dict) -> Path:
    path = cache_path(ident)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(profile, indent=1) + "\n")
    tmp.replace(path)
    return path


def _prune_like(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    w = weight.detach().float()
    return w if pattern == DENSE else w * nm_mask(w.abs(), NM.parse(pattern))


def _streamed_copies(shape: tuple[int, int], pattern: str, kind: str, gen: torch.Generator) -> tuple[list, Arena]:
    """Enough packed copies of a (out, in) matrix that a sweep streams from memory as in a real decode
    step (a single hot copy would sit in cache), placed like the engine places weights: in one mapping
    on 2 MiB pages (4 KiB pages slow a stream by a third, and ordinary allocations get them by chance)."""
    nm = None if pattern == DENSE else NM.parse(pattern)
    one = pack(_prune_like(torch.randn(shape, generator=gen), pattern), kind, nm)
    copies = max(4, min(4096, STREAM_BYTES // max(one.nbytes(), 1)))
    mats = [one] + [pack(_prune_like(torch.randn(shape, generator=gen), pattern), kind, one.pattern)
                    for _ in range(copies - 1)]
    arena = Arena([nbytes(t) for m in mats for t in m.tensors()])
    for m in mats:
        m.relocate(arena.place)
    return mats, arena


def time_matrices(shape: tuple[int, int], patterns: tuple[str, ...], batch: int, kind: str, threads: int,
                  reps: int = 7) -> dict[str, float]:
    """Median seconds of one ``nmr_matmul`` of a (out, in) matrix per pattern, streamed from memory; each
    repetition sweeps every pattern in turn, so a drift of the machine hits all of them alike."""
    gen = torch.Generator().manual_seed(0)
    sets = {p: _streamed_copies(shape, p, kind, gen) for p in patterns}
    x = torch.randn(batch, shape[1], generator=gen)
    isa = native.isa_code()
    for mats, _ in sets.values():  # warm-up: pages touched, threads started
        for m in mats:
            native_matmul(m, x, isa, threads)
    samples: dict[str, list[float]] = {p: [] for p in patterns}
    for _ in range(reps):
        for p, (mats, _) in sets.items():
            t0 = time.perf_counter()
            for m in mats:
                native_matmul(m, x, isa, threads)
            samples[p].append((time.perf_counter() - t0) / len(mats))
    return {p: statistics.median(s) for p, s in samples.items()}


def time_step(engine: Engine, batch: int, steps: int = 32) -> float:
    """Mean seconds of one ``Engine.forward`` of ``batch`` tokens (after one cached token)."""
    engine.reset()
    engine.forward([1])
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.forward([1] * batch)
    return (time.perf_counter() - t0) / steps


def time_steps(engines: dict[str, Engine], batch: int, rounds: int = 7, steps: int = 32) -> dict[str, float]:
    """Whole-step seconds per engine, interleaved: each round times every engine in turn, so a drift
    of the machine hits all of them alike. A pattern's figure is the dense median times the median of
    its per-round ratio to dense (the two sides of each ratio were timed moments apart)."""
    samples: dict[str, list[float]] = {p: [] for p in engines}
    for _ in range(rounds):
        for p, engine in engines.items():
            samples[p].append(time_step(engine, batch, steps))
    base = samples[DENSE]
    dense = statistics.median(base)
    return {p: dense * statistics.median(t / b for t, b in zip(s, base, strict=True)) for p, s in samples.items()}


@torch.no_grad()
def measure(model: nn.Module, shape: ModelShape, kind: str, threads: int, batch: int,
            patterns: tuple[str, ...] = CANDIDATES, log=lambda msg: None) -> dict:
    """A fresh profile of ``model`` (its planned layers ``shape.layers``) on this machine."""
    matrices: dict[str, dict[str, float]] = {}
    for out, inp in dict.fromkeys(shape.layers.values()):
        log(f"timing {out}x{inp} matrices ({', '.join(patterns)})")
        matrices[f"{out}x{inp}"] = time_matrices((out, inp), patterns, batch, kind, threads)
    modules = dict(model.named_modules())
    engines: dict[str, Engine] = {}
    for p in (DENSE, *(q for q in patterns if q != DENSE)):
        log(f"packing the model with every planned layer {p}")
        saved = {}
        for name in shape.layers:
            w = modules[name].weight
            saved[name] = w.data
            w.data = _prune_like(w, p).to(w.dtype)
        try:  # the engine packs its own copy of the weights: the model is restored at once
            engines[p] = Engine(model, weights=kind, threads=threads, max_seq=32 * batch + 2)
        finally:
            for name, data in saved.items():
                modules[name].weight.data = data
    log(f"timing whole decode steps, {', '.join(engines)} interleaved")
    steps = {p: t for p, t in time_steps(engines, batch).items() if p in patterns}
    del engines

    def summed(p: str) -> float:
        return sum(matrices[f"{o}x{i}"][p] for o, i in shape.layers.values())

    overhead = max(0.0, steps[DENSE] - summed(DENSE))
    scale = {p: (steps[p] - overhead) / summed(p) for p in patterns}
    if any(s <= 0 for s in scale.values()):  # a sparse step faster than the fixed part: the timings were disturbed
        shown = ", ".join(f"{p} {1e3 * t:.1f} ms" for p, t in steps.items())
        raise UserError(f"the CPU profile is inconsistent (steps: {shown}); the machine was busy: rerun "
                        "`nmkit plan MODEL --profile` on a quiet machine")
    return {"version": VERSION, "kind": kind, "threads": threads, "batch": batch, "arch": shape.key,
            "isa": native.best_isa(), "matrices": matrices, "steps_s": steps, "overhead_s": overhead,
            "scale": scale, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
