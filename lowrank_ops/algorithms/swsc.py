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

from typing import NamedTuple

import torch

from lowrank_ops.engine.svd import _check_matrix
from lowrank_ops.formats import check_clusters, check_shared


class SharedChannels(NamedTuple):
    """Shared channels of one matrix: codebook (K, n) for rows / (m, K) for columns, index int32 (m,) / (n,),
    and the k-means inertia (the weighted squared error of W_shared, float)."""

    codebook: torch.Tensor
    index: torch.Tensor
    shared: str
    inertia: float


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
