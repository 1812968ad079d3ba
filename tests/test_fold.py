"""The fold: maps along parameter axes, blocks, repeats and averaging."""

import torch

from graphmerge.fold import AxisMap, SpaceMaps, fold_state_dicts, fold_tensors
from graphmerge.graphs.spaces import ParamAxis


def test_index_map_equals_the_permutation_matrix():
    index = torch.tensor([2, 0, 1])
    matrix = torch.eye(3)[index]
    tensor = torch.randn(4, 3, 5)
    by_index = AxisMap.permutation(index).apply(tensor, 1)
    by_matrix = AxisMap(matrix=matrix).apply(tensor, 1)
    assert torch.equal(by_index, tensor[:, index])
    assert torch.allclose(by_index, by_matrix)


def test_fold_applies_merge_to_outputs_and_unmerge_to_inputs_of_every_model():
    torch.manual_seed(0)
    w = [torch.randn(3, 2), torch.randn(3, 2)]  # (out in space "h", in in space "x")
    merge = torch.randn(4, 6)  # d' = 4 from N * d = 6
    unmerge = torch.randn(4, 4)  # input space: N * d = 4 rows, d' = 4
    maps = {
        "h": SpaceMaps(write=[AxisMap(matrix=merge[:, :3]), AxisMap(matrix=merge[:, 3:])], read=[]),
        "x": SpaceMaps(
            write=[], read=[AxisMap(matrix=unmerge[:2].T), AxisMap(matrix=unmerge[2:].T)]
        ),
    }
    axes = [("h", ParamAxis("w", 0, "out", 0, 3)), ("x", ParamAxis("w", 1, "in", 0, 2))]
    folded = fold_tensors(w, axes, maps)
    expected = merge[:, :3] @ w[0] @ unmerge[:2] + merge[:, 3:] @ w[1] @ unmerge[2:]
    assert torch.allclose(folded, expected, atol=1e-5)


def test_unmapped_parameters_are_averaged_and_counters_kept():
    a, b = torch.randn(5), torch.randn(5)
    assert torch.allclose(fold_tensors([a, b], [], {}), (a + b) / 2)
    counters = [torch.tensor(7), torch.tensor(9)]
    assert fold_tensors(counters, [], {}).item() == 7


def test_blocks_and_repeats_are_folded_in_place():
    # a linear layer reading cat(A (2 channels), B (3 channels)) flattened over 2 positions
    weight = torch.arange(4 * 10, dtype=torch.float32).reshape(4, 10)
    perm_b = torch.tensor([2, 0, 1])
    maps = {"B": SpaceMaps(write=[], read=[AxisMap.permutation(perm_b)])}
    axes = [("A", ParamAxis("w", 1, "in", 0, 2, 2)), ("B", ParamAxis("w", 1, "in", 4, 3, 2))]
    folded = fold_tensors([weight], axes, maps)
    columns_b = weight[:, 4:].reshape(4, 3, 2)[:, perm_b].reshape(4, 6)
    assert torch.equal(folded[:, :4], weight[:, :4])  # A unmapped: left as is
    assert torch.equal(folded[:, 4:], columns_b)


def test_state_dict_fold_follows_aliases():
    w = torch.randn(3, 2)
    perm = torch.tensor([1, 2, 0])
    maps = {"h": SpaceMaps(write=[AxisMap.permutation(perm)], read=[])}
    merged = fold_state_dicts(
        [{"a.weight": w, "b.weight": w}],
        {"a.weight": [("h", ParamAxis("a.weight", 0, "out", 0, 3))]},
        maps,
        aliases={"b.weight": "a.weight"},
    )
    assert torch.equal(merged["a.weight"], w[perm]) and torch.equal(merged["b.weight"], w[perm])


def test_negative_folded_running_variances_are_clamped_with_a_warning():
    import pytest

    variances = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    mixing = torch.tensor([[1.0, -1.0], [0.5, 0.5]])  # a signed map, as cca gives
    maps = {"h": SpaceMaps(write=[AxisMap(matrix=mixing)] * 2, read=[])}
    axes = {"bn.running_var": [("h", ParamAxis("bn.running_var", 0, "out", 0, 2))]}
    with pytest.warns(RuntimeWarning, match=r"bn\.running_var \(1\).*reset_bn"):
        merged = fold_state_dicts([{"bn.running_var": v} for v in variances], axes, maps)
    # row 0: (1 - 2) + (3 - 4) = -2 -> the smallest positive variance, row 1: 1.5 + 3.5
    assert torch.equal(merged["bn.running_var"], torch.tensor([5.0, 5.0]))
