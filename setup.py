"""Builds the optional native extension ``fasttips._native`` from ``csrc/``.

Metadata lives in pyproject.toml; this file only decides whether the C++ part can be built.
The extension uses the plain CPython API (no torch at build time), so a CPU-only
``pip install -e .`` works with build isolation. If the compiler or Python headers are missing,
the build is skipped with a message and fasttips falls back to the pure-Python twins.

FASTTIPS_BUILD_NATIVE=0 skips it; =1 makes a failed build an error.
"""
import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODE = os.environ.get("FASTTIPS_BUILD_NATIVE", "auto")


class OptionalBuildExt(build_ext):
    """build_ext that turns a failure into a warning unless FASTTIPS_BUILD_NATIVE=1."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, headers missing, ...
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc):
        if MODE == "1":
            raise
        print(f"fasttips: skipping optional native extension ({exc}); "
              "the pure-Python fallbacks will be used", file=sys.stderr)


sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = []
if MODE != "0" and sources:
    ext_modules.append(Extension(
        "fasttips._native",
        sources=sources,
        language="c++",
        extra_compile_args=["-O3", "-std=c++17"],
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
