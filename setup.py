"""Build the plain-C kernel library (loaded with ctypes, no torch C++ ABI).

It is built as an extension module so pip/wheels place it inside the package; Python never imports
it, ``nmkit.kernels.native`` opens it with ctypes. No -march flag: each ISA path carries its own
``target`` attribute and is chosen at run time. If the compiler fails, the package still installs and
nmkit runs on the pure-torch reference kernels (with a warning).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    failed: set = set()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # the reference path still works without the native library
            self.failed.add(ext.name)
            print(f"WARNING: nmkit native kernels not built ({exc}); using the torch reference path",
                  file=sys.stderr)

    def copy_extensions_to_source(self):  # editable installs: skip what failed to build
        failed = [e for e in self.extensions if e.name in self.failed]
        self.extensions = [e for e in self.extensions if e.name not in self.failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions += failed

    def get_outputs(self):
        return [o for e, o in zip(self.extensions, super().get_outputs(), strict=True) if e.name not in self.failed]


native = Extension(
    "nmkit.kernels._native",
    sources=["src/nmkit/kernels/csrc/nmkit_kernels.c", "src/nmkit/kernels/csrc/nmkit_attention.c"],
    extra_compile_args=["-O3", "-fopenmp", "-std=gnu11"],
    extra_link_args=["-fopenmp"],
    libraries=["m"],  # expf in the attention kernel
)

# Mask solvers (transposable N:M per tile), a separate ctypes library: nmkit/solvers/native.py.
solvers_native = Extension(
    "nmkit.solvers._solvers_native",
    sources=["src/nmkit/solvers/csrc/nmkit_solvers.c"],
    extra_compile_args=["-O3", "-fopenmp", "-std=gnu11"],
    extra_link_args=["-fopenmp"],
)

# The lean decode runtime (a whole Llama forward per call): nmkit/runtime/native.py.
runtime_native = Extension(
    "nmkit.runtime._runtime",
    sources=["src/nmkit/runtime/csrc/nmkit_runtime.c"],
    extra_compile_args=["-O3", "-fopenmp", "-std=gnu11"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[native, solvers_native, runtime_native], cmdclass={"build_ext": OptionalBuildExt})
