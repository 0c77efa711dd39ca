"""Calibrated quantization of an N:M layer with its mask fixed (GPTQ's error feedback, Frantar et al. 2023).

The OBS sweep SparseGPT uses for pruning, with rounding to the INT8/INT4 grid in place of zeroing:
columns left to right, each kept weight is rounded to its group's grid (pruned ones are set to
exactly zero) and the error, divided by the inverse-Hessian Cholesky diagonal, is spread over the
columns not yet visited. A scale group's fp16 scales are chosen when the sweep reaches its first
column, from the group's kept weights as updated so far (:func:`quantize_kept`'s clip search,
weighted by diag(X^T X)), so later groups' scales see the error earlier groups pushed onto them.

The result is the codes and scales the runtime stores (:class:`QuantizedLayer`), not floats to be
re-quantized; :meth:`QuantizedLayer.dequantized` is the weight they stand for.

:func:`quantize_model` runs the sweep block by block like the pruning pipeline: each block's X^T X
comes from the outputs of the blocks before it *after* they were quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from nmkit.errors import UserError
from nmkit.oneshot.blocks import capture_block_inputs, find_blocks, run_block
from nmkit.oneshot.methods import inverse_hessian_factor, reconstruction_error, single_thread
from nmkit.oneshot.model_refit import progress_line
from nmkit.oneshot.stats import InputStats, collect_block_stats
from nmkit.oneshot.targets import Target, find_targets
from nmkit.patterns import NM
from nmkit.quant.model_fit import fit_quantized, teacher_states
from nmkit.quant.nm_quant import QuantSpec, check_pattern, dequantize, fit_levels, quantize_kept
from nmkit.solvers.nm import nm_mask


@dataclass
class QuantizedLayer:
    """One layer's kept values as integer codes: what the runtime's packed layouts store.

    ``keep``: bool (rows, cols), exactly ``k64`` kept per row and 64-input block; ``codes``: int8
    (rows, blocks, k64) in the spec's range; ``scales``: fp16 (rows, groups of ``group_blocks`` blocks).
    """

    pattern: NM | None  # None: dense (every weight kept)
    spec: QuantSpec
    keep: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.keep.shape)

    def dequantized(self) -> torch.Tensor:
        """float32 (rows, cols): zeros where pruned, code x scale where kept."""
        rows, cols = self.shape
        w = torch.zeros(rows, cols)
        w[self.keep] = dequantize(self.codes, self.scales, self.spec.group_blocks).reshape(-1)
        return w


def kept_mask(w: torch.Tensor, pattern: NM | None) -> torch.Tensor:
    """The N:M mask ``w`` already follows (its non-zeros, topped up by index where a group has fewer)."""
    if pattern is None:
        return torch.ones_like(w, dtype=torch.bool)
    keep = nm_mask((w != 0).float() + w.abs(), pattern)
    if bool((w[~keep] != 0).any()):
        raise UserError(f"weight does not follow {pattern} (a group has more than {pattern.keep} non-zeros); "
                        "prune it first")
    return keep


def _check_layer(w: torch.Tensor, pattern: NM | None) -> None:
    if w.dim() != 2 or w.shape[1] % 64:
        raise UserError(f"quantized N:M needs 2-d weights with in_features divisible by 64, got {tuple(w.shape)}")
    if pattern is not None:
        check_pattern(pattern)


def quantize_layer(w: torch.Tensor, xtx: torch.Tensor, pattern: NM | None, spec: QuantSpec, damp: float = 0.01,
                   blocksize: int = 128, act_order: bool = False, refit_scales: bool = False,
                   refine: int = 0, fit_grid: bool = False) -> QuantizedLayer:
    """GPTQ with the mask fixed for one (rows, cols) weight that follows ``pattern`` (zeros where pruned).

    ``xtx``: (cols, cols) sum of x x^T over the calibration inputs of the layer. ``act_order``: visit the
    columns by decreasing diag(X^T X) (GPTQ's act-order); scale groups stay contiguous 64-input blocks,
    each group's scales chosen when the sweep first reaches one of its columns. ``refit_scales``: after
    the sweep, re-solve each row's scales by least squares on the layer output with the codes fixed.
    ``refine``: passes of :func:`refine_codes` (each followed by the scale re-solve when ``refit_scales``).
    ``fit_grid`` (INT4): a 16-level table fitted to this layer's kept values (:func:`fit_levels`) in
    place of the uniform [-8, 7] grid; the table is the returned layer's ``spec.levels``.
    """
    _check_layer(w, pattern)
    keep = kept_mask(w.detach(), pattern)
    target = w.detach().float()
    rows, cols = target.shape
    xtx = xtx.float().clone()
    dead = xtx.diagonal() == 0  # inputs that were always zero: no error to feed back through them
    xtx[dead, dead] = 1.0
    importance = xtx.diagonal().expand(rows, cols)
    if fit_grid and spec.bits == 4:
        shape = (rows, cols // 64, -1)
        spec = QuantSpec(4, spec.group_blocks,
                         fit_levels(target[keep].reshape(shape), importance[keep].reshape(shape), spec.group_blocks))
    group_cols = 64 * spec.group_blocks
    n_groups = -(-cols // group_cols)
    # sweep position -> column; stable so ties keep index order (reproducible bit for bit)
    order = torch.argsort(xtx.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    position = torch.argsort(order)
    h = xtx[order][:, order]
    u = inverse_hessian_factor(h, damp)
    w = target[:, order].clone()  # the sweep runs in visiting order
    if not act_order:
        # A block of lazy updates holds whole scale groups, so a group's first column starts with the group.
        blocksize = max(group_cols, -(-blocksize // group_cols) * group_cols)
    scale_of = torch.zeros(rows, cols)  # each column's per-row scale (fp16 values in float32), column order
    scales = torch.zeros(rows, n_groups, dtype=torch.float16)
    chosen = [False] * n_groups
    with single_thread():  # many small ops: threads only add barrier waits
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
            err1 = torch.zeros_like(w1)
            for j in range(i2 - i1):
                c = int(order[i1 + j])
                g = c // group_cols
                if not chosen[g]:
                    members = torch.arange(g * group_cols, min((g + 1) * group_cols, cols))
                    current = _current(w, w1, err1[:, :j], u[i1 : i1 + j], position[members], i1, i2)
                    s = _group_scales(current, keep[:, members], importance[:, members], spec)
                    scales[:, g] = s
                    scale_of[:, members] = s.float().unsqueeze(1)
                    chosen[g] = True
                col = w1[:, j]
                q = _round(col, scale_of[:, c], spec) * keep[:, c]
                err = (col - q) / u1[j, j]
                w1[:, j:] -= err.unsqueeze(1) * u1[j, j:].unsqueeze(0)
                w1[:, j] = q  # exact grid points (and exact zeros where pruned)
                err1[:, j] = err
            w[:, i1:i2] = w1
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    w = w[:, position]  # back to column order
    safe = torch.where(scale_of > 0, scale_of, torch.ones_like(scale_of))
    codes = torch.round(w / safe)[keep].reshape(rows, cols // 64, -1)
    layer = QuantizedLayer(pattern, spec, keep, codes.to(torch.int8).contiguous(), scales.contiguous())
    if refit_scales:
        layer.scales = least_squares_scales(layer, target, xtx)
    for _ in range(refine):  # alternate: codes for the scales, then scales for the codes
        refine_codes(layer, target, xtx)
        if refit_scales:
            layer.scales = least_squares_scales(layer, target, xtx)
    return layer


def _current(w: torch.Tensor, w1: torch.Tensor, err_so_far: torch.Tensor, u_rows: torch.Tensor,
             positions: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
    """The up-to-date values of the columns at sweep ``positions`` (none visited yet), inside the current
    block of lazy updates (``w1``) or after it (``w`` minus this block's pending updates)."""
    if bool((positions < i2).all()):
        return w1[:, positions - i1]
    out = torch.empty(w.shape[0], positions.numel())
    inside = positions < i2
    out[:, inside] = w1[:, positions[inside] - i1]
    after = positions[~inside]
    out[:, ~inside] = w[:, after] - err_so_far @ u_rows[:, after]
    return out


def refine_codes(layer: QuantizedLayer, target: torch.Tensor, xtx: torch.Tensor, blocksize: int = 128) -> None:
    """One pass of exact coordinate descent on the codes (scales and mask fixed), in place.

    The output error f(W_q) = (W_q - T) H (W_q - T)^T is, for one weight, a convex quadratic in its
    code: moving code c of row r by d changes f by 2 d s g_rc + d^2 s^2 H_cc, with g = (W_q - T) H.
    Its best integer d is the rounded vertex, clamped to the grid, so each step can only lower f
    (coordinate descent on the layer objective, as QuantEase, Behdin et al. 2023, does after GPTQ).
    Columns in blocks: inside a block g is updated per column, for the rest once per block.
    """
    rows, cols = layer.shape
    spec = layer.spec
    h = xtx.float()
    hd = h.diagonal()
    per_col = layer.scales.float().repeat_interleave(64 * spec.group_blocks, dim=1)[:, :cols]
    q = torch.zeros(rows, cols)
    q[layer.keep] = layer.codes.float().reshape(-1)
    g = (q * per_col - target.float()) @ h
    keep = layer.keep.float()
    with single_thread():
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            delta = torch.zeros(rows, i2 - i1)  # weight change of this block's columns
            g1 = g[:, i1:i2].clone()
            for j in range(i2 - i1):
                c = i1 + j
                s = per_col[:, c]
                safe = torch.where(s > 0, s, torch.ones_like(s))
                new = spec.nearest(q[:, c] - g1[:, j] / (safe * hd[c]))  # the 1-D quadratic's best grid value
                d = (new - q[:, c]) * keep[:, c] * (s > 0)
                q[:, c] += d
                dw = d * s
                delta[:, j] = dw
                g1[:, j:] += dw.unsqueeze(1) * h[c, i1 + j : i2].unsqueeze(0)
            g[:, i1:i2] = g1
            g[:, i2:] += delta @ h[i1:i2, i2:]
    layer.codes = q[layer.keep].reshape(layer.codes.shape).to(torch.int8).contiguous()


def least_squares_scales(layer: QuantizedLayer, target: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
    """fp16 scales (rows, groups) minimising ||(target - W_q) X||^2 with the codes fixed: per row, a
    groups x groups linear system (the output error is quadratic in the scales). A scale that comes
    out non-positive or non-finite keeps its old value."""
    rows, cols = layer.shape
    gc = 64 * layer.spec.group_blocks
    n_groups = layer.scales.shape[1]
    padded = n_groups * gc
    q = torch.zeros(rows, padded)
    q[:, :cols][layer.keep] = layer.codes.float().reshape(-1)
    h = torch.zeros(padded, padded)
    h[:cols, :cols] = xtx.float()
    qg = q.reshape(rows, n_groups, gc)
    hg = h.reshape(n_groups, gc, padded)
    # m[r, g, k] = q_g^T H q_k for row r; b[r, g] = q_g^T H target_r
    qh = torch.einsum("rga,gac->rgc", qg, hg)  # (rows, groups, padded)
    m = torch.einsum("rgkb,rkb->rgk", qh.reshape(rows, n_groups, n_groups, gc), qg)
    t = torch.zeros(rows, padded)
    t[:, :cols] = target.float()
    b = torch.einsum("rgc,rc->rg", qh, t)
    empty = m.diagonal(dim1=1, dim2=2) <= 0  # all-zero codes: the scale multiplies nothing
    m = m + torch.diag_embed(empty.float())
    s = torch.linalg.solve(m.double(), b.double().unsqueeze(-1)).squeeze(-1).float().half()
    old = layer.scales
    bad = ~torch.isfinite(s.float()) | (s.float() <= 0) | empty
    return torch.where(bad, old, s).contiguous()


def _group_scales(wg: torch.Tensor, kg: torch.Tensor, imp: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """fp16 scale per row for one scale group (rows, group columns) from its current kept weights."""
    rows, n = wg.shape
    blocks = n // 64
    kept = wg[kg].reshape(rows, blocks, -1)
    _, s = quantize_kept(kept, QuantSpec(spec.bits, blocks, spec.levels), imp[kg].reshape(rows, blocks, -1))
    return s[:, 0]


def _round(col: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Nearest grid point code x scale (0 where the scale is 0: an all-zero group)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return spec.nearest(col / safe) * scale


def round_to_nearest(w: torch.Tensor, pattern: NM | None, spec: QuantSpec,
                     importance: torch.Tensor | None = None) -> QuantizedLayer:
    """The no-feedback baseline: each group's scales and codes from the weights as they are."""
    _check_layer(w, pattern)
    keep = kept_mask(w.detach(), pattern)
    rows, cols = w.shape
    kept = w.detach().float()[keep].reshape(rows, cols // 64, -1)
    imp = None if importance is None else importance.float().expand(rows, cols)[keep].reshape(kept.shape)
    codes, scales = quantize_kept(kept, spec, imp)
    return QuantizedLayer(pattern, spec, keep, codes, scales)


@dataclass
class QuantizeResult:
    spec: QuantSpec
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    rel_errors: dict[str, float] = field(default_factory=dict)  # ||(W - W_q) X||^2 / ||W X||^2
    seconds: float = 0.0
    model_fit: dict | None = None  # {objective, before, after, steps} with model_epochs > 0


def _pattern_of(w: torch.Tensor) -> NM | None:
    """The sparsest N:M (M in 2, 4, 8, 16) that ``w`` follows, or None (dense)."""
    nonzero = w != 0
    best = None
    for m in (2, 4, 8, 16):
        keep = max(1, int(nonzero.reshape(w.shape[0], -1, m).sum(-1).max()))
        if keep < m and (best is None or keep / m < best.density):
            best = NM(keep, m)
    return best


@torch.no_grad()
def quantize_model(model: nn.Module, calibration: torch.Tensor, spec: QuantSpec,
                   patterns: dict[str, NM | None] | None = None, damp: float = 0.01, blocksize: int = 128,
                   batch: int = 8, progress: bool = True, act_order: bool = False, refine: int = 0,
                   fit_grid: bool = False, model_epochs: int = 0, model_lr: float = 1e-4) -> QuantizeResult:
    """Quantize the Linear layers inside the transformer blocks of ``model`` in place, block by block.

    ``calibration``: token ids (samples, seqlen). ``patterns``: layer name -> the N:M it follows (e.g. from
    nmkit.json; default: the layers named there, else every block Linear with its pattern detected).
    Each layer's weight is replaced by its dequantized value, so later blocks calibrate on the
    quantized predecessors; the codes and scales are in the result. ``act_order`` and ``refine``: see
    :func:`quantize_layer` (``refine`` > 0 also re-solves the scales by least squares around each pass);
    ``fit_grid``: each INT4 layer gets its own fitted 16-level table. ``model_epochs`` > 0: afterwards, fit
    the whole quantized model to the unquantized one's logits on ``calibration`` (:mod:`nmkit.quant.model_fit`).
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    targets = [t for t in find_targets(model) if patterns is None or t.name in patterns]
    if any(t.reduce_dim != 1 for t in targets):
        raise UserError("quantization supports nn.Linear layers (out, in) only")
    prefix, blocks = find_blocks(model)
    per_block: list[list[Target]] = [[] for _ in blocks]
    for t in targets:
        index = t.name[len(prefix) + 1:].split(".", 1)[0] if t.name.startswith(prefix + ".") else ""
        if not index.isdigit():
            raise UserError(f"layer {t.name} is outside the transformer blocks; quantization covers block layers")
        per_block[int(index)].append(t)
    for t in targets:
        _check_layer(t.weight, None)
    result = QuantizeResult(spec)
    teacher = teacher_states(model, calibration, batch) if model_epochs > 0 else None  # before any rounding
    hidden, kwargs = capture_block_inputs(model, blocks[0], calibration, device)
    for block, block_targets in tqdm(list(zip(blocks, per_block, strict=True)), desc=f"quantize {spec}",
                                     unit="block", disable=not progress):
        if block_targets:
            block_stats = collect_block_stats(block, block_targets, hidden, kwargs, batch)
            for t in block_targets:
                w = t.weight.detach().float().cpu()
                pattern = patterns[t.name] if patterns is not None else _pattern_of(w)
                stats: InputStats = block_stats[t.name]
                layer = quantize_layer(w, stats.xtx.cpu(), pattern, spec, damp, blocksize, act_order=act_order,
                                       refit_scales=refine > 0, refine=refine, fit_grid=fit_grid)
                wq = layer.dequantized()
                result.layers[t.name] = layer
                result.rel_errors[t.name] = reconstruction_error(w, wq, InputStats(stats.xtx.cpu()))
                t.weight.data.copy_(wq.to(t.weight.dtype))
        hidden = run_block(block, hidden, kwargs, batch)
    if model_epochs > 0:
        fit = fit_quantized(model, result.layers, calibration, teacher, epochs=model_epochs, lr=model_lr,
                            batch=batch, log=progress_line if progress else None)
        result.model_fit = {"objective": fit.objective, "before": fit.loss_before, "after": fit.loss_after,
                            "steps": fit.steps}
    result.seconds = time.perf_counter() - start
    return result
