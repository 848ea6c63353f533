"""The experiments and the publishing tools import in one direction (issue 30): publishing/ reads what
experiments/ writes and imports it; experiments/ never imports publishing/, and neither package has a cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "openclip_align"
PACKAGES = ("experiments", "publishing")


def _imports(path: Path, package: str):
    """'package.module' names of experiments/ and publishing/ that ``path`` imports (top level or in functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(f"{package}.{name.split('.')[0]}" for name in names)
        elif (node.module or "").startswith("openclip_align."):
            parts = node.module.split(".")
            if len(parts) >= 3 and parts[1] in PACKAGES:
                found.add(f"{parts[1]}.{parts[2]}")
            elif len(parts) == 2 and parts[1] in PACKAGES:
                found.update(f"{parts[1]}.{alias.name}" for alias in node.names)
    return found


def _graph():
    modules = {f"{package}.{p.stem}": p for package in PACKAGES for p in (ROOT / package).glob("*.py")}
    return {name: _imports(path, name.split(".")[0]) & set(modules) for name, path in modules.items()}


def test_experiments_never_import_the_publishing_tools():
    graph = _graph()
    assert graph["publishing.committed_copy"] >= {"experiments.benchmark"}        # the check sees cross-package imports
    for name, imported in graph.items():
        if name.startswith("experiments."):
            assert not {m for m in imported if m.startswith("publishing.")}, name


def test_no_import_cycle_in_experiments_or_publishing():
    graph, state = _graph(), {}

    def visit(module, trail):
        if state.get(module) == "open":
            raise AssertionError("import cycle: " + " -> ".join(trail + [module]))
        if state.get(module) == "done":
            return
        state[module] = "open"
        for other in sorted(graph[module]):
            visit(other, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
