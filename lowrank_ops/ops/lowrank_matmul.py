"""The op `torch.ops.lowrank_ops.lowrank_matmul(x, v, u, bias=None)`: y = (x V^T) U^T + b.

x (..., n) fp16 / bf16 / fp32 (fp64 on the torch backend), V (r, n), U (m, r), b (m,) all in x's dtype and
on x's device; y (..., m) in x's dtype. Any M, n, m and 1 <= r <= min(m, n); x may be non-contiguous.

Backends (chosen by `lowrank_ops.backends.select_backend`):
- triton: kernels/lowrank_matmul.py (split-K shrink + fused expand, fp32 accumulation throughout).
- torch: two F.linear calls. On CUDA an unaligned rank is zero-padded to a multiple of 16 first: padding
  costs r (m + n) extra bytes, cuBLAS on an unaligned rank cost 3.3x (docs/FACTS.md, r = 1492 vs 1536).
- cuda: csrc/lowrank_decode.cu (split-K shrink + expand chained by PDL) through the private op
  torch.ops.lowrank_ops.lowrank_matmul_cuda: M <= 16, fp16 / bf16, only when requested (not chosen by AUTO yet).
Registered with torch.library (fake implementation for torch.compile, autograd formula for training the
factors), so it composes with torch.compile(fullgraph=True) and CUDA-graph capture.
The Python function runs the implementation directly, without the custom op's dispatch, when the call is eager
and records no gradient (`_checks.eager_without_autograd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_ops.backends import (
    DECODE_MAX_M,
    Backend,
    BackendUnavailableError,
    cuda_dtype_unavailable_reason,
    select_backend,
)
from lowrank_ops.ops._checks import eager_without_autograd, shape_of

OP = "lowrank_matmul"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES = (*TRITON_DTYPES, torch.float64)
RANK_PAD_MULTIPLE = 16


def check_lowrank_matmul_args(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise TypeError / ValueError naming the op, the offending value and the rule."""
    for name, t in (("x", x), ("v", v), ("u", u), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least 1 dimension (..., n), got a 0-d tensor")
    if v.dim() != 2:
        raise ValueError(f"{OP}: v must be 2-D (r, n), got v.shape={shape_of(v)}")
    if u.dim() != 2:
        raise ValueError(f"{OP}: u must be 2-D (m, r), got u.shape={shape_of(u)}")
    rank, n_in = v.shape
    m_out = u.shape[0]
    if rank < 1:
        raise ValueError(f"{OP}: rank={rank} must be >= 1 (v.shape={shape_of(v)})")
    if u.shape[1] != rank:
        raise ValueError(f"{OP}: u.shape[1]={u.shape[1]} must equal the rank v.shape[0]={rank} (u.shape={shape_of(u)})")
    if x.shape[-1] != n_in:
        raise ValueError(f"{OP}: x.shape[-1]={x.shape[-1]} must equal v.shape[1]={n_in} (x.shape={shape_of(x)})")
    if rank > min(m_out, n_in):
        raise ValueError(
            f"{OP}: rank={rank} must be <= min(m, n) = {min(m_out, n_in)} "
            f"(u.shape={shape_of(u)}, v.shape={shape_of(v)})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != m_out):
        raise ValueError(f"{OP}: bias.shape={shape_of(bias)} must be ({m_out},) to match u.shape[0]")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{OP}: x.dtype={x.dtype} must be one of {[str(d) for d in SUPPORTED_DTYPES]}")
    for name, t in (("v", v), ("u", u), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{OP}: {name}.dtype={t.dtype} must equal x.dtype={x.dtype}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}; all tensors must share a device")


def _pad_rank(v: torch.Tensor, u: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the rank to a multiple of `multiple`; the product is unchanged."""
    pad = -v.shape[0] % multiple
    if pad == 0:
        return v, u
    return F.pad(v, (0, 0, 0, pad)), F.pad(u, (0, pad))


def _lowrank_matmul_torch(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.is_cuda:
        v, u = _pad_rank(v, u, RANK_PAD_MULTIPLE)
    return F.linear(F.linear(x, v), u, bias)


def _lowrank_matmul_cuda(
    x2d: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:  # pragma: no cover - needs the extension and a GPU
    """The csrc/ decode kernels; x2d needs unit column stride, the weights row-major."""
    if (reason := cuda_dtype_unavailable_reason(x2d.dtype)) is not None:
        raise BackendUnavailableError(f"{OP}: backend 'cuda' is unavailable: {reason}")
    if x2d.shape[0] == 0:
        return x2d.new_empty((0, u.shape[0]))
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    bias = None if bias is None else bias.contiguous()
    return torch.ops.lowrank_ops.lowrank_matmul_cuda(x2d, v.contiguous(), u.contiguous(), bias)


def lowrank_matmul(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x V^T) U^T + b. See the module docstring for shapes, dtypes and backends.

    Same as torch.ops.lowrank_ops.lowrank_matmul, except that non-tensor arguments raise TypeError here
    instead of the dispatcher's RuntimeError.
    """
    check_lowrank_matmul_args(x, v, u, bias)
    if eager_without_autograd(x, v, u, bias):
        return _lowrank_matmul_impl(x, v, u, bias)
    return _lowrank_matmul_op(x, v, u, bias)


@torch.library.custom_op("lowrank_ops::lowrank_matmul", mutates_args=())
def _lowrank_matmul_op(
    x: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    check_lowrank_matmul_args(x, v, u, bias)
    return _lowrank_matmul_impl(x, v, u, bias)


def _lowrank_matmul_impl(x, v, u, bias) -> torch.Tensor:
    """The op's body after its checks: pick the backend (the one dispatch point) and run it."""
    x2d = x.reshape(-1, x.shape[-1])
    backend = select_backend(OP, x.device, x2d.shape[0])
    if x.dtype == torch.float64 and backend is not Backend.TORCH:
        raise TypeError(f"{OP}: x.dtype=torch.float64 runs only on the torch backend, not {backend.value}")
    if backend is Backend.TRITON and x2d.shape[0] > 0:
        from lowrank_ops.kernels.lowrank_matmul import lowrank_matmul_triton

        y2d = lowrank_matmul_triton(x2d, v, u, bias, DECODE_MAX_M)
    elif backend is Backend.CUDA:  # pragma: no cover - needs the extension and a GPU (tests/test_cuda_kernels.py)
        y2d = _lowrank_matmul_cuda(x2d, v, u, bias)
    else:
        y2d = _lowrank_matmul_torch(x2d, v, u, bias)
    return y2d.reshape(*x.shape[:-1], u.shape[0])


@_lowrank_matmul_op.register_fake
def _(x, v, u, bias=None):
    check_lowrank_matmul_args(x, v, u, bias)
    return x.new_empty((*x.shape[:-1], u.shape[0]))


def _setup_context(ctx, inputs, output):
    x, v, u, bias = inputs
    ctx.save_for_backward(x, v, u)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """dz = dy U, dx = dz V, dU = dy^T z, dV = dz^T x, db = sum dy (leading dims flattened)."""
    x, v, u = ctx.saved_tensors
    x2d, dy = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
    z = x2d @ v.T
    dz = dy @ u
    grad_x = (dz @ v).reshape(x.shape) if ctx.needs_input_grad[0] else None
    grad_v = dz.T @ x2d if ctx.needs_input_grad[1] else None
    grad_u = dy.T @ z if ctx.needs_input_grad[2] else None
    grad_b = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_x, grad_v, grad_u, grad_b


_lowrank_matmul_op.register_autograd(_backward, setup_context=_setup_context)
