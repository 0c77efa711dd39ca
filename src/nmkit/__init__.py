"""nmkit: N:M structured sparsity for PyTorch.

"N:M" means keep N of every M consecutive weights along the reduction dimension.

    import nmkit
    model = nmkit.load("smollm2-135m")                       # alias, HF dir/id, or nmkit export
    nmkit.prune(model, "2:4", method="sparsegpt", calibration=ids)
    nmkit.compress(model)                                     # Linear -> SparseLinear where it wins
"""

import sys

from nmkit import _hf_registration
from nmkit.patterns import NM, Dense, Pattern, Unstructured, parse
from nmkit.solvers import mask_for, nm_mask

__version__ = "0.1.0"

# Heavier entry points load on first use so `import nmkit` stays light (no transformers import).
_LAZY = {
    "load": ("nmkit.models", "load"),
    "load_tokenizer": ("nmkit.models", "load_tokenizer"),
    "prune": ("nmkit.oneshot", "prune"),
    "compress": ("nmkit.nn", "compress"),
    "SparseLinear": ("nmkit.nn", "SparseLinear"),
    "export": ("nmkit.formats.io", "export"),
    "sparsify_": ("nmkit.api", "sparsify_"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'nmkit' has no attribute {name!r}")


# `AutoModelForCausalLM.from_pretrained` reads nmkit exports once nmkit is imported: register the
# quantizer now if transformers' quantizer tables are loaded, else the moment they are.
_hf_registration.install(sys.modules)

__all__ = ["NM", "Dense", "Pattern", "Unstructured", "parse", "mask_for", "nm_mask", "__version__", *_LAZY]
