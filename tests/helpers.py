"""Shared test utilities: where kernels run, and the float64 accuracy rule of STYLE.md (rule 12)."""

import os

import pytest
import torch

KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_close_to_reference(actual: torch.Tensor, same_dtype_torch: torch.Tensor, reference64: torch.Tensor):
    """Error vs float64 at most twice PyTorch's own same-dtype error plus one unit of the dtype's rounding
    (the epsilon covers shapes where torch happens to be nearly exact)."""
    err = relative_error(actual, reference64)
    torch_err = relative_error(same_dtype_torch, reference64)
    eps = torch.finfo(actual.dtype).eps
    assert err <= 2 * torch_err + eps, f"error {err:.3e} > 2 x torch's same-dtype error {torch_err:.3e} + eps {eps:.1e}"
