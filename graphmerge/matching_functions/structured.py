"""Matching structured spaces (attention heads, convolution groups) block by block.

A structured space of width d = H * w may only be permuted as whole blocks (one block
permutation shared by every space of its block index) and freely within each block. Its
merge matrix is therefore block-structured: each merged block takes one block of each
model. ``two_level_assignment`` finds the blocks' partners (the value of a w x w
assignment per pair of blocks, summed over the spaces sharing the index, is the
similarity of an H x H assignment; Verma & Elbayad 2024); ``solve_blocks`` then runs any
features matching function on each merged block's units alone and assembles the
block-diagonal result, and ``block_match`` gives the block index its own (H', N*H) match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from graphmerge.fold import Match, composed_permutation
from graphmerge.graphs import Space
from graphmerge.matching_functions.common import Statistics, assignment


@dataclass(frozen=True)
class BlockStatistics:
    """The statistics of some units of a space (the Statistics protocol)."""

    mean: Tensor
    covariance: Tensor
    correlation: Tensor

    @classmethod
    def of(cls, stats: Statistics, units: Tensor) -> BlockStatistics:
        def pick(matrix: Tensor) -> Tensor:
            return matrix.index_select(0, units).index_select(1, units)

        return cls(stats.mean[units], pick(stats.covariance), pick(stats.correlation))


def two_level_assignment(
    similarities: Sequence[Tensor], blocks: int
) -> tuple[Tensor, list[Tensor]]:
    """The block partner of each block and, per space, the composed partner of each unit.

    ``similarities[s]`` is (d_s, d_s): model A's units (rows) against model B's (columns)
    of space s, d_s = blocks * w_s. For blocks a, b: v_s(a, b) = max over within-block
    permutations sigma of sum_j sim_s[a*w + j, b*w + sigma(j)]; the block partner is
    argmax_pi sum_a sum_s v_s(a, pi(a)), and unit a*w + j of space s is matched with
    pi(a)*w + sigma_s,a,pi(a)(j).

    Example:
        >>> sim = torch.eye(4)[[2, 3, 0, 1]].T  # block 0 of A is block 1 of B
        >>> two_level_assignment([sim], blocks=2)[0].tolist()
        [1, 0]
    """
    value = torch.zeros(blocks, blocks, dtype=torch.float64)
    within: list[list[list[Tensor]]] = []
    for similarity in similarities:
        width = similarity.shape[0] // blocks
        pairs = similarity.double().reshape(blocks, width, blocks, width).transpose(1, 2)
        found = []
        for a in range(blocks):
            row = []
            for b in range(blocks):
                partner = assignment(pairs[a, b])
                value[a, b] += pairs[a, b][torch.arange(width), partner].sum()
                row.append(partner)
            found.append(row)
        within.append(found)
    block_partner = assignment(value)
    composed = [
        composed_permutation(
            block_partner, [found[a][int(block_partner[a])] for a in range(blocks)]
        )
        for found in within
    ]
    return block_partner, composed


def block_partners(
    similarity: Callable[[Space, int], Tensor],
    spaces: Sequence[Space],
    blocks: int,
    num_models: int,
    aligned: bool,
) -> list[Tensor]:
    """Per model, the partner of each of model 0's blocks (model 0: the identity).

    ``similarity(space, i)`` is the (d, d) similarity of model 0's units to model i's;
    ``aligned`` keeps block k with block k (plain averaging).
    """
    partners = [torch.arange(blocks)]
    for model in range(1, num_models):
        if aligned:
            partners.append(torch.arange(blocks))
        else:
            found, _ = two_level_assignment([similarity(s, model) for s in spaces], blocks)
            partners.append(found)
    return partners


def solve_blocks(
    function: Callable[[Statistics], Match],
    stats: Statistics,
    space: Space,
    partners: Sequence[Tensor],
) -> Match:
    """``function`` on the units of each merged block alone (block a of model 0 with block
    partners[i][a] of model i), assembled into one block-diagonal Match of the space."""
    count, blocks = len(partners), len(partners[0])
    width = space.width // blocks
    units = torch.arange(width)
    parts = []
    for block in range(blocks):
        chosen = torch.cat(
            [i * space.width + partners[i][block] * width + units for i in range(count)]
        )
        found = function(BlockStatistics.of(stats, chosen))
        parts.append((chosen, found.merge.double(), found.unmerge.double()))
    rows = sum(merge.shape[0] for _, merge, _ in parts)
    merge_full = torch.zeros(rows, count * space.width, dtype=torch.float64)
    unmerge_full = torch.zeros(count * space.width, rows, dtype=torch.float64)
    start = 0
    for chosen, merge, unmerge in parts:
        stop = start + merge.shape[0]
        merge_full[start:stop, chosen] = merge
        unmerge_full[chosen, start:stop] = unmerge
        start = stop
    return Match(merge_full, unmerge_full)


def block_match(match: Match, space: Space, blocks: int, num_models: int, method: str) -> Match:
    """The (H', N*H) match of a block index from the Match of a space it structures: block
    sums of the merge and unmerge matrices divided by the block width (a merged block that
    averages block b of each model gets 1/N there). A clear error where the match moves
    channels across blocks or changes the block width."""
    width = space.width // blocks
    merged = match.merge.shape[0]
    if merged % width:
        raise ValueError(
            f"{method} merged the structured space {space.name!r} to {merged} channels, not a "
            f"multiple of its block width {width}: heads and groups keep their width (merge "
            "it at its width, or freeze it)"
        )
    merged_blocks = merged // width
    merge = torch.zeros(merged_blocks, num_models * blocks, dtype=torch.float64)
    unmerge = torch.zeros(num_models * blocks, merged_blocks, dtype=torch.float64)
    for model in range(num_models):
        columns = slice(model * space.width, (model + 1) * space.width)
        part = match.merge[:, columns].reshape(merged_blocks, width, blocks, width)
        back = match.unmerge[columns, :].reshape(blocks, width, merged_blocks, width)
        touched = part.abs().sum(dim=(1, 3)) > 0
        if bool((touched.sum(dim=1) > 1).any()) or bool(
            ((back.abs().sum(dim=(1, 3)) > 0).sum(dim=0) > 1).any()
        ):
            raise ValueError(
                f"{method} mixes channels of different blocks (heads or groups) of model "
                f"{model} in the structured space {space.name!r}: a merged block must take one "
                "block of each model. Match such spaces block by block (the built-in methods "
                "do), or freeze them."
            )
        block = slice(model * blocks, (model + 1) * blocks)
        merge[:, block] = part.sum(dim=(1, 3)) / width
        unmerge[block, :] = back.sum(dim=(1, 3)) / width
    return Match(merge, unmerge)
