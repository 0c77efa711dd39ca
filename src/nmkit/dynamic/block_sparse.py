"""Attention that reads only the key blocks a :class:`BlockMask` lists, and skips the rest.

For every query block, the listed key and value blocks are gathered next to each other, and one
batched matmul, softmax and matmul run over just those: work and memory grow with the kept blocks,
not with queries x keys. Query heads that share a key/value head (GQA) are stacked into one matmul,
so the keys are never repeated. Query blocks run in chunks that keep the scores under a memory budget.

Inside the gathered blocks the mask's element rule is applied exactly, so the result equals torch's
SDPA with the equivalent full boolean mask (``mask.to_dense()``). A query that may attend to nothing
gets a zero output, as torch's fused CPU SDPA gives it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nmkit.dynamic.block_mask import BlockMask, causal_block_tables, own_blocks, select_block_keep
from nmkit.errors import UserError
from nmkit.patterns import NM

# Scores of one chunk of query blocks; about the L2-to-memory sweet spot measured on this CPU.
_SCORE_BUDGET_BYTES = 32 << 20


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask, *,
                    scale: float | None = None) -> torch.Tensor:
    """Attention over the blocks ``mask`` keeps: ``query`` (batch, q_heads, L, E), ``key`` (batch, kv_heads, S, E),
    ``value`` (batch, kv_heads, S, Ev) -> (batch, q_heads, L, Ev); ``q_heads`` a multiple of ``kv_heads``."""
    _check_shapes(query, key, value, mask)
    batch, q_heads, length, _ = query.shape
    kv_heads, kv_length, value_dim = key.shape[1], key.shape[2], value.shape[-1]
    groups, block = q_heads // kv_heads, mask.block
    q_blocks, k_blocks = mask.q_blocks, -(-kv_length // block)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    # (batch, kv_heads, q_blocks, groups * block, E): one row block per key/value head and query block.
    q = F.pad(query * scale, (0, 0, 0, q_blocks * block - length))
    q = q.view(batch, kv_heads, groups, q_blocks, block, -1).transpose(2, 3).reshape(
        batch, kv_heads, q_blocks, groups * block, -1)
    k = F.pad(key, (0, 0, 0, k_blocks * block - kv_length)).view(batch, kv_heads, k_blocks, block, -1)
    v = F.pad(value, (0, 0, 0, k_blocks * block - kv_length)).view(batch, kv_heads, k_blocks, block, -1)

    slots = mask.kv_blocks
    # Slots that need the element rule: partial blocks, the short last key block, unused slots.
    ruled = ~mask.full if mask.full is not None else torch.ones_like(slots, dtype=torch.bool)
    if kv_length % block:
        ruled = ruled | (slots == k_blocks - 1)
    ruled = ruled | (slots < 0)
    b_idx = torch.arange(batch, device=query.device).view(-1, 1, 1, 1)
    h_idx = torch.arange(kv_heads, device=query.device).view(1, -1, 1, 1)
    out = query.new_empty(batch, kv_heads, q_blocks, groups * block, value_dim)
    for c0, c1, width in _chunks(slots, batch * q_heads * block * block * query.element_size()):
        chunk_slots, chunk_ruled = slots[:, :, c0:c1, :width], ruled[:, :, c0:c1, :width]
        gathered = chunk_slots.clamp(min=0).expand(batch, kv_heads, -1, -1)
        k_c = k[b_idx, h_idx, gathered].flatten(-3, -2)  # (batch, kv_heads, chunk, width * block, E)
        v_c = v[b_idx, h_idx, gathered].flatten(-3, -2)
        scores = (q[:, :, c0:c1] @ k_c.transpose(-2, -1)).view(batch, kv_heads, c1 - c0, groups, block, width, block)
        alive = (~chunk_ruled).any(-1, keepdim=True).expand(batch, kv_heads, -1, block).float()
        tile_q, tile_slot = chunk_ruled.flatten(0, 1).any(0).nonzero(as_tuple=True)
        if tile_q.numel():
            allowed = _tile_rule(mask, chunk_slots[:, :, tile_q, tile_slot], (c0 + tile_q) * block,
                                 batch, length, kv_length)  # (batch|1, heads|1, tiles, block, block)
            tiles = scores[:, :, tile_q, :, :, tile_slot]  # (tiles, batch, kv_heads, groups, block, block)
            scores[:, :, tile_q, :, :, tile_slot] = tiles.masked_fill(~allowed.movedim(2, 0)[:, :, :, None], -math.inf)
            alive.index_add_(2, tile_q, allowed.any(-1).float().expand(batch, kv_heads, -1, block))
        probs = torch.softmax(scores.flatten(-2), dim=-1, dtype=torch.float32).to(query.dtype)
        dead = (alive == 0) & (torch.arange(c0 * block, c1 * block, device=query.device) < length).view(c1 - c0, block)
        if dead.any():  # rows with no key at all: softmax gave NaN, SDPA gives zeros
            probs = probs.masked_fill(dead[:, :, :, None, :, None], 0.0)
        out[:, :, c0:c1] = probs.flatten(-3, -2) @ v_c
    out = out.view(batch, kv_heads, q_blocks, groups, block, value_dim).transpose(2, 3)
    return out.reshape(batch, q_heads, q_blocks * block, value_dim)[:, :, :length]


def _chunks(slots: torch.Tensor, bytes_per_slot: int) -> Iterator[tuple[int, int, int]]:
    """Runs of query blocks (c0, c1, width) whose scores fit the budget; ``width`` is the most key blocks
    any of them reads, so query blocks that read few blocks (early causal ones) do not pay for the widest."""
    counts = (slots >= 0).flatten(0, 1).sum(-1).amax(0).clamp(min=1).tolist()
    c0 = 0
    while c0 < len(counts):
        c1, width = c0 + 1, counts[c0]
        while c1 < len(counts) and max(width, counts[c1]) * (c1 + 1 - c0) * bytes_per_slot <= _SCORE_BUDGET_BYTES:
            width = max(width, counts[c1])
            c1 += 1
        yield c0, c1, width
        c0 = c1


def _tile_rule(mask: BlockMask, slots: torch.Tensor, first_rows: torch.Tensor, batch: int, length: int,
               kv_length: int) -> torch.Tensor:
    """Which (query row, key) pairs of the given tiles attend: (batch|1, heads|1, tiles, block, block).

    ``slots`` (batch|1, heads|1, tiles) are the tiles' key blocks, ``first_rows`` (tiles) their first
    query rows. Positions past the ends are clamped before the element rule sees them and ruled out
    afterwards, so ``mask_mod`` only ever gets real positions.
    """
    block, device = mask.block, slots.device
    offsets = torch.arange(block, device=device)
    rows = (first_rows[:, None] + offsets)[:, :, None]  # (tiles, block, 1)
    keys = (slots.clamp(min=0)[..., None] * block + offsets)[..., None, :]  # (b|1, h|1, tiles, 1, block)
    allowed = (slots >= 0)[..., None, None] & (keys < kv_length)
    if mask.mask_mod is not None:
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1, 1)
        h = torch.arange(slots.shape[1], device=device).view(1, -1, 1, 1, 1)
        q_pos = rows.clamp(max=length - 1) + mask.q_offset
        allowed = allowed & mask.mask_mod(b, h, q_pos, keys.clamp(max=kv_length - 1))
    return allowed


def _check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise UserError(f"block_attention takes (batch, heads, length, dim) tensors, got {tuple(query.shape)}, "
                        f"{tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[-1] != key.shape[-1] or key.shape[:3] != value.shape[:3] or query.shape[0] != key.shape[0]:
        raise UserError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                        "do not fit together (same batch, same key/value heads and length, same query/key dim)")
    if query.shape[1] % key.shape[1]:
        raise UserError(f"{query.shape[1]} query heads cannot share {key.shape[1]} key/value heads evenly")
    if (query.shape[2], key.shape[2]) != (mask.q_length, mask.kv_length):
        raise UserError(f"the mask is for {mask.q_length} queries and {mask.kv_length} keys, the tensors have "
                        f"{query.shape[2]} and {key.shape[2]}; build the mask for these lengths")
    for dim, name in ((0, "batch"), (1, "key/value heads")):
        if mask.kv_blocks.shape[dim] not in (1, key.shape[dim]):
            raise UserError(f"the mask has {mask.kv_blocks.shape[dim]} {name}, the tensors {key.shape[dim]}")


class _HFMask:
    """What transformers asked its mask builder for, kept unbuilt: no (queries x keys) tensor is made.

    One is shared by every layer of a forward pass, so the block tables are built once and cached.
    """

    def __init__(self, **request):
        self.request = request
        self._tables: dict[int, tuple] = {}

    def dense(self) -> torch.Tensor | None:
        """The mask transformers' SDPA would get (None where SDPA's own causal flag covers it)."""
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(**self.request)

    def block_mask(self, query: torch.Tensor, key: torch.Tensor, block: int, select: NM | None) -> BlockMask:
        from transformers.masking_utils import (
            and_masks,
            causal_mask_function,
            padding_mask_function,
            prepare_padding_mask,
        )

        req = self.request
        q_length, kv_length = req["q_length"], req["kv_length"]
        q_offset, kv_offset = req.get("q_offset", 0), req.get("kv_offset", 0)
        if block not in self._tables:
            rule = req.get("mask_function", causal_mask_function)
            padding = prepare_padding_mask(req.get("attention_mask"), kv_length, kv_offset)
            if padding is not None and not bool(padding.all()):
                rule = and_masks(rule, padding_mask_function(padding))

            def mask_mod(b, h, q, kv):  # our positions count from the first key; transformers' from kv_offset
                return rule(b, h, q + kv_offset, kv + kv_offset)

            offset = q_offset - kv_offset
            # The model's rule is causal (windowed when it says local_size), so these blocks hold every allowed pair.
            keep, full = causal_block_tables(q_length, kv_length, block, offset, req.get("local_size"))
            own = own_blocks(q_length, kv_length, block, offset)
            self._tables[block] = (keep, full, own, mask_mod, offset)
        keep, full, own, mask_mod, offset = self._tables[block]
        if select is not None:
            keep = select_block_keep(query, key, select, block, keep, own)
        else:
            keep = keep[None, None]
        return BlockMask.from_block_keep(keep, block, q_length, kv_length, mask_mod, offset, full[None, None])


def _hf_attention(block: int, select: NM | None):
    """A function with the signature of transformers' ``AttentionInterface`` entries."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        request = attention_mask if isinstance(attention_mask, _HFMask) else None
        fits = (request is not None and (query.shape[2], key.shape[2])
                == (request.request["q_length"], request.request["kv_length"]))
        if not fits or not getattr(module, "is_causal", True) or (module.training and dropout > 0):
            # Encoders, cross-attention and dropout: exactly what the SDPA path does.
            mask = request.dense() if request is not None else attention_mask
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        out = block_attention(query, key, value, request.block_mask(query, key, block, select), scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return forward


class BlockAttention:
    """Block-skipping attention on a Hugging Face decoder, through transformers' ``AttentionInterface``.

    The model's own mask (causal, sliding window, padding, packed sequences) is kept exactly; attention
    reads only the key blocks of ``block`` positions that the mask can reach, so a sliding-window
    model skips everything outside its window. With ``select="N:M"`` each query block also reads only N
    of every M of those key blocks, chosen per key/value head by the block-mean score estimate (this
    changes the model's function, like :class:`NMAttention`). No (queries x keys) mask is built.
    Switches back on :meth:`remove` or at the end of a ``with`` block.

        with BlockAttention(model, block=128):
            out = model(ids)          # same logits as SDPA, less work for windowed attention

    For decoders whose masks are causal (optionally windowed/chunked); encoders and cross-attention
    run transformers' SDPA unchanged.
    """

    def __init__(self, model: torch.nn.Module, block: int = 128, select: NM | str | None = None):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        if block < 1:
            raise UserError(f"block must be a positive number of positions, got {block}")
        if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
            raise UserError(f"{type(model).__name__} is not a transformers PreTrainedModel; for other models "
                            "call nmkit.dynamic.block_attention inside your own attention module")
        if not model._can_set_attn_implementation():
            raise UserError(f"{type(model).__name__} does not route attention through transformers' "
                            "AttentionInterface, so its attention cannot be replaced without patching it")
        self.select = None if select is None else NM.parse(select)
        self.name = f"nmkit_block_{block}" + ("" if self.select is None
                                              else f"_select_{self.select.keep}of{self.select.group}")
        AttentionInterface.register(self.name, _hf_attention(block, self.select))
        AttentionMaskInterface.register(self.name, _HFMask)
        self.model = model
        self.previous = model.config._attn_implementation
        model.set_attn_implementation(self.name)

    def remove(self) -> None:
        """Switch the model back to the attention it used before."""
        if self.model is not None:
            self.model.set_attn_implementation(self.previous)
            self.model = None

    def __enter__(self) -> BlockAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
