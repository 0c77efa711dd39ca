"""Sparsity recipes: which layers get which N:M pattern, by which method, with what calibration.

One record, :class:`Recipe`, read from a dict (``nmkit.sparsify_(model, config)``) or a YAML file
(``nmkit prune --recipe recipe.yaml``), checked completely before any work:

.. code-block:: yaml

    pattern: "2:4"            # every selected layer, unless a `layers` glob says otherwise
    layers:                   # glob over module names -> pattern; the first matching glob wins
      "*.mlp.down_proj": "2:8"
    method: wanda             # see `nmkit prune --help`
    include: ["*"]            # optional; default: the Linear layers inside the transformer blocks
    exclude: ["*lm_head*"]
    calibration: {samples: 64, seqlen: 512, seed: 0, data: mix}   # data: mix | wikitext
    permute: false            # or {budget_s: 5}
    tail: error               # error | pad | dense

Unknown keys, invalid patterns and globs that select no layer are errors (:class:`UserError`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from nmkit.calibration import CHOICES as CALIBRATION_DATA
from nmkit.errors import UserError
from nmkit.oneshot.methods import METHODS
from nmkit.patterns import PatternError, parse
from nmkit.selection import matches

KEYS = ("pattern", "layers", "method", "include", "exclude", "calibration", "permute", "tail")
CALIBRATION_KEYS = ("samples", "seqlen", "seed", "data")
TAILS = ("error", "pad", "dense")


@dataclass
class Recipe:
    pattern: str = "2:4"
    layers: dict[str, str] = field(default_factory=dict)
    method: str = "magnitude"
    include: list[str] | None = None
    exclude: list[str] | None = None
    calibration: dict = field(default_factory=lambda: {"samples": 64, "seqlen": 512, "seed": 0, "data": "mix"})
    permute: bool = False
    permute_budget_s: float = 5.0
    tail: str = "error"

    def to_dict(self) -> dict:
        return asdict(self)

    def pattern_for(self, name: str) -> str:
        """The pattern layer ``name`` gets: its first matching ``layers`` glob, else ``pattern``."""
        return next((p for glob, p in self.layers.items() if matches(name, [glob])), self.pattern)

    def check_globs(self, names: list[str]) -> None:
        """Every ``layers`` glob must select at least one of the layers the recipe prunes."""
        for glob in self.layers:
            if not matches_any(glob, names):
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise UserError(f"recipe: layers glob {glob!r} matches none of the {len(names)} selected layers "
                                f"(e.g. {shown})")


def matches_any(glob: str, names: list[str]) -> bool:
    return any(matches(n, [glob]) for n in names)


def _pattern(value, where: str) -> str:
    try:
        return str(parse(str(value)))
    except (PatternError, ValueError) as exc:
        raise UserError(f"recipe: {where} {value!r} is not a valid pattern ({exc}); use N:M, e.g. 2:4 "
                        "(keep 2 of every 4)") from None


def _globs(value, key: str) -> list[str] | None:
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise UserError(f"recipe: {key} must be a glob or a list of globs, got {value!r}")
    return value


def from_dict(config: dict) -> Recipe:
    """Check ``config`` (the fields in the module docstring) and return the recipe."""
    if not isinstance(config, dict):
        raise UserError(f"recipe: expected a mapping of {', '.join(KEYS)}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise UserError(f"recipe: unknown key {unknown[0]!r}; allowed: {', '.join(KEYS)}")
    r = Recipe()
    if "pattern" in config:
        r.pattern = _pattern(config["pattern"], "pattern")
    layers = config.get("layers") or {}
    if not isinstance(layers, dict):
        raise UserError("recipe: layers must map globs to patterns, e.g. {'*.mlp.down_proj': '2:8'}")
    r.layers = {str(g): _pattern(p, f"layers[{g!r}]") for g, p in layers.items()}
    r.method = str(config.get("method", r.method))
    if r.method not in METHODS:
        raise UserError(f"recipe: unknown method {r.method!r}; available: {', '.join(sorted(METHODS))}")
    r.include, r.exclude = _globs(config.get("include"), "include"), _globs(config.get("exclude"), "exclude")
    cal = config.get("calibration") or {}
    if not isinstance(cal, dict) or set(cal) - set(CALIBRATION_KEYS):
        raise UserError(f"recipe: calibration takes {', '.join(CALIBRATION_KEYS)}, got {cal!r}")
    r.calibration = {**r.calibration, **{k: v if k == "data" else int(v) for k, v in cal.items()}}
    if r.calibration["data"] not in CALIBRATION_DATA:
        raise UserError(f"recipe: calibration data must be one of {', '.join(CALIBRATION_DATA)}, "
                        f"got {r.calibration['data']!r}")
    if r.calibration["samples"] < 1 or r.calibration["seqlen"] < 2:
        raise UserError("recipe: calibration samples must be >= 1 and seqlen >= 2")
    permute = config.get("permute", False)
    if isinstance(permute, dict):
        if set(permute) - {"budget_s"}:
            raise UserError(f"recipe: permute takes budget_s only, got {permute!r}")
        r.permute, r.permute_budget_s = True, float(permute.get("budget_s", r.permute_budget_s))
    elif isinstance(permute, bool):
        r.permute = permute
    else:
        raise UserError(f"recipe: permute must be true, false or {{budget_s: S}}, got {permute!r}")
    r.tail = str(config.get("tail", r.tail))
    if r.tail not in TAILS:
        raise UserError(f"recipe: tail must be one of {', '.join(TAILS)}, got {r.tail!r}")
    return r


def load(path: str | Path) -> Recipe:
    """Read and check a YAML recipe file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_dict(config or {})


__all__ = ["KEYS", "Recipe", "from_dict", "load"]
