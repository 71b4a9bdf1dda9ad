"""SWSC: shared weight for similar channels, plus a low-rank residual (pure functions).

Zeng et al. 2025, "SWSC: Shared Weight for Similar Channel in LLM" (arXiv:2501.08631). A layer W (m, n) = (out, in)
is replaced by K shared channels and a rank-r correction:

- rows shared (output channels): codebook C (K, n), index l (m,) in [0, K):  W ~= C[l]        (row i is C[l(i)])
- columns shared (input channels): codebook C (m, K), index l (n,) in [0, K): W ~= C[:, l]    (column f is C[:, l(f)])

    y = W_shared x + U (V x) + b,   U V ~= E = W - W_shared  (rank r, `residual_svd` of the EoRA module).

The codebook is the engine's k-means (`lowrank_ops.engine.kmeans`) of the channels. For rows shared, the output error
of row i over calibration inputs is E ||(w_i - c) . x||^2 = (w_i - c)^T E[x x^T] (w_i - c); keeping the diagonal
gives per-feature weights w_f = E[x_f^2], and we use ASVD's statistic (mean |x_f|)^2 in its place (always collected,
no Gram needed), so input channels that carry large activations are matched more closely ("activation-weighted").
For columns shared the same diagonal argument weights each POINT (column f) by E[x_f^2]: ||(W_:f - c) x_f||^2
averages to E[x_f^2] ||W_:f - c||^2, so the engine's per-point weights (p-weighted centroids) get (mean |x_f|)^2.

The residual is fitted to the shared weight the module will hold (the codebook rounded to the layer's dtype) by
one of the EoRA module's residual methods: "svd" (plain SVD of E, as in the paper), "eora" (whitened by the
calibration Gram: minimises the calibration output error) or "lqer" (diagonal mean-|x| scaling).

Storage (`storage_bits`): codebook K x (n or m) values + index (m or n) entries + factors r (m + n) values, at the
widths the module stores them (16-bit values for fp16 / bf16 layers, int32 indices: the kernels read int32; a
ceil(log2 K)-bit packed index would save (32 - ceil(log2 K)) / n bits per weight, under 0.05 at n = 576).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lowrank_ops.engine.svd import _check_matrix

SHARED_DIMS = ("rows", "columns")
INDEX_BITS = 32
"""Stored index width: the kernels gather with int32 indices."""


class SharedChannels(NamedTuple):
    """Shared channels of one matrix: codebook (K, n) for rows / (m, K) for columns, index int32 (m,) / (n,),
    and the k-means inertia (the weighted squared error of W_shared, float)."""

    codebook: torch.Tensor
    index: torch.Tensor
    shared: str
    inertia: float


def check_shared(shared, where: str) -> str:
    if shared not in SHARED_DIMS:
        raise ValueError(f"{where}: shared={shared!r} must be one of {list(SHARED_DIMS)}")
    return shared


def channel_count(m: int, n: int, shared: str) -> int:
    """Number of channels that share the codebook: m output rows, or n input columns."""
    return m if shared == "rows" else n


def storage_bits(m: int, n: int, clusters: int, rank: int, shared: str, value_bits: int = 16) -> int:
    """Bits stored for a (m, n) layer: codebook + index + residual factors (bias excluded)."""
    entry = n if shared == "rows" else m
    return value_bits * (clusters * entry + rank * (m + n)) + INDEX_BITS * channel_count(m, n, shared)


def bits_per_weight(m: int, n: int, clusters: int, rank: int, shared: str, value_bits: int = 16) -> float:
    return storage_bits(m, n, clusters, rank, shared, value_bits) / (m * n)


def clusters_for_bits(m: int, n: int, bits: float, rank: int, shared: str, value_bits: int = 16,
                      where: str = "clusters_for_bits") -> int:  # fmt: skip
    """The largest K whose storage fits `bits` per weight of the (m, n) layer with a rank-`rank` residual, capped
    at the number of channels. Raises when not even K = 1 fits (the residual or the index alone is over budget)."""
    entry = n if shared == "rows" else m
    budget = bits * m * n - INDEX_BITS * channel_count(m, n, shared) - value_bits * rank * (m + n)
    clusters = min(math.floor(budget / (value_bits * entry)), channel_count(m, n, shared))
    if clusters < 1:
        floor = bits_per_weight(m, n, 1, rank, shared, value_bits)
        raise ValueError(
            f"{where}: {bits} bits per weight cannot hold one cluster plus a rank-{rank} residual for a ({m}, {n}) "
            f"layer (that needs {floor:.3f}); lower the rank or raise the bits"
        )
    return clusters


def check_clusters(clusters, m: int, n: int, shared: str, where: str) -> int:
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"{where}: clusters={clusters!r} must be an int >= 1")
    channels = channel_count(m, n, shared)
    if clusters > channels:
        raise ValueError(
            f"{where}: clusters={clusters} is larger than the {channels} {shared} of a ({m}, {n}) weight "
            f"(shared={shared!r}); use at most {channels}"
        )
    return clusters


def share_channels(
    W: torch.Tensor,
    clusters: int,
    *,
    shared: str = "rows",
    importance: torch.Tensor | None = None,
    n_iter: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
) -> SharedChannels:
    """k-means the channels of W (m, n) into `clusters` shared ones (module docstring).

    importance: None, or per-input-channel weights (n,) >= 0 (e.g. (mean |x|)^2): feature weights of the distance
        for shared rows, point weights (weighted centroids) for shared columns (module docstring). The codebook is
        float32 (float64 for float64 W) on W's device.
    """
    from lowrank_ops.engine import kmeans

    where = "share_channels"
    check_shared(shared, where)
    _check_matrix(W, where, name="W", batched=False)
    m, n = W.shape
    check_clusters(clusters, m, n, shared, where)
    points = W if shared == "rows" else W.mT
    weights = None if importance is None else importance.to(device=W.device, dtype=torch.float32)
    by_feature, by_point = (weights, None) if shared == "rows" else (None, weights)
    result = kmeans(points, clusters, n_iter=n_iter, tol=tol, weights=by_feature, point_weights=by_point, seed=seed)
    codebook = result.centroids if shared == "rows" else result.centroids.mT.contiguous()
    return SharedChannels(codebook, result.labels.to(torch.int32), shared, float(result.inertia))


def shared_weight(codebook: torch.Tensor, index: torch.Tensor, shared: str) -> torch.Tensor:
    """W_shared (m, n): codebook rows gathered by index (rows), or codebook columns (columns)."""
    check_shared(shared, "shared_weight")
    index = index.to(torch.int64)
    return codebook.index_select(0, index) if shared == "rows" else codebook.index_select(1, index)
