"""integration/ imports in one direction (issue 23): no module reaches back to one that imports it."""
from _import_graph import find_cycle, import_graph, within

INTEGRATION = "openclip_align.integration."


def _graph():
    """integration's modules by their short name -> the integration modules each imports."""
    graph = within(import_graph(), INTEGRATION)
    return {name[len(INTEGRATION):]: {other[len(INTEGRATION):] for other in imported}
            for name, imported in graph.items()}


def test_no_import_cycle_inside_integration():
    graph = _graph()
    assert "run_state" in graph["trainer_adapter"]            # the graph sees the imports it checks
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_data_side_does_not_import_the_trainer_hooks():
    graph = _graph()
    hooks = {"trainer_adapter", "data_wiring", "before_train", "loss_adapter", "loss_state", "eval_gap_metrics"}
    for name in ("run_state", "csv_checks", "training_shards", "batch_extras", "checkpoints", "loader_health"):
        assert not graph[name] & hooks, name


def test_only_the_adapter_imports_the_adapter():
    """The concern modules receive the run and plain callables from trainer_adapter, never reach back."""
    importers = {name for name, imported in _graph().items() if "trainer_adapter" in imported}
    assert importers == set(), importers
