"""Dynamic N:M attention (DFSS, Chen et al. 2023): prune the score matrix ``Q K^T`` at run time.

In every group of M consecutive keys, each query keeps the N largest *scores* (by value: softmax is
monotone, so these are the N largest probabilities) and the rest get probability zero. Groups start
at key 0; a key length that is not a multiple of M leaves a last, partial group that keeps at most N.

DFSS's speed comes from a fused GPU kernel that prunes in the QK^T GEMM's epilogue and runs ``P V``
as a 2:4 SpMM. On CPU, inference (no autograd, no explicit mask) runs the same idea in nmkit's C
kernels: scores of a query tile against a key tile stay in registers, are pruned there, go through
an online softmax, and only the kept keys' values are read (at 8k tokens faster than torch's dense
SDPA). Everything else runs :func:`nm_attention_reference` in torch: use it to measure what N:M
attention does to a model, and to fine-tune a model with it (the mask is recomputed every call;
gradients flow through kept scores).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from nmkit.errors import UserError
from nmkit.kernels import native as kernels_native
from nmkit.patterns import NM
from nmkit.solvers.nm import nm_mask


def score_mask(scores: torch.Tensor, pattern: NM | str = "2:4") -> torch.Tensor:
    """Boolean mask of the scores each query keeps: top-N by value in every group of M keys (last dim).

    Masked-out scores (``-inf`` or the dtype's minimum) lose to every real score; ties keep the
    lower key index, so the mask is reproducible bit for bit.
    """
    pattern = NM.parse(pattern)
    if not scores.is_floating_point():
        raise UserError(f"attention scores must be floating point, got {scores.dtype}")
    return nm_mask(scores, pattern, dim=-1, tail="pad")


def prune_scores(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """``scores`` with every score outside its group's top N set to ``-inf``.

    Without autograd, on CPU, the native kernel library does it in place in one pass (about 6x
    faster than the torch reference at 2:4), on fp32 scores (half-precision ones are converted
    first; the result is then fp32); ``scores`` must be a temporary the caller owns. Otherwise the
    torch reference (:func:`score_mask`) is used.
    """
    if (not scores.requires_grad and scores.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and scores.device.type == "cpu" and pattern.group <= kernels_native.TOPN_MAX_GROUP
            and kernels_native.available()):
        scores = scores.float()  # the softmax runs in fp32 anyway
        keys = scores.shape[-1]
        tail = -keys % pattern.group
        full = F.pad(scores, (0, tail), value=-math.inf) if tail else scores.contiguous()
        kernels_native.topn_fill_(full, pattern.keep, pattern.group, -math.inf)
        return full[..., :keys] if tail else full
    with torch.no_grad():
        keep = score_mask(scores.detach(), pattern)
    return scores.masked_fill(~keep, -math.inf)


def nm_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: NM | str = "2:4",
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block: int = 256,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with N:M pruned scores; shapes as ``F.scaled_dot_product_attention``.

    ``query`` (..., L, E), ``key`` (..., S, E), ``value`` (..., S, Ev) -> (..., L, Ev).
    ``attn_mask`` is boolean (True = may attend) or additive float, broadcastable to (..., L, S).
    ``is_causal`` masks keys after each query (top-left aligned, as torch's SDPA does).
    ``enable_gqa``: grouped-query attention as in SDPA, query head h reads key/value head
    ``h // (query heads / key heads)`` (dim -3), without a repeated copy of key and value.

    Without autograd, dropout or ``attn_mask``, on CPU with AVX-512 (M dividing 16) or AVX2 (M
    dividing 8), the fused kernel (:func:`nmkit.kernels.native.nm_attention`, flash style: N:M
    selection, online softmax and the kept keys' P V per query tile, never the whole score matrix)
    computes it in fp32 (half-precision inputs are converted; the result has the query's dtype).
    Otherwise :func:`nm_attention_reference` runs, which processes ``block`` query rows at a time.
    Both keep the same keys up to the order of the dot products' additions: only scores within
    rounding of each other can be ranked apart.
    """
    pattern = NM.parse(pattern)
    _check_inputs(query, key, value, attn_mask, is_causal, block, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if attn_mask is None and dropout_p == 0.0:
        fused = _fused_attention(query, key, value, pattern, is_causal, scale, enable_gqa)
        if fused is not None:
            return fused
    return nm_attention_reference(query, key, value, pattern, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                  dropout_p=dropout_p, block=block, enable_gqa=enable_gqa)


def nm_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: NM | str = "2:4",
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block: int = 256,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The torch path of :func:`nm_attention` (the reference; differentiable, any device and mask).

    Queries are processed ``block`` rows at a time, so scores take (..., block, S) memory; with
    ``is_causal`` a block reads only the keys its last query may see (about half the work).
    """
    pattern = NM.parse(pattern)
    _check_inputs(query, key, value, attn_mask, is_causal, block, enable_gqa)
    if enable_gqa:
        groups = query.shape[-3] // key.shape[-3]
        key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    query = query * scale  # cheaper than scaling (L, S) scores
    length, keys = query.shape[-2], key.shape[-2]
    outputs = []
    for r0 in range(0, length, block):
        r1 = min(length, r0 + block)
        end = min(keys, r1) if is_causal else keys
        scores = torch.matmul(query[..., r0:r1, :], key[..., :end, :].transpose(-2, -1))
        if is_causal:
            rows = torch.arange(r0, r1, device=scores.device)[:, None]
            scores.masked_fill_(torch.arange(end, device=scores.device) > rows, -math.inf)
        elif attn_mask is not None:
            mask = attn_mask[..., r0:r1, :] if attn_mask.shape[-2] > 1 else attn_mask
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, -math.inf)
            else:
                scores = scores + mask
        probs = F.softmax(prune_scores(scores, pattern), dim=-1, dtype=torch.float32).to(query.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        outputs.append(torch.matmul(probs, value[..., :end, :]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)


def _check_inputs(query, key, value, attn_mask, is_causal, block, enable_gqa) -> None:
    if query.shape[-1] != key.shape[-1]:
        raise UserError(f"query and key feature sizes differ: {query.shape[-1]} vs {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise UserError(f"key and value lengths differ: {key.shape[-2]} vs {value.shape[-2]}")
    if is_causal and attn_mask is not None:
        raise UserError("pass either attn_mask or is_causal=True, not both (as torch's SDPA requires)")
    if block < 1:
        raise UserError(f"block must be a positive number of query rows, got {block}")
    if enable_gqa and (query.dim() < 3 or key.dim() < 3 or key.shape[-3] != value.shape[-3]
                       or key.shape[-3] == 0 or query.shape[-3] % key.shape[-3]):
        raise UserError(f"enable_gqa needs query heads (dim -3) divisible by key/value heads, got query "
                        f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, length, features) view of t: leading dims flattened into batch, or added."""
    if t.dim() >= 4:
        return t if t.dim() == 4 else t.reshape(-1, *t.shape[-3:])
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _fused_attention(query, key, value, pattern: NM, is_causal: bool, scale: float, enable_gqa: bool):
    """The fused native kernel's result, or None where it does not apply (the torch path runs)."""
    tensors = (query, key, value)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if not kernels_native.attention_is_fast(pattern.group):
        return None
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16, torch.float16) for t in tensors):
        return None
    lead = query.shape[:-3] if enable_gqa else query.shape[:-2]
    if key.shape[:len(lead)] != lead or value.shape[:len(lead)] != lead or key.dim() != query.dim() \
            or value.dim() != query.dim() or key.shape[-2] == 0:
        return None  # broadcast leading dims (or no keys): the torch path
    q4, k4, v4 = (_as_4d(t.float()) for t in tensors)
    if not kernels_native.supports_attention(q4, k4, v4, pattern.group):
        return None
    out = kernels_native.nm_attention(q4, k4, v4, pattern.keep, pattern.group, causal=is_causal, scale=scale)
    return out.reshape(*query.shape[:-1], value.shape[-1]).to(query.dtype)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def _hf_attention(pattern: NM, layers: frozenset[int] | None):
    """A function with the signature of transformers' ``AttentionInterface`` entries."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        gqa = getattr(module, "num_key_value_groups", 1) > 1  # heads share key/value: read, never repeated
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            attention_mask = attention_mask[..., : key.shape[-2]]
        # transformers' SDPA mask is None when a causal (or, for encoders, full) mask needs no
        # padding; then the causal flag says which, exactly as in its own SDPA integration.
        causal = attention_mask is None and query.shape[-2] > 1 and getattr(module, "is_causal", True)
        p = dropout if module.training else 0.0
        layer = getattr(module, "layer_idx", None)
        if layers is not None and layer not in layers:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=p,
                                                 scale=scaling, is_causal=causal, enable_gqa=gqa)
        else:
            out = nm_attention(query, key, value, pattern, attn_mask=attention_mask, is_causal=causal,
                               scale=scaling, dropout_p=p, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None

    return forward


def _registered_name(pattern: NM, layers: frozenset[int] | None) -> str:
    name = f"nmkit_nm_{pattern.keep}of{pattern.group}"
    return name if layers is None else name + "_layers_" + "-".join(map(str, sorted(layers)))


class NMAttention:
    """N:M attention on a Hugging Face model, through transformers' ``AttentionInterface``.

    Registers an attention function (with transformers' SDPA mask builder) under a name of its own,
    switches ``model`` to it, and switches back on :meth:`remove` or at the end of a ``with`` block.
    The model's modules are not touched. ``layers`` limits the pruning to those decoder layers
    (``layer_idx``); the others run dense SDPA.

        with NMAttention(model, "2:4"):
            ppl = perplexity(model, ...)
    """

    def __init__(self, model: torch.nn.Module, pattern: NM | str = "2:4", layers: Iterable[int] | None = None):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.pattern = NM.parse(pattern)
        if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
            raise UserError(f"{type(model).__name__} is not a transformers PreTrainedModel; for other models "
                            "call nmkit.dynamic.nm_attention inside your own attention module")
        if not model._can_set_attn_implementation():
            raise UserError(f"{type(model).__name__} does not route attention through transformers' "
                            "AttentionInterface, so its attention cannot be replaced without patching it")
        self.layers = None if layers is None else frozenset(int(i) for i in layers)
        if self.layers is not None:
            self._check_layers(model)
        self.name = _registered_name(self.pattern, self.layers)
        AttentionInterface.register(self.name, _hf_attention(self.pattern, self.layers))
        AttentionMaskInterface.register(self.name, sdpa_mask)
        self.model = model
        self.previous = model.config._attn_implementation
        model.set_attn_implementation(self.name)

    def _check_layers(self, model: torch.nn.Module) -> None:
        present = {m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        if not present:
            raise UserError(f"{type(model).__name__}'s attention modules carry no layer_idx; "
                            "use layers=None to prune every layer")
        missing = sorted(self.layers - present)
        if missing:
            raise UserError(f"layers {missing} do not exist; this model has layers {min(present)}..{max(present)}")

    def remove(self) -> None:
        """Switch the model back to the attention it used before."""
        if self.model is not None:
            self.model.set_attn_implementation(self.previous)
            self.model = None

    def __enter__(self) -> NMAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
