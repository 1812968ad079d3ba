"""A naive, obviously-correct ZipIt! greedy: the oracle of the fast implementation.

Like the published code it removes the fused row and column (copying the whole
matrix) at every step; the semantics are those of DESIGN.md section 4.
"""

import math

import torch


def oracle_clusters(
    correlation: torch.Tensor, num_models: int, merged_width: int, alpha: float, beta: float
) -> torch.Tensor:
    """Cluster label of every unit, clusters numbered by their smallest unit."""
    total = correlation.shape[0]
    width = total // num_models
    sims = correlation.clone().double()
    sims.fill_diagonal_(-math.inf)
    free = sims.clone()  # the same without the budgets' blocks, for when they block every pair
    clusters = [[unit] for unit in range(total)]
    budget = [int(beta * (total - merged_width) / num_models + 1e-9)] * num_models
    budgets_apply = True
    while len(clusters) > merged_width:
        if budgets_apply and sims.max() == -math.inf:
            sims, budgets_apply = free, False  # the budgets are lifted
        first, second = divmod(int(sims.reshape(-1).argmax()), len(clusters))
        row, col = min(first, second), max(first, second)
        if sims[row, col] == -math.inf:
            raise ValueError("no admissible pair")
        row_origin, col_origin = clusters[row][0] // width, clusters[col][0] // width
        clusters[row] = sorted(clusters[row] + clusters[col])
        del clusters[col]
        keep = [k for k in range(sims.shape[0]) if k != col]
        fused_matrices = []
        for matrix in (sims, free) if budgets_apply else (sims,):
            fused = torch.minimum(matrix[row], matrix[col])
            if alpha > 0:
                fused = fused * alpha
            matrix[row, :] = fused
            matrix[:, row] = fused
            matrix[row, row] = -math.inf
            matrix = matrix[keep][:, keep]
            if alpha <= 0:
                models = {unit // width for unit in clusters[row]}
                for k, cluster in enumerate(clusters):
                    if models & {unit // width for unit in cluster}:
                        matrix[row, k] = matrix[k, row] = -math.inf
            fused_matrices.append(matrix)
        sims = fused_matrices[0]
        free = fused_matrices[1] if budgets_apply else sims
        if budgets_apply and row_origin == col_origin:
            budget[row_origin] -= 1
            if budget[row_origin] <= 0:
                same = [k for k, c in enumerate(clusters) if c[0] // width == row_origin]
                for i in same:
                    for j in same:
                        sims[i, j] = -math.inf
    labels = torch.empty(total, dtype=torch.long)
    for label, cluster in enumerate(clusters):
        labels[cluster] = label
    return labels
