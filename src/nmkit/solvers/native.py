"""ctypes loader for the compiled mask solvers in ``csrc/nmkit_solvers.c``.

Separate from the kernel library (``nmkit.kernels.native``) so either can be built or missing on its
own. If the library is missing or fails to load, :func:`available` is False and the solvers use their
torch reference paths. Opened by :mod:`nmkit.clib` (``NMKIT_NATIVE=0`` disables it, as for the
kernels; ``NMKIT_SOLVERS_LIB`` points at a development build of the same C file).
"""

from __future__ import annotations

import ctypes

import torch

from nmkit import clib

MODES: dict[str, int] = {"greedy": 0, "swap": 1, "optimal": 2}
MAX_GROUP = 64  # the C solver keeps a row's kept columns in one uint64


LIBRARY = clib.Library(
    "nmkit.solvers._solvers_native", "NMKIT_SOLVERS_LIB", "compiled solvers",
    (
        ("nms_transposable", clib.INT, (clib.PTR, clib.I64, clib.I64, clib.I64, clib.PTR, clib.I64, clib.INT, clib.INT,
                                        clib.INT, clib.INT)),
        ("nms_stripe_pairs", clib.INT, (clib.PTR, clib.I64, clib.I64, clib.INT, clib.INT, clib.PTR, clib.F64, clib.U64,
                                        clib.INT, clib.INT, clib.PTR)),
        ("nms_stripe_converge", clib.INT, (clib.PTR, clib.I64, clib.I64, clib.INT, clib.INT, clib.PTR, clib.INT,
                                           clib.F64, clib.INT, clib.PTR)),
        ("nms_stripe_assign", clib.INT, (clib.PTR, clib.I64, clib.I64, clib.INT, clib.INT, clib.PTR, clib.F64, clib.U64,
                                         clib.F64, clib.I64, clib.INT, clib.INT, clib.INT, clib.PTR)),
    ),
)


def _lib():
    return clib.load(LIBRARY)


def available() -> bool:
    """True when the compiled solver library is loaded."""
    return _lib() is not None


def transposable(scores: torch.Tensor, n: int, m: int, mode: str, threads: int | None = None) -> torch.Tensor:
    """Transposable N:M mask of ``scores`` (..., R, C) on CPU with the compiled per-tile solver.

    ``mode``: ``greedy`` (<= N per row/column), ``swap`` (greedy, completion to exactly N by augmenting
    paths, best 2x2 swaps while they gain) or ``optimal`` (also cancels longer cycles: the exact optimum
    up to a float tolerance of 1e-6 x the tile's largest |score|).
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError("compiled solvers not available")
    if m > MAX_GROUP:
        raise ValueError(f"the compiled solver supports M <= {MAX_GROUP}, got {m}")
    *lead, r, c = scores.shape
    x = scores.detach().to(device="cpu", dtype=torch.float32).reshape(-1, c).contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    nt = threads if threads is not None else torch.get_num_threads()
    rc = lib.nms_transposable(x.data_ptr(), x.shape[0], c, c, out.data_ptr(), c, n, m, MODES[mode], nt)
    if rc != 0:
        raise ValueError(f"compiled transposable solver rejected shape {tuple(scores.shape)} for {n}:{m}")
    return out.view(torch.bool).reshape(scores.shape).to(scores.device)



def _stripe_lib(name: str, xt: torch.Tensor, perm: torch.Tensor):
    """The loaded library, after checking the in-place buffers the stripe searches write to."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("compiled solvers not available")
    if xt.dtype != torch.float32 or not xt.is_contiguous() or perm.dtype != torch.int64 or not perm.is_contiguous():
        raise ValueError(f"{name} needs contiguous float32 xt and int64 perm")
    return lib


def stripe_pairs(
    xt: torch.Tensor, perm: torch.Tensor, n: int, m: int, seconds: float, seed: int = 0, max_stale: int = 3,
    threads: int | None = None,
) -> int:
    """Random stripe pairing, every pair split optimally over all rows (M <= 4), in place.

    ``xt`` (cols, rows) float32 contiguous CPU (the transposed scores), ``perm`` int64 (cols,): both are
    permuted in place. Stops after ``seconds`` or ``max_stale`` rounds without a gain; returns the
    number of rounds.
    """
    lib = _stripe_lib("stripe_pairs", xt, perm)
    rounds = ctypes.c_int64(0)
    nt = threads if threads is not None else torch.get_num_threads()
    rc = lib.nms_stripe_pairs(xt.data_ptr(), xt.shape[0], xt.shape[1], n, m, perm.data_ptr(), float(seconds),
                              seed & (2**64 - 1), max_stale, nt, ctypes.byref(rounds))
    if rc != 0:
        raise ValueError(f"compiled stripe search rejected {tuple(xt.shape)} for {n}:{m} (rc {rc})")
    return int(rounds.value)


def stripe_converge(
    xt: torch.Tensor, perm: torch.Tensor, n: int, m: int, k: int, seconds: float, threads: int | None = None
) -> int:
    """Exhaustive stripe-group search (every set of ``k`` in {2, 3} stripes, every split of its columns),
    best disjoint improvements per sweep, until none is left or ``seconds`` pass; in place like
    :func:`stripe_pairs`. Returns the number of moves applied."""
    lib = _stripe_lib("stripe_converge", xt, perm)
    moves = ctypes.c_int64(0)
    nt = threads if threads is not None else torch.get_num_threads()
    rc = lib.nms_stripe_converge(xt.data_ptr(), xt.shape[0], xt.shape[1], n, m, perm.data_ptr(), k, float(seconds),
                                 nt, ctypes.byref(moves))
    if rc != 0:
        raise ValueError(f"compiled stripe search rejected {tuple(xt.shape)} for {n}:{m}, k={k} (rc {rc})")
    return int(moves.value)


def stripe_assign(
    xt: torch.Tensor, perm: torch.Tensor, n: int, m: int, seconds: float, seed: int = 0, noise: float = 0.0,
    block: int = 1024, max_rounds: int = 1 << 30, max_stale: int = 1 << 30, threads: int | None = None,
) -> int:
    """Column reassignment rounds (M <= 32, N < M), in place like :func:`stripe_pairs`: each round takes
    one random column out of every stripe and puts them all back by an exact linear assignment (the best
    of all ways, so never worse; ``noise`` > 0 perturbs the scores by up to +-noise/2, so a round may
    lose). Above ``block`` stripes each round solves random blocks of at most ``block`` stripes. Stops
    after ``seconds``, ``max_rounds`` rounds or ``max_stale`` rounds in a row without a gain; returns
    the number of columns moved."""
    lib = _stripe_lib("stripe_assign", xt, perm)
    moved = ctypes.c_int64(0)
    nt = threads if threads is not None else torch.get_num_threads()
    rc = lib.nms_stripe_assign(xt.data_ptr(), xt.shape[0], xt.shape[1], n, m, perm.data_ptr(), float(seconds),
                               seed & (2**64 - 1), float(noise), block, max_rounds, max_stale, nt,
                               ctypes.byref(moved))
    if rc != 0:
        raise ValueError(f"compiled column reassignment rejected {tuple(xt.shape)} for {n}:{m} (rc {rc})")
    return int(moved.value)
