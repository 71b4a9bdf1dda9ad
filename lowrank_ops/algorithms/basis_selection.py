"""Application-specific basis selection: score the SVD bases of W on target data, keep the best under a budget.

Bases. A full-rank factorisation from the engine (`whitened_svd(W, S, min(m, n))`, folded U = A Sigma^{1/2},
V = Sigma^{1/2} B^T S^+ for W S = A Sigma B^T) is read as W = sum_i s_i u_i v_i^T with s = 1 and u_i, v_i the i-th
column of U and row of V. The split of a basis' scale between s_i, u_i and v_i changes none of the scores below.
The columns of A are orthonormal, so for every S the u_i are orthogonal.

Scores of basis i on target inputs X (T, n), Gram G = X^T X, next-token loss L:
- energy:  e_i = s_i^2 ||u_i||^2 v_i^T G v_i = ||s_i u_i v_i^T X^T||_F^2, the target output energy of basis i alone.
           Because the u_i are orthogonal, dropping a set D of bases costs EXACTLY sum_{i in D} e_i of target output
           error ||(W - W_kept) X^T||_F^2 (no cross terms), so a per-layer greedy on e is optimal for that error.
           With basis "whiten" and G the same Gram, v_i^T G v_i = sigma_i and e_i = sigma_i^2: selection by energy
           then IS truncation, and the allocation equals the "loss" allocator's (an identity the tests check).
- taylor:  |s_i dL/ds_i| with L the mean loss over the scoring windows: the first-order change of L when basis i is
           removed (s_i -> 0). In loss units, so it compares bases across layers directly.
- fisher:  mean_b (s_i dL_b/ds_i)^2 over backward batches b: the empirical-Fisher (Gauss-Newton) estimate of the
           second-order loss change, which stays informative where the mean gradient cancels between batches.

Selection. Each layer's bases are sorted by score, descending, and `lowrank_ops.algorithms.allocation.
allocate_by_loss` receives the sorted scores as the layer's "energies": its greedy over aligned blocks of `align`
bases, with per-basis cost m + n and "go dense" where a layer would reach break-even, is the global selection
(optimal on the aligned grid because the sorted scores make each layer's gains decrease). Energy scores are
allocated on each layer's fraction (relative=True, as the loss allocator does: target output energies of
different layers are not in comparable units); gradient scores on their absolute sum (they are loss changes).

New bases (EoRA-style): after pruning, the target residual dW = W - W_kept is fitted by the engine's whitened SVD
in the eigenspace of the target Gram (`algorithms.eora.residual_svd`, method "eora"): its leading directions are
the rank-k correction that minimises ||(dW - U_new V_new) X^T||_F on target inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lowrank_ops.algorithms.allocation import allocate_by_loss, layer_cost, max_factored_rank
from lowrank_ops.algorithms.eora import residual_svd

Shape = tuple[int, int]
SCORES = ("energy", "taylor", "fisher")


def _check_factors(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None, where: str) -> None:
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]:
        raise ValueError(f"{where}: u.shape={tuple(u.shape)} must be (m, k) and v.shape={tuple(v.shape)} (k, n)")
    if s is not None and tuple(s.shape) != (u.shape[1],):
        raise ValueError(f"{where}: s.shape={tuple(s.shape)} must be ({u.shape[1]},)")


def energy_scores(u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """e_i = s_i^2 ||u_i||^2 v_i^T G v_i for u (m, k), v (k, n), G (n, n), s (k,) (default ones); float64 (k,)."""
    where = "energy_scores"
    _check_factors(u, v, s, where)
    n = v.shape[1]
    if tuple(gram.shape) != (n, n):
        raise ValueError(f"{where}: gram.shape={tuple(gram.shape)} must be ({n}, {n}) for v.shape={tuple(v.shape)}")
    device = gram.device
    v64 = v.detach().to(device, torch.float64)
    u_norm2 = u.detach().to(device, torch.float64).square().sum(0)
    quad = ((v64 @ gram.to(torch.float64)) * v64).sum(1)
    scores = u_norm2 * quad.clamp_min(0)
    if s is not None:
        scores = scores * s.detach().to(device, torch.float64).square()
    return scores


class GradientScores:
    """Accumulates s * dL_b/ds over backward batches b for one layer; `taylor()` and `fisher()` read the scores.

    update(s, grad): s, grad (k,) of one batch whose loss is that batch's mean loss; taylor = |mean_b s g_b| (the
    first-order change of the mean loss over all batches, batches weighted alike), fisher = mean_b (s g_b)^2."""

    def __init__(self, k: int):
        self.k = k
        self.batches = 0
        self._sum = torch.zeros(k, dtype=torch.float64)
        self._sum_sq = torch.zeros(k, dtype=torch.float64)

    def update(self, s: torch.Tensor, grad: torch.Tensor) -> None:
        if tuple(s.shape) != (self.k,) or tuple(grad.shape) != (self.k,):
            raise ValueError(f"GradientScores.update: s.shape={tuple(s.shape)}, grad.shape={tuple(grad.shape)} must "
                             f"both be ({self.k},)")  # fmt: skip
        sg = (s.detach().double() * grad.detach().double()).cpu()
        self._sum += sg
        self._sum_sq += sg.square()
        self.batches += 1

    def _require(self) -> None:
        if self.batches == 0:
            raise ValueError("GradientScores: no batch accumulated; call update(s, grad) first")

    def taylor(self) -> torch.Tensor:
        self._require()
        return (self._sum / self.batches).abs()

    def fisher(self) -> torch.Tensor:
        self._require()
        return self._sum_sq / self.batches

    def score(self, kind: str) -> torch.Tensor:
        if kind == "taylor":
            return self.taylor()
        if kind == "fisher":
            return self.fisher()
        raise ValueError(f"GradientScores.score: kind={kind!r} must be 'taylor' or 'fisher'")


@dataclass
class Selection:
    """Per layer: the rank kept (None: the layer stays dense) and the kept basis indices, best score first
    (None for a dense layer)."""

    ranks: list[int | None]
    kept: list[torch.Tensor | None]


def selection_ratio(shapes: Sequence[Shape], ratio: float, new_rank: int) -> float:
    """The param ratio left for kept bases when every layer reserves `new_rank` new bases (costing m + n each)."""
    total = sum(m * n for m, n in shapes)
    reserved = new_rank * sum(m + n for m, n in shapes)
    left = ratio - reserved / total
    if left <= 0:
        raise ValueError(
            f"selection_ratio: new_rank={new_rank} new bases per layer cost {reserved / total:.4f} of the parameters, "
            f"which leaves nothing of param_ratio={ratio} for the kept bases"
        )
    return left


def select_bases(
    shapes: Sequence[Shape], scores: Sequence[torch.Tensor], ratio: float, align: int = 16, relative: bool = True
) -> Selection:
    """Keep the highest-scoring bases of each layer under the global budget sum_l cost_l <= ratio sum_l m_l n_l.

    scores[l] (k_l,) >= 0 for the k_l bases of layer l (any order). The allocation is `allocate_by_loss` on each
    layer's scores sorted descending (module docstring); relative=True weighs each layer's fraction of its total
    score, relative=False the absolute scores."""
    if len(shapes) != len(scores):
        raise ValueError(f"select_bases: {len(shapes)} shapes but {len(scores)} score vectors")
    orders, sorted_scores = [], []
    for (m, n), score in zip(shapes, scores, strict=True):
        score = score.detach().double().cpu()
        if score.dim() != 1 or score.numel() != min(m, n):
            raise ValueError(f"select_bases: a layer of shape ({m}, {n}) needs {min(m, n)} scores (one per basis of "
                             f"its full-rank factorisation), got shape {tuple(score.shape)}")  # fmt: skip
        if not bool(torch.isfinite(score).all()) or bool((score < 0).any()):
            raise ValueError(f"select_bases: scores of the layer of shape ({m}, {n}) must be finite and >= 0")
        # stable sort: equal scores keep the SVD order (leading singular values first)
        order = torch.sort(score, descending=True, stable=True).indices
        orders.append(order)
        sorted_scores.append(score[order])
    ranks = allocate_by_loss(shapes, sorted_scores, ratio, align, relative=relative)
    kept = [None if rank is None else order[:rank] for order, rank in zip(orders, ranks, strict=True)]
    return Selection(ranks, kept)


def new_basis_count(shape: Shape, kept_rank: int, new_rank: int, align: int) -> int:
    """How many of `new_rank` new bases a layer keeping `kept_rank` bases takes: all, unless the layer would reach
    the largest aligned rank below break-even (then what fits, maybe 0)."""
    m, n = shape
    return max(0, min(new_rank, max_factored_rank(m, n, align) - kept_rank))


def new_bases(W: torch.Tensor, W_kept: torch.Tensor, stats, rank: int):
    """Folded factors U (m, rank), V (rank, n) of the target residual W - W_kept in the eigenspace of the target
    Gram (`stats`: an InputStatistics with a Gram, a Gram (n, n) or an eigh Whitening), and the singular values of
    the whitened residual: `algorithms.eora.residual_svd(..., method="eora")`."""
    return residual_svd(W, W_kept, stats, rank, "eora")


def kept_cost(shapes: Sequence[Shape], ranks: Sequence[int | None]) -> int:
    return sum(layer_cost(m, n, r) for (m, n), r in zip(shapes, ranks, strict=True))
