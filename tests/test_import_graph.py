"""The package's layering, read from its source: every import statement, at module level or inside a function
(lazy imports count: they run too), except those under `if TYPE_CHECKING:`.

- no import cycles anywhere in hf_modelopt;
- `hf_modelopt.formats` (the on-disk formats) is a leaf: it imports nothing of hf_modelopt outside itself but
  `errors`;
- the technique packages (`distill`, `prune`, `quant`) never import the export, the pipeline, the recipe
  stages, the recipe or the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_modelopt"
TECHNIQUES = ("hf_modelopt.distill", "hf_modelopt.prune", "hf_modelopt.quant")
NOT_FOR_TECHNIQUES = ("hf_modelopt.export", "hf_modelopt.pipeline", "hf_modelopt.stages", "hf_modelopt.recipe",
                      "hf_modelopt.cli")


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    modules = {}
    for file in root.rglob("*.py"):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    return skipped


def imports_of(module: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The hf_modelopt modules `module` imports (a name imported from a package counts as its submodule if it
    is one, else as the package)."""
    tree = ast.parse(file.read_text())
    skipped = _type_checking_nodes(tree)
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {module: imports_of(module, file, modules) for module, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_lazy_imports_and_finds_cycles():
    # The checks below are only as good as the walker: it must see an import inside a function, skip
    # TYPE_CHECKING, and report a cycle.
    modules = module_files()
    assert "hf_modelopt.distill.student" in imports_of("hf_modelopt.stages.distill",
                                                        modules["hf_modelopt.stages.distill"], modules)
    assert "hf_modelopt.recipe" not in imports_of("hf_modelopt.stages", modules["hf_modelopt.stages"], modules)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


LEAVES = ("hf_modelopt.errors", "hf_modelopt.extras")  # every layer may import these; they import only each other


def test_formats_is_a_leaf(graph):
    wrong = {(module, target) for module, targets in graph.items() if module.startswith("hf_modelopt.formats")
             for target in targets if not target.startswith("hf_modelopt.formats") and target not in LEAVES}
    assert not wrong, f"hf_modelopt.formats must import no technique or runner: {sorted(wrong)}"
    assert all(graph[leaf] <= set(LEAVES) for leaf in LEAVES), {leaf: graph[leaf] for leaf in LEAVES}


def test_techniques_do_not_import_export_or_pipeline(graph):
    wrong = {(module, target) for module, targets in graph.items() if module.startswith(TECHNIQUES)
             for target in targets if target.startswith(NOT_FOR_TECHNIQUES)}
    assert not wrong, f"technique packages import the layers above them: {sorted(wrong)}"


def test_public_api_is_small_and_resolves():
    import hf_modelopt

    assert len(hf_modelopt.__all__) <= 15
    for name in hf_modelopt.__all__:
        assert getattr(hf_modelopt, name).__name__ == name


def test_export_knows_no_recipe(graph):
    # The export takes a model, a tokenizer and a plain `Provenance`: the recipe layer sits above it.
    wrong = {(module, target) for module, targets in graph.items() if module.startswith("hf_modelopt.export")
             for target in targets if target.startswith(("hf_modelopt.stages", "hf_modelopt.recipe",
                                                         "hf_modelopt.pipeline", "hf_modelopt.cli"))}
    assert not wrong, f"hf_modelopt.export imports the layers above it: {sorted(wrong)}"


# The foundations every technique reads (what each technique supports, the block stacks and layouts, the tasks and
# their data): a technique may import them, so they import no technique.
FOUNDATIONS = ("hf_modelopt.compat", "hf_modelopt.blocks", "hf_modelopt.tasks", "hf_modelopt.data")


def test_foundations_import_no_technique(graph):
    wrong = {(module, target) for module, targets in graph.items() if module.startswith(FOUNDATIONS)
             for target in targets if target.startswith(TECHNIQUES + NOT_FOR_TECHNIQUES)}
    assert not wrong, f"foundation modules import techniques or the layers above them: {sorted(wrong)}"


# The layers, lowest first: a module may import its own layer and the layers below it, never one above. The
# foundations are the facts every technique shares (model structure, tasks, data, on-disk formats, what each
# technique supports); a technique works on a model in memory; export writes a model with its card; a stage
# adapts a technique or the export to the recipe runner; the recipe and the pipeline run stages; the CLI parses
# words. Sub-packages of one layer must not form a cycle either (test_no_package_cycles).
LAYERS = (
    ("errors", "extras", "files", "blocks", "inplace", "interrupt", "distributed", "data", "tasks", "modeling",
     "metrics", "inspection", "formats", "compat", "parallel"),
    ("distill", "prune", "quant"),
    ("export",),
    ("benchmark", "stages"),
    ("recipe",),
    ("pipeline",),
    ("cli",),
)


def sub_package(module: str) -> str:
    """`hf_modelopt.export.save` -> `export`; the package itself -> `hf_modelopt`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


@pytest.fixture(scope="module")
def package_graph(graph) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(sub_package(module), set()).update(
            sub_package(t) for t in targets if sub_package(t) != sub_package(module))
    return packages


def test_every_sub_package_has_a_layer(package_graph):
    layered = {name for layer in LAYERS for name in layer}
    assert set(package_graph) - {"hf_modelopt", "__main__"} <= layered, set(package_graph) - layered


def test_no_package_cycles(package_graph):
    assert find_cycle(package_graph) is None, " -> ".join(find_cycle(package_graph))


def test_imports_point_down_the_layers(graph):
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = sorted((module, target) for module, targets in graph.items() for target in targets
                    if sub_package(module) in rank and sub_package(target) in rank
                    and rank[sub_package(target)] > rank[sub_package(module)])
    assert not upward, f"imports that point up the layers: {upward}"
