"""Decomposition engine: randomized, batched, exact and whitened SVD.

Every compression method decomposes matrices through this module; none calls torch.linalg.svd on its own.

Conventions: A is (..., m, n) (leading dims are a batch); W is (m, n) = (out, in) as in nn.Linear; rank r.
Results are float32 (float64 for float64 inputs) whatever the input dtype; every function is pure (the inputs are
never modified) and device-agnostic (CUDA first, CPU for tests).

Randomized SVD (Halko, Martinsson & Tropp 2011; block Krylov variant: Musco & Musco 2015)
------------------------------------------------------------------------------------------
With l = r + p columns (p = oversample) and a Gaussian test matrix Omega (n, l):

    Q_0 = orth(A Omega),   P_i = orth(A^T Q_{i-1}),   Q_i = orth(A P_i)      for i = 1 .. q (q = n_iter)

orth() re-orthonormalises at every step (without it the iterates collapse onto the top singular vector in floating
point). The basis is then

    method="subspace":  Q = Q_q                              (HMT subspace iteration, l columns)
    method="krylov":    Q = orth([Q_0, Q_1, ..., Q_q])       (block Krylov, (q + 1) l columns)

and the Rayleigh-Ritz step takes the best rank-r approximation of A inside span(Q): B = Q^T A (c, n),
B = U_B Sigma V^T, A ~= (Q U_B[:, :r]) Sigma_r V_r^T. Both methods do the same 2q + 1 products with l columns in the
iteration; Krylov's final product and small eigenproblem are (q + 1) times wider.

Why Krylov is the default. Measured on CPU (float64 reference SVD, n_iter=2, p=r/4, 1200 x 900 with
sigma_i = (i+1)^-alpha for alpha in 0.3 .. 1.0 and Gaussian (Marchenko-Pastur) spectra, r/min(m,n) in 0.02 .. 0.58),
error / optimal error: subspace iteration up to 1.024 (alpha = 0.3, flat spectra, r/k >= 1/8 all exceed 1.01);
block Krylov at most 1.0053. Subspace iteration needs p = r to stay under 1.01 at n_iter=2 (at most 1.0073).

Numerics of the small steps (the large products run in the compute dtype, or in `power_dtype` for the iteration):
- orth() of an iterate (m, l) is CholeskyQR2 with the Gram in float64: Y^T Y is formed from fp32 data in fp64 (the
  products are exact, so the squared condition number costs nothing until cond(Y) ~ 1e7), R = chol(Y^T Y),
  Y R^-1, twice. It is two GEMMs and a triangular solve, much faster on GPU than Householder QR. A batch element whose
  Cholesky fails (rank-deficient iterate) or whose second Gram is far from I falls back to Householder QR.
- The Krylov basis [Q_0 .. Q_q] is ill-conditioned by construction (its blocks share the dominant directions), so
  it is orthonormalised by Householder QR (fp32), which stays orthonormal for any conditioning.
- Rayleigh-Ritz: B (fp32) is cast to float64, G = B B^T = U_B Lambda U_B^T by fp64 eigh, and Sigma V^T = U_B^T B
  (so sigma_i are row norms, accurate without squaring). The fp64 Gram loses nothing against the fp32 data for
  sigma_i >= ~1e-4 sigma_1; smaller ones are below fp32 resolution of A anyway. Rows of Vh whose sigma_i sit at
  the rounding level (rank-deficient A) are noise, so Vh^T goes through orth() once more, in order: the dominant
  rows move by ~eps, the noise rows become an orthonormal completion. U and Vh are orthonormal in every case.
- The same Gaussian Omega (n, l) sketches every matrix of a batch, so a matrix's factors do not depend on what it is
  batched with: batched, grouped and single calls agree to rounding.

Exact SVD
---------
CUDA's default driver for large matrices is inaccurate (H100, 4096^2 fp32: default gesvdj 1.11 s with
reconstruction error 1e-3; gesvd 1.31 s at 1e-5; gesvda 0.13 s at 9e-7). `exact_svd` uses gesvda on the tall
orientation, checks the result, and falls back to gesvd (one log line) if the check fails; on CPU it uses LAPACK's
default (gesdd). Every result is checked: reconstruction and orthogonality errors are estimated with a few Gaussian
probe vectors in float64 (E ||E x||^2 = ||E||_F^2 for x ~ N(0, I)), O((m + n) k) work instead of a full product.

Whitened (activation-aware) truncated SVD -- the shared primitive
------------------------------------------------------------------
For a layer with inputs X (T, n) and Gram G = X^T X, pick any S with S S^T = G. Then for every W' (m, n)

    ||(W - W') X^T||_F^2 = tr((W - W') G (W - W')^T) = ||(W - W') S||_F^2,

so the best rank-r W' in the activation-weighted norm is W' = SVD_r(W S) S^+ (Eckart-Young on W S), and its loss is
the discarded energy sum_{i > r} sigma_i(W S)^2 exactly. The factors are folded as

    U = U_r Sigma_r^{1/2}  (m, r),      V = Sigma_r^{1/2} V_r^T S^+  (r, n).

`Whitening` holds S and applies S and S^+ (so EoRA and the SWSC residual reuse it on an error matrix W - W_hat):
- identity: S = I (plain SVD);
- diagonal (ASVD): S = diag(s), s = mean|x|^alpha; channels with s_j = 0 carry no input and are dropped (S^+ = 0);
- cholesky: G = L L^T, S = L (n, n); on failure the diagonal is damped (warning with the amount, never silent);
- eigh: G = Q Lambda Q^T in float64, S = Q_k Lambda_k^{1/2} (n, k) keeping lambda > rtol lambda_max; negative
  eigenvalues are clamped, collapsed directions (fewer tokens than channels) dropped; S^+ = Lambda_k^{-1/2} Q_k^T.
Cholesky and eigh give the same W' (their S differ by an orthogonal factor, W S has the same singular values).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from lowrank_ops.engine.stats import InputStatistics
from lowrank_ops.rank import validate_rank

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0
"""Seed of the Gaussian test matrix when no generator is given: results are reproducible by default."""

_CUDA_AUTO_DRIVERS = ("gesvda", "gesvd")
_CUDA_DRIVERS = ("gesvd", "gesvdj", "gesvda")
_PROBE_SEED = 0x5EED
_N_PROBES = 4
_CHECK_TOL_FACTOR = 30.0
"""exact_svd's default check tolerance is 30 eps sqrt(min(m, n)): about 4x the error gesvd showed at 4096^2 fp32
(1e-5 = 1.3 eps sqrt(4096)) and 20x below gesvdj's (1e-3), so it separates working drivers from broken ones."""
_DAMPING_LADDER = tuple(10.0**e for e in range(-10, 0))
"""Relative damping tried, in order, when a Gram's Cholesky fails: lambda = rel * mean(diag(G))."""


class SVDResult(NamedTuple):
    """A (thin or truncated) SVD: A ~= U diag(S) Vh with U (..., m, k), S (..., k) descending, Vh (..., k, n)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


class WhitenedSVD(NamedTuple):
    """Folded factors of the best rank-r approximation in the whitened norm, W ~= U V.

    U (m, r) = U_r Sigma_r^{1/2}; V (r, n) = Sigma_r^{1/2} V_r^T S^+; singular_values: those computed for W S,
    descending (all min(m, k) for svd="exact", the top r for svd="randomized"), for discarded-energy rules.
    """

    U: torch.Tensor
    V: torch.Tensor
    singular_values: torch.Tensor


class WhiteningDampingWarning(UserWarning):
    """A Gram matrix was not numerically positive definite and its diagonal was damped before Cholesky."""


# ----------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _describe(where: str, label: str | None) -> str:
    return where if label is None else f"{where}: {label}"


def _check_matrix(A, where: str, name: str = "A", label: str | None = None, batched: bool = True) -> None:
    """TypeError / ValueError naming `where`, the matrix and the rule; NaN/Inf errors name the first bad index."""
    prefix = _describe(where, label)
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{prefix}: {name} must be a torch.Tensor, got {type(A).__name__}")
    if not A.is_floating_point():
        raise TypeError(f"{prefix}: {name}.dtype={A.dtype} must be a real floating dtype")
    if A.ndim < 2 or (not batched and A.ndim != 2):
        rule = "(..., m, n)" if batched else "(m, n)"
        raise ValueError(f"{prefix}: {name}.shape={tuple(A.shape)} must be {rule}")
    if A.numel() == 0 or A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"{prefix}: {name}.shape={tuple(A.shape)} has an empty dimension")
    _check_finite(A, prefix, name)


def _check_finite(t: torch.Tensor, prefix: str, name: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        count = int(bad.sum())
        raise ValueError(
            f"{prefix}: {name} contains NaN/Inf ({count} entries, first at index {first}, "
            f"{name}.shape={tuple(t.shape)})"
        )


def _check_int(value, where: str, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name}={value!r} must be an int")
    if value < minimum:
        raise ValueError(f"{where}: {name}={value} must be >= {minimum}")
    return value


def default_oversample(rank: int) -> int:
    """p = max(10, ceil(r / 4)): the oversampling at which the error targets of the module docstring were measured."""
    return max(10, -(-rank // 4))


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------


def _make_generator(generator, device: torch.device) -> torch.Generator:
    """None -> a fresh generator seeded DEFAULT_SEED on `device`; int -> seeded likewise; a Generator is used as is
    (its state advances). A generator on another device draws there and the sample is moved (still deterministic)."""
    if generator is None or (isinstance(generator, int) and not isinstance(generator, bool)):
        seed = DEFAULT_SEED if generator is None else generator
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g
    if isinstance(generator, torch.Generator):
        return generator
    raise TypeError(f"generator={generator!r} must be None, an int seed or a torch.Generator")


def _gaussian(shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype):
    sample = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return sample.to(device=device, dtype=dtype)


def _orthonormalize(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of Y (B, m, l), l <= m: CholeskyQR2 with fp64 Grams, Householder fallback.

    Pass 1 orthonormalises up to a loss of orthogonality ~ u64 cond(Y)^2; pass 2 (on a matrix with cond ~ 1) fixes it.
    A batch element falls back to Householder QR (always orthonormal, also for rank-deficient Y) when a Cholesky
    fails or when the second pass's Gram deviates from I by more than 0.5 (pass 1 lost too much).
    """
    X = Y.to(torch.float64)
    eye = torch.eye(Y.shape[-1], dtype=torch.float64, device=Y.device)
    ok = torch.ones(Y.shape[:-2], dtype=torch.bool, device=Y.device)
    for step in range(2):
        G = X.mT @ X
        if step == 1:
            ok &= (G - eye).abs().amax(dim=(-2, -1)) < 0.5
        R, info = torch.linalg.cholesky_ex(G, upper=True)
        ok &= info == 0
        R = torch.where(ok[..., None, None], R, eye)  # keep failed elements finite; they are replaced below
        X = torch.linalg.solve_triangular(R, X, upper=True, left=False)
    Q = X.to(Y.dtype)
    if not bool(ok.all()):
        Q = Q.clone()
        Q[~ok] = _householder(Y[~ok])
    return Q


def _householder(Y: torch.Tensor) -> torch.Tensor:
    """Householder Q of Y (B, m, l) with the signs of CholeskyQR (diag(R) >= 0), so column j of Q keeps the
    orientation of Y's j-th column after projecting out the previous ones (the order of the columns matters)."""
    Q, R = torch.linalg.qr(Y)
    signs = R.diagonal(dim1=-2, dim2=-1).sign()
    return Q * torch.where(signs == 0, torch.ones_like(signs), signs)[..., None, :]


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of each column of U positive (flipping the matching row of Vh)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.gather(U, -2, idx).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.mT


def _rayleigh_ritz(Q: torch.Tensor, A: torch.Tensor, rank: int) -> SVDResult:
    """Best rank-`rank` approximation of A (B, m, n) inside span(Q) (B, m, c): fp64 Gram + eigh of B = Q^T A."""
    Bm = (Q.mT @ A).to(torch.float64)  # (B, c, n)
    _, W = torch.linalg.eigh(Bm @ Bm.mT)  # ascending
    W = W.flip(-1)[..., :rank]  # (B, c, r), top eigenvectors first
    C = W.mT @ Bm  # (B, r, n) = Sigma V^T
    S = torch.linalg.vector_norm(C, dim=-1)  # (B, r)
    S, order = S.sort(dim=-1, descending=True, stable=True)
    C = torch.gather(C, -2, order[..., None].expand_as(C))
    W = torch.gather(W, -1, order[..., None, :].expand_as(W))
    tiny = torch.finfo(torch.float64).tiny
    Vh = C / S.clamp_min(tiny)[..., None]
    # Rows of singular values at the rounding level of A (rank-deficient A) are noise and need not be orthogonal;
    # re-orthonormalise in order (Gram-Schmidt-like: the dominant rows move by ~eps, the noise rows are completed).
    Vh = _orthonormalize(Vh.mT.to(Q.dtype)).mT
    U = Q @ W.to(Q.dtype)
    U, Vh = _fix_signs(U, Vh)
    return SVDResult(U, S.to(Q.dtype), Vh)


def _range_basis(A, Apow, omega, n_iter: int, method: str) -> torch.Tensor:
    """Orthonormal basis whose span approximates the dominant column space of A (see module docstring)."""
    dtype = A.dtype

    def mm(X, Y):
        return (X @ Y.to(Apow.dtype)).to(dtype)

    Q = _orthonormalize(mm(Apow, omega))
    blocks = [Q]
    for _ in range(n_iter):
        P = _orthonormalize(mm(Apow.mT, Q))
        Q = _orthonormalize(mm(Apow, P))
        blocks.append(Q)
    if method == "subspace":
        return Q
    return _householder(torch.cat(blocks, dim=-1))


def _randomized_core(A, rank, n_iter, method, omega, power_dtype) -> SVDResult:
    """A (B, m, n) in the compute dtype, omega (n, l): the randomized SVD proper, no checks."""
    Apow = A if power_dtype in (None, A.dtype) else A.to(power_dtype)
    Q = _range_basis(A, Apow, omega, n_iter, method)
    return _rayleigh_ritz(Q, A, rank)


def _sketch_width(rank: int, oversample: int, n_iter: int, method: str, m: int, n: int) -> tuple[int, bool]:
    """(l, exact): the sketch width, and whether the basis would span the whole column space anyway (then the
    randomized result equals the exact truncated SVD, which `exact_svd` computes more cheaply)."""
    k = min(m, n)
    sketch = min(rank + oversample, k)
    width = sketch * (n_iter + 1) if method == "krylov" else sketch
    return sketch, width >= k


def _check_method(method: str, power_dtype, where: str) -> None:
    if method not in ("krylov", "subspace"):
        raise ValueError(f"{where}: method={method!r} must be 'krylov' or 'subspace'")
    if power_dtype is not None and power_dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"{where}: power_dtype={power_dtype} must be None, float32, float64, bfloat16 or float16")


# ----------------------------------------------------------------------------------------------------------------
# randomized SVD
# ----------------------------------------------------------------------------------------------------------------


def randomized_svd(
    A: torch.Tensor,
    rank: int,
    oversample: int | None = None,
    n_iter: int = 2,
    generator: torch.Generator | int | None = None,
    *,
    method: str = "krylov",
    power_dtype: torch.dtype | None = None,
) -> SVDResult:
    """Rank-`rank` truncated SVD of A (..., m, n) by randomized range finding with power iterations.

    Args:
        A: (..., m, n) floating tensor; leading dims are a batch, every matrix sketched with the same Omega.
        rank: r, 1 <= r <= min(m, n).
        oversample: p extra columns, l = min(r + p, min(m, n)); None -> `default_oversample(r)` = max(10, ceil(r/4)).
        n_iter: q power iterations (A A^T applications), each followed by re-orthonormalisation.
        generator: None (seed DEFAULT_SEED, reproducible), an int seed, or a torch.Generator (best on A's device;
            its state advances).
        method: "krylov" (block Krylov, default: <= 1.0053 x optimal at q=2, p=r/4 in the measurements of the
            module docstring) or "subspace" (HMT subspace iteration: cheaper small steps, needs p ~ r for 1%).
        power_dtype: dtype of the 2q+1 large products of the iteration (None = compute dtype). bfloat16 halves their
            memory traffic and runs on tensor cores; the final projection Q^T A always runs in the compute dtype.

    Returns:
        SVDResult(U (..., m, r), S (..., r) descending, Vh (..., r, n)), float32 (float64 for float64 A). When the
        sketch would span the whole column space (l (q+1) >= min(m, n) for Krylov, l = min(m, n) for subspace) the
        result is the exact truncated SVD and is computed by `exact_svd`.
    """
    where = "randomized_svd"
    _check_matrix(A, where)
    m, n = A.shape[-2:]
    validate_rank(rank, m, n, where)
    oversample = default_oversample(rank) if oversample is None else _check_int(oversample, where, "oversample", 0)
    _check_int(n_iter, where, "n_iter", 0)
    _check_method(method, power_dtype, where)
    generator = _make_generator(generator, A.device)
    dtype = _compute_dtype(A.dtype)
    A_ = A.to(dtype).reshape(-1, m, n)
    sketch, exact = _sketch_width(rank, oversample, n_iter, method, m, n)
    if exact:
        U, S, Vh = exact_svd(A_)
        result = SVDResult(U[..., :rank], S[..., :rank], Vh[..., :rank, :])
    else:
        omega = _gaussian((n, sketch), generator, A.device, dtype)
        result = _randomized_core(A_, rank, n_iter, method, omega, power_dtype)
    batch = A.shape[:-2]
    return SVDResult(*(t.reshape(*batch, *t.shape[1:]) for t in result))


def named_matrices(matrices, where: str) -> tuple[list | None, list, list[str]]:
    """(keys or None, matrices, labels for errors) of a sequence or a mapping of matrices (the *_many inputs)."""
    if isinstance(matrices, Mapping):
        keys = list(matrices.keys())
        return keys, [matrices[k] for k in keys], [f"matrix {k!r}" for k in keys]
    if isinstance(matrices, Sequence) and not isinstance(matrices, (torch.Tensor, str)):
        mats = list(matrices)
        return None, mats, [f"matrix {i}" for i in range(len(mats))]
    kind = type(matrices).__name__
    raise TypeError(f"{where}: matrices must be a sequence or a mapping of 2-D tensors, got {kind}")


def randomized_svd_many(
    matrices: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    rank: int | Sequence[int] | Mapping[str, int],
    oversample: int | None = None,
    n_iter: int = 2,
    generator: int | None = None,
    *,
    method: str = "krylov",
    power_dtype: torch.dtype | None = None,
    pad_rank: bool = False,
    max_batch_bytes: int = 2 << 30,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> list[SVDResult] | dict[str, SVDResult]:
    """`randomized_svd` of many 2-D matrices of mixed shapes, batched by shape internally, results in input order.

    Matrices with the same (shape, device, rank) run as one batch (split so one batch's fp32 copy stays under
    `max_batch_bytes`); each result equals `randomized_svd(A_i, r_i, oversample, n_iter, generator)` up to rounding,
    because the Gaussian Omega depends only on (n, l) and the seed.

    Args:
        matrices: a sequence (result: list) or a name -> matrix mapping (result: dict, same order); errors name the
            offending index or name.
        rank: one rank for all, or one per matrix (sequence in order, or mapping with the same keys).
        generator: None (seed DEFAULT_SEED) or an int seed; every batch restarts from it, as a single call would.
        pad_rank: sketch each shape group at its largest rank and truncate each result to its own rank: one batch per
            shape instead of one per (shape, rank). At least as accurate, but no longer equal to the single calls.
        device: where to compute (and return) results; None -> each matrix's own device.
        progress: show a tqdm bar (matrices done).
    """
    where = "randomized_svd_many"
    keys, mats, labels = named_matrices(matrices, where)
    ranks = _per_matrix_ranks(rank, keys, len(mats), where)
    if generator is not None and (isinstance(generator, bool) or not isinstance(generator, int)):
        raise TypeError(f"{where}: generator={generator!r} must be None or an int seed (every batch restarts from it)")
    if oversample is not None:
        _check_int(oversample, where, "oversample", 0)
    _check_int(n_iter, where, "n_iter", 0)
    _check_int(max_batch_bytes, where, "max_batch_bytes", 1)
    _check_method(method, power_dtype, where)
    target = None if device is None else torch.device(device)

    groups: dict[tuple, list[int]] = {}
    for i, (A, r, label) in enumerate(zip(mats, ranks, labels, strict=True)):
        _check_matrix(A, where, label=label, batched=False)
        validate_rank(r, *A.shape, f"{where}: {label}")
        dev = target if target is not None else A.device
        key = (tuple(A.shape), str(dev), _compute_dtype(A.dtype)) + (() if pad_rank else (r,))
        groups.setdefault(key, []).append(i)

    results: list[SVDResult | None] = [None] * len(mats)
    with tqdm(total=len(mats), desc=where, disable=not progress, unit="matrix") as bar:
        for key, idx in groups.items():
            (m, n), dev, dtype = key[0], torch.device(key[1]), key[2]
            group_rank = max(ranks[i] for i in idx)
            p = default_oversample(group_rank) if oversample is None else oversample
            sketch, exact = _sketch_width(group_rank, p, n_iter, method, m, n)
            omega = None if exact else _gaussian((n, sketch), _make_generator(generator, dev), dev, dtype)
            per_batch = max(1, max_batch_bytes // (m * n * torch.finfo(dtype).bits // 8))
            for start in range(0, len(idx), per_batch):
                chunk = idx[start : start + per_batch]
                A = torch.stack([mats[i].to(device=dev, dtype=dtype) for i in chunk])
                if exact:
                    U, S, Vh = exact_svd(A)
                    U, S, Vh = U[..., :group_rank], S[..., :group_rank], Vh[..., :group_rank, :]
                else:
                    U, S, Vh = _randomized_core(A, group_rank, n_iter, method, omega, power_dtype)
                for j, i in enumerate(chunk):
                    r = ranks[i]
                    results[i] = SVDResult(U[j, :, :r].contiguous(), S[j, :r].contiguous(), Vh[j, :r, :].contiguous())
                bar.update(len(chunk))
    if keys is None:
        return results
    return dict(zip(keys, results, strict=True))


def _per_matrix_ranks(rank, keys, count: int, where: str) -> list[int]:
    if isinstance(rank, Mapping):
        if keys is None:
            raise TypeError(f"{where}: rank is a mapping but matrices is a sequence; give a sequence of ranks")
        missing = [k for k in keys if k not in rank]
        if missing:
            raise ValueError(f"{where}: rank has no entry for matrices {missing[:5]}")
        return [rank[k] for k in keys]
    if isinstance(rank, Sequence):
        if len(rank) != count:
            raise ValueError(f"{where}: got {len(rank)} ranks for {count} matrices")
        return list(rank)
    return [rank] * count


# ----------------------------------------------------------------------------------------------------------------
# exact SVD
# ----------------------------------------------------------------------------------------------------------------


def svd_check_errors(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[float, float]:
    """(reconstruction, orthogonality) errors of a thin SVD, estimated in float64 with Gaussian probes.

    reconstruction ~ ||A - U diag(S) Vh||_F / ||A||_F and orthogonality ~ max(||U^T U - I||_F, ||Vh Vh^T - I||_F) /
    sqrt(k), each from _N_PROBES probe vectors (a Hutchinson estimate, within a small factor of the exact value;
    enough to tell a working driver, ~1e-6, from a broken one, ~1e-3). Worst case over a batch.
    """
    m, n = A.shape[-2:]
    k = S.shape[-1]
    g = torch.Generator(device=A.device)
    g.manual_seed(_PROBE_SEED)
    f64 = torch.float64
    X = torch.randn((n, _N_PROBES), generator=g, device=A.device, dtype=f64)
    Y = torch.randn((k, _N_PROBES), generator=g, device=A.device, dtype=f64)
    U64, S64, Vh64 = U.to(f64), S.to(f64), Vh.to(f64)
    AX = A.to(f64) @ X
    R = AX - U64 @ (S64[..., :, None] * (Vh64 @ X))
    norm_ax = torch.linalg.matrix_norm(AX).clamp_min(torch.finfo(f64).tiny)
    recon = (torch.linalg.matrix_norm(R) / norm_ax).max()
    norm_y = torch.linalg.matrix_norm(Y)
    orth_u = torch.linalg.matrix_norm(U64.mT @ (U64 @ Y) - Y) / norm_y
    orth_v = torch.linalg.matrix_norm(Vh64 @ (Vh64.mT @ Y) - Y) / norm_y
    orth = torch.maximum(orth_u.max(), orth_v.max())
    return float(recon), float(orth)


def default_check_tol(dtype: torch.dtype, m: int, n: int) -> float:
    """30 eps sqrt(min(m, n)) of the compute dtype (see _CHECK_TOL_FACTOR)."""
    return _CHECK_TOL_FACTOR * torch.finfo(_compute_dtype(dtype)).eps * math.sqrt(min(m, n))


def exact_svd(A: torch.Tensor, driver: str | None = None, *, check: bool = True, tol: float | None = None) -> SVDResult:
    """Thin SVD of A (..., m, n) with an accurate, fast driver for the device, checked.

    CPU: LAPACK through torch.linalg.svd (gesdd); `driver` must be None. CUDA: driver=None tries gesvda (on the tall
    orientation: wide matrices are transposed) and, if its check fails, gesvd, with one log line; an explicit driver
    (gesvd, gesvdj, gesvda) is used alone. Never the default gesvdj silently.

    The check (`svd_check_errors`) requires reconstruction and orthogonality errors <= tol
    (default `default_check_tol`: 30 eps sqrt(min(m, n))); a result that fails raises RuntimeError naming the drivers
    and their errors. `check=False` skips it (and the fallback).

    Returns SVDResult(U (..., m, k), S (..., k), Vh (..., k, n)), k = min(m, n), float32 (float64 for float64 A),
    signs fixed so each column of U has its largest-magnitude entry positive.
    """
    where = "exact_svd"
    _check_matrix(A, where)
    m, n = A.shape[-2:]
    A_ = A.to(_compute_dtype(A.dtype))
    tol = default_check_tol(A_.dtype, m, n) if tol is None else float(tol)
    drivers = _drivers_for(A_.device, driver)
    return _first_accurate_svd(A_, drivers, check, tol)


def _drivers_for(device: torch.device, driver: str | None) -> tuple[str | None, ...]:
    """The drivers exact_svd tries in order: (None,) = LAPACK default on CPU; gesvda then gesvd on CUDA."""
    if device.type != "cuda":
        if driver is not None:
            raise ValueError(f"exact_svd: driver={driver!r} only applies to CUDA tensors (A is on {device})")
        return (None,)
    if driver is None:
        return _CUDA_AUTO_DRIVERS
    if driver in _CUDA_DRIVERS:
        return (driver,)
    raise ValueError(f"exact_svd: driver={driver!r} must be None or one of {_CUDA_DRIVERS}")


def _first_accurate_svd(A: torch.Tensor, drivers: tuple[str | None, ...], check: bool, tol: float) -> SVDResult:
    """The first driver's SVD that passes the check; one log line per fallback; RuntimeError if none passes."""
    failures = []
    for i, d in enumerate(drivers):
        name = d or "default"
        try:
            U, S, Vh = _svd_with_driver(A, d)
        except torch.linalg.LinAlgError as exc:  # did not converge
            failures.append(f"{name}: {exc}")
        else:
            if not check:
                return SVDResult(*_fix_signs_svd(U, S, Vh))
            recon, orth = svd_check_errors(A, U, S, Vh)
            if recon <= tol and orth <= tol:
                return SVDResult(*_fix_signs_svd(U, S, Vh))
            failures.append(f"{name}: reconstruction {recon:.2e}, orthogonality {orth:.2e}")
        if i + 1 < len(drivers):
            logger.warning("exact_svd: %s (tol %.1e); falling back to %s", failures[-1], tol, drivers[i + 1])
    raise RuntimeError(
        f"exact_svd: no driver produced an accurate SVD of A.shape={tuple(A.shape)} ({'; '.join(failures)}; "
        f"tol {tol:.1e})"
    )


def _svd_with_driver(A: torch.Tensor, driver: str | None):
    if driver is None:
        return torch.linalg.svd(A, full_matrices=False)
    if driver == "gesvda" and A.shape[-2] < A.shape[-1]:  # gesvda handles tall (m >= n) matrices
        U, S, Vh = torch.linalg.svd(A.mT, full_matrices=False, driver=driver)
        return Vh.mT, S, U.mT
    return torch.linalg.svd(A, full_matrices=False, driver=driver)


def _fix_signs_svd(U, S, Vh):
    U, Vh = _fix_signs(U, Vh)
    return U, S, Vh


# ----------------------------------------------------------------------------------------------------------------
# whitening
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Whitening:
    """S (n, k) with S S^T = G (or diag(s), or I): applies S and its pseudo-inverse S^+ (k, n).

    Build with `Whitening.identity(n)`, `whitening_from_scale(s)` or `whitening_from_gram(G, method)`. Factors are
    stored in float64; `apply`/`unapply` compute in float64 and return the compute dtype of their input.

    Fields:
        kind: "identity", "diagonal", "cholesky" or "eigh".
        n_features: n.
        scale: diagonal: s (n,).
        factor: cholesky: L (n, n) lower triangular, G + damping I = L L^T; eigh: Q_k (n, k) kept eigenvectors.
        eigenvalues: eigh: lambda_k (k,) kept eigenvalues, descending.
        damping: cholesky: the amount added to diag(G) (0.0 when none was needed).
        dropped: eigh: eigenvalues dropped (<= rtol lambda_max, negatives clamped); diagonal: channels with s = 0.
    """

    kind: str
    n_features: int
    scale: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None
    damping: float = 0.0
    dropped: int = 0

    @staticmethod
    def identity(n_features: int) -> Whitening:
        """S = I: whitened_svd becomes the plain truncated SVD."""
        _check_int(n_features, "Whitening.identity", "n_features", 1)
        return Whitening("identity", n_features)

    @property
    def rank(self) -> int:
        """k, the number of columns of S (n unless eigh dropped directions)."""
        return self.factor.shape[1] if self.kind == "eigh" else self.n_features

    @property
    def device(self) -> torch.device | None:
        for t in (self.scale, self.factor):
            if t is not None:
                return t.device
        return None

    def to(self, device: torch.device | str) -> Whitening:
        """A copy with its factors on `device`."""

        def move(t):
            return None if t is None else t.to(device)

        return replace(self, scale=move(self.scale), factor=move(self.factor), eigenvalues=move(self.eigenvalues))

    def _check(self, M: torch.Tensor, size: int, what: str, where: str) -> None:
        if not isinstance(M, torch.Tensor) or not M.is_floating_point():
            raise TypeError(f"Whitening.{where}: M must be a floating torch.Tensor")
        if M.ndim < 1 or M.shape[-1] != size:
            raise ValueError(
                f"Whitening.{where}: M.shape={tuple(M.shape)} must end in {what}={size} ({self.kind} whitening "
                f"of {self.n_features} features)"
            )
        if self.device is not None and M.device != self.device:
            raise ValueError(
                f"Whitening.{where}: M is on {M.device} but the whitening is on {self.device}; call whitening.to()"
            )

    def apply(self, M: torch.Tensor) -> torch.Tensor:
        """M S: (..., n) -> (..., k)."""
        self._check(M, self.n_features, "n_features", "apply")
        out = _compute_dtype(M.dtype)
        if self.kind == "identity":
            return M.to(out)
        M64 = M.to(torch.float64)
        if self.kind == "diagonal":
            return (M64 * self.scale).to(out)
        if self.kind == "cholesky":
            return (M64 @ self.factor).to(out)
        return ((M64 @ self.factor) * self.eigenvalues.sqrt()).to(out)

    def unapply(self, M: torch.Tensor) -> torch.Tensor:
        """M S^+: (..., k) -> (..., n). S^+ = S^-1 for identity and Cholesky (triangular solve, no inverse formed)."""
        self._check(M, self.rank, "k", "unapply")
        out = _compute_dtype(M.dtype)
        if self.kind == "identity":
            return M.to(out)
        M64 = M.to(torch.float64)
        if self.kind == "diagonal":
            inv = torch.where(self.scale > 0, 1.0 / self.scale, torch.zeros_like(self.scale))
            return (M64 * inv).to(out)
        if self.kind == "cholesky":
            flat = M64.reshape(-1, self.n_features)
            X = torch.linalg.solve_triangular(self.factor, flat, upper=False, left=False)  # X L = M
            return X.reshape(M.shape).to(out)
        return ((M64 * self.eigenvalues.rsqrt()) @ self.factor.mT).to(out)

    def matrix(self) -> torch.Tensor:
        """S as a dense float64 (n, k) matrix (for tests and inspection)."""
        dev = self.device
        eye = torch.eye(self.n_features, dtype=torch.float64, device=dev)
        return self.apply(eye)


def whitening_from_scale(scale: torch.Tensor) -> Whitening:
    """S = diag(s) for a per-channel scale s (n,) >= 0 (ASVD: s = mean|x|^alpha). Channels with s = 0 are dropped."""
    where = "whitening_from_scale"
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"{where}: scale must be a floating torch.Tensor, got {type(scale).__name__}")
    if scale.ndim != 1 or scale.numel() == 0:
        raise ValueError(f"{where}: scale.shape={tuple(scale.shape)} must be (n,) with n >= 1")
    _check_finite(scale, where, "scale")
    if bool((scale < 0).any()):
        raise ValueError(f"{where}: scale has negative entries (min {float(scale.min()):.3e}); it must be >= 0")
    if not bool((scale > 0).any()):
        raise ValueError(f"{where}: scale is all zeros (no channel carries input)")
    s = scale.to(torch.float64)
    return Whitening("diagonal", s.numel(), scale=s, dropped=int((s == 0).sum()))


def whitening_from_gram(
    gram: torch.Tensor,
    method: str = "cholesky",
    *,
    damping: float = 0.0,
    rtol: float | None = None,
    device: torch.device | str | None = None,
) -> Whitening:
    """S with S S^T = G for a Gram G = X^T X (n, n), in float64.

    method="cholesky": G + lambda I = L L^T with lambda = damping * mean(diag(G)) (explicit regularisation, silent).
        If Cholesky fails, or leaves a pivot with L_jj^2 <= n eps64 max(diag(G)) (numerically singular: fewer tokens
        than channels), lambda grows through 1e-10 .. 1e-1 times mean(diag(G)) and a WhiteningDampingWarning reports
        the amount used; beyond that a ValueError.
    method="eigh": G = Q Lambda Q^T; eigenvalues <= rtol lambda_max (default rtol = n eps64; negatives are clamped)
        are dropped: S = Q_k Lambda_k^{1/2} (n, k). Grams accumulated in float32 carry noise ~ eps32 per entry that
        this default keeps; pass a larger rtol to drop it.

    G must be square, finite, symmetric to 1000 eps of its dtype (relative to max |G|) and have a non-negative diagonal.
    """
    where = "whitening_from_gram"
    if method not in ("cholesky", "eigh"):
        raise ValueError(f"{where}: method={method!r} must be 'cholesky' or 'eigh'")
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0.0:
        raise ValueError(f"{where}: damping={damping!r} must be a float >= 0 (relative to mean(diag(G)))")
    G = _checked_gram(gram, where).to(device=device if device is not None else gram.device, dtype=torch.float64)
    G = 0.5 * (G + G.mT)
    n = G.shape[0]
    diag = G.diagonal()
    mean_diag = float(diag.mean())
    if mean_diag <= 0.0:
        raise ValueError(f"{where}: the Gram matrix is zero (no tokens accumulated?)")
    if method == "eigh":
        return _eigh_whitening(G, n, rtol, where)

    max_diag = float(diag.max())
    floor = n * torch.finfo(torch.float64).eps * max_diag
    eye = torch.eye(n, dtype=torch.float64, device=G.device)
    base = damping * mean_diag
    for rel in (0.0,) + _DAMPING_LADDER:
        amount = base + rel * mean_diag
        L, info = torch.linalg.cholesky_ex(G + amount * eye if amount > 0 else G)
        if int(info) == 0 and float(L.diagonal().square().min()) > floor:
            if rel > 0:
                warnings.warn(
                    f"{where}: Gram ({n}x{n}) is not numerically positive definite; added {rel * mean_diag:.3e} "
                    f"(= {rel:.0e} x mean diagonal {mean_diag:.3e}) to its diagonal before Cholesky",
                    WhiteningDampingWarning,
                    stacklevel=2,
                )
            return Whitening("cholesky", n, factor=L, damping=amount)
    lam_min = float(torch.linalg.eigvalsh(G)[0])
    raise ValueError(
        f"{where}: Cholesky failed even with damping {_DAMPING_LADDER[-1]:.0e} x mean diagonal {mean_diag:.3e} "
        f"(smallest eigenvalue {lam_min:.3e}): G is not positive semi-definite"
    )


def _eigh_whitening(G: torch.Tensor, n: int, rtol: float | None, where: str) -> Whitening:
    rtol = n * torch.finfo(torch.float64).eps if rtol is None else float(rtol)
    if not rtol >= 0.0:
        raise ValueError(f"{where}: rtol={rtol} must be >= 0")
    lam, Q = torch.linalg.eigh(G)  # ascending
    lam, Q = lam.flip(0), Q.flip(1)
    keep = lam > rtol * lam[0]
    k = int(keep.sum())
    return Whitening("eigh", n, factor=Q[:, :k].contiguous(), eigenvalues=lam[:k].contiguous(), dropped=n - k)


def _checked_gram(gram, where: str) -> torch.Tensor:
    if not isinstance(gram, torch.Tensor) or not gram.is_floating_point():
        raise TypeError(f"{where}: gram must be a floating torch.Tensor, got {type(gram).__name__}")
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"{where}: gram.shape={tuple(gram.shape)} must be square (n, n)")
    _check_finite(gram, where, "gram")
    scale = float(gram.abs().max())
    tol = 1000 * torch.finfo(gram.dtype).eps * scale
    asym = float((gram - gram.mT).abs().max())
    if asym > tol:
        raise ValueError(f"{where}: gram is not symmetric (max |G - G^T| = {asym:.3e} > {tol:.1e})")
    min_diag = float(gram.diagonal().min())
    if min_diag < -tol:
        raise ValueError(f"{where}: gram has a negative diagonal entry ({min_diag:.3e}); a Gram X^T X has diag >= 0")
    return gram


def as_whitening(stats, n_features: int, *, gram_method: str = "cholesky", device=None) -> Whitening:
    """Turn `stats` into a Whitening for n_features inputs.

    stats: None (identity), a Whitening, a 1-D scale s (n,) (diagonal), a 2-D Gram (n, n), or an InputStatistics
    accumulated with gram=True (its Gram). Gram-based whitenings are built on `device` (default: the Gram's device).
    """
    where = "as_whitening"
    if stats is None:
        return Whitening.identity(n_features)
    if isinstance(stats, Whitening):
        w = stats
    elif isinstance(stats, InputStatistics):
        w = whitening_from_gram(stats.gram, gram_method, device=device)
    elif isinstance(stats, torch.Tensor):
        if stats.ndim == 1:
            w = whitening_from_scale(stats if device is None else stats.to(device))
        elif stats.ndim == 2:
            w = whitening_from_gram(stats, gram_method, device=device)
        else:
            shape = tuple(stats.shape)
            raise ValueError(f"{where}: a statistics tensor must be a scale (n,) or a Gram (n, n), got {shape}")
    else:
        raise TypeError(
            f"{where}: stats must be None, a Whitening, a scale or Gram tensor, or an InputStatistics; "
            f"got {type(stats).__name__}"
        )
    if w.n_features != n_features:
        raise ValueError(f"{where}: statistics describe {w.n_features} input features but W has n={n_features} columns")
    return w


# ----------------------------------------------------------------------------------------------------------------
# whitened SVD
# ----------------------------------------------------------------------------------------------------------------


def fold_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, whitening: Whitening | None = None):
    """(U_r Sigma_r^{1/2}, Sigma_r^{1/2} V_r^T S^+) from an SVD of W S, truncated to `rank` <= len(S)."""
    sq = S[..., :rank].sqrt()
    U_f = U[..., :rank] * sq[..., None, :]
    V_f = sq[..., :, None] * Vh[..., :rank, :]
    if whitening is not None:
        V_f = whitening.unapply(V_f)
    return U_f, V_f


def whitened_svd(
    W: torch.Tensor,
    stats,
    rank: int,
    *,
    gram_method: str = "cholesky",
    svd: str = "exact",
    oversample: int | None = None,
    n_iter: int = 2,
    generator: torch.Generator | int | None = None,
    method: str = "krylov",
) -> WhitenedSVD:
    """Factors U (m, r), V (r, n) minimising ||(W - U V) X^T||_F: SVD_r(W S) S^+, folded with Sigma_r^{1/2}.

    Args:
        W: (m, n) weight, or an error matrix W - W_hat (EoRA, SWSC residual).
        stats: None (plain SVD), a Whitening (reuse one across matrices fed by the same input), a scale s (n,)
            (ASVD, S = diag(s)), a Gram G = X^T X (n, n), or an InputStatistics with a Gram.
        rank: r, 1 <= r <= min(m, n). If S has only k < r columns (eigh dropped directions) or W S has rank < r, the
            factors are zero-padded to r: the loss is already zero on the statistics' span.
        gram_method: "cholesky" (damped on failure, with a warning) or "eigh", for a Gram.
        svd: "exact" (`exact_svd`, full spectrum returned) or "randomized" (`randomized_svd` with oversample,
            n_iter, generator, method; top r singular values returned).

    Returns WhitenedSVD(U, V, singular_values of W S). Loss identity: ||(W - U V) S||_F^2 =
    sum_{i >= r} sigma_i^2 (exact for svd="exact"), which `lowrank_ops.rank.discarded_energy` computes.
    """
    where = "whitened_svd"
    _check_matrix(W, where, name="W", batched=False)
    m, n = W.shape
    validate_rank(rank, m, n, where)
    if svd not in ("exact", "randomized"):
        raise ValueError(f"{where}: svd={svd!r} must be 'exact' or 'randomized'")
    whitening = as_whitening(stats, n, gram_method=gram_method, device=W.device)
    WS = whitening.apply(W)  # (m, k)
    k = WS.shape[1]
    r = min(rank, m, k)
    if svd == "exact":
        U, S, Vh = exact_svd(WS)
    else:
        U, S, Vh = randomized_svd(WS, r, oversample, n_iter, generator, method=method)
    U_f, V_f = fold_svd(U, S, Vh, r, whitening)
    if r < rank:
        U_f = torch.cat([U_f, U_f.new_zeros(m, rank - r)], dim=1)
        V_f = torch.cat([V_f, V_f.new_zeros(rank - r, n)], dim=0)
    return WhitenedSVD(U_f, V_f, S)
