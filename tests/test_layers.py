"""The house rules of the code layout (docs/ENGINE.md, "The code, layer by layer"): imports only point down
the layers, no two modules import each other (directly or in a loop), and no folder grows past a dozen or
so modules."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lib_merge"

# lowest first; a module may import from its own layer and the layers below it
LAYERS = {"core": 0, "methods": 1, "engine": 2, "tools": 3, "preview": 3, "host": 4, "session": 5, "xy": 6,
          "lora": 7, "optimize": 8, "api": 9, "ui": 9, "webui_xyz": 9, "cli": 10, "__main__": 11, "__init__": 11}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every import of a lib_merge module by another (module level and inside functions alike)."""
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                # a package's own __init__ is not a dependency of its modules (Python runs it first anyway)
                if t and t != name and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_no_import_cycles():
    graph = _imports(_modules())
    # Tarjan's strongly connected components: any component of two or more modules is a loop
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert loops == []


def test_imports_point_down_the_layers():
    graph = _imports(_modules())
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) > _layer(a))
    assert upward == []


def test_every_module_has_a_layer_and_no_folder_is_crowded():
    modules = _modules()
    for name in modules:
        _layer(name)   # a KeyError names a module outside the known layers
    for folder in [PKG, *(p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        count = len([p for p in folder.glob("*.py") if p.name != "__init__.py"])
        assert count <= 13, f"{folder} holds {count} modules: split it by what its parts do"
