"""Feature statistics at every merge point of N models, streamed in float64.

For each mergeable space, the features of the N models at the space's merge
point are concatenated (N*d columns; conv maps give one row per batch element and
position) and summed: count, sum and sum of outer products. Memory does not grow
with the number of samples, and statistics from several processes combine by
adding those three (an ``all_reduce``). Each batch is centred before its outer
product is taken in the features' own precision, then added in float64, so float32
models lose no accuracy to cancellation.

Split by job: ``accumulators`` (the streaming sums), ``reader`` (features at graph
nodes), ``passes`` (the passes over data, and the loop RESET shares).
"""

from graphmerge.statistics.accumulators import ChannelMoments, SpaceStatistics
from graphmerge.statistics.passes import DataPass, collect_moments, collect_statistics
from graphmerge.statistics.reader import FeatureReader, ReadPoint, channel_rows, merge_points

__all__ = [
    "ChannelMoments",
    "DataPass",
    "FeatureReader",
    "ReadPoint",
    "SpaceStatistics",
    "channel_rows",
    "collect_moments",
    "collect_statistics",
    "merge_points",
]
