"""Block-sparse attention masks: which key blocks each query block reads, and the exact rule inside them.

Queries and keys are cut into blocks of ``block`` positions (the last block of each may be short).
A :class:`BlockMask` lists, for every query block, the key blocks it reads; attention over any other
key block is skipped outright. Inside the listed blocks an element rule (``mask_mod``) decides each
query-key pair exactly, so the edge blocks of a sliding window and the causal diagonal are exact.

``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool`` takes broadcastable integer tensors of
absolute positions (the convention of FlexAttention and of transformers' mask functions, which plug
in directly). ``head_idx`` is the key/value head: query heads that share a key/value head (GQA) share
its mask, because they are computed together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.solvers.nm import nm_mask

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockMask:
    """``kv_blocks[b, h, i]`` lists the key blocks query block ``i`` reads (ascending, ``-1`` = unused slot).

    Its leading dims are ``batch`` and key/value ``heads``, each either full size or 1 (shared).
    Query row ``r`` sits at position ``q_offset + r`` (keys at ``0 .. kv_length-1``), so a mask for a
    cached decoding step lines up with the keys as transformers' masks do.
    """

    block: int
    q_length: int
    kv_length: int
    kv_blocks: torch.Tensor
    mask_mod: MaskMod | None = None  # None: every pair inside a listed block attends
    q_offset: int = 0
    full: torch.Tensor | None = None  # like kv_blocks: True where every pair attends, so the rule can be skipped

    @classmethod
    def from_block_keep(cls, keep: torch.Tensor, block: int, q_length: int, kv_length: int,
                        mask_mod: MaskMod | None = None, q_offset: int = 0,
                        full: torch.Tensor | None = None) -> BlockMask:
        """A mask from a boolean ``(batch|1, heads|1, q_blocks, kv_blocks)`` table of the blocks to read.

        ``full`` (same shape, optional) marks block pairs where ``mask_mod`` allows every pair; only
        the other kept blocks pay for the element rule. Without it every kept block does.
        """
        if keep.dim() != 4 or keep.dtype != torch.bool:
            raise UserError(f"block keep table must be a 4-d bool tensor (batch, heads, q_blocks, kv_blocks), "
                            f"got {keep.dtype} of shape {tuple(keep.shape)}")
        if keep.shape[-2:] != (_blocks(q_length, block), _blocks(kv_length, block)):
            raise UserError(f"block keep table covers {tuple(keep.shape[-2:])} blocks, but {q_length} queries and "
                            f"{kv_length} keys in blocks of {block} need "
                            f"{(_blocks(q_length, block), _blocks(kv_length, block))}")
        width = max(1, int(keep.sum(-1).max()))
        # A stable sort of "not kept" puts the kept blocks first, in ascending order.
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
        kv_blocks = torch.where(torch.gather(keep, -1, order), order, -1)
        if full is not None:
            full = torch.gather(full.expand_as(keep), -1, order) & (kv_blocks >= 0)
        return cls(block, q_length, kv_length, kv_blocks, mask_mod, q_offset, full)

    @property
    def q_blocks(self) -> int:
        return self.kv_blocks.shape[-2]

    def density(self) -> float:
        """Fraction of the (query block, key block) pairs that are read."""
        kept = (self.kv_blocks >= 0).sum(dim=(-1, -2)).float().mean().item()
        return kept / (self.q_blocks * _blocks(self.kv_length, self.block))

    def block_keep(self) -> torch.Tensor:
        """The boolean ``(batch|1, heads|1, q_blocks, kv_blocks)`` table of the blocks read."""
        lead = self.kv_blocks.shape[:-1]
        keep = torch.zeros(*lead, _blocks(self.kv_length, self.block) + 1, dtype=torch.bool,
                           device=self.kv_blocks.device)
        # Unused slots (-1) land in the extra last column, which is cut off.
        keep.scatter_(-1, self.kv_blocks.where(self.kv_blocks >= 0, keep.shape[-1] - 1), True)
        return keep[..., :-1]

    def to_dense(self) -> torch.Tensor:
        """The equivalent full boolean mask ``(batch|1, heads|1, q_length, kv_length)`` (True = attend).

        Use it for checks and for torch's SDPA; it takes q_length x kv_length bytes per batch and head.
        """
        keep = self.block_keep()
        dense = keep.repeat_interleave(self.block, -2)[..., : self.q_length, :]
        dense = dense.repeat_interleave(self.block, -1)[..., : self.kv_length]
        if self.mask_mod is not None:
            device = self.kv_blocks.device
            b = torch.arange(dense.shape[0], device=device).view(-1, 1, 1, 1)
            h = torch.arange(dense.shape[1], device=device).view(1, -1, 1, 1)
            q = torch.arange(self.q_length, device=device).view(1, 1, -1, 1) + self.q_offset
            kv = torch.arange(self.kv_length, device=device).view(1, 1, 1, -1)
            dense = dense & self.mask_mod(b, h, q, kv)
        return dense


def _blocks(length: int, block: int) -> int:
    return -(-length // block)


def _check(length: int, block: int) -> None:
    if block < 1:
        raise UserError(f"block must be a positive number of positions, got {block}")
    if length < 1:
        raise UserError(f"sequence length must be positive, got {length}")


def _block_bounds(length: int, block: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of every block (the last block may be short)."""
    first = torch.arange(0, length, block) + offset
    return first, torch.clamp(first + block - 1, max=offset + length - 1)


def causal_block_tables(length: int, kv_length: int, block: int, offset: int,
                        window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_blocks, kv_blocks) tables of the block pairs a causal (windowed) mask reads at all, and reads whole.

    Query row ``r`` is at position ``offset + r``; query ``p`` sees keys ``p - window < k <= p``.
    """
    q_first, q_last = _block_bounds(length, block, offset)
    k_first, k_last = _block_bounds(kv_length, block)
    keep = k_first[None, :] <= q_last[:, None]
    full = k_last[None, :] <= q_first[:, None]
    if window is not None:
        keep &= q_first[:, None] - k_last[None, :] < window
        full &= q_last[:, None] - k_first[None, :] < window
    return keep, full


def own_blocks(length: int, kv_length: int, block: int, offset: int) -> torch.Tensor:
    """(q_blocks, kv_blocks): the key blocks holding a query block's own positions (the causal diagonal)."""
    q_first, q_last = _block_bounds(length, block, offset)
    k_first, k_last = _block_bounds(kv_length, block)
    return (k_first[None, :] <= q_last[:, None]) & (k_last[None, :] >= q_first[:, None])


def causal_mask(length: int, block: int = 128, *, window: int | None = None,
                kv_length: int | None = None) -> BlockMask:
    """Causal attention, optionally limited to a sliding ``window``: query ``p`` sees keys ``p - window < k <= p``.

    (A window of ``w`` keys including the query's own, as transformers' ``sliding_window``.) With
    ``kv_length`` > ``length`` the queries are the last ``length`` positions, as in cached decoding.
    """
    kv_length = length if kv_length is None else kv_length
    _check(length, block)
    if kv_length < length:
        raise UserError(f"kv_length ({kv_length}) is shorter than the query length ({length})")
    if window is not None and window < 1:
        raise UserError(f"window must be a positive number of keys, got {window}")
    offset = kv_length - length
    keep, full = causal_block_tables(length, kv_length, block, offset, window)

    def mask_mod(b, h, q, kv):
        allowed = kv <= q
        return allowed if window is None else allowed & (q - kv < window)

    return BlockMask.from_block_keep(keep[None, None], block, length, kv_length, mask_mod, offset, full[None, None])


def document_mask(document_ids: torch.Tensor, block: int = 128, *, causal: bool = True) -> BlockMask:
    """Each token attends only within its own document (packed sequences); ``document_ids`` is (batch, length).

    A block pair is read when the blocks' id ranges overlap: exact for packed sequences (ids that
    never decrease), a safe superset otherwise (the element rule stays exact either way).
    """
    if document_ids.dim() != 2 or document_ids.is_floating_point():
        raise UserError(f"document_ids must be an integer tensor (batch, length), got {document_ids.dtype} "
                        f"of shape {tuple(document_ids.shape)}")
    batch, length = document_ids.shape
    _check(length, block)
    ids = document_ids.long()
    tail = -length % block
    lows = torch.nn.functional.pad(ids, (0, tail), value=torch.iinfo(torch.long).max).view(batch, -1, block)
    highs = torch.nn.functional.pad(ids, (0, tail), value=torch.iinfo(torch.long).min).view(batch, -1, block)
    low, high = lows.amin(-1), highs.amax(-1)
    keep = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
    single = low == high
    full = single[:, :, None] & single[:, None, :] & (low[:, :, None] == low[:, None, :])
    if causal:
        keep &= torch.ones(keep.shape[-2:], dtype=torch.bool).tril()
        full &= torch.ones(keep.shape[-2:], dtype=torch.bool).tril(-1)

    def mask_mod(b, h, q, kv):
        same = ids[b, q] == ids[b, kv]
        return same & (kv <= q) if causal else same

    return BlockMask.from_block_keep(keep[:, None], block, length, length, mask_mod, full=full[:, None])


def _block_means(states: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of rows of (..., length, dim); a short last block averages only its rows."""
    length = states.shape[-2]
    tail = -length % block
    sums = torch.nn.functional.pad(states, (0, 0, 0, tail)).unflatten(-2, (-1, block)).sum(-2)
    counts = torch.full((sums.shape[-2], 1), float(block), dtype=sums.dtype, device=sums.device)
    counts[-1] = block - tail
    return sums / counts


def select_blocks(query: torch.Tensor, key: torch.Tensor, pattern: NM | str, block: int = 128, *,
                  causal: bool = True, shared_heads: bool = False) -> BlockMask:
    """Top-N of every M key blocks per query block, by a cheap estimate of the block's attention score.

    The estimate is the dot product of the block means of ``query`` (batch, q_heads, L, dim) and
    ``key`` (batch, kv_heads, S, dim), averaged over the query heads that share a key/value head (over
    all heads with ``shared_heads``). Groups of M blocks start at key block 0; a short last group keeps
    at most N; ties keep the lower block. With ``causal``, blocks wholly in the future are never read
    and the blocks holding the query block's own positions always count as best in their group, so
    every query sees at least itself.
    """
    pattern = NM.parse(pattern)
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1]:
        raise UserError(f"query and key must be (batch, heads, length, dim) with the same dim, got "
                        f"{tuple(query.shape)} and {tuple(key.shape)}")
    batch, q_heads, length, _ = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    _check(length, block)
    if q_heads % kv_heads:
        raise UserError(f"{q_heads} query heads cannot share {kv_heads} key/value heads evenly")
    if causal and kv_length < length:
        raise UserError(f"causal selection needs at least as many keys ({kv_length}) as queries ({length})")
    offset = kv_length - length if causal else 0
    if causal:
        candidate, full = causal_block_tables(length, kv_length, block, offset)
        own = own_blocks(length, kv_length, block, offset)
    else:
        candidate = full = torch.ones(_blocks(length, block), _blocks(kv_length, block), dtype=torch.bool)
        own = None
    keep = select_block_keep(query, key, pattern, block, candidate, own, shared_heads=shared_heads)

    def mask_mod(b, h, q, kv):
        return kv <= q

    return BlockMask.from_block_keep(keep, block, length, kv_length, mask_mod if causal else None, offset,
                                     full[None, None])


def select_block_keep(query: torch.Tensor, key: torch.Tensor, pattern: NM | str, block: int,
                      candidate: torch.Tensor, own: torch.Tensor | None = None, *,
                      shared_heads: bool = False) -> torch.Tensor:
    """The (batch, heads|1, q_blocks, kv_blocks) table of :func:`select_blocks`: N of every M key blocks among the
    ``candidate`` ones (q_blocks, kv_blocks), by block-mean estimate; ``own`` blocks always win their group."""
    pattern = NM.parse(pattern)
    kv_heads = key.shape[1]
    with torch.no_grad():
        q_mean = _block_means(query.float(), block).unflatten(1, (kv_heads, -1)).mean(2)
        k_mean = _block_means(key.float(), block)
        if shared_heads:
            q_mean, k_mean = q_mean.mean(1, keepdim=True), k_mean.mean(1, keepdim=True)
        estimate = (q_mean @ k_mean.transpose(-2, -1)).masked_fill(~candidate, -math.inf)
        if own is not None:
            estimate = estimate.masked_fill(own, math.inf)
        return nm_mask(estimate, pattern, dim=-1, tail="pad") & candidate
