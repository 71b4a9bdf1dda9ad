"""Decomposition engine: randomized / batched / exact / whitened SVD and streaming input statistics.

Every compression method decomposes matrices through these functions; none calls torch.linalg.svd on its own.
See `lowrank_ops.engine.svd` for the math and the measured accuracy, `lowrank_ops.engine.stats` for the accumulator,
and `lowrank_ops.rank` for the rank rules (param ratio, break-even rank, alignment, discarded energy).
"""

from lowrank_ops.engine.kmeans import INIT_METHODS, KMeansResult, kmeans, kmeans_many
from lowrank_ops.engine.stats import InputStatistics
from lowrank_ops.engine.svd import (
    DEFAULT_SEED,
    SVDResult,
    WhitenedSVD,
    Whitening,
    WhiteningDampingWarning,
    as_whitening,
    default_oversample,
    exact_svd,
    fold_svd,
    randomized_svd,
    randomized_svd_many,
    svd_check_errors,
    whitened_svd,
    whitening_from_gram,
    whitening_from_scale,
)

__all__ = [
    "DEFAULT_SEED",
    "INIT_METHODS",
    "KMeansResult",
    "kmeans",
    "kmeans_many",
    "InputStatistics",
    "SVDResult",
    "WhitenedSVD",
    "Whitening",
    "WhiteningDampingWarning",
    "as_whitening",
    "default_oversample",
    "exact_svd",
    "fold_svd",
    "randomized_svd",
    "randomized_svd_many",
    "svd_check_errors",
    "whitened_svd",
    "whitening_from_gram",
    "whitening_from_scale",
]
