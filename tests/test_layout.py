"""The package layout's import rules (docs/ARCHITECTURE.md), read from the source with ``ast``: every import counts,
also those inside functions, since a lazy import is still a dependency."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "detection"
# Each package imports only packages of a lower rank; engine and inference share a rank and never import each other.
RANK = {"core": 0, "data": 1, "modeling": 2, "evaluation": 3, "checkpoint": 4, "engine": 5, "inference": 5,
        "commands": 6}
# The documented ``python -m src.detection.<name>`` spellings: one-line shims over ``commands``.
SHIMS = {"evaluate", "export", "convert", "synthetic", "analyze"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Modules under src.detection that ``path`` imports (relative or absolute), as dotted names below the package."""
    own = module_name(path).split(".") if module_name(path) else []
    package = own if path.name == "__init__.py" else own[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("src.detection"):
                target = node.module.split(".")[2:]
            else:
                continue
            # `from .pkg import module` names a module when such a file exists
            for alias in node.names:
                sub = PKG.joinpath(*target, alias.name)
                found.add(".".join(target + [alias.name]) if sub.with_suffix(".py").is_file() or sub.is_dir()
                          else ".".join(target))
        elif isinstance(node, ast.Import):
            found.update(a.name[len("src.detection."):] for a in node.names if a.name.startswith("src.detection."))
    return {f for f in found if f}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        top = mod.split(".")[0]
        if top not in RANK:
            continue
        for dep in deps:
            dtop = dep.split(".")[0]
            if dtop not in RANK or dtop == top:
                if top == "commands" and dtop == "commands" and dep not in ("commands", mod):
                    bad.append(f"{mod} imports another command {dep}")
                continue
            if RANK[dtop] >= RANK[top]:
                bad.append(f"{mod} ({top}) imports {dep} ({dtop})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), package ``__init__`` edges excluded."""
    g = {m: {d for d in deps if d in g and d != m} for m, deps in g.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_packages_import_only_lower_layers_and_commands_never_import_commands():
    assert layer_violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_top_level_modules_are_only_the_documented_shims():
    top = {module_name(p) for p in PKG.glob("*.py")} - {""}
    assert top == SHIMS
    for name in SHIMS:
        assert imports_of(PKG / f"{name}.py") <= {f"commands.{name}", "core.errors"}


@pytest.mark.parametrize("g, expected", [
    ({"core.io": {"engine.loop"}, "engine.loop": set()}, ["core.io (core) imports engine.loop (engine)"]),
    ({"engine.loop": {"inference.predictor"}, "inference.predictor": set()},
     ["engine.loop (engine) imports inference.predictor (inference)"]),
    ({"commands.train": {"commands.evaluate"}, "commands.evaluate": set()},
     ["commands.train imports another command commands.evaluate"]),
    ({"data.datasets": {"core.io"}, "core.io": set()}, []),
])
def test_rule_checker_reports_what_it_should(g, expected):
    assert layer_violations(g) == expected


def test_cycle_finder_reports_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
