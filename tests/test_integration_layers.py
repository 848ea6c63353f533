"""integration/ imports in one direction (issue 23): no module reaches back to one that imports it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openclip_align" / "integration"


def _imports(path: Path):
    """Sibling modules of integration/ that ``path`` imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("openclip_align.integration."):
            found.add(node.module.split(".")[2])
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_no_import_cycle_inside_integration():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py")}
    state = {}

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


def test_the_data_side_does_not_import_the_trainer_hooks():
    hooks = {"trainer_adapter", "data_wiring", "before_train", "loss_adapter", "loss_state", "eval_gap_metrics"}
    for name in ("run_state", "csv_checks", "training_shards", "batch_extras", "checkpoints", "loader_health"):
        assert not _imports(PACKAGE / f"{name}.py") & hooks, name


def test_only_the_adapter_imports_the_adapter():
    """The concern modules receive the run and plain callables from trainer_adapter, never reach back."""
    importers = {p.stem for p in PACKAGE.glob("*.py") if "trainer_adapter" in _imports(p)}
    assert importers == set(), importers
