"""Low-rank factoring of one Linear weight for the methods svd / asvd / whiten (pure functions).

All three go through the engine's whitened primitive: the best rank-r approximation of W in the norm
||(W - W') S||_F is SVD_r(W S) S^+, folded as U = U_r Sigma_r^{1/2}, V = Sigma_r^{1/2} V_r^T S^+. They differ in S:
- svd:    S = I                                   (plain truncated SVD)
- asvd:   S = diag(mean|x|^alpha)                 (ASVD, Yuan et al. 2023; alpha = 0.5 by default)
- whiten: S S^T = X^T X (Cholesky of the Gram)    (SVD-LLM, Wang et al. 2024): the truncation loss
          sum_{i >= r} sigma_i(W S)^2 equals the calibration output error ||(W - U V) X^T||_F^2 exactly.
The factoring itself is `lowrank_ops.engine.whitened_svd(W, whitening, rank)`. Its folded factors at full rank
truncate to the factors of any smaller rank (U[:, :r], V[:r]), so one SVD serves every candidate rank.
"""

from __future__ import annotations

import torch

from lowrank_ops.engine import InputStatistics, Whitening, as_whitening


def whitening_for(method: str, stats: InputStatistics | None, n_features: int, alpha: float = 0.5,
                  device: torch.device | None = None) -> Whitening:  # fmt: skip
    """The S of `method` from the layer's input statistics (None allowed only for "svd")."""
    if method == "svd":
        return Whitening.identity(n_features)
    if stats is None:
        raise ValueError(f"whitening_for: method={method!r} needs calibration statistics of the layer's inputs")
    if method == "asvd":
        return as_whitening(stats.mean_abs.to(torch.float64).pow(alpha), n_features, device=device)
    if method == "whiten":
        return as_whitening(stats, n_features, gram_method="cholesky", device=device)
    raise ValueError(f"whitening_for: method={method!r} must be one of 'svd', 'asvd', 'whiten'")
