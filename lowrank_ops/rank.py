"""Rank rules: parameter ratio <-> rank, break-even rank, alignment.

Conventions (docs/FACTS.md): W is (m, n) = (out, in); a rank-r factorisation stores r (m + n) parameters, so the
param ratio -- the fraction of parameters KEPT -- is rho = r (m + n) / (m n). The break-even rank is
r* = m n / (m + n): at or above it the factors are no smaller than W.

Alignment policy: ranks derived from a param ratio are rounded DOWN to a multiple of `align` (default 16),
so the kept fraction never exceeds the one asked for, but never below `align` itself (a layer keeps at least
one aligned block). Unaligned ranks are slow on tensor cores (docs/FACTS.md: H100 cuBLAS, M=2048, r=1492 took
476 us where r=1536 took 145 us). A rank the caller gives explicitly is honoured exactly.
"""

from __future__ import annotations

import torch

DEFAULT_ALIGN = 16


def _check_shape(m: int, n: int) -> None:
    if m < 1 or n < 1:
        raise ValueError(f"rank rules: matrix shape ({m}, {n}) must have m >= 1 and n >= 1")


def param_ratio(m: int, n: int, rank: int) -> float:
    """Fraction of the parameters of an (m, n) matrix kept by rank-`rank` factors: r (m + n) / (m n)."""
    _check_shape(m, n)
    return rank * (m + n) / (m * n)


def break_even_rank(m: int, n: int) -> float:
    """r* = m n / (m + n): factors of rank >= r* store at least as many parameters as W."""
    _check_shape(m, n)
    return m * n / (m + n)


def rank_for_param_ratio(m: int, n: int, ratio: float, align: int = DEFAULT_ALIGN) -> int:
    """Largest rank whose param ratio is <= `ratio`, rounded down to a multiple of `align`.

    Clamped to [min(align, min(m, n)), min(m, n)]. `align=1` disables alignment.
    """
    _check_shape(m, n)
    if not 0.0 < ratio:
        raise ValueError(f"rank_for_param_ratio: ratio={ratio} must be > 0 (fraction of parameters kept)")
    if align < 1:
        raise ValueError(f"rank_for_param_ratio: align={align} must be >= 1")
    full = min(m, n)
    rank = int(ratio * m * n / (m + n) + 1e-9)
    rank = (rank // align) * align
    return max(min(align, full), min(rank, full))


def validate_rank(rank: int, m: int, n: int, where: str) -> int:
    """Check 1 <= rank <= min(m, n) and return it; `where` names the caller in the error."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{where}: rank={rank!r} must be an int")
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"{where}: rank={rank} must satisfy 1 <= rank <= min(m, n) = {min(m, n)} for W of shape ({m}, {n})"
        )
    return rank


def discarded_energy(singular_values: torch.Tensor, rank: int | None = None, *, relative: bool = False) -> torch.Tensor:
    """E(r) = sum_{i >= r} sigma_i^2 for singular values (..., k) in descending order (0-based i), in float64.

    By Eckart-Young, E(r) is the squared Frobenius error of the best rank-r approximation; for the singular values of
    W S (whitened SVD) it is the activation-weighted loss ||(W - U V) X^T||_F^2. `rank` in [0, k] gives E(rank)
    with shape (...); rank=None gives the whole curve E(0), ..., E(k) with shape (..., k + 1), for allocators.
    relative=True divides by E(0) = sum_i sigma_i^2 (0 where all sigma are 0).
    """
    where = "discarded_energy"
    if not isinstance(singular_values, torch.Tensor) or not singular_values.is_floating_point():
        kind = type(singular_values).__name__
        raise TypeError(f"{where}: singular_values must be a floating torch.Tensor, got {kind}")
    if singular_values.ndim < 1:
        raise ValueError(f"{where}: singular_values.shape={tuple(singular_values.shape)} must be (..., k)")
    k = singular_values.shape[-1]
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"{where}: rank={rank!r} must be an int or None")
        if not 0 <= rank <= k:
            raise ValueError(f"{where}: rank={rank} must satisfy 0 <= rank <= k = {k}")
    s2 = singular_values.to(torch.float64).square()
    tail = s2.flip(-1).cumsum(-1).flip(-1)  # tail[..., r] = sum_{i >= r} sigma_i^2
    curve = torch.cat([tail, torch.zeros_like(tail[..., :1])], dim=-1)
    if relative:
        total = curve[..., :1]
        tiny = torch.finfo(torch.float64).tiny
        curve = torch.where(total > 0, curve / total.clamp_min(tiny), torch.zeros_like(curve))
    return curve if rank is None else curve[..., rank]
