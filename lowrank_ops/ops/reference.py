"""Torch reference implementations. They run in whatever dtype they are given, so tests call them in
float64 as the ground truth, and the benchmark uses them as the stock-PyTorch baseline."""

from __future__ import annotations

import torch


def lowrank_matmul_ref(
    x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = (x V^T) U^T + b with x (..., n), V (r, n), U (m, r), b (m,): two plain matmuls in x's dtype."""
    y = (x @ v.transpose(-1, -2)) @ u.transpose(-1, -2)
    return y if bias is None else y + bias
