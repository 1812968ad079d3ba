"""One vocabulary of operations for the tracer, the GraphBuilder and the repair points."""

import operator

import torch

from graphmerge.graphs import operations


def test_the_sums_repair_folds_through_are_additions_the_tracer_joins():
    assert operations.SUMS <= operations.ADDITIONS
    assert operations.category("add") == operations.category("iadd") == "add"
    assert operations.category("sub") == "add" and "sub" not in operations.SUMS


def test_transparent_ops_are_one_operand_ops_of_the_tracer():
    assert operations.TRANSPARENT_NAMES <= operations.ONE_OPERAND_NAMES


def test_functions_methods_and_operators_share_names():
    assert operations.name_of(torch.add) == operations.name_of(operator.add) == "add"
    assert operations.name_of("add") == "add"
    assert operations.SUM in operations.SUMS and operations.PRODUCT in operations.BINARY_NAMES
