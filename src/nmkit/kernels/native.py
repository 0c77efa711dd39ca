"""ctypes loader and dispatch for the C kernels in ``csrc/nmkit_kernels.c``.

ISA levels: ``portable`` < ``avx2`` < ``avx512`` < ``avx512bf16`` (AVX-512 plus VBMI2 and BF16).
The best level the CPU has is used unless lowered by the ``isa=`` argument or the ``NMKIT_ISA``
environment variable (read once by :mod:`nmkit.clib`, the one loader of nmkit's compiled libraries).
If the library is missing or fails to load, :func:`available` is False and callers use
:mod:`nmkit.kernels.reference`. Also here: :func:`topn_fill_`, the run-time N:M of attention scores,
and :func:`nm_attention`, fused DFSS N:M attention (``csrc/nmkit_attention.c``).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import torch

from nmkit import clib
from nmkit.formats.blocked import BlockedNM

ISAS: tuple[str, ...] = ("portable", "avx2", "avx512", "avx512bf16")
KINDS: dict[str, int] = {"auto": 0, "gemv": 1, "spmm": 2, "gather": 3, "pair": 4}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class NativeError(RuntimeError):
    """The native library rejected a call (it should not happen for inputs that pass :func:`supports`)."""


LIBRARY = clib.Library(
    "nmkit.kernels._native", "NMKIT_NATIVE_LIB", "native kernels",
    (
        ("nmk_best_isa", clib.INT, ()),
        ("nmk_linear", clib.INT, (clib.INT, clib.INT, clib.INT, clib.PTR, clib.PTR, clib.INT, clib.INT, clib.INT,
                                  clib.INT, clib.PTR, clib.I64, clib.INT, clib.PTR, clib.I64, clib.INT)),
        ("nmk_decompress", clib.INT, (clib.INT, clib.INT, clib.PTR, clib.PTR, clib.INT, clib.INT, clib.INT, clib.PTR,
                                      clib.I64, clib.INT)),
        ("nmk_topn_fill", clib.INT, (clib.PTR, clib.I64, clib.INT, clib.INT, clib.F32, clib.INT)),
        ("nmk_nm_attention", clib.INT, (clib.INT, clib.PTR, clib.PTR, clib.PTR, clib.PTR, clib.PTR, clib.PTR,
                                        clib.F32, clib.INT)),
    ),
)
TOPN_MAX_GROUP = 64  # nmk_topn_fill ranks a group in registers of this size


def _lib():
    return clib.load(LIBRARY)


def available() -> bool:
    """True when the native library is loaded."""
    return _lib() is not None


def best_isa() -> str | None:
    """Highest ISA level of this CPU that the library supports (None without the library)."""
    lib = _lib()
    return None if lib is None else ISAS[lib.nmk_best_isa()]


def supported_isas() -> list[str]:
    """Every ISA level this machine can run, lowest first (tests force each one)."""
    best = best_isa()
    return [] if best is None else list(ISAS[: ISAS.index(best) + 1])


@lru_cache(maxsize=16)
def _isa_code(want: str | None) -> int:
    best = ISAS.index(best_isa() or "portable")
    want = want or ISAS[best]
    if want not in ISAS:
        raise ValueError(f"unknown ISA {want!r}; choose one of {ISAS}")
    return min(ISAS.index(want), best)


def _resolve_isa(isa: str | None) -> int:
    return _isa_code(isa or clib.environment().isa)


def supports(weight: BlockedNM, x: torch.Tensor) -> bool:
    """Whether the native kernels handle this weight and input (else use the reference)."""
    return (
        available()
        and isinstance(weight, BlockedNM)
        and 16 % weight.pattern.group == 0
        and weight.values.dtype in _DTYPES
        and x.dtype == weight.values.dtype
        and x.device.type == "cpu"
        and weight.values.device.type == "cpu"
    )


def supports_decompress(weight: BlockedNM) -> bool:
    """Whether :func:`decompress` handles this weight (else use :func:`nmkit.formats.decompress`)."""
    return (
        available()
        and weight.values.dtype in _DTYPES
        and weight.values.device.type == "cpu"
        and 16 % weight.pattern.group == 0
    )


def linear(
    x: torch.Tensor,
    weight: BlockedNM,
    *,
    isa: str | None = None,
    kind: str = "auto",
    threads: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for x (..., in) and a weight in the kernel layout (``formats.to_blocked``).

    Returns (..., out) in x's dtype.

    ``kind`` forces ``gemv`` or ``spmm`` (``auto`` picks by batch size); ``threads`` defaults to
    ``torch.get_num_threads()``.
    """
    lib = _lib()
    if lib is None or not supports(weight, x):
        raise NativeError("native kernels unavailable for this input; use nmkit.kernels.reference")
    rows, cols = weight.shape
    if x.shape[-1] != cols:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {cols}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, cols)
    if weight.kp != cols:  # the kernels read whole 32-column chunks
        x2 = torch.nn.functional.pad(x2, (0, weight.kp - cols))
    if x2.stride(-1) != 1 or x2.stride(0) < weight.kp:
        x2 = x2.contiguous()
    batch = x2.shape[0]
    ldx = x2.stride(0) if batch > 1 else weight.kp
    y = out if out is not None else torch.empty(batch, rows, dtype=x.dtype)
    values, mask = weight.values, weight.mask
    if not (values.is_contiguous() and mask.is_contiguous()):
        raise NativeError("compressed weight buffers must be contiguous")
    rc = lib.nmk_linear(
        _resolve_isa(isa), KINDS[kind], _DTYPES[x.dtype], values.data_ptr(), mask.data_ptr(), rows,
        weight.kp, weight.p16, weight.pattern.group, x2.data_ptr(), ldx, batch, y.data_ptr(), y.stride(0),
        threads or torch.get_num_threads(),
    )
    if rc != 0:
        raise NativeError(f"nmk_linear failed with code {rc}")
    return y.reshape(*lead, rows)


def decompress(weight: BlockedNM, *, isa: str | None = None, threads: int | None = None) -> torch.Tensor:
    """Dense (out, in) weight from the kernel layout in one pass (the dense fallback for big batches)."""
    lib = _lib()
    if lib is None or weight.values.dtype not in _DTYPES or 16 % weight.pattern.group:
        raise NativeError("native decompress unavailable for this weight; use nmkit.formats")
    rows, cols = weight.shape
    out = torch.empty(rows, weight.kp, dtype=weight.values.dtype)
    rc = lib.nmk_decompress(
        _resolve_isa(isa), _DTYPES[weight.values.dtype], weight.values.data_ptr(), weight.mask.data_ptr(),
        rows, weight.kp, weight.p16, out.data_ptr(), weight.kp, threads or torch.get_num_threads(),
    )
    if rc != 0:
        raise NativeError(f"nmk_decompress failed with code {rc}")
    return out if cols == weight.kp else out[:, :cols]


def topn_fill_(x: torch.Tensor, n: int, m: int, fill: float, threads: int | None = None) -> torch.Tensor:
    """In place: in every group of ``m`` consecutive entries of ``x`` (contiguous fp32 on CPU, numel a
    multiple of m) keep the ``n`` largest, ties to the lower index, and set the rest to ``fill``."""
    lib = _lib()
    if lib is None:
        raise NativeError("native kernels unavailable")
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() % m:
        raise ValueError("topn_fill_ needs a contiguous fp32 CPU tensor whose size is a multiple of m")
    if not 1 <= m <= TOPN_MAX_GROUP:
        raise ValueError(f"group size {m} outside 1..{TOPN_MAX_GROUP}")
    rc = lib.nmk_topn_fill(x.data_ptr(), x.numel() // m, m, n, fill, threads or torch.get_num_threads())
    if rc != 0:
        raise NativeError(f"nmk_topn_fill failed with code {rc}")
    return x


ATTENTION_GROUPS = (1, 2, 4, 8, 16)  # nmk_nm_attention selects within 16-lane registers: M must divide 16


def attention_is_fast(group: int, isa: str | None = None) -> bool:
    """Whether :func:`nm_attention` beats the torch path here for groups of ``group`` keys: its tiled
    kernel needs AVX-512, or AVX2 with ``group`` dividing 8; otherwise it runs a per-query-row loop
    (the portable code, kept and tested as the C reference), slower than torch's batched matmuls."""
    if not available():
        return False
    level = _resolve_isa(isa)
    return level >= ISAS.index("avx512") or (level == ISAS.index("avx2") and 8 % group == 0)


def supports_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: int) -> bool:
    """Whether :func:`nm_attention` handles these (batch, heads, length, features) CPU fp32 tensors."""
    return (
        available()
        and group in ATTENTION_GROUPS
        and query.dim() == key.dim() == value.dim() == 4
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (query, key, value))
        and query.shape[0] == key.shape[0] == value.shape[0]
        and key.shape[1] == value.shape[1] and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0
        and key.shape[2] == value.shape[2] > 0
        and query.shape[3] == key.shape[3] > 0 and value.shape[3] > 0
    )


def nm_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    n: int,
    m: int,
    *,
    causal: bool,
    scale: float,
    isa: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Fused DFSS attention: query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev), fp32 on CPU.

    In every group of ``m`` keys each query keeps the ``n`` largest scores ``(query * scale) @ key.T``
    (ties to the lower key index; keys after the query when ``causal``, top-left aligned, count as
    -inf before the selection), softmax over the kept ones, times ``value``. Query head h reads
    key/value head ``h // (Hq // Hkv)`` (grouped-query attention without repeating key/value).
    Returns (B, Hq, L, Ev). The reference is ``nmkit.dynamic.attention.nm_attention_reference``.
    """
    lib = _lib()
    if lib is None or not supports_attention(query, key, value, m):
        raise NativeError("native attention unavailable for this input; use the torch path")
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    batch, heads, length, _ = query.shape
    out = torch.empty(batch, heads, length, value.shape[-1], dtype=torch.float32)
    dims = (ctypes.c_int * 10)(n, m, batch, heads, key.shape[1], length, key.shape[2], key.shape[3],
                               value.shape[3], int(causal))
    strides = (ctypes.c_int64 * 12)(*(s for t in (query, key, value, out) for s in t.stride()[:3]))
    rc = lib.nmk_nm_attention(_resolve_isa(isa), dims, strides, query.data_ptr(), key.data_ptr(), value.data_ptr(),
                              out.data_ptr(), scale, threads or torch.get_num_threads())
    if rc != 0:
        raise NativeError(f"nmk_nm_attention failed with code {rc}")
    return out
