"""Streaming moments in float64: the accumulators every statistics pass fills.

``SpaceStatistics`` sums the concatenated features of N models at a merge point
(count, sum, sum of outer products: what matching functions read); ``ChannelMoments``
keeps per-channel mean and variance (and optionally the covariance) with Chan et al.'s
parallel update (what REPAIR reads). Both combine across torch.distributed processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from graphmerge import distributed

STD_EPS = 1e-8


@dataclass
class SpaceStatistics:
    """Streaming moments of the concatenated features (N*d) of one space.

    ``count`` samples, ``total`` = sum of features, ``outer`` = sum of outer products.
    """

    count: int
    total: Tensor
    outer: Tensor

    @classmethod
    def empty(cls, width: int, device: torch.device | str = "cpu") -> SpaceStatistics:
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        return cls(0, zeros, torch.zeros(width, width, dtype=torch.float64, device=device))

    def update(self, features: Tensor) -> None:
        """Add rows of ``features`` (samples x N*d)."""
        self.update_blocks([features.T.contiguous()])

    def update_blocks(self, blocks: Sequence[Tensor]) -> None:
        """Add samples given channel-major, one (d_i x samples) block per model.

        The blocks are centred in place (pass tensors you own). Outer products are
        taken in the features' precision on centred values, block by block (the
        lower triangle mirrored), and accumulated in float64.
        """
        samples = blocks[0].shape[1]
        # sum x x^T = sum c c^T + shift r^T + r shift^T + n shift shift^T, with c = x - shift
        # and r = sum c (not exactly 0 in floating point): exact for any shift.
        shifts = [block.mean(dim=1) for block in blocks]
        for block, shift in zip(blocks, shifts, strict=True):
            block -= shift[:, None]
        starts = [0]
        for block in blocks:
            starts.append(starts[-1] + block.shape[0])
        for i, left in enumerate(blocks):
            rows = slice(starts[i], starts[i + 1])
            for j in range(i + 1):
                product = (left @ blocks[j].T).double()
                columns = slice(starts[j], starts[j + 1])
                self.outer[rows, columns] += product
                if i != j:
                    self.outer[columns, rows] += product.T
        shift = torch.cat(shifts).double()
        residual = torch.cat([block.sum(dim=1) for block in blocks]).double()
        half = residual + samples / 2 * shift  # shift r^T + r shift^T + n shift shift^T
        self.outer.addr_(shift, half).addr_(half, shift)
        self.total += residual + samples * shift
        self.count += samples

    @property
    def finite(self) -> bool:
        """False once a NaN or Inf feature has been added (it reaches the sums)."""
        return bool(
            torch.isfinite(self.total).all() and torch.isfinite(self.outer.diagonal()).all()
        )

    def __add__(self, other: SpaceStatistics) -> SpaceStatistics:
        return SpaceStatistics(
            self.count + other.count, self.total + other.total, self.outer + other.outer
        )

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> Tensor:
        mean = self.mean
        return self.outer / self.count - torch.outer(mean, mean)

    @property
    def std(self) -> Tensor:
        """Standard deviations, clamped at 1e-8 so dead units give no NaN."""
        return self.covariance.diagonal().clamp_min(0).sqrt().clamp_min(STD_EPS)

    @property
    def correlation(self) -> Tensor:
        std = self.std
        return self.covariance / torch.outer(std, std)

    def to(self, device: torch.device | str) -> SpaceStatistics:
        return SpaceStatistics(self.count, self.total.to(device), self.outer.to(device))

    def all_reduce(self) -> None:
        """Sum count, total and outer over the processes of torch.distributed, in place."""
        distributed.all_reduce_sum([self.total, self.outer])
        self.count = distributed.total(self.count)


@dataclass
class ChannelMoments:
    """Streaming per-channel mean and variance (float64; Chan et al.'s parallel update).

    ``count`` samples per channel, ``mean`` and ``m2`` (sum of squared deviations);
    with ``comoment`` (created by ``empty(..., covariance=True)``) also the sum of
    products of deviations between channels, for the full covariance.
    """

    count: int
    mean: Tensor
    m2: Tensor
    comoment: Tensor | None = None

    @classmethod
    def empty(
        cls, width: int, device: torch.device | str = "cpu", covariance: bool = False
    ) -> ChannelMoments:
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        comoment = torch.zeros(width, width, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone(), comoment if covariance else None)

    def update(self, rows: Tensor) -> None:
        """Add samples given channel-major (channels x samples)."""
        samples = rows.shape[1]
        if samples == 0:
            return
        rows = rows.double()
        variance, mean = torch.var_mean(rows, dim=1, correction=0)
        total = self.count + samples
        delta = mean - self.mean
        weight = self.count * samples / total
        if self.comoment is not None:
            centred = rows - mean[:, None]
            self.comoment = self.comoment + centred @ centred.T + torch.outer(delta, delta) * weight
        self.mean = self.mean + delta * (samples / total)
        self.m2 = self.m2 + variance * samples + delta.square() * weight
        self.count = total

    def all_reduce(self) -> None:
        """Combine the moments of the processes of torch.distributed, in place.

        With n_r, mean_r, m2_r per rank: mean = sum n_r mean_r / n and
        m2 = sum m2_r + n_r (mean_r - mean)^2 (the comoment with outer products).
        """
        if not distributed.active():
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean.device)
        weighted = self.mean * self.count
        distributed.all_reduce_sum([count, weighted])
        mean = weighted / count.clamp_min(1)
        delta = self.mean - mean
        self.m2 = self.m2 + delta.square() * self.count
        sums = [self.m2]
        if self.comoment is not None:
            self.comoment = self.comoment + torch.outer(delta, delta) * self.count
            sums.append(self.comoment)
        distributed.all_reduce_sum(sums)
        self.mean = mean
        self.count = int(count.item())

    @property
    def covariance(self) -> Tensor:
        """The population covariance between channels (needs ``covariance=True``)."""
        if self.comoment is None:
            raise ValueError("these moments were collected without covariance=True")
        return self.comoment / self.count

    @property
    def variance(self) -> Tensor:
        return self.m2 / self.count

    @property
    def std(self) -> Tensor:
        """Population standard deviation per channel (not clamped: 0 for a constant unit)."""
        return self.variance.clamp_min(0).sqrt()

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.mean).all() and torch.isfinite(self.m2).all())
