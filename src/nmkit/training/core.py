"""``SparseTraining``: one object that attaches N:M masks to a model and runs any STE-family method.

Usage::

    sparse = SparseTraining(model, "2:4", method="srste", schedule=Schedule(total_steps=1000))
    opt = sparse.wrap(torch.optim.AdamW(model.parameters(), lr=3e-3))   # or call the hooks yourself
    for batch in data:
        loss = model(batch).loss; loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(loss=loss.item()); opt.zero_grad()
    report = sparse.finalize()       # plain weights, N:M checked

Without ``wrap``: call ``sparse.before_optimizer_step()`` (adds the masked decay to the gradients,
after clipping) before ``optimizer.step()`` and ``sparse.step(loss)`` after it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.selection import matches, selected
from nmkit.solvers.transposable import transposable_mask
from nmkit.training.bidirectional import BidirectionalLinear
from nmkit.training.masks import column_mask, flips, magnitude_mask, soft_threshold_scale
from nmkit.training.parametrization import NMWeight
from nmkit.training.permutation import (
    LEARNED,
    PERMUTE,
    PermuteConfig,
    PermutedLinear,
    export,
    l1_l2_penalty,
    oneshot_perm,
    temperature,
    window,
)
from nmkit.training.schedule import Schedule

METHODS = ("fixed", "ste", "srste", "sste", "decay", "dense")
MASK_KINDS = ("rows", "transposable", "bidirectional")
DEFAULT_SRSTE_LAMBDA = 2e-4
_MODE_OF = {
    "fixed": "fixed",
    "ste": "ste",
    "srste": "ste",
    "sste": "soft",
    "decay": "decay",
    "dense": "dense",
}

Include = Iterable[str] | Callable[[str, nn.Module], bool] | None


@dataclass
class _Layer:
    name: str
    module: nn.Linear
    param: NMWeight
    within: torch.Tensor | None = None


@dataclass
class History:
    """Loss per step and flip rate per mask update (overall and per layer)."""

    loss_steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    flip_steps: list[int] = field(default_factory=list)
    flip_rate: list[float] = field(default_factory=list)
    flip_rate_layers: dict[str, list[float]] = field(default_factory=dict)


def _selected(name: str, module: nn.Module, include: Include, exclude: Iterable[str]) -> bool:
    if not isinstance(module, nn.Linear):
        return False
    if callable(include):
        return bool(include(name, module)) and not matches(name, exclude)
    return selected(name, include, exclude)


class SparseTraining:
    """Attach N:M masks to the ``nn.Linear`` layers of ``model`` with ``torch.nn.utils.parametrize``.

    ``pattern``: ``"N:M"`` keeps N of every M consecutive weights along the input dimension.
    ``method``: ``fixed`` (mask frozen, masked gradient: recovery after one-shot pruning), ``ste``,
    ``srste`` (STE + masked decay ``lambda * (1-m) * W`` on the gradient), ``sste`` (beta * soft
    threshold, beta frozen at start), ``decay`` (pruned weights scaled by alpha_t: 1 -> 0), ``dense``
    (no mask in the forward; masks still tracked, for baselines and flip-rate reference).
    ``include``/``exclude``: fnmatch patterns on module names (or a callable for include); by
    default every ``nn.Linear`` except ``*lm_head*``. Layers whose input size is not a multiple of M are
    skipped and listed in ``self.skipped`` (a warning says so).
    ``masks``: for ``fixed``, ``"nonzero"`` (keep what is non-zero now, e.g. a one-shot-pruned model),
    ``"magnitude"`` or ``{name: bool mask}``.
    ``within``: ``{name: parent mask}`` keeps every mask a subset of its parent (sparsity inheritance).
    ``mask_kind``: ``rows`` (standard), ``transposable`` (W and W.T both N:M), ``bidirectional``
    (row-wise mask in the forward, column-wise N:M mask in the input-gradient GEMM; swaps each layer
    for a :class:`BidirectionalLinear`, undone by :meth:`finalize`).
    ``permute``: ``None``; ``"oneshot"`` (each layer's inputs reordered once, at the start, by nmkit's
    permutation search on ``|W|``); ``"learned"`` (a Sinkhorn-relaxed input permutation per layer,
    trained with the weights and hardened at ``permute_config.harden_at``; needs
    ``Schedule(total_steps=...)``). Each layer is swapped for a
    :class:`~nmkit.training.permutation.PermutedLinear` whose weight is N:M in the permuted order;
    :meth:`finalize` leaves that weight plain N:M and the order absorbed into the producing layer, or a
    :class:`~nmkit.permute_model.PermutedInput` gather. The learned logits are model parameters
    (:meth:`permutation_parameters`): give them their own optimiser group (no weight decay, and
    leave them out of gradient clipping: their gradient grows as the temperature falls).
    ``"padst"``: learned, but closer to PA-DST: random start with no identity anchor, fixed temperature,
    and an L1-L2 penalty that drives each soft matrix to a permutation; add
    :meth:`permutation_penalty` to the loss every step.
    ``"dynamic"``: like oneshot, but the search re-runs on the current weights every
    ``permute_config.every`` steps until ``harden_at``; it moves weight columns and the optimiser
    state with them, so it needs :meth:`wrap` or :meth:`bind_optimizer`.
    """

    def __init__(
        self,
        model: nn.Module,
        pattern: str | NM = "2:4",
        method: str = "srste",
        include: Include = None,
        exclude: Iterable[str] = ("*lm_head*",),
        schedule: Schedule | None = None,
        masked_decay: float | None = None,
        masks: str | Mapping[str, torch.Tensor] = "magnitude",
        within: Mapping[str, torch.Tensor] | None = None,
        mask_kind: str = "rows",
        backward_mask: str = "subset",
        permute: str | None = None,
        permute_config: PermuteConfig | None = None,
    ) -> None:
        if method not in METHODS:
            raise UserError(f"method must be one of {METHODS}, got {method!r}")
        if mask_kind not in MASK_KINDS:
            raise UserError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
        if backward_mask not in ("subset", "dense"):
            raise UserError(f"backward_mask must be 'subset' or 'dense', got {backward_mask!r}")
        if method == "sste" and mask_kind != "rows":
            raise UserError("sste uses a soft threshold along rows; use mask_kind='rows'")
        if permute not in PERMUTE:
            raise UserError(f"permute must be one of None, 'oneshot', 'learned', 'padst', 'dynamic', got {permute!r}")
        if permute and mask_kind != "rows":
            raise UserError(
                f"permute={permute!r} reorders inputs, which breaks {mask_kind} masks; use mask_kind='rows'"
            )
        if permute and method == "dense":
            raise UserError(f"permute={permute!r} changes nothing for method='dense'; pick a sparse method")
        if permute and within:
            raise UserError(f"permute={permute!r} cannot keep masks inside parent masks (within=): orders differ")
        if permute in ("oneshot", "dynamic") and isinstance(masks, Mapping):
            raise UserError(
                f"permute={permute!r} reorders the weights, so given masks would not match; use 'magnitude'"
            )
        if permute == "dynamic" and method == "fixed":
            raise UserError("permute='dynamic' recomputes masks as it moves columns; method='fixed' keeps them")
        if permute in (*LEARNED, "dynamic") and not (schedule and schedule.total_steps):
            raise UserError(f"permute={permute!r} needs Schedule(total_steps=...) to know when to harden")
        self.permute = permute
        self.permute_config = permute_config or PermuteConfig()
        self.permuted: dict[str, PermutedLinear] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.model = model
        self.target = NM.parse(pattern)
        self.method = method
        self.schedule = schedule or Schedule(decay="exp" if method == "decay" else None)
        if method == "decay" and self.schedule.decay and not self.schedule.total_steps:
            raise UserError("method='decay' needs Schedule(total_steps=...) to know when alpha reaches 0")
        if method != "decay" and self.schedule.decay is not None and schedule is not None:
            # Schedule's default is exp decay; only the decay method uses it.
            self.schedule = dataclasses.replace(self.schedule, decay=None)
        if masked_decay is None:
            masked_decay = DEFAULT_SRSTE_LAMBDA if method == "srste" else 0.0
        self.masked_decay = float(masked_decay)
        self.mask_kind = mask_kind
        self.backward_mask_kind = backward_mask
        self.steps = 0
        self.pattern = self.schedule.pattern(0, self.target)
        self.in_dense_phase = False
        self.finalized = False
        self.history = History()
        self.skipped: list[str] = []
        self.layers: list[_Layer] = []
        self._swaps: list[tuple[nn.Module, str, nn.Linear]] = []
        self._last_flip: dict[str, float] = {}
        self._attach(include, exclude, masks, within or {})

    # ---------------------------------------------------------------- set-up
    def _attach(self, include: Include, exclude: Iterable[str], masks, within) -> None:
        exclude = tuple(exclude)
        m = max([self.target.group] + [NM.parse(s).group for s, _ in self.schedule.structure or ()])
        chosen = []
        for name, module in self.model.named_modules():
            if not _selected(name, module, include, exclude):
                continue
            if parametrize.is_parametrized(module, "weight"):
                raise UserError(f"{name}.weight already has a parametrization; finalize or remove it first")
            out_f, in_f = module.weight.shape
            if in_f % m or (self.mask_kind != "rows" and out_f % m):
                self.skipped.append(name)
                continue
            chosen.append((name, module))
        if self.skipped:
            warnings.warn(
                f"N:M training skipped {len(self.skipped)} layer(s) whose size is not a multiple of M={m}: "
                f"{', '.join(self.skipped[:5])}{' ...' if len(self.skipped) > 5 else ''}",
                stacklevel=3,
            )
        if not chosen:
            raise UserError("no nn.Linear layer matched include/exclude with sizes divisible by M")
        for name, module in chosen:
            if self.permute in ("oneshot", "dynamic"):
                with torch.no_grad():  # the stored order becomes the searched one; the wrapper undoes it
                    perm = oneshot_perm(module.weight, self.pattern, self.permute_config.oneshot_budget_s)
                    module.weight.copy_(module.weight[:, perm.to(module.weight.device)])
            w = module.weight.detach()
            parent = within.get(name)
            if parent is not None:
                parent = parent.to(device=w.device, dtype=torch.bool)
            mask = self._initial_mask(name, w, masks, parent)
            param = NMWeight(w, self.pattern, _MODE_OF[self.method], mask)
            if self.method == "sste":
                param.beta.fill_(soft_threshold_scale(w, self.pattern))
            if self.method == "decay":
                param.alpha.fill_(self.schedule.alpha(0))
            parametrize.register_parametrization(module, "weight", param)
            layer = _Layer(name, module, param, parent)
            self._refresh_backward_mask(layer)
            self.layers.append(layer)
            if self.permute:
                self._wrap_permuted(name, module, None if self.permute in LEARNED else perm)
        if self.mask_kind == "bidirectional":
            self._swap_bidirectional()

    def _wrap_permuted(self, name: str, module: nn.Linear, perm: torch.Tensor | None) -> None:
        if not name:
            raise UserError("permute needs the Linear to be a child module")
        cfg = self.permute_config
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        block = window(module.in_features, self.target.group, cfg.block)
        random = (cfg.init_scale, cfg.seed + len(self.permuted)) if self.permute == "padst" else None
        wrapper = PermutedLinear(module, block, cfg.init_diag, cfg.tau_start, perm, cfg.iters, random)
        setattr(parent, child, wrapper)
        self.permuted[name] = wrapper

    def permutation_parameters(self) -> list[nn.Parameter]:
        """The learned permutation logits (empty unless ``permute`` is ``'learned'`` or ``'padst'``)."""
        return [w.logits for w in self.permuted.values()] if self.permute in LEARNED else []

    def permutation_penalty(self) -> torch.Tensor:
        """``permute='padst'``: the term to add to this step's loss, ``lambda_t * l1_l2_penalty(P)``
        averaged over the still-soft layers, ``lambda_t`` rising linearly from 0 to
        ``permute_config.penalty`` at ``harden_at``. A zero tensor for the other modes and once hard."""
        if self.permute != "padst":
            return torch.zeros(())
        soft = [w for w in self.permuted.values() if not bool(w.hardened)]
        lam = self.permute_config.penalty * min(self.steps / self._harden_step(), 1.0)
        if not soft or lam == 0.0:
            return torch.zeros(())
        return lam * torch.stack([l1_l2_penalty(w.soft()) for w in soft]).mean()

    def _harden_step(self) -> int:
        return max(1, round(self.permute_config.harden_at * (self.schedule.total_steps or 1)))

    @torch.no_grad()
    def _step_permutations(self) -> None:
        harden_step = self._harden_step()
        if self.permute == "dynamic" and self.steps < harden_step and self.steps % self.permute_config.every == 0:
            if self.optimizer is None:
                raise UserError("permute='dynamic' moves weight columns: pass the optimizer (wrap or bind_optimizer)")
            for layer in self.layers:
                wrapper = self.permuted[layer.name]
                master = layer.module.parametrizations.weight.original
                dense = master[:, torch.argsort(wrapper.perm)]  # back to the input order
                budget = self.permute_config.oneshot_budget_s
                wrapper.reorder(oneshot_perm(dense, layer.param.pattern, budget), self.optimizer)
            self.update_masks()
        if self.permute not in LEARNED:
            return
        # padst keeps its temperature: the penalty, not annealing, makes P a permutation.
        tau = temperature(self.steps, harden_step, self.permute_config) if self.permute == "learned" else None
        for wrapper in self.permuted.values():
            if tau is not None:
                wrapper.tau.fill_(tau)
            if self.steps >= harden_step:
                wrapper.harden()

    def _initial_mask(self, name: str, w: torch.Tensor, masks, parent: torch.Tensor | None) -> torch.Tensor:
        if isinstance(masks, Mapping):
            if name not in masks:
                raise UserError(f"masks has no entry for layer {name!r}")
            mask = masks[name].to(device=w.device, dtype=torch.bool)
        elif masks == "nonzero":
            mask = w != 0
        elif masks == "magnitude":
            return self._solve(w, self.pattern, parent)
        else:
            raise UserError(f"masks must be 'magnitude', 'nonzero' or a dict of masks, got {masks!r}")
        if mask.shape != w.shape or not self.pattern.is_valid(mask):
            raise UserError(f"the given mask of {name!r} is not a valid {self.pattern} mask of shape {tuple(w.shape)}")
        return mask

    def _solve(self, w: torch.Tensor, pattern: NM, parent: torch.Tensor | None) -> torch.Tensor:
        if self.mask_kind == "transposable":
            # Exact (90 tile patterns for 2:4) for M <= 4; larger M uses the fast greedy+repair solver,
            # cheap enough to run at every mask update.
            mask = transposable_mask(w.abs(), pattern, method="exact" if pattern.group <= 4 else "fast")
            return mask if parent is None else mask & parent
        return magnitude_mask(w, pattern, parent)

    def _refresh_backward_mask(self, layer: _Layer) -> None:
        if self.mask_kind != "bidirectional":
            return
        w = layer.module.parametrizations.weight.original.detach()
        p = layer.param
        if self.backward_mask_kind == "subset":  # Bi-Mask: the backward keeps a subset of the forward mask
            p.backward_mask.copy_(column_mask(w, p.pattern, p.mask))
        else:
            p.backward_mask.copy_(column_mask(w, p.pattern))

    def _swap_bidirectional(self) -> None:
        named = dict(self.model.named_modules())
        for layer in self.layers:
            parent_name, _, child = layer.name.rpartition(".")
            parent = named[parent_name] if parent_name else self.model
            if not layer.name:
                raise UserError("bidirectional masks need the Linear to be a child module")
            setattr(parent, child, BidirectionalLinear(layer.module))
            self._swaps.append((parent, child, layer.module))

    # ---------------------------------------------------------------- training hooks
    def wrap(self, optimizer: torch.optim.Optimizer) -> SparseOptimizer:
        """An optimizer whose ``step()`` also applies the masked decay before and :meth:`step` after."""
        self.bind_optimizer(optimizer)
        return SparseOptimizer(optimizer, self)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell this object the optimizer, whose per-weight state ``permute='dynamic'`` re-orders."""
        self.optimizer = optimizer

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Masked decay on gradients: ``grad += lambda * (1 - m) * W`` (call after clipping, before the step).

        Under DDP this runs after the gradient all-reduce, on identical weights, so ranks stay equal.
        """
        self._check_open()
        if self.masked_decay == 0.0 or self.in_dense_phase:
            return
        for layer in self.layers:
            w = layer.module.parametrizations.weight.original
            if w.grad is not None:
                w.grad.add_(w * ~layer.param.mask, alpha=self.masked_decay)

    @torch.no_grad()
    def step(self, loss: float | torch.Tensor | None = None) -> None:
        """Advance the schedule by one optimiser step; refresh masks on the update interval; log ``loss``."""
        self._check_open()
        self.steps += 1
        if loss is not None:
            self.history.loss_steps.append(self.steps)
            self.history.loss.append(float(loss))
        self._step_permutations()
        dense_from = self.schedule.dense_from()
        if dense_from is not None and self.steps >= dense_from and not self.in_dense_phase:
            self._enter_dense_phase()
        new_pattern = self.schedule.pattern(self.steps, self.target)
        pattern_changed = new_pattern != self.pattern
        if pattern_changed:
            self.pattern = new_pattern
            for layer in self.layers:
                layer.param.pattern = new_pattern
        if self.method == "decay":
            alpha = self.schedule.alpha(self.steps)
            for layer in self.layers:
                layer.param.alpha.fill_(alpha)
        updates = self.method != "fixed" or pattern_changed
        if updates and (pattern_changed or self.steps % self.schedule.update_interval == 0):
            self.update_masks()

    @torch.no_grad()
    def update_masks(self) -> dict[str, float]:
        """Recompute every mask from the current master weights and record the flip rate."""
        total_flips, total = 0, 0
        rates = {}
        for layer in self.layers:
            w = layer.module.parametrizations.weight.original.detach()
            new = self._solve(w, layer.param.pattern, layer.within)
            n_flips = flips(new, layer.param.mask)
            rates[layer.name] = n_flips / new.numel()
            total_flips += n_flips
            total += new.numel()
            layer.param.mask.copy_(new)
            self._refresh_backward_mask(layer)
        overall = total_flips / max(total, 1)
        self.history.flip_steps.append(self.steps)
        self.history.flip_rate.append(overall)
        for name, r in rates.items():
            self.history.flip_rate_layers.setdefault(name, []).append(r)
        self._last_flip = {"overall": overall, **rates}
        return self._last_flip

    def _enter_dense_phase(self) -> None:
        self.in_dense_phase = True
        for layer in self.layers:
            w = layer.module.parametrizations.weight.original
            if self.schedule.dense_start == "masked":
                # Start dense training from the sparse point: re-injecting stale pruned weights late hurts.
                w.mul_(layer.param.deployed(w) != 0)
            layer.param.mode = "dense"

    def flip_rate(self) -> dict[str, float]:
        """Flip rate of the last mask update: ``{"overall": r, layer_name: r, ...}``, r = flips / weights."""
        return dict(self._last_flip)

    def state_dict(self) -> dict:
        """Schedule position and history; masks and scalars are buffers in ``model.state_dict()``."""
        return {
            "steps": self.steps,
            "pattern": str(self.pattern),
            "in_dense_phase": self.in_dense_phase,
            "history": dataclasses.asdict(self.history),
            "permute": self.permute,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: restore the schedule position (load the model's state dict separately)."""
        if state.get("permute") != self.permute:
            raise UserError(f"this state was saved with permute={state.get('permute')!r}, not {self.permute!r}")
        self.steps = int(state["steps"])
        self.pattern = NM.parse(state["pattern"])
        for layer in self.layers:
            layer.param.pattern = self.pattern
            if state["in_dense_phase"]:
                layer.param.mode = "dense"
        self.in_dense_phase = bool(state["in_dense_phase"])
        self.history = History(**state["history"])

    def _check_open(self) -> None:
        if self.finalized:
            raise UserError("this SparseTraining was finalized; create a new one to keep training")

    # ---------------------------------------------------------------- end
    @torch.no_grad()
    def deployed_weights(self) -> dict[str, torch.Tensor]:
        """The weights that :meth:`finalize` would leave (copies), keyed by layer name."""
        return {
            layer.name: layer.param.deployed(layer.module.parametrizations.weight.original).clone()
            for layer in self.layers
        }

    @torch.no_grad()
    def finalize(self, keep_dense: bool = False) -> dict:
        """Remove the parametrizations, leaving plain N:M weights; returns a validity report.

        After a dense fine-tune phase the trained model is dense: ``keep_dense=True`` keeps it (the
        report then says so); the default projects it onto the N:M mask of its own magnitudes.
        """
        self._check_open()
        for parent, child, linear in self._swaps:
            setattr(parent, child, linear)
        report: dict = {"pattern": str(self.pattern), "method": self.method, "layers": {}}
        dense_kept = keep_dense and self.in_dense_phase
        for layer in self.layers:
            p = layer.param
            if self.in_dense_phase and not keep_dense:
                w = layer.module.parametrizations.weight.original
                p.mask.copy_(self._solve(w, p.pattern, layer.within))
                p.mode = "ste"
            if not dense_kept:
                # The value left behind is exactly the deployed weight.
                p.mode = "soft" if p.mode == "soft" else "fixed"
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=True)
            w = layer.module.weight
            valid = p.pattern.is_valid(w)
            if self.mask_kind == "transposable":
                valid = valid and p.pattern.is_valid(w.T)
            report["layers"][layer.name] = {"valid": valid, "density": float((w != 0).float().mean())}
        if self.permuted:
            # Weights are plain N:M in the stored order now; the order goes to the producer or a gather.
            late = [n for n, w in self.permuted.items() if not bool(w.hardened)]
            for wrapper in self.permuted.values():
                wrapper.harden()
            kinds = export(self.model, self.permuted, self.permute_config)
            report["permute"] = {"mode": self.permute, "layers": kinds, "hardened_at_finalize": late}
        report["valid"] = all(v["valid"] for v in report["layers"].values())
        report["dense"] = dense_kept
        self.finalized = True
        if not report["valid"] and not dense_kept:
            bad = [n for n, v in report["layers"].items() if not v["valid"]]
            raise RuntimeError(f"deployed weights violate {self.pattern} in {bad}; this is a bug in nmkit")
        return report


class SparseOptimizer:
    """Delegates to a torch optimizer; ``step()`` = masked decay, ``optimizer.step()``, ``sparse.step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, sparse: SparseTraining) -> None:
        self.optimizer = optimizer
        self.sparse = sparse

    def step(self, closure=None, loss: float | torch.Tensor | None = None):
        self.sparse.before_optimizer_step()
        out = self.optimizer.step(closure)
        self.sparse.step(loss if loss is not None else out)
        return out

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)
