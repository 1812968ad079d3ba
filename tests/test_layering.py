"""The layering of graphmerge's modules, checked on every import (lazy and type-only too).

Each layer may import only the layers below it; modules within a layer are independent
of each other (grimp's layers contract, as import-linter checks it). A type a lower
layer needs from a higher one is a misplaced type: move it down instead.
"""

import grimp
import networkx as nx
import pytest

# Top to bottom; the modules of one layer do not import each other.
LAYERS = (
    grimp.Layer("__main__"),
    grimp.Layer("cli"),
    grimp.Layer("demo", "connectivity"),
    grimp.Layer("comparison", "plots", "training"),
    grimp.Layer("evaluation", "diagnostics"),
    grimp.Layer("checkpoints", "recipes", "data"),
    grimp.Layer("merge"),
    grimp.Layer("normalization"),
    grimp.Layer("matching_functions", "statistics", "resize", "results"),
    grimp.Layer("least_squares"),
    grimp.Layer("models"),
    grimp.Layer("graphs"),
    grimp.Layer("fold", "weighting"),
    grimp.Layer("batches"),
    grimp.Layer("runtime", "distributed", "_atomic"),
)


def build():
    return grimp.build_graph("graphmerge", include_external_packages=False)


@pytest.fixture(scope="module")
def imports():
    return build()


def illegal(graph) -> set[str]:
    found = graph.find_illegal_dependencies_for_layers(layers=LAYERS, containers={"graphmerge"})
    return {f"{dependency.importer} -> {dependency.imported}" for dependency in found}


def cycles(graph) -> list[list[str]]:
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    return list(nx.simple_cycles(edges))


def test_every_module_belongs_to_a_layer(imports):
    layered = {tail for layer in LAYERS for tail in layer.module_tails}
    tops = {module.split(".")[1] for module in imports.modules if module != "graphmerge"}
    assert tops <= layered, f"modules outside the layers: {sorted(tops - layered)}"


def test_layers_import_only_downwards(imports):
    assert illegal(imports) == set()


def test_no_import_cycles(imports):
    found = cycles(imports)
    assert not found, f"{len(found)} import cycles, the shortest: {min(found, key=len)}"


def test_an_upward_import_fails_the_check():
    imports = build()
    imports.add_import(
        importer="graphmerge.fold",
        imported="graphmerge.merge",
        line_number=1,
        line_contents="from graphmerge.merge import Merger",
    )
    assert illegal(imports) == {"graphmerge.fold -> graphmerge.merge"}
    assert any("graphmerge.fold" in cycle for cycle in cycles(imports))


def test_siblings_in_a_layer_are_independent():
    imports = build()
    imports.add_import(importer="graphmerge.statistics.reader", imported="graphmerge.resize")
    assert illegal(imports) == {"graphmerge.statistics -> graphmerge.resize"}
