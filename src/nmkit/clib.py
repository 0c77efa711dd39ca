"""One loader for nmkit's compiled C libraries, and the environment that steers them, read once.

The libraries are plain C built as extension modules (so wheels place them in the package) and
opened with ctypes; Python never imports them. If one is missing or fails to load, :func:`load`
returns None (with one warning) and its callers use their torch paths.

Environment (read on first use; :func:`reset` re-reads it, for tests):

- ``NMKIT_NATIVE=0`` disables every compiled library.
- ``NMKIT_ISA`` lowers the kernels' ISA level (``portable``, ``avx2``, ``avx512``, ``avx512bf16``).
- A library's ``override`` variable, ``NMKIT_<NAME>_LIB`` (``NMKIT_NATIVE_LIB`` for the kernels,
  ``NMKIT_SOLVERS_LIB`` for the solvers), points at a development build of the same C file.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch  # noqa: F401  (imported first, so a library binds to torch's already-loaded libgomp: one pool)

# ctypes shorthands for the signature tables
INT, PTR, I64, U64, F32, F64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, \
    ctypes.c_double


@dataclass(frozen=True)
class Environment:
    enabled: bool
    isa: str | None
    overrides: dict[str, str] = field(default_factory=dict)  # override variable -> path


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The NMKIT_* settings of this process, read once."""
    overrides = {k: v for k, v in os.environ.items() if k.startswith("NMKIT_") and k.endswith("_LIB") and v}
    return Environment(os.environ.get("NMKIT_NATIVE", "1") != "0", os.environ.get("NMKIT_ISA") or None, overrides)


@dataclass(frozen=True)
class Library:
    """A compiled library: its extension module, the variable that overrides its path, its C signatures."""

    module: str  # e.g. "nmkit.kernels._native"
    override: str  # environment variable holding a development build's path
    label: str  # for the warning when it is unavailable
    signatures: tuple[tuple[str, object, tuple], ...]  # (function, restype, argtypes)


_loaded: dict[str, ctypes.CDLL | None] = {}


def load(library: Library) -> ctypes.CDLL | None:
    """The opened library with its signatures set, or None when it is disabled, missing or broken."""
    if library.module not in _loaded:
        _loaded[library.module] = _open(library)
    return _loaded[library.module]


def _open(library: Library) -> ctypes.CDLL | None:
    env = environment()
    if not env.enabled:
        return None
    try:
        path = env.overrides.get(library.override)
        if path is None:
            spec = importlib.util.find_spec(library.module)
            if spec is None or spec.origin is None:
                raise OSError(f"{library.module} was not built")
            path = spec.origin
        lib = ctypes.CDLL(path)
        for name, restype, argtypes in library.signatures:
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, list(argtypes)
    except (OSError, AttributeError) as exc:
        warnings.warn(f"nmkit {library.label} unavailable ({exc}); using the slower torch path",
                      RuntimeWarning, stacklevel=4)
        return None
    return lib


def reset() -> None:
    """Forget the environment and the opened libraries (tests that change NMKIT_* variables)."""
    environment.cache_clear()
    _loaded.clear()
