"""The package's shape: layers below stages, imports pointing down only, no cycles, project imports at the
top of each module (the dependency graph is what the import lines say)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import modules of its own or a lower rank only (and, inside a package such
# as ``score/``, its siblings, without cycles). The README's "Where things are" table follows this order.
LAYERS: list[tuple[str, ...]] = [
    # shared layers
    (
        "storage",
        "scan",
        "groups",
        "volumes",
        "config",
        "runtime",
        "model",
        "phantoms",
        "synth_dicom",
        "augment",
    ),
    ("medical", "metrics", "results", "split"),
    ("scope", "series"),
    ("formats", "bundle", "calibrate", "explain"),
    ("preprocess",),
    ("predict", "ingest"),
    ("adapt", "localise"),
    # stages
    ("score", "slices"),
    ("serve",),
    ("review",),
    ("evaluate",),
    ("report",),
    ("train",),
    ("tune",),
    ("cv",),
    ("demo",),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "raytumor").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(tree: ast.AST, mods: dict[str, Path]) -> list[tuple[str, int]]:
    """(raytumor module, line) for each project import in ``tree`` (``from pkg import submodule`` too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("raytumor.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raytumor"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
            found += [(m, node.lineno) for m in subs] or [(node.module, node.lineno)]
    return [(m, line) for m, line in found if m != "raytumor"]


def _unit(module: str) -> str:
    """The layer unit of a module: ``raytumor.score.job`` -> ``score``."""
    return module.split(".")[1]


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _modules() if m != "raytumor"}
    assert units == set(RANK), (units - set(RANK), set(RANK) - units)


# Project modules that may be imported inside functions, and why.
LAZY_MODULES = {
    # imports ray.serve (~1 s) at module level for its @serve.batch method; only a replica and
    # `raytumor serve` need it, not every `raytumor --help`
    "raytumor.serve.endpoint",
}


def test_project_imports_at_module_top():
    """Imports of raytumor modules inside functions hide the dependency graph (and once hid two cycles);
    only heavy optional libraries (ray, pydicom, nibabel, matplotlib) are imported lazily."""
    mods = _modules()
    inner = []
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        top = {id(n) for n in tree.body}
        # A package's lazy re-exports (PEP 562 ``__getattr__`` in its __init__) of its own modules are fine:
        # Ray tasks import the package to reach one light module, and should not pay for the heavy ones.
        lazy = {
            id(n)
            for fn in tree.body
            if f.name == "__init__.py" and isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__"
            for n in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                found = _imports(node, mods)
                if id(node) in lazy:
                    found = [(m, line) for m, line in found if not m.startswith(name + ".")]
                found = [(m, line) for m, line in found if m not in LAZY_MODULES]
                inner += [f"{name}:{line} imports {m}" for m, line in found]
    assert not inner, inner


def test_imports_point_down_and_have_no_cycles():
    mods = _modules()
    graph: dict[str, set[str]] = {}
    upward = []
    for name, f in mods.items():
        deps = {m for m, _ in _imports(ast.parse(f.read_text()), mods) if m in mods and m != name}
        graph[name] = deps
        if name == "raytumor":
            continue
        for dep, line in _imports(ast.parse(f.read_text()), mods):
            a, b = _unit(name), _unit(dep)
            if a != b and RANK[b] >= RANK[a]:
                upward.append(f"{name}:{line} imports {dep} (rank {RANK[b]} >= {RANK[a]})")
    assert not upward, upward
    # A package's __init__ re-exports its modules; a module importing its own package's __init__ would
    # close a cycle through it, so look for cycles with every edge kept.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
