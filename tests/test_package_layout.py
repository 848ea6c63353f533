"""The package's layout rules (issue 30): no import cycle anywhere, no module over 450 lines, and each data
format's file name written in its one owner module only."""
import re

import pytest

from _import_graph import find_cycle, import_graph, package_modules

MAX_LINES = 450
# file name as it appears in source -> the modules allowed to spell it (its owners)
FORMAT_OWNERS = {
    ".emb.npy": {"openclip_align.data.column", "openclip_align.data.csv_embeddings"},
    "sizes.json": {"openclip_align.data.sizes"},
    "openclip_align_record": {"openclip_align.data.record"},
}
# upstream trainer functions: only the adapter names them (argparse's parse_args and open_clip's public
# create_model_and_transforms, called as a library, are not matched by these forms)
UPSTREAM = re.compile(r"\b(train_one_epoch|get_clip_metrics|create_loss|get_wds_dataset|get_dataset_fn|"
                      r"filter_no_caption_or_no_image|log_and_continue|tarfile_to_samples_nothrow|expand_urls|"
                      r"get_dataset_size|pt_load|init_distributed_device)\b")


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "openclip_align.data.column" in graph["openclip_align.data.embed"]      # the graph sees the imports
    assert find_cycle(graph) is None, find_cycle(graph)


def test_no_module_over_450_lines():
    long = {name: n for name, path in package_modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("name", sorted(FORMAT_OWNERS))
def test_each_format_is_named_by_its_owner_only(name):
    spelling = {module for module, path in package_modules().items() if name in path.read_text()}
    assert spelling == FORMAT_OWNERS[name]


def test_only_the_trainer_adapter_names_upstreams_trainer_functions():
    naming = {module for module, path in package_modules().items() if UPSTREAM.search(path.read_text())}
    assert naming == {"openclip_align.integration.trainer_adapter"}
