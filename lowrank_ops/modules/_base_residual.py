"""What the "compressed base + optional low-rank residual" modules share (QuantLowRankLinear, SparseLowRankLinear,
SharedChannelLinear): checking the residual factors handed to a constructor, copying them in, and building the dense
nn.Linear W = W_base + U V that `to_linear` returns."""

from __future__ import annotations

import torch
from torch import nn


def check_residual_rank(rank, in_features: int, out_features: int, where: str) -> int:
    """Check that the residual rank is an int with 0 <= rank < the break-even rank m n / (m + n) and return it: at
    or above it the factors alone store as many parameters as the dense weight, so compressing the base is moot."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{where}: rank={rank!r} must be an int")
    m, n = out_features, in_features
    if rank < 0 or rank * (m + n) >= m * n:
        raise ValueError(f"{where}: rank={rank} must satisfy 0 <= rank < m n / (m + n) = {m * n / (m + n):.1f} for a "
                         f"({m}, {n}) weight (the break-even rank: a larger residual stores more than the dense "
                         "weight)")  # fmt: skip
    return rank


def check_residual_parts(u, v, bias, m: int, n: int, where: str) -> int:
    """Rank r of the residual U (m, r), V (r, n) (0 when both are None); TypeError / ValueError naming `where`.

    u and v: both or neither; floating tensors; bias None or (m,)."""
    if (u is None) != (v is None):
        raise ValueError(f"{where}: give both u (m, r) and v (r, n) or neither")
    for name, t in (("u", u), ("v", v), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"{where}: {name} must be a floating torch.Tensor, got {type(t).__name__}")
    rank = 0
    if u is not None:
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != m or v.shape[1] != n or u.shape[1] != v.shape[0]:
            raise ValueError(
                f"{where}: u.shape={tuple(u.shape)}, v.shape={tuple(v.shape)} must be (m, r), (r, n) with "
                f"(m, n) = {(m, n)}"
            )
        rank = u.shape[1]
    if bias is not None and tuple(bias.shape) != (m,):
        raise ValueError(f"{where}: bias.shape={tuple(bias.shape)} must be ({m},)")
    return rank


def copy_residual_parts(module: nn.Module, u, v, bias) -> None:
    """Copy the (checked) residual factors and bias into `module` (casting to its dtype and device)."""
    with torch.no_grad():
        if module.rank:
            module.u.copy_(u.detach())
            module.v.copy_(v.detach())
        if bias is not None:
            module.bias.copy_(bias.detach())


def dense_linear(module: nn.Module, base: torch.Tensor, dtype: torch.dtype, residual: bool = True) -> nn.Linear:
    """nn.Linear in `dtype` on base's device with W = base + U V (residual=True and rank > 0) and the module's bias;
    the sum is computed in float32 at least, so W is rounded once to `dtype`."""
    device = base.device
    compute = torch.promote_types(dtype, torch.float32)
    weight = base.detach().to(compute)
    if residual and module.rank:
        weight = weight + module.u.detach().to(compute) @ module.v.detach().to(compute)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                       device=device)  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return linear
