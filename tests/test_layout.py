"""The layout's promises, read from the source: the model layer (src/models) depends on torch only (and on the
torch-only math of src/diffusion) and imports nothing above it, and no module of src takes part in an import cycle
(lazy imports inside functions count)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# What the network modules may import besides the standard library and each other: torch alone. The diffusers
# conversion (convert.py) reads safetensors files as well.
MODEL_LAYER_EXTERNAL = {"torch"}
CONVERT_EXTERNAL = {"torch", "safetensors", "diffusers"}
# DiffusionModel saves and loads safetensors files, and reads an old checkpoint's run config.yaml (yaml).
DIFFUSION_MODEL_EXTERNAL = {"torch", "safetensors", "yaml"}
# The torch-only layers below the model layer: the math and four helpers (errors, per-sample seeds, atomic saves, and
# DiffusionModule's option groups, which DiffusionModel reads a checkpoint's recorded options by).
TORCH_ONLY = ("src.models", "src.diffusion", "src.errors", "src.seeding", "src.atomic", "src.options")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as dotted names (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
            # `from src.models import unet` imports the submodule src.models.unet
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def src_graph() -> dict[str, set[str]]:
    """Module -> the src modules it imports."""
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {i for i in imports(path) if i in files and i != name} for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_model_layer_imports_torch_and_itself_only() -> None:
    stdlib = set(sys.stdlib_module_names)
    extra = {"convert.py": CONVERT_EXTERNAL, "diffusion.py": DIFFUSION_MODEL_EXTERNAL}
    torch_only = [p for p in SRC.rglob("*.py") if module_name(p).startswith(TORCH_ONLY)]
    for path in sorted(torch_only):
        allowed = extra.get(path.name, MODEL_LAYER_EXTERNAL) if path.parent.name == "models" else MODEL_LAYER_EXTERNAL
        allowed = allowed | {"numpy", "scipy", "tqdm", "PIL"} if path.parent.name == "diffusion" else allowed
        # errors.py reads the config files a command line names (yaml), lazily, to tell a user's missing path
        allowed = allowed | {"yaml"} if path.name == "errors.py" and path.parent.name == "src" else allowed
        outside = sorted(
            name
            for name in imports(path)
            if name.split(".")[0] not in stdlib | allowed | {"__future__"} and not name.startswith(TORCH_ONLY)
        )
        assert not outside, f"{module_name(path)} imports {outside}: the model layer depends on torch only"


def test_src_is_in_no_import_cycle() -> None:
    assert import_cycles(src_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
