"""The experiments and the publishing tools import in one direction (issue 30): publishing/ reads what
experiments/ writes and imports it; experiments/ never imports publishing/, and neither package has a cycle."""
from _import_graph import find_cycle, import_graph

PACKAGES = ("openclip_align.experiments.", "openclip_align.publishing.")


def _graph():
    graph = import_graph()
    inside = {name for name in graph if name.startswith(PACKAGES)}
    return {name: graph[name] & inside for name in inside}


def test_experiments_never_import_the_publishing_tools():
    graph = _graph()
    # the check sees cross-package imports
    assert graph["openclip_align.publishing.committed_copy"] >= {"openclip_align.experiments.benchmark"}
    for name, imported in graph.items():
        if name.startswith("openclip_align.experiments."):
            assert not {m for m in imported if m.startswith("openclip_align.publishing.")}, name


def test_no_import_cycle_in_experiments_or_publishing():
    assert find_cycle(_graph()) is None, find_cycle(_graph())
