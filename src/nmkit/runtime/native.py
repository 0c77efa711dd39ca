"""ctypes binding of the decode runtime's C library (``csrc/nmkit_runtime.c``), opened by :mod:`nmkit.clib`.

The structs mirror ``nmr_mat`` and ``nmr_model`` in the C file field for field. ISA levels are the
kernels' names: ``portable`` < ``avx2`` < ``avx512`` (with VBMI2 and VNNI) < ``avx512bf16``; the best
one this CPU has is used unless ``isa=`` or ``NMKIT_ISA`` asks for a lower one.
"""

from __future__ import annotations

import ctypes

from nmkit import clib

ISAS: tuple[str, ...] = ("portable", "avx2", "avx512", "avx512bf16")
KINDS: dict[str, int] = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}

_p = ctypes.c_void_p


class MatStruct(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32),
                ("keep", ctypes.c_int32), ("group", ctypes.c_int32), ("group_blocks", ctypes.c_int32),
                ("values", _p), ("mask", _p), ("scales", _p), ("bias", _p), ("wsum", _p), ("index", _p),
                ("levels", _p), ("tiles", _p)]


class ModelStruct(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("dim", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv", ctypes.c_int32), ("head_dim", ctypes.c_int32), ("hidden", ctypes.c_int32),
                ("vocab", ctypes.c_int32), ("max_seq", ctypes.c_int32), ("eps", ctypes.c_float),
                ("embed_kind", ctypes.c_int32), ("embed", _p), ("rope_cos", _p), ("rope_sin", _p),
                ("norms", _p), ("mats", _p), ("kcache", _p), ("vcache", _p)]


LIBRARY = clib.Library(
    module="nmkit.runtime._runtime",
    override="NMKIT_RUNTIME_LIB",
    label="decode runtime",
    signatures=(
        ("nmr_best_isa", clib.INT, ()),
        ("nmr_forward", clib.INT, (ctypes.POINTER(ModelStruct), _p, clib.INT, clib.INT, _p, clib.INT, clib.INT,
                                   clib.INT)),
        ("nmr_matmul", clib.INT, (ctypes.POINTER(MatStruct), _p, clib.INT, _p, clib.INT, clib.INT)),
        ("nmr_quantize", None, (_p, clib.INT, _p, _p, clib.INT)),
        ("nmr_layout", None, (_p,)),
    ),
)


class RuntimeUnavailable(RuntimeError):
    """The compiled runtime library is missing (the package was installed without a C compiler)."""


def lib() -> ctypes.CDLL:
    """The opened library; raises :class:`RuntimeUnavailable` with the fix when it is not there."""
    handle = clib.load(LIBRARY)
    if handle is None:
        raise RuntimeUnavailable("nmkit's decode runtime is not available (not compiled, or NMKIT_NATIVE=0): "
                                 "reinstall nmkit with a C compiler present (pip install -e .)")
    return handle


def available() -> bool:
    return clib.load(LIBRARY) is not None


def best_isa() -> str:
    return ISAS[lib().nmr_best_isa()]


def supported_isas() -> list[str]:
    """Every ISA level this machine can run, lowest first (tests force each one)."""
    return list(ISAS[: ISAS.index(best_isa()) + 1])


def isa_code(isa: str | None = None) -> int:
    """The level to run: ``isa``, else ``NMKIT_ISA`` (read once by :mod:`nmkit.clib`), never above the CPU's."""
    want = isa or clib.environment().isa or best_isa()
    if want not in ISAS:
        raise ValueError(f"unknown ISA {want!r}; choose one of {ISAS}")
    return min(ISAS.index(want), ISAS.index(best_isa()))
