"""Matching functions: pure functions from feature statistics to merge/unmerge matrices.

Signature: ``fn(stats, num_models, **hparams) -> (merge, unmerge)`` where
``merge`` has shape (d', N*d) and ``unmerge`` (N*d, d') for a space of width d
shared by N models (see the "Merge engine" and "Matching functions" issues).
"""
