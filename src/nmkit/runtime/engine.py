"""The lean decode engine: a Hugging Face Llama-family model packed for ``nmr_forward``.

:class:`Engine` packs every Linear once (N:M detected per layer, values as fp32, bf16, INT8 or
INT4), precomputes the rotary tables with the model's own rotary module (so rope scaling variants
come for free), and allocates a static KV cache. Each call of :meth:`Engine.forward` is one C call
that runs every layer; Python does no per-layer work. Supported: decoder-only models with the Llama
block (RMSNorm, rotary attention with optional q/k/v biases, grouped KV heads, SiLU-gated MLP):
Llama, SmolLM2, Qwen2, Mistral without a sliding window in reach.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from nmkit.errors import UserError
from nmkit.patterns import NM
from nmkit.runtime import native
from nmkit.runtime.arena import Arena, nbytes
from nmkit.runtime.pack import SUPPORTED_GROUPS, PackedMat, pack

WEIGHT_KINDS = ("fp32", "bf16", "int8", "int4")
_MODEL_TYPES = ("llama", "qwen2", "mistral")
_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def detect_nm(weight: torch.Tensor) -> NM | None:
    """The sparsest supported N:M (M in 2, 4, 8, 16) the weight follows, or None (dense)."""
    cols = weight.shape[-1]
    # non-zeros per group of 2, then 4, 8, 16, each from neighbouring pairs of the last (strided adds:
    # torch reduces a tiny last dimension ten times slower)
    counts = (weight.detach() != 0).reshape(-1, cols).to(torch.uint8)
    best = None
    for m in SUPPORTED_GROUPS:
        if cols % m or counts.shape[1] * m != 2 * cols:
            break
        counts = counts[:, 0::2] + counts[:, 1::2]
        keep = max(int(counts.max()), 1)
        if keep < m and (best is None or keep / m < best.density):
            best = NM(keep, m)
    return best


@dataclass
class EngineInfo:
    """What was packed: per-layer kind and pattern, bytes read per decoded token."""

    weights: str
    head: str
    patterns: dict[str, str] = field(default_factory=dict)
    weight_bytes: int = 0  # every packed matrix (what one decode step reads)
    isa: str = ""
    threads: int = 1
    huge_pages: bool = False  # weights and KV cache advised onto 2 MiB pages


def _check_config(cfg) -> None:
    kind = getattr(cfg, "model_type", "?")
    if kind not in _MODEL_TYPES:
        raise UserError(f"the decode runtime supports Llama-family models ({', '.join(_MODEL_TYPES)}), "
                        f"not model_type {kind!r}; use HF generate for this model")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"the decode runtime needs a SiLU MLP, the model uses {cfg.hidden_act!r}")


def _default_threads() -> int:
    env = os.environ.get("NMKIT_THREADS")
    return int(env) if env else max(1, torch.get_num_threads())


class Engine:
    """A packed model plus its KV cache. ``weights``: fp32, bf16, int8 or int4 for the block Linears;
    ``head``: the LM head's kind. By default the fastest that keeps its accuracy: bf16 for fp32 and
    bf16 weights (the tied 49152 x 576 head is a third of SmolLM2's bytes; bf16 changes greedy tokens
    rarely), int8 for int8 and int4 weights (llama.cpp keeps Q8_0 there for Q4_0 models too).
    ``packed``: layer name -> a ready PackedMat (e.g. calibrated codes from :mod:`nmkit.quant.storage`)
    used as is instead of packing that layer's weight."""

    def __init__(self, model: nn.Module, weights: str = "fp32", head: str | None = None, max_seq: int = 2048,
                 threads: int | None = None, isa: str | None = None, group_blocks: int = 1,
                 head_pattern: NM | None = None, packed: dict[str, PackedMat] | None = None) -> None:
        if weights not in WEIGHT_KINDS:
            raise UserError(f"unknown --weights {weights!r}: choose one of {', '.join(WEIGHT_KINDS)}")
        head = head or ("bf16" if weights in ("fp32", "bf16") else "int8")
        if head not in WEIGHT_KINDS:
            raise UserError(f"unknown --head {head!r}: choose one of {', '.join(WEIGHT_KINDS)}")
        cfg = model.config
        _check_config(cfg)
        self.lib = native.lib()
        self.isa = native.isa_code(isa)
        self.threads = threads or _default_threads()
        self.max_seq = max_seq
        self.config = cfg
        inner = model.model
        layers = inner.layers
        dim = cfg.hidden_size
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or dim // n_heads
        window = getattr(cfg, "sliding_window", None)
        if window is not None and getattr(cfg, "use_sliding_window", True) and window < max_seq:
            raise UserError(f"the model uses a sliding window of {window} tokens; the runtime needs "
                            f"--max-seq <= {window}")
        self.info = EngineInfo(weights=weights, head=head, isa=native.ISAS[self.isa], threads=self.threads)
        self._mats: list[PackedMat] = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for part, proj in _PROJ:
                    lin = getattr(getattr(layer, part), proj)
                    name = f"model.layers.{i}.{part}.{proj}"
                    if packed and name in packed:  # pre-quantized (calibrated codes): used as stored
                        mat = packed[name]
                        pattern = mat.pattern
                    else:
                        pattern = detect_nm(lin.weight)
                        mat = pack(lin.weight, weights, pattern, bias=lin.bias, group_blocks=group_blocks, name=name)
                    self._mats.append(mat)
                    self.info.patterns[name] = str(pattern) if pattern else "dense"
            lm = model.get_output_embeddings()
            self._mats.append(pack(lm.weight, head, head_pattern, bias=getattr(lm, "bias", None),
                                   group_blocks=group_blocks, name="lm_head"))
            self.info.patterns["lm_head"] = str(head_pattern) if head_pattern else "dense"
            embed = inner.embed_tokens.weight.detach()
            self._embed = embed.float().contiguous() if embed.dtype != torch.bfloat16 else embed.contiguous()
            norms = []
            for layer in layers:
                norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            norms.append(inner.norm.weight)
            self._norms = torch.cat([n.detach().float().reshape(-1) for n in norms]).contiguous()
            self._cos, self._sin = self._rope_tables(inner, max_seq, head_dim)
        self.info.weight_bytes = sum(m.nbytes() for m in self._mats)
        eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        # keys transposed (layer, kv head, head_dim, position); 16 floats of slack after the last row, which
        # the vector score loop may read (those positions are masked)
        cache = len(layers) * n_kv * max_seq * head_dim
        # what each decode step streams, in memory that asks for 2 MiB pages (see nmkit.runtime.arena)
        sizes = [nbytes(t) for m in self._mats for t in m.tensors()] + [4 * (cache + 16), 4 * cache]
        self._arena = Arena(sizes)
        for m in self._mats:
            m.relocate(self._arena.place)
        self._kc = self._arena.zeros(cache + 16)
        self._vc = self._arena.zeros(cache)
        self.info.huge_pages = self._arena.huge_pages
        self._structs = (native.MatStruct * len(self._mats))(*[m.struct() for m in self._mats])
        self._model = native.ModelStruct(
            len(layers), dim, n_heads, n_kv, head_dim, cfg.intermediate_size, cfg.vocab_size, max_seq, eps,
            native.KINDS["bf16" if self._embed.dtype == torch.bfloat16 else "fp32"], self._embed.data_ptr(),
            self._cos.data_ptr(), self._sin.data_ptr(), self._norms.data_ptr(),
            ctypes.cast(self._structs, ctypes.c_void_p), self._kc.data_ptr(), self._vc.data_ptr())
        self.vocab = cfg.vocab_size
        self.pos = 0
        # the greedy decode step's buffers, reused: a fresh 192 KB logits tensor per token costs page
        # faults and allocator work comparable to a small layer's matmul (next_token)
        self._step_logits = torch.empty(1, self.vocab)
        self._step_id = ctypes.c_int32(0)

    @staticmethod
    def _rope_tables(inner: nn.Module, max_seq: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        rot = inner.rotary_emb
        probe = torch.zeros(1, 1, head_dim)
        pos = torch.arange(max_seq).unsqueeze(0)
        cos, sin = rot(probe, pos)
        half = head_dim // 2
        return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()

    def reset(self) -> None:
        """Forget the cached tokens (the cache is overwritten, not cleared)."""
        self.pos = 0

    def next_token(self, token: int) -> int:
        """Greedy decode step: run one ``token`` after the cached ones and return the most likely next id.
        The same arithmetic as ``int(forward([token]).argmax())`` without its per-step allocations."""
        if not 0 <= token < self.vocab:
            raise UserError(f"token id out of range for a vocabulary of {self.vocab}")
        if self.pos + 1 > self.max_seq:
            raise UserError(f"context full: {self.pos} cached + 1 new token > max_seq {self.max_seq}; "
                            f"start a new sequence or raise --max-seq")
        self._step_id.value = token
        self._call(ctypes.addressof(self._step_id), 1, self._step_logits.data_ptr(), 0)
        return int(self._step_logits.argmax())

    def _call(self, ids_ptr: int, n: int, out_ptr: int, all_logits: int) -> None:
        rc = self.lib.nmr_forward(ctypes.byref(self._model), ids_ptr, n, self.pos, out_ptr, all_logits, self.isa,
                                  self.threads)
        if rc == -2:
            raise MemoryError("nmkit runtime: out of memory for the forward pass")
        if rc:
            raise RuntimeError(f"nmr_forward failed with code {rc}")
        self.pos += n

    def forward(self, tokens: list[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run ``tokens`` after the cached ones; logits of the last token (vocab,), or (T, vocab)."""
        ids = torch.as_tensor(tokens, dtype=torch.int32).reshape(-1).contiguous()
        n = ids.numel()
        if n == 0:
            raise UserError("forward() needs at least one token")
        if self.pos + n > self.max_seq:
            raise UserError(f"context full: {self.pos} cached + {n} new tokens > max_seq {self.max_seq}; "
                            f"start a new sequence or raise --max-seq")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
            raise UserError(f"token id out of range for a vocabulary of {self.vocab}")
        out = torch.empty((n if all_logits else 1), self.vocab)
        self._call(ids.data_ptr(), n, out.data_ptr(), int(all_logits))
        return out if all_logits else out[0]
