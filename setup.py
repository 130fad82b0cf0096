"""Builds the C++ CPU kernels at install time, one extension module per instruction-set variant.

Why at install: compiling at first use cost a new user 30-45 s on the first request (and two entry
points with different build hashes rebuilt each other's module). Here `pip install` compiles every
variant once (lowbit/kernels/variants.py: AVX2+FMA+F16C and AVX-512), each from its own translation
units with its own flags, and lowbit.kernels picks one at run time; nothing compiles after install.

Install with the torch that will run the kernels already present, and without build isolation
(`pip install --no-build-isolation -e .`): an isolated build would need torch among the build
requirements, and pip would fetch the default (CUDA) torch for it.

The kernels are optional: if torch is missing at build time or a variant fails to compile (no
compiler, an old compiler without AVX-512 BF16), the install still succeeds with one warning and
lowbit runs the variants that were built, or its pure-torch reference path.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("lowbit") / "kernels" / "csrc"  # relative: setuptools wants relative source paths


def _load_variants():
    """lowbit/kernels/variants.py by path (importing the package would need torch)."""
    spec = importlib.util.spec_from_file_location("_lowbit_variants", ROOT / "lowbit" / "kernels" / "variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


#: Whether this run builds (pip's metadata steps run egg_info / dist_info only).
_BUILDING = bool({"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"} & set(sys.argv[1:]))


def _warn(message: str) -> None:
    print(f"\nWARNING (lowbit): {message}\n", file=sys.stderr, flush=True)


def _kernel_build():
    """(ext_modules, cmdclass) for the kernels, or empty ones (with the warning) without torch."""
    try:
        import torch.utils.cpp_extension as cpp
    except ImportError as exc:
        if _BUILDING:  # pip also runs this file for metadata: warn once, in the build itself
            _warn(
                f"torch is not importable at build time ({exc}), so the C++ CPU kernels were not built; lowbit "
                "will use its slower pure-torch path. Install torch first, then reinstall with "
                "`pip install --no-build-isolation -e .`."
            )
        return [], {}

    v = _load_variants()
    csrc_abs = ROOT / CSRC
    digest = v.sources_hash(csrc_abs)
    headers = [str(p.relative_to(ROOT)) for p in v.source_files(csrc_abs) if p.suffix == ".h"]
    extensions = [
        cpp.CppExtension(
            name=variant.module,
            sources=[str(p.relative_to(ROOT)) for p in v.variant_sources(csrc_abs, variant)],
            depends=headers,
            extra_compile_args=list(variant.cflags),
            extra_link_args=list(v.LDFLAGS),
            language="c++",
        )
        for variant in v.VARIANTS
    ]

    class BuildKernels(cpp.BuildExtension):
        """torch's BuildExtension, with each variant optional and built with exactly its own flags."""

        def build_extensions(self) -> None:
            # Only the compiler and -fPIC from Python's own flags: its -g / -fwrapv / -DNDEBUG are not
            # what the kernels were measured with (-fwrapv changes how loops may be optimised).
            self.failed: dict[str, str] = {}
            cxx = os.environ.get("CXX") or (getattr(self.compiler, "compiler_so_cxx", None) or ["c++"])[0]
            for attr in ("compiler_so", "compiler_so_cxx"):  # the second exists in setuptools >= 72
                if hasattr(self.compiler, attr):
                    self.compiler.set_executable(attr, [cxx, "-fPIC"])
            try:
                super().build_extensions()  # checks the compiler first: that fails without one
            except Exception as exc:  # noqa: BLE001 - any failure leaves the pure-torch install usable
                for ext in self.extensions:
                    self.failed.setdefault(ext.name, _last_line(exc))
            if self.failed:
                built = [e.name for e in self.extensions if e.name not in self.failed]
                _warn(
                    "could not build the C++ CPU kernels for "
                    + "; ".join(f"{name.rsplit('_', 1)[-1]} ({why})" for name, why in self.failed.items())
                    + (f". Built: {', '.join(n.rsplit('_', 1)[-1] for n in built)}." if built else
                       ". lowbit will use its slower pure-torch path; install a C++ compiler and reinstall "
                       "with `pip install --no-build-isolation -e .` to get them.")
                )

        def build_extension(self, ext) -> None:
            base = self.build_temp
            self.build_temp = os.path.join(base, ext.name)  # the variants compile the same files
            try:
                _write_hash_header(Path(self.build_temp) / "generated", digest)
                ext.include_dirs = [*ext.include_dirs, str(Path(self.build_temp) / "generated")]
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - see build_extensions
                self.failed[ext.name] = _last_line(exc)
            finally:
                self.build_temp = base

        def copy_extensions_to_source(self) -> None:
            """Editable installs: copy only the variants that were built next to the package."""
            every = self.extensions
            self.extensions = [e for e in every if e.name not in getattr(self, "failed", {})]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = every

    return extensions, {"build_ext": BuildKernels.with_options(use_ninja=cpp.is_ninja_available())}


def _write_hash_header(directory: Path, digest: str) -> None:
    """sources_hash.h for bind/python.cpp, the one file that needs the hash (as a define on the
    command line it would recompile every file of both variants whenever any source changed).
    Rewritten only when the hash changes, so an unchanged tree rebuilds nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    header = directory / "sources_hash.h"
    text = f'#define LOWBIT_SOURCES_HASH "{digest}"\n'
    if not header.exists() or header.read_text() != text:
        header.write_text(text)


def _last_line(exc: BaseException) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".strip()


ext_modules, cmdclass = _kernel_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
