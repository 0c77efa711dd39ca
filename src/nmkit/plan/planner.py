"""From a cost model and layer sensitivities to a plan for a speed target, and the trade-off curve."""

from __future__ import annotations

from dataclasses import dataclass

from nmkit.errors import UserError
from nmkit.plan.cost import DENSE, CostModel, ModelShape, step_seconds
from nmkit.plan.solve import solve


@dataclass
class Planned:
    layers: dict[str, str]  # layer -> pattern
    step_s: float  # predicted seconds of one step
    dense_step_s: float
    loss: float  # sum of the layers' relative reconstruction errors

    @property
    def speedup(self) -> float:
        return self.dense_step_s / self.step_s


def layer_options(model: CostModel, shape: ModelShape, errors: dict[str, dict[str, float]], batch: int,
                  patterns: tuple[str, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """layer -> pattern -> (seconds, loss) for every candidate the device runs on that layer."""
    options = {}
    for name, s in shape.layers.items():
        choices = {p: (model.cost(s, batch, p), errors[name][p]) for p in patterns
                   if p in errors.get(name, {}) and model.supports(s, p)}
        if not choices:
            raise UserError(f"layer {name} ({s[0]}x{s[1]}) has no pattern among {', '.join(patterns)} that "
                            f"device {model.name} runs (the runtime needs in_features divisible by 64 and by M)")
        options[name] = choices
    return options


def fastest(options: dict[str, dict[str, tuple[float, float]]]) -> dict[str, str]:
    return {n: min(ch, key=lambda p: ch[p][0]) for n, ch in options.items()}


def evaluate(model: CostModel, shape: ModelShape, options, layers: dict[str, str], batch: int) -> Planned:
    dense = step_seconds(model, shape, {}, batch)
    step = step_seconds(model, shape, layers, batch)
    loss = sum(options[n][p][1] for n, p in layers.items() if p in options[n])
    return Planned(layers, step, dense, loss)


def plan_for_speedup(model: CostModel, shape: ModelShape, options, target: float, batch: int) -> Planned:
    """The least-loss plan whose predicted step is at most dense / ``target``."""
    dense = step_seconds(model, shape, {}, batch)
    best = evaluate(model, shape, options, fastest(options), batch)
    if best.speedup < target:
        raise UserError(f"target {target:g}x is out of reach on {model.name}: the fastest plan (every layer at its "
                        f"fastest pattern) is predicted at {best.speedup:.2f}x; ask for at most that")
    budget = dense / target - model.overhead(shape, batch)
    return evaluate(model, shape, options, solve(options, budget), batch)


def uniform(model: CostModel, shape: ModelShape, options, pattern: str, batch: int) -> Planned | None:
    """Every layer at ``pattern`` (None when some layer cannot take it)."""
    if any(pattern not in ch for ch in options.values()):
        return None
    return evaluate(model, shape, options, {n: pattern for n in options}, batch)


def curve(model: CostModel, shape: ModelShape, options, batch: int, points: int = 24) -> list[Planned]:
    """Plans at evenly spaced speedups from dense to the fastest reachable."""
    top = evaluate(model, shape, options, fastest(options), batch).speedup
    out = []
    for i in range(points):
        target = 1.0 + (top - 1.0) * i / (points - 1)
        try:
            out.append(plan_for_speedup(model, shape, options, target * (1 - 1e-9), batch))
        except UserError:
            continue
    return out


def summary(plan: dict[str, str]) -> dict[str, dict[str, int]]:
    """Per layer kind (last name part, e.g. mlp.down_proj -> down_proj): pattern -> count."""
    out: dict[str, dict[str, int]] = {}
    for name, p in plan.items():
        kind = name.rsplit(".", 1)[-1]
        out.setdefault(kind, {}).setdefault(p, 0)
        out[kind][p] += 1
    return out


__all__ = ["DENSE", "Planned", "curve", "evaluate", "layer_options", "plan_for_speedup", "summary", "uniform"]
