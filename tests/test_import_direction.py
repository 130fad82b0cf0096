"""The package's layering, checked from the source: imports flow one way, and files stay small.

kernels < distributed < layers < models < quant (loaders) < engine < eval, bench < serve < cluster < commands, cli
< the package's __init__. A module may import from its own layer or any layer below; never above.
Leaves (errors, logprobs) import nothing from lowbit and may be imported from anywhere.

Every `import` / `from ... import` counts, wherever it is (inside functions, under TYPE_CHECKING),
and so does `importlib.import_module` with a literal (or f-string prefix) name: a deferred import
is still a dependency, and the point is that a layer can be built, tested and replaced (a GPU
backend, new kernels) without the layers above it.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowbit"

#: Rank of each top-level part of the package (lower = closer to the hardware).
LAYERS: dict[str, int] = {
    "lowbit.kernels": 0,
    "lowbit.distributed": 0.5,  # tensor-parallel groups and collectives: above kernels, below layers
    "lowbit.layers": 1,
    "lowbit.models": 2,
    "lowbit.quant": 3,
    "lowbit.engine": 4,
    "lowbit.eval": 5,
    "lowbit.bench": 5,
    "lowbit.serve": 6,
    "lowbit.cluster": 7,
    "lowbit.commands": 8,
    "lowbit.cli": 8,
    "lowbit": 9,  # lowbit/__init__.py: the public API, on top of everything
}
#: Dependency-free modules every layer may use.
LEAVES = {"lowbit.errors", "lowbit.logprobs", "lowbit.fsio"}

MAX_PY_LINES = 500
MAX_CPP_LINES = 600
#: Files over the limit that another branch of issue 15 splits; empty this set when it merges.
PENDING_PY_SPLITS: set[str] = set()


@dataclass(frozen=True)
class Edge:
    where: str  # file:line
    source: str  # importing module
    target: str  # imported module (best resolution from the source text)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path, root: Path) -> list[str]:
    """The package a relative import in `path` is relative to."""
    parts = module_name(path, root).split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _is_module(name: str, root: Path) -> bool:
    rel = Path(*name.split("."))
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()


def _import_module_name(call: ast.Call) -> str | None:
    """`importlib.import_module("lowbit.x")` / `import_module(f"lowbit.commands.{name}")` -> the
    (literal prefix of the) module name."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def imports_of(path: Path, root: Path = ROOT) -> list[Edge]:
    source = module_name(path, root)
    rel = path.relative_to(root)
    edges: list[Edge] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path, root)
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import name`: name may be a submodule (its own layer) or an attribute of pkg
            subs = [f"{module}.{a.name}" for a in node.names if _is_module(f"{module}.{a.name}", root)]
            targets = subs + ([module] if len(subs) < len(node.names) else [])
        elif isinstance(node, ast.Call):
            name = _import_module_name(node)
            targets = [name] if name else []
        edges += [Edge(f"{rel}:{node.lineno}", source, t) for t in targets if t == "lowbit" or t.startswith("lowbit.")]
    return edges


def layer_of(module: str) -> str | None:
    """The LAYERS key owning `module` (longest matching prefix), or None."""
    best = None
    for key in LAYERS:
        if module == key or module.startswith(key + "."):
            if best is None or len(key) > len(best):
                best = key
    return best


def is_leaf(module: str) -> bool:
    return any(module == leaf or module.startswith(leaf + ".") for leaf in LEAVES)


def python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unmapped = [module_name(p) for p in python_files() if not is_leaf(module_name(p)) and layer_of(module_name(p)) is None]
    assert not unmapped, f"modules outside every layer (add them to LAYERS or LEAVES): {unmapped}"


def test_imports_only_flow_downwards():
    upward = []
    for path in python_files():
        src = module_name(path)
        for e in imports_of(path):
            if is_leaf(e.target):
                continue
            if is_leaf(src):
                upward.append(f"{e.where}: leaf {src} imports {e.target} (leaves import nothing from lowbit)")
                continue
            s, t = layer_of(src), layer_of(e.target)
            assert s is not None and t is not None, f"{e.where}: cannot place {src} -> {e.target}"
            if LAYERS[t] > LAYERS[s]:
                upward.append(f"{e.where}: {src} ({s}) imports {e.target} ({t}), a layer above")
    assert not upward, "upward imports:\n" + "\n".join(upward)


# ---- the checker itself ------------------------------------------------------------------------


def test_checker_sees_imports_inside_functions_relative_and_absolute(tmp_path):
    """Function-level relative and absolute imports and import_module, from a fake lowbit/layers file."""
    root = tmp_path
    (root / "lowbit" / "layers").mkdir(parents=True)
    (root / "lowbit" / "engine").mkdir()
    for d in ("lowbit", "lowbit/layers", "lowbit/engine"):
        (root / d / "__init__.py").write_text("")
    (root / "lowbit" / "engine" / "kv_cache.py").write_text("")
    bad = root / "lowbit" / "layers" / "bad.py"
    bad.write_text("import torch\n\n\ndef f():\n    from ..engine import kv_cache\n    import lowbit.engine.kv_cache\n"
                   "    from lowbit import LLM\n    from . import other\n"
                   "    importlib.import_module(f'lowbit.serve.{name}')\n")
    edges = imports_of(bad, root)
    assert [(e.where, e.target) for e in edges] == [
        ("lowbit/layers/bad.py:5", "lowbit.engine.kv_cache"), ("lowbit/layers/bad.py:6", "lowbit.engine.kv_cache"),
        ("lowbit/layers/bad.py:7", "lowbit"), ("lowbit/layers/bad.py:8", "lowbit.layers"),
        ("lowbit/layers/bad.py:9", "lowbit.serve"),
    ]
    src = layer_of(module_name(bad, root))
    assert [LAYERS[layer_of(e.target)] > LAYERS[src] for e in edges] == [True, True, True, False, True]


# ---- file sizes --------------------------------------------------------------------------------


def _line_count(p: Path) -> int:
    return len(p.read_text().splitlines())


def test_python_files_stay_under_500_lines():
    over = {str(p.relative_to(ROOT)): n for p in python_files() if (n := _line_count(p)) > MAX_PY_LINES}
    unexpected = {f: n for f, n in over.items() if f not in PENDING_PY_SPLITS}
    assert not unexpected, f"files over {MAX_PY_LINES} lines: {unexpected}"
    if over:
        pytest.xfail(f"being split on another branch of issue 15: {over}")


def test_cpp_files_stay_under_600_lines():
    files = [p for ext in ("*.cpp", "*.cc", "*.h", "*.hpp") for p in PACKAGE.rglob(ext)]
    over = {str(p.relative_to(ROOT)): n for p in files if (n := _line_count(p)) > MAX_CPP_LINES}
    assert not over, f"C++ files over {MAX_CPP_LINES} lines: {over}"
