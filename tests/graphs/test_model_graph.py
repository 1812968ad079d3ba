"""ModelGraph: node kinds and names, space lookup, permutation, summary, DOT and PNG."""

import networkx as nx
import pytest
import torch

import graphmerge as gm
from graphmerge.graphs import NodeKind, trace


@pytest.fixture(scope="module")
def resnet_graph():
    model = gm.models.build("resnet20", seed=0)
    return trace(model, torch.randn(2, 3, 8, 8))


def test_nodes_have_kinds_and_readable_names(resnet_graph):
    graph = resnet_graph.graph
    assert isinstance(graph, nx.DiGraph) and nx.is_directed_acyclic_graph(graph)
    kinds = {data["kind"] for _, data in graph.nodes(data=True)}
    assert kinds == set(NodeKind)
    for node, data in graph.nodes(data=True):
        assert isinstance(node, str) and not node.isdigit() and data["name"] == node
    modules = {
        data["target"] for _, data in graph.nodes(data=True) if data["kind"] is NodeKind.MODULE
    }
    assert {"conv1", "layer1.0.conv1", "layer3.2.norm2", "fc"} <= modules
    assert graph.nodes["add"]["kind"] is NodeKind.FUNCTION
    assert graph.nodes["layer1_0_conv1"]["spaces"] == ("layer1.0.conv1",)
    assert graph.nodes["layer1_0_conv1"]["shape"] == (2, 16, 8, 8)


def test_merge_and_unmerge_nodes_follow_each_mergeable_merge_point(resnet_graph):
    graph = resnet_graph.graph
    for space in resnet_graph.mergeable_spaces:
        merge, unmerge = f"merge[{space.name}]", f"unmerge[{space.name}]"
        assert graph.nodes[merge]["kind"] is NodeKind.MERGE
        assert list(graph.predecessors(merge)) == [space.merge_point]
        assert list(graph.successors(merge)) == [unmerge]
        assert list(graph.successors(space.merge_point)) == [merge]
    merges = [n for n, d in graph.nodes(data=True) if d["kind"] is NodeKind.MERGE]
    assert len(merges) == len(resnet_graph.mergeable_spaces) == 12


def test_space_lookup_by_index_and_name(resnet_graph):
    assert resnet_graph.space(1) is resnet_graph.space("conv1")
    assert resnet_graph.space(-1).role == "output"
    assert [s.index for s in resnet_graph.spaces] == list(range(len(resnet_graph.spaces)))
    with pytest.raises(IndexError, match="out of range: the graph has 14 spaces"):
        resnet_graph.space(14)
    with pytest.raises(KeyError, match="no space named 'conv9'"):
        resnet_graph.space("conv9")


def test_permutations_are_seeded_and_validated(resnet_graph):
    first, again = resnet_graph.random_permutations(3), resnet_graph.random_permutations(3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = resnet_graph.random_permutations(4)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    with pytest.raises(ValueError, match=r"must reorder 0\.\.15"):
        resnet_graph.permute({"conv1": torch.tensor([0] * 16)})
    model = resnet_graph.model
    before = model.state_dict()["conv1.weight"].clone()
    permuted = resnet_graph.permute(first)
    assert permuted is not model
    assert torch.equal(model.state_dict()["conv1.weight"], before)
    index = first["conv1"]
    assert torch.equal(permuted.state_dict()["conv1.weight"], before[index])


def test_summary_lists_spaces_and_coverage(resnet_graph):
    text = resnet_graph.summary()
    assert str(resnet_graph) == text
    assert "conv1           16     25    mergeable (stream of 4 layers)" in text
    assert "coverage 100.0% (448 of 448 hidden channels)" in text
    assert "ResNet20 (traced): " in text
    assert "coverage 100%" in repr(resnet_graph)


def test_dot_and_png(resnet_graph, tmp_path):
    dot = resnet_graph.to_dot()
    assert dot.startswith("digraph model {") and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == resnet_graph.graph.number_of_edges()
    assert 'label="MERGE\\nconv1 (16)"' in dot
    path = tmp_path / "graph.png"
    assert resnet_graph.draw(path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["graph.png"]  # no temporary file left


def test_draw_into_a_missing_folder_fails_cleanly(resnet_graph, tmp_path):
    with pytest.raises(FileNotFoundError):
        resnet_graph.draw(tmp_path / "missing" / "graph.png")


def test_relative_check_divides_by_the_largest_output_and_trials_must_be_positive(resnet_graph):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = resnet_graph.model.eval()(x).abs().max().item()
    absolute = resnet_graph.check_symmetries(x, trials=2)
    assert resnet_graph.check_symmetries(x, trials=2, relative=True) == absolute / scale
    for trials in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="trials must be a positive integer"):
            resnet_graph.check_symmetries(x, trials=trials)


def test_nodes_read_typed_hold_what_networkx_holds(resnet_graph):
    for key, data in resnet_graph.graph.nodes(data=True):
        node = resnet_graph.node(key)
        assert isinstance(node, gm.graphs.GraphNode) and node.attributes() == data
    conv = resnet_graph.node("layer1_0_conv1")
    assert conv.kind is gm.graphs.NodeKind.MODULE and conv.target == "layer1.0.conv1"
    assert conv.spaces == ("layer1.0.conv1",) and conv.channel_axis == 1
    assert [n.name for n in resnet_graph.nodes()] == list(resnet_graph.graph.nodes)
