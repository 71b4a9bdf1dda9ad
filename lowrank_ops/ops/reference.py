"""Torch reference implementations. They run in whatever dtype they are given, so tests call them in
float64 as the ground truth, and the benchmark uses them as the stock-PyTorch baseline."""

from __future__ import annotations

import torch

from lowrank_ops.quant_format import dequantize


def lowrank_matmul_ref(
    x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = (x V^T) U^T + b with x (..., n), V (r, n), U (m, r), b (m,): two plain matmuls in x's dtype."""
    y = (x @ v.transpose(-1, -2)) @ u.transpose(-1, -2)
    return y if bias is None else y + bias


def codebook_matmul_ref(
    x: torch.Tensor,
    codebook: torch.Tensor,
    index: torch.Tensor,
    v: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shared: str = "rows",
) -> torch.Tensor:
    """y = x W^T + (x V^T) U^T + b in x's dtype with W = C[idx] (shared="rows", C (K, n), idx (m,)) or
    W = C[:, idx] (shared="columns", C (m, K), idx (n,)) materialised; v = u = None means no residual."""
    index = index.long()
    w = codebook.index_select(0, index) if shared == "rows" else codebook.index_select(1, index)
    y = x @ w.transpose(-1, -2)
    if v is not None:
        y = y + (x @ v.transpose(-1, -2)) @ u.transpose(-1, -2)
    return y if bias is None else y + bias


def quant_lowrank_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """y = x W_hat^T + (x V^T) U^T + b in x's dtype, W_hat = quant_format.dequantize(...) (computed in fp32, or
    fp64 for fp64 x, and rounded once to x's dtype); v = u = None (or rank 0) means no residual. Plain matmuls:
    call it with float64 x, scales, zeros, v, u, b for the ground truth."""
    w = dequantize(qweight, scales, zeros, bits, group_size, x.shape[-1], x.dtype)
    y = x @ w.transpose(-1, -2)
    if v is not None and v.shape[0] > 0:
        y = y + (x @ v.transpose(-1, -2)) @ u.transpose(-1, -2)
    return y if bias is None else y + bias
