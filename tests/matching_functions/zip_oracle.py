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
    clusters = [[unit] for unit in range(total)]
    budget = [int(beta * (total - merged_width) / num_models + 1e-9)] * num_models
    while len(clusters) > merged_width:
        first, second = divmod(int(sims.reshape(-1).argmax()), len(clusters))
        row, col = min(first, second), max(first, second)
        if sims[row, col] == -math.inf:
            raise ValueError("no admissible pair")
        row_origin, col_origin = clusters[row][0] // width, clusters[col][0] // width
        clusters[row] = sorted(clusters[row] + clusters[col])
        del clusters[col]
        fused = torch.minimum(sims[row], sims[col])
        if alpha > 0:
            fused = fused * alpha
        sims[row, :] = fused
        sims[:, row] = fused
        sims[row, row] = -math.inf
        keep = [k for k in range(sims.shape[0]) if k != col]
        sims = sims[keep][:, keep]
        if alpha <= 0:
            models = {unit // width for unit in clusters[row]}
            for k, cluster in enumerate(clusters):
                if models & {unit // width for unit in cluster}:
                    sims[row, k] = sims[k, row] = -math.inf
        if row_origin == col_origin:
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
