"""Decomposition engine: batched, weighted, chunked k-means (Lloyd) with k-means++ initialisation, GPU first.

SWSC (shared weight for similar channels) replaces the rows (output channels) or the columns (input channels) of a
weight matrix by k shared representatives; this module finds them. Points are the rows of X (N, d): pass W (m, n)
to share rows (N = m points of d = n features) and W.T to share columns. Leading dims are a batch: X (..., N, d)
clusters several same-shape matrices at once, with independent per-matrix results.

Objective
---------
With per-feature importance weights w (d,) >= 0 (None: w = 1), labels l(i) in [0, k) and centroids c_j (d,):

    inertia = sum_i || (x_i - c_{l(i)}) * sqrt(w) ||^2 = sum_i sum_f w_f (x_if - c_{l(i), f})^2.

For rows shared and inputs x, ||(w_i - c) x||^2 averaged over tokens is (w_i - c)^T E[x x^T] (w_i - c); keeping the
diagonal gives the weights w_f = E[x_f^2] (or (mean|x_f|)^2 from ASVD's statistic), so channels that carry large
activations are matched more closely.

The centroids are still plain means under this weighted distance. For fixed labels the objective separates over
clusters and features: cluster j contributes sum_f w_f sum_{i in j} (x_if - c_jf)^2, each term a 1-D least-squares
problem in c_jf whose minimiser is the mean of x_if over the cluster (for w_f > 0; for w_f = 0 every value is optimal
and the mean is kept). So w changes the assignment step (and the initialisation and re-seeding, which use the same
distance) but not the update step.

Per-point weights p (N,) >= 0 (`point_weights`; None: p = 1) weigh the points instead of the features:

    inertia = sum_i p_i || (x_i - c_{l(i)}) * sqrt(w) ||^2.

For shared columns the points are W's columns and ||(w_:j - c) x_j||^2 averaged over tokens is E[x_j^2] ||w_:j - c||^2,
so p_j = E[x_j^2] (or (mean|x_j|)^2) weighs each input channel by the activations it meets. The assignment is
unchanged (p_i scales all of point i's distances alike); the update becomes the p-weighted mean (the minimiser of
sum_{i in j} p_i (x_i - c)^2; a cluster whose points all have p = 0 keeps their plain mean); k-means++ draws the first
centre with probability proportional to p and the next ones to p D^2; re-seeding picks the points of largest p D^2.

Algorithm
---------
1. Centre: X <- X - mean_i(x_i) per matrix (k-means is translation invariant; this shrinks ||x||^2 and with it the
   cancellation error of the expanded distance below). Centroids are shifted back on return.
2. Initialise: "k-means++" (Arthur & Vassilvitskii 2007: first centre uniform, then each next centre drawn with
   probability proportional to D^2(x), the weighted squared distance to the nearest centre chosen so far),
   "greedy-k-means++" (draw 2 + floor(ln k) candidates per step, keep the one that lowers sum_i D^2 most, as
   scikit-learn does), "random" (k distinct points) or an explicit (k, d) / (..., k, d) tensor.
3. Lloyd: assign each point to its nearest centroid, move each centroid to the mean of its points, repeat up to
   `n_iter` times; a matrix stops when its inertia improved by at most tol x its previous inertia (tol = 0: at a fixed
   point). Inertia never increases: the update minimises it for fixed labels, the assignment for fixed centroids.
4. Empty clusters: after an assignment, the empty clusters of a matrix (in index order) are moved onto the points
   farthest from their own centroid (largest distance first, ties by point index). The moved point's old cluster
   keeps its mean for this step, and the next assignment gives the point distance 0, so the inertia still does not
   increase (with point weights the farthest means largest p_i D^2); re-seeding repeats at every step a cluster is
   empty (e.g. when X has fewer than k distinct points).

Distances and memory
--------------------
Assignment uses ||x - c||_w^2 = ||x_w||^2 - 2 x_w . c_w + ||c_w||^2 with x_w = x * sqrt(w), c_w = c * sqrt(w): one
(chunk, k) GEMM per chunk of rows (labels come from argmin_j (||c_w,j||^2 - 2 x_w . c_w,j), which does not need
||x_w||^2). Nothing (N, k, d)-sized is ever formed. Memory per matrix: the centred fp32 copy of X, its weighted copy
(only when w is given), a float64 copy for the cluster sums, and working blocks each bounded by _CHUNK_BYTES = 256 MiB
summed over the batch:
- the (chunk, k) fp32 distance block: chunk = `chunk_size`, or the most rows that fit (256 MiB / (4 B k)).
  11008 x 4096 with k = 1024 (SwiGLU up/gate of a 7B model): the whole (11008, 1024) block is 45 MB, so a matrix runs
  each assignment as one GEMM; a batch of 8 such matrices runs in 2 chunks of 8192 rows;
- the update's (k_chunk, N) float64 one-hot block (90 MB for the shape above, one block);
- the final inertia's (chunk, d) float64 difference block (8192 rows for d = 4096).
For that shape, weighted: 180 MB + 180 MB + 360 MB of copies + < 0.5 GB of blocks; measured on CPU, one call with
n_iter=1 raised the peak RSS by 1.1 GB (a batch of 8 needs about 8 x 0.7 GB + 0.8 GB).

Precision and determinism
-------------------------
Distances run in float32 (float64 for float64 inputs; fp16/bf16 are upcast); on CUDA the GEMMs run in IEEE fp32
whatever torch's TF32 setting (TF32 would round x to 10 mantissa bits and flip near assignments). The expanded
distance has an absolute error ~ eps (||x_w||^2 + ||c_w||^2), so a label can differ from an exact computation only
where two centroids are that close to equidistant. The reported inertia is recomputed from the differences
x - c_{l(i)} (squared and summed in float64), not from the expansion.
- Cluster sums come from one-hot GEMMs (onehot (k, N) @ X) in float64, not atomics (index_add_ on CUDA is
  non-deterministic): the one-hot x fp32 products are exact and the fp64 sums round ~1e-16, so the fp32 means do not
  depend on the BLAS kernel (on CPU, MKL changes its summation order with the alignment of a batch element) and are
  bitwise reproducible. The fp64 GEMM costs what the fp32 distance GEMM does on H100/H200 (fp64 tensor cores); on
  GPUs with slow fp64 (consumer parts, 1/64 rate) it dominates an iteration.
- Random numbers come from a torch.Generator on X's device seeded with `seed` (CPU and CUDA streams differ, so CPU
  and GPU results for the same seed do too). Every matrix of a batch uses the same random numbers (a single matrix
  run with the same seed draws the same ones) and stops on its own convergence test, so batched, grouped
  (`kmeans_many`) and single calls agree (bitwise on CPU in the tests; a distance GEMM that rounds differently in
  another batch layout could flip only a near-tie).
- Every chunked step splits only the output rows of a GEMM (each row's reduction is unchanged), so `chunk_size`
  changes memory, not results (bitwise where the BLAS computes a row independently of the block's row count, as on
  CPU; cuBLAS may pick another kernel for another block shape, which moves distances by rounding only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from lowrank_ops.engine.svd import DEFAULT_SEED, _check_finite, _check_int, _compute_dtype, named_matrices

_CHUNK_BYTES = 256 << 20
"""Bound on each working block (distances (B, chunk, k), one-hot (B, k_chunk, N), differences (B, chunk, d)) in
bytes, summed over the batch: small next to an 80 GB GPU, large enough that one 11008 x 4096, k = 1024 matrix runs
each step as a single GEMM."""

INIT_METHODS = ("k-means++", "greedy-k-means++", "random")


class KMeansResult(NamedTuple):
    """k-means of X (..., N, d) into k clusters.

    centroids: (..., k, d) float32 (float64 for float64 X), the mean of each cluster's points (an empty cluster, only
        possible when X has fewer than k distinct points, keeps the point it was re-seeded on).
    labels: (..., N) int64 in [0, k), each point's nearest centroid (in the weighted distance).
    inertia: (...,) float64, sum_i p_i ||(x_i - c_{l(i)}) * sqrt(w)||^2 (p = 1 without point weights), computed
        from the differences.
    n_iter: (...,) int64, Lloyd updates run per matrix (<= the n_iter cap; 0 for k == N or n_iter=0).
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: torch.Tensor
    n_iter: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------


def _check_points(X, where: str, batched: bool = True) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{where}: X must be a torch.Tensor, got {type(X).__name__}")
    if not X.is_floating_point():
        raise TypeError(f"{where}: X.dtype={X.dtype} must be a real floating dtype")
    if X.ndim < 2 or (not batched and X.ndim != 2):
        rule = "(..., N, d)" if batched else "(N, d)"
        raise ValueError(f"{where}: X.shape={tuple(X.shape)} must be {rule} (points are rows)")
    if X.numel() == 0:
        raise ValueError(f"{where}: X.shape={tuple(X.shape)} has an empty dimension")
    _check_finite(X, where, "X")


def _check_k(k, N: int, shape: tuple[int, ...], where: str) -> int:
    _check_int(k, where, "k", 1)
    if k > N:
        raise ValueError(f"{where}: k={k} must be <= N={N}, the number of points (rows of X.shape={shape})")
    return k


def _check_weights(weights, batch: tuple[int, ...], d: int, where: str) -> torch.Tensor | None:
    """None, or w broadcastable to (B, d): shape (d,) or batch + (d,); finite, >= 0, not all zero per matrix."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"{where}: weights must be None or a floating torch.Tensor, got {type(weights).__name__}")
    if tuple(weights.shape) not in ((d,), (*batch, d)):
        allowed = f"({d},)" if not batch else f"({d},) or {(*batch, d)}"
        raise ValueError(f"{where}: weights.shape={tuple(weights.shape)} must be {allowed} (one weight per feature)")
    _check_finite(weights, where, "weights")
    if bool((weights < 0).any()):
        raise ValueError(f"{where}: weights has negative entries (min {float(weights.min()):.3e}); they must be >= 0")
    if bool((weights.reshape(-1, d) == 0).all(dim=-1).any()):
        raise ValueError(f"{where}: weights are all zero for some matrix (every distance would be 0)")
    return weights


def _check_point_weights(point_weights, batch: tuple[int, ...], N: int, where: str) -> torch.Tensor | None:
    """None, or p broadcastable to (B, N): shape (N,) or batch + (N,); finite, >= 0, not all zero per matrix."""
    if point_weights is None:
        return None
    if not isinstance(point_weights, torch.Tensor) or not point_weights.is_floating_point():
        raise TypeError(f"{where}: point_weights must be None or a floating torch.Tensor, got "
                        f"{type(point_weights).__name__}")  # fmt: skip
    if tuple(point_weights.shape) not in ((N,), (*batch, N)):
        allowed = f"({N},)" if not batch else f"({N},) or {(*batch, N)}"
        raise ValueError(f"{where}: point_weights.shape={tuple(point_weights.shape)} must be {allowed} (one weight "
                         "per point)")  # fmt: skip
    _check_finite(point_weights, where, "point_weights")
    if bool((point_weights < 0).any()):
        raise ValueError(f"{where}: point_weights has negative entries (min {float(point_weights.min()):.3e})")
    if bool((point_weights.reshape(-1, N) == 0).all(dim=-1).any()):
        raise ValueError(f"{where}: point_weights are all zero for some matrix (every point would be free)")
    return point_weights


def _check_chunk_size(chunk_size, where: str) -> int | None:
    if chunk_size is None:
        return None
    return _check_int(chunk_size, where, "chunk_size", 1)


def _check_tol(tol, where: str) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0.0 or math.isinf(tol):
        raise ValueError(f"{where}: tol={tol!r} must be a finite float >= 0 (relative inertia improvement)")
    return float(tol)


def _check_init_name(init, where: str) -> None:
    if isinstance(init, str) and init not in INIT_METHODS:
        raise ValueError(f"{where}: init={init!r} must be one of {INIT_METHODS} or a (k, d) tensor")


@contextmanager
def _ieee_fp32(device: torch.device):
    """cuBLAS in IEEE fp32 for the duration (TF32 would flip near assignments); restores the caller's setting."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; never mix with the legacy flag
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


# ----------------------------------------------------------------------------------------------------------------
# building blocks (X is (B, N, d) centred, Xw = X * sqrt(w) or X itself; C is (B, k, d))
# ----------------------------------------------------------------------------------------------------------------


def _rows_per_block(B: int, width: int, itemsize: int) -> int:
    return max(1, _CHUNK_BYTES // (B * width * itemsize))


def _assign(Xw: torch.Tensor, xx: torch.Tensor, Cw: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per point: labels (B, N) int64 and squared distances (B, N) >= 0, by the expansion in chunks
    of `chunk` rows (first index on ties)."""
    B, N, _ = Xw.shape
    cc = Cw.square().sum(-1, dtype=torch.float64).to(Cw.dtype)[:, None, :]  # (B, 1, k)
    CwT = Cw.mT
    labels = torch.empty((B, N), dtype=torch.int64, device=Xw.device)
    dist = torch.empty((B, N), dtype=Xw.dtype, device=Xw.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        partial = torch.baddbmm(cc, Xw[:, s:e], CwT, alpha=-2.0)  # (B, c, k) = ||c||^2 - 2 x.c
        best, idx = partial.min(dim=-1)
        labels[:, s:e] = idx
        dist[:, s:e] = best + xx[:, s:e]
    return labels, dist.clamp_min_(0.0)


def _cluster_sums(X64: torch.Tensor, labels: torch.Tensor, k: int, p64: torch.Tensor | None) -> torch.Tensor:
    """sum_{i in j} p_i x_i (B, k, d) float64 (p = 1 when None), by one-hot GEMMs split over clusters."""
    B, N, d = X64.shape
    dev = X64.device
    sums = torch.empty((B, k, d), dtype=torch.float64, device=dev)
    step = _rows_per_block(B, N, 8)
    for s in range(0, k, step):
        e = min(s + step, k)
        ids = torch.arange(s, e, device=dev)
        onehot = (labels[:, None, :] == ids[None, :, None]).to(torch.float64)  # (B, kc, N)
        if p64 is not None:
            onehot.mul_(p64[:, None, :])
        torch.bmm(onehot, X64, out=sums[:, s:e])
    return sums


def _update(X64: torch.Tensor, labels: torch.Tensor, k: int, dtype: torch.dtype,
            p64: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cluster means (B, k, d) (0 for empty clusters; p-weighted with point weights p64 (B, N)) and sizes (B, k)
    int64, from float64 one-hot GEMMs split over clusters (each sum is one full-length reduction, deterministic and
    independent of the split; float64 makes the rounded means independent of the BLAS kernel, which on CPU varies
    with the alignment of a batch element)."""
    counts = torch.zeros(labels.shape[0], k, dtype=torch.int64, device=X64.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))  # integer adds: exact in any order
    if p64 is None:
        return (_cluster_sums(X64, labels, k, None) / counts.clamp_min(1)[..., None]).to(dtype), counts
    mass = torch.zeros(labels.shape[0], k, dtype=torch.float64, device=X64.device).scatter_add_(1, labels, p64)
    means = _cluster_sums(X64, labels, k, p64) / mass.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
    weightless = (mass == 0) & (counts > 0)  # every point of the cluster has p = 0: their plain mean
    if bool(weightless.any()):
        plain = _cluster_sums(X64, labels, k, None) / counts.clamp_min(1)[..., None]
        means = torch.where(weightless[..., None], plain, means)
    return means.to(dtype), counts


def _reseed_empty(X, C, counts, dist) -> torch.Tensor:
    """Move the empty clusters of each matrix (index order) onto its points farthest from their centroid (`dist`:
    p-weighted distances with point weights)."""
    empty = counts == 0  # (B, k)
    if not bool(empty.any()):
        return C
    B, N, d = X.shape
    order = torch.sort(dist, dim=-1, descending=True, stable=True).indices  # (B, N), ties by point index
    rank = (empty.cumsum(-1) - 1).clamp_(min=0)  # j-th empty cluster -> j-th farthest point (k <= N)
    pick = order.gather(1, rank)  # (B, k)
    points = X.gather(1, pick[..., None].expand(B, pick.shape[1], d))
    return torch.where(empty[..., None], points, C)


def _exact_distances(X, C, labels, sqrt_w, chunk: int) -> torch.Tensor:
    """||(x_i - c_{l(i)}) * sqrt(w)||^2 (B, N) from the differences (squared and summed in float64), in chunks."""
    B, N, d = X.shape
    out = torch.empty((B, N), dtype=torch.float64, device=X.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        diff = C.gather(1, labels[:, s:e, None].expand(B, e - s, d))
        torch.sub(X[:, s:e], diff, out=diff)
        if sqrt_w is not None:
            diff.mul_(sqrt_w[:, None, :])
        out[:, s:e] = diff.to(torch.float64).square_().sum(-1)
    return out


def _sq_dist_to(Xw: torch.Tensor, xx: torch.Tensor, Pw: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, N, L) from every point to L points Pw (B, L, d), by the expansion, clamped at 0."""
    pp = Pw.square().sum(-1, dtype=torch.float64).to(Pw.dtype)[:, None, :]
    return torch.baddbmm(pp, Xw, Pw.mT, alpha=-2.0).add_(xx[..., None]).clamp_min_(0.0)


def _kmeanspp(Xw: torch.Tensor, xx: torch.Tensor, k: int, trials: int, g: torch.Generator,
              p64: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Indices (B, k) of k-means++ centres (trials > 1: greedy); with point weights p64 (B, N) the first centre is
    drawn with probability p and the next ones p D^2. One set of uniforms serves every matrix."""
    B, N, _ = Xw.shape
    dev = Xw.device
    u = torch.rand((k, trials), generator=g, device=g.device, dtype=torch.float64).to(dev)
    rows = torch.arange(B, device=dev)
    idx = torch.empty((B, k), dtype=torch.int64, device=dev)
    if p64 is None:
        first = (u[0, 0] * N).to(torch.int64).clamp_(max=N - 1).expand(B)
    else:
        cum_p = p64.cumsum(-1)
        first = torch.searchsorted(cum_p, u[0, 0] * cum_p[:, -1:], right=True)[:, 0].clamp_(max=N - 1)
    idx[:, 0] = first
    d2 = _sq_dist_to(Xw, xx, Xw[rows, first][:, None, :])[..., 0]  # (B, N): D^2 to the nearest centre so far
    chosen = torch.zeros((B, N), dtype=torch.bool, device=dev)
    chosen[rows, first] = True
    d2.masked_fill_(chosen, 0.0)
    for j in range(1, k):
        mass = d2.to(torch.float64) if p64 is None else d2.to(torch.float64) * p64
        total = mass.sum(-1, keepdim=True)
        # all remaining D^2 = 0 (fewer distinct points than centres so far): uniform over the points not yet chosen
        mass = torch.where(total > 0, mass, (~chosen).to(torch.float64))
        cum = mass.cumsum(-1)
        target = u[j][None, :] * cum[:, -1:]  # (B, trials)
        cand = torch.searchsorted(cum, target, right=True).clamp_(max=N - 1)  # first i with cum[i] > target
        dc = _sq_dist_to(Xw, xx, Xw.gather(1, cand[..., None].expand(B, trials, Xw.shape[-1])))  # (B, N, trials)
        if trials == 1:
            best = torch.zeros((B, 1), dtype=torch.int64, device=dev)
        else:
            nearest = torch.minimum(d2[..., None], dc).to(torch.float64)  # (B, N, trials)
            potential = (nearest if p64 is None else nearest * p64[..., None]).sum(dim=1)  # (B, trials)
            best = potential.argmin(dim=-1, keepdim=True)
        pick = cand.gather(1, best)[:, 0]
        d2 = torch.minimum(d2, dc.gather(2, best[:, None, :].expand(B, N, 1))[..., 0])
        chosen[rows, pick] = True
        d2[rows, pick] = 0.0
        idx[:, j] = pick
    return idx


def _initial_centroids(X, Xw, xx, k, init, seed, p64=None) -> torch.Tensor:
    """(B, k, d) centred initial centroids."""
    B, N, d = X.shape
    if isinstance(init, torch.Tensor):
        return init  # already checked, centred and broadcast by the caller
    g = torch.Generator(device=X.device)
    g.manual_seed(seed)
    if init == "random":
        idx = torch.randperm(N, generator=g, device=X.device)[:k].expand(B, k)
    else:
        trials = 1 if init == "k-means++" else 2 + int(math.log(k))
        idx = _kmeanspp(Xw, xx, k, trials, g, p64)
    return X.gather(1, idx[..., None].expand(B, k, d))


def _check_init(init, batch: tuple[int, ...], k: int, d: int, where: str) -> None:
    if isinstance(init, str):
        _check_init_name(init, where)
        return
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"{where}: init must be one of {INIT_METHODS} or a tensor, got {type(init).__name__}")
    if not init.is_floating_point():
        raise TypeError(f"{where}: init.dtype={init.dtype} must be a real floating dtype")
    if tuple(init.shape) not in ((k, d), (*batch, k, d)):
        allowed = f"({k}, {d})" if not batch else f"({k}, {d}) or {(*batch, k, d)}"
        raise ValueError(f"{where}: init.shape={tuple(init.shape)} must be {allowed} (k={k} centroids of d={d})")
    _check_finite(init, where, "init")


def _centred_init(init, k: int, d: int, mean: torch.Tensor) -> torch.Tensor | str:
    """A name as is, or the init tensor moved to X's device and dtype, centred and broadcast to (B, k, d)."""
    if isinstance(init, str):
        return init
    C = init.to(device=mean.device, dtype=mean.dtype).reshape(-1, k, d)
    return (C - mean).expand(mean.shape[0], k, d).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def kmeans(
    X: torch.Tensor,
    k: int,
    *,
    n_iter: int = 100,
    tol: float = 1e-4,
    weights: torch.Tensor | None = None,
    point_weights: torch.Tensor | None = None,
    seed: int = DEFAULT_SEED,
    init: str | torch.Tensor = "k-means++",
    chunk_size: int | None = None,
) -> KMeansResult:
    """k-means of the rows of X (..., N, d) into k clusters under the distance ||(x - c) * sqrt(w)||^2.

    Args:
        X: (N, d) points as rows (W for shared rows, W.T for shared columns), or (..., N, d) a batch of matrices
            clustered independently. Any floating dtype; computed in float32 (float64 for float64). NaN/Inf is an error.
        k: number of clusters, 1 <= k <= N. k == N returns every point as its own centroid (inertia 0, n_iter 0).
        n_iter: cap on Lloyd updates (>= 0; 0 returns the initial centroids with their assignment).
        tol: a matrix stops once an update lowers its inertia by at most tol x the previous inertia (0: fixed point).
        weights: None, or per-feature importance w >= 0 of shape (d,) (every matrix) or (..., d) (one per matrix),
            e.g. E[x^2] or (mean|x|)^2 of the layer's inputs for shared rows. Centroids stay plain cluster means.
        point_weights: None, or per-point importance p >= 0 of shape (N,) or (..., N), e.g. E[x_j^2] of input channel
            j for shared columns: the objective weighs point i by p_i and centroids are p-weighted means.
        seed: seeds a torch.Generator on X's device; the result is reproducible for (seed, device).
        init: "k-means++" (default), "greedy-k-means++" (2 + ln k candidates per centre, best kept), "random"
            (k distinct points), or a tensor (k, d) / (..., k, d) of initial centroids (in X's coordinates).
        chunk_size: rows per distance block (memory only, not results); None -> the most rows whose (B, rows, k)
            block fits in 256 MiB (see the module docstring).

    Returns:
        KMeansResult(centroids (..., k, d), labels (..., N) int64, inertia (...,) float64, n_iter (...,) int64).
    """
    where = "kmeans"
    _check_points(X, where)
    *batch, N, d = X.shape
    batch = tuple(batch)
    _check_k(k, N, tuple(X.shape), where)
    _check_int(n_iter, where, "n_iter", 0)
    tol = _check_tol(tol, where)
    _check_int(seed, where, "seed", 0)
    chunk_size = _check_chunk_size(chunk_size, where)
    weights = _check_weights(weights, batch, d, where)
    point_weights = _check_point_weights(point_weights, batch, N, where)
    _check_init(init, batch, k, d, where)

    dtype = _compute_dtype(X.dtype)
    X3 = X.detach().to(dtype).reshape(-1, N, d)
    B = X3.shape[0]
    if k == N:  # every point its own centroid: the optimum, inertia 0
        C = X3.detach().clone()
        labels = torch.arange(N, device=X.device).expand(B, N).contiguous()
        inertia = torch.zeros(B, dtype=torch.float64, device=X.device)
        iters = torch.zeros(B, dtype=torch.int64, device=X.device)
    else:
        mean = (X3.sum(dim=1, keepdim=True, dtype=torch.float64) / N).to(dtype)  # (B, 1, d)
        init = _centred_init(init, k, d, mean)
        with _ieee_fp32(X.device), torch.no_grad():
            C, labels, inertia, iters = _kmeans_core(X3 - mean, k, n_iter, tol, weights, seed, init, chunk_size,
                                                     point_weights)  # fmt: skip
        C = C + mean
    return KMeansResult(
        C.reshape(*batch, k, d), labels.reshape(*batch, N), inertia.reshape(batch), iters.reshape(batch)
    )


def _kmeans_core(X, k, n_iter, tol, weights, seed, init, chunk_size, point_weights=None):
    """Lloyd on centred X (B, N, d), k < N: (centroids, labels, inertia, n_iter), no checks."""
    B, N, d = X.shape
    dev = X.device
    sqrt_w = None
    Xw = X
    if weights is not None:
        sqrt_w = weights.to(device=dev, dtype=X.dtype).reshape(-1, d).expand(B, d).sqrt()
        Xw = X * sqrt_w[:, None, :]
    xx = Xw.square().sum(-1, dtype=torch.float64).to(X.dtype)  # (B, N)
    p64 = None
    if point_weights is not None:
        p64 = point_weights.to(device=dev, dtype=torch.float64).reshape(-1, N).expand(B, N).contiguous()

    def objective(dist):  # per-point contributions to the inertia
        return dist if p64 is None else dist * p64
    X64 = X.to(torch.float64)  # one-hot x fp32 products are exact in fp64: cluster sums round only in fp64
    chunk = chunk_size or _rows_per_block(B, k, X.element_size())

    def weighted(C):
        return C if sqrt_w is None else C * sqrt_w[:, None, :]

    C = _initial_centroids(X, Xw, xx, k, init, seed, p64)
    labels, dist = _assign(Xw, xx, weighted(C), chunk)
    inertia = objective(dist).sum(-1, dtype=torch.float64)
    iters = torch.zeros(B, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    for _ in range(n_iter):
        means, counts = _update(X64, labels, k, X.dtype, p64)
        C_new = _reseed_empty(X, means, counts, objective(dist))
        labels_new, dist_new = _assign(Xw, xx, weighted(C_new), chunk)
        inertia_new = objective(dist_new).sum(-1, dtype=torch.float64)
        # matrices that already stopped keep their state, so a matrix's result does not depend on its batch
        C = torch.where(active[:, None, None], C_new, C)
        labels = torch.where(active[:, None], labels_new, labels)
        dist = torch.where(active[:, None], dist_new, dist)
        iters += active.to(torch.int64)
        done = inertia - inertia_new <= tol * inertia
        inertia = torch.where(active, inertia_new, inertia)
        active &= ~done
        if not bool(active.any()):
            break
    exact = _exact_distances(X, C, labels, sqrt_w, _rows_per_block(B, d, 8))
    return C, labels, objective(exact).sum(-1), iters


def kmeans_many(
    matrices: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    k: int | Sequence[int] | Mapping[str, int],
    *,
    n_iter: int = 100,
    tol: float = 1e-4,
    weights: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None] | None = None,
    point_weights: Sequence[torch.Tensor | None] | Mapping[str, torch.Tensor | None] | None = None,
    seed: int = DEFAULT_SEED,
    init: str = "k-means++",
    chunk_size: int | None = None,
    max_batch_bytes: int = 2 << 30,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[KMeansResult] | dict[str, KMeansResult]:
    """`kmeans` of many 2-D matrices, batched by (shape, device, dtype, k) internally, results in input order.

    Each result equals `kmeans(X_i, k_i, ...)` with the same arguments (the same random numbers and convergence test
    per matrix; see the module docstring), with n_iter, inertia as 0-d tensors.

    Args:
        matrices: a sequence (result: list) or a name -> matrix mapping (result: dict, same order) of (N, d) tensors;
            errors name the offending index or name.
        k: one k for all, or one per matrix (a sequence in order, or a mapping with the same keys).
        weights: None, or one entry per matrix (sequence or mapping; an entry may be None, meaning w = 1).
        point_weights: None, or one entry per matrix (sequence or mapping; an entry may be None, meaning p = 1).
        init: an initialisation name (tensors are per matrix: call `kmeans`).
        max_batch_bytes: bound on one batch's compute-dtype copy of its matrices.
        device: where to compute (and return) results; None -> each matrix's own device.
        progress: show a tqdm bar (matrices done).
    """
    where = "kmeans_many"
    keys, mats, labels = named_matrices(matrices, where)
    ks = _per_matrix(k, keys, len(mats), where, "k")
    ws = [None] * len(mats) if weights is None else _per_matrix(weights, keys, len(mats), where, "weights")
    ps = [None] * len(mats) if point_weights is None else _per_matrix(point_weights, keys, len(mats), where,
                                                                      "point_weights")  # fmt: skip
    if not isinstance(init, str):
        raise TypeError(f"{where}: init must be one of {INIT_METHODS} (for init tensors call kmeans per matrix)")
    _check_init_name(init, where)
    _check_int(n_iter, where, "n_iter", 0)
    tol = _check_tol(tol, where)
    _check_int(seed, where, "seed", 0)
    chunk_size = _check_chunk_size(chunk_size, where)
    _check_int(max_batch_bytes, where, "max_batch_bytes", 1)
    target = None if device is None else torch.device(device)

    groups: dict[tuple, list[int]] = {}
    for i, (X, k_i, w, label) in enumerate(zip(mats, ks, ws, labels, strict=True)):
        prefix = f"{where}: {label}"
        _check_points(X, prefix, batched=False)
        _check_k(k_i, X.shape[0], tuple(X.shape), prefix)
        _check_weights(w, (), X.shape[1], prefix)
        _check_point_weights(ps[i], (), X.shape[0], prefix)
        dev = target if target is not None else X.device
        groups.setdefault((tuple(X.shape), str(dev), _compute_dtype(X.dtype), k_i), []).append(i)

    results: list[KMeansResult | None] = [None] * len(mats)
    with tqdm(total=len(mats), desc=where, disable=not progress, unit="matrix") as bar:
        for (shape, dev, dtype, k_g), idx in groups.items():
            N, d = shape
            per_batch = max(1, max_batch_bytes // (N * d * torch.finfo(dtype).bits // 8))
            for s in range(0, len(idx), per_batch):
                chunk = idx[s : s + per_batch]
                X = torch.stack([mats[i].to(device=dev, dtype=dtype) for i in chunk])
                w, pw = _stacked(ws, chunk, d, dtype, dev), _stacked(ps, chunk, N, dtype, dev)
                res = kmeans(X, k_g, n_iter=n_iter, tol=tol, weights=w, point_weights=pw, seed=seed, init=init,
                             chunk_size=chunk_size)  # fmt: skip
                for j, i in enumerate(chunk):
                    results[i] = KMeansResult(*(t[j].clone() for t in res))
                bar.update(len(chunk))
    if keys is None:
        return results
    return dict(zip(keys, results, strict=True))


def _stacked(entries: list, chunk: list[int], size: int, dtype, dev) -> torch.Tensor | None:
    """The entries of `chunk` stacked (len(chunk), size), ones where an entry is None; None when all are None."""
    if all(entries[i] is None for i in chunk):
        return None
    ones = torch.ones(size, dtype=dtype, device=dev)
    return torch.stack([ones if entries[i] is None else entries[i].to(device=dev, dtype=dtype) for i in chunk])


def _per_matrix(value, keys, count: int, where: str, name: str) -> list:
    if isinstance(value, Mapping):
        if keys is None:
            raise TypeError(f"{where}: {name} is a mapping but matrices is a sequence; give a sequence")
        missing = [key for key in keys if key not in value]
        if missing:
            raise ValueError(f"{where}: {name} has no entry for matrices {missing[:5]}")
        return [value[key] for key in keys]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{where}: got {len(value)} entries of {name} for {count} matrices")
        return list(value)
    if name in ("weights", "point_weights"):
        raise TypeError(f"{where}: {name} must be None or one entry per matrix (a sequence or a mapping)")
    return [value] * count
