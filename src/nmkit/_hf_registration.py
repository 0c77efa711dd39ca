"""Register nmkit's transformers quantizer when transformers' quantizer tables load, not before.

``import nmkit`` must stay light (importing transformers' quantizers costs ~1.6 s), yet
``AutoModelForCausalLM.from_pretrained`` on an nmkit export must find ``quant_method: "nmkit"`` with
nmkit merely imported. So: if ``transformers.quantizers.auto`` is already imported, register now;
otherwise a one-shot import hook registers right after that module first executes, then removes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from types import ModuleType

TARGET = "transformers.quantizers.auto"
REGISTRAR = "nmkit.hf_quantizer"  # loaded by name: it imports transformers, which `import nmkit` must not


def _register() -> None:
    try:
        importlib.import_module(REGISTRAR).register()
    except Exception as e:  # noqa: BLE001 - never break the user's transformers import
        warnings.warn(f"nmkit could not register its transformers quantizer ({type(e).__name__}: {e}); "
                      "from_pretrained will not read nmkit exports, nmkit.load still does", stacklevel=2)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install(modules: dict[str, ModuleType]) -> None:
    if TARGET in modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


__all__ = ["TARGET", "install"]
