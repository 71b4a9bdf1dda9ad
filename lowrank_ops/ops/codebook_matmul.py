"""The op `torch.ops.lowrank_ops.codebook_matmul(x, codebook, index, v=None, u=None, bias=None, shared="rows")`.

SWSC (shared weight for similar channels, issue 6) stores a weight W (m, n) as a codebook of shared channels
plus an optional low-rank residual U V and bias b:

- shared="rows":    codebook C (K, n), index idx (m,):  W ~ C[idx],     y = (x C^T)[..., idx] + (x V^T) U^T + b
- shared="columns": codebook C (m, K), index idx (n,):  W ~ C[:, idx],  y = segment_sum(x, idx) C^T + (x V^T) U^T + b
  where segment_sum(x, idx)[..., j] = sum over f with idx[f] = j of x[..., f].

Schema: codebook_matmul(Tensor x, Tensor codebook, Tensor index, Tensor? v=None, Tensor? u=None,
                        Tensor? bias=None, str shared="rows") -> Tensor
- x (..., n) fp16 / bf16 / fp32 (fp64 on the torch backend); y (..., m) in x's dtype; x may be non-contiguous.
- codebook in x's dtype with K >= 1 entries; index int32, 1-D, of length m (rows) or n (columns).
- No residual: v = u = None. Otherwise v (r, n), u (m, r) in x's dtype, 1 <= r <= min(m, n).
- bias (m,) in x's dtype or None. All tensors on x's device.
- The index VALUES are not checked here (0 <= idx < K would need a device sync every call): SharedChannelLinear
  validates them when it is built or loaded. With an out-of-range entry the Triton backend adds nothing for it
  (its loads are masked, never a wild read); the torch backend raises (CPU) or hits a device assert (CUDA).

Backends (chosen by `lowrank_ops.backends.select_backend`):
- triton: kernels/codebook_matmul.py (split-K shrink over [C; V] or [one-hot(idx); V], then a gather / GEMV
  expand with the U product and bias in its epilogue; C[idx] is never materialised).
- torch: rows: F.linear(x, C).index_select(-1, idx), then the residual accumulated by addmm; columns:
  segment_sum by index_add_ into an fp32 (M, K) buffer, rounded to x's dtype, then F.linear with C. On CUDA an
  unaligned rank is zero-padded to a multiple of 16 (as in lowrank_matmul); index_add_ on CUDA uses atomics, so
  its summation order (last bits of the columns-shared result) may vary from run to run.
- cuda: not yet.
Registered with torch.library (fake implementation for torch.compile, autograd for x, codebook, v, u and bias;
the index gets no gradient), so it composes with torch.compile(fullgraph=True) and CUDA-graph capture.
The Python function runs the implementation directly, without the custom op's dispatch, when the call is eager
and records no gradient (`_checks.eager_without_autograd`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_ops.backends import DECODE_MAX_M, Backend, select_backend
from lowrank_ops.ops._checks import check_residual_args, check_same_dtype_and_device, eager_without_autograd, shape_of
from lowrank_ops.ops.lowrank_matmul import RANK_PAD_MULTIPLE, _pad_rank

OP = "codebook_matmul"
SHARED_MODES = ("rows", "columns")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPES = (*TRITON_DTYPES, torch.float64)


def codebook_matmul_out_features(codebook: torch.Tensor, index: torch.Tensor, shared: str) -> int:
    """m, the output width: len(index) when rows are shared, codebook.shape[0] when columns are."""
    return index.shape[0] if shared == "rows" else codebook.shape[0]


def check_codebook_matmul_args(
    x: torch.Tensor,
    codebook: torch.Tensor,
    index: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    shared: str,
) -> None:
    """Raise TypeError / ValueError naming the op, the offending value and the rule (index values excepted,
    see the module docstring)."""
    optional = ("v", "u", "bias")
    for name, t in (("x", x), ("codebook", codebook), ("index", index), ("v", v), ("u", u), ("bias", bias)):
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(shared, str):
        raise TypeError(f"{OP}: shared must be a str, one of {SHARED_MODES}, got {type(shared).__name__}")
    if shared not in SHARED_MODES:
        raise ValueError(f"{OP}: shared={shared!r} must be one of {SHARED_MODES}")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least 1 dimension (..., n), got a 0-d tensor")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{OP}: x.dtype={x.dtype} must be one of {[str(d) for d in SUPPORTED_DTYPES]}")
    n_in = x.shape[-1]
    if n_in < 1:
        raise ValueError(f"{OP}: n=x.shape[-1]={n_in} must be >= 1 (x.shape={shape_of(x)})")
    layout = "(K, n)" if shared == "rows" else "(m, K)"
    if codebook.dim() != 2:
        raise ValueError(
            f"{OP}: codebook must be 2-D {layout} for shared={shared!r}, got codebook.shape={shape_of(codebook)}"
        )
    if index.dtype != torch.int32:
        raise TypeError(f"{OP}: index.dtype={index.dtype} must be torch.int32")
    if index.dim() != 1:
        raise ValueError(f"{OP}: index must be 1-D, got index.shape={shape_of(index)}")
    if shared == "rows":
        entries = codebook.shape[0]
        if codebook.shape[1] != n_in:
            raise ValueError(
                f"{OP}: codebook.shape[1]={codebook.shape[1]} must equal n=x.shape[-1]={n_in} for shared='rows' "
                f"(codebook (K, n), codebook.shape={shape_of(codebook)})"
            )
        m_out = index.shape[0]
        if m_out < 1:
            raise ValueError(f"{OP}: index.shape={shape_of(index)} must have m >= 1 entries (one per output row)")
    else:
        entries = codebook.shape[1]
        m_out = codebook.shape[0]
        if m_out < 1:
            raise ValueError(f"{OP}: codebook.shape[0]={m_out} (m) must be >= 1 for shared='columns'")
        if index.shape[0] != n_in:
            raise ValueError(
                f"{OP}: index.shape[0]={index.shape[0]} must equal n=x.shape[-1]={n_in} for shared='columns' "
                "(one entry per input column)"
            )
    if entries < 1:
        raise ValueError(f"{OP}: the codebook must have K >= 1 entries, got K=0 (codebook.shape={shape_of(codebook)})")
    check_residual_args(OP, v, u, bias, m_out, n_in, min_rank=1)
    check_same_dtype_and_device(OP, x, dict(codebook=codebook, v=v, u=u, bias=bias),
                                dict(codebook=codebook, index=index, v=v, u=u, bias=bias))  # fmt: skip


def segment_sum(x2d: torch.Tensor, index: torch.Tensor, entries: int) -> torch.Tensor:
    """s (M, K) with s[:, j] = sum of x2d[:, f] over idx[f] = j, accumulated in fp32 (fp64 for fp64 x)."""
    acc = torch.float64 if x2d.dtype == torch.float64 else torch.float32
    return x2d.new_zeros((x2d.shape[0], entries), dtype=acc).index_add_(1, index, x2d.to(acc))


def _codebook_matmul_torch(x2d, codebook, index, v, u, bias, shared) -> torch.Tensor:
    if shared == "rows":
        y = F.linear(x2d, codebook).index_select(1, index)
    else:
        y = F.linear(segment_sum(x2d, index, codebook.shape[1]).to(x2d.dtype), codebook)
    if v is not None:
        if x2d.is_cuda:
            v, u = _pad_rank(v, u, RANK_PAD_MULTIPLE)
        y = torch.addmm(y, F.linear(x2d, v), u.t())  # the expand accumulates into y in the GEMM epilogue
    return y if bias is None else y.add_(bias)


def codebook_matmul(
    x: torch.Tensor,
    codebook: torch.Tensor,
    index: torch.Tensor,
    v: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    shared: str = "rows",
) -> torch.Tensor:
    """y = x W^T + (x V^T) U^T + b with W = C[idx] (shared="rows") or C[:, idx] (shared="columns"), never
    materialised. See the module docstring for shapes, dtypes and backends.

    Same as torch.ops.lowrank_ops.codebook_matmul, except that non-tensor arguments raise TypeError here
    instead of the dispatcher's RuntimeError.
    """
    check_codebook_matmul_args(x, codebook, index, v, u, bias, shared)
    if eager_without_autograd(x, codebook, v, u, bias):
        return _codebook_matmul_impl(x, codebook, index, v, u, bias, shared)
    return _codebook_matmul_op(x, codebook, index, v, u, bias, shared)


@torch.library.custom_op("lowrank_ops::codebook_matmul", mutates_args=())
def _codebook_matmul_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    index: torch.Tensor,
    v: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shared: str = "rows",
) -> torch.Tensor:
    check_codebook_matmul_args(x, codebook, index, v, u, bias, shared)
    return _codebook_matmul_impl(x, codebook, index, v, u, bias, shared)


def _codebook_matmul_impl(x, codebook, index, v, u, bias, shared: str) -> torch.Tensor:
    """The op's body after its checks: pick the backend (the one dispatch point) and run it."""
    x2d = x.reshape(-1, x.shape[-1])
    m_rows = x2d.shape[0]
    backend = select_backend(OP, x.device, m_rows)
    if x.dtype == torch.float64 and backend is not Backend.TORCH:
        raise TypeError(f"{OP}: x.dtype=torch.float64 runs only on the torch backend, not {backend.value}")
    if backend is Backend.TRITON and m_rows > 0:
        from lowrank_ops.kernels.codebook_matmul import codebook_matmul_triton

        y2d = codebook_matmul_triton(x2d, codebook, index, v, u, bias, shared, DECODE_MAX_M)
    elif backend is Backend.CUDA:  # pragma: no cover - select_backend raises until csrc/ registers a kernel
        raise NotImplementedError(f"{OP}: the CUDA backend has no kernel yet")
    else:
        y2d = _codebook_matmul_torch(x2d, codebook, index, v, u, bias, shared)
    return y2d.reshape(*x.shape[:-1], codebook_matmul_out_features(codebook, index, shared))


@_codebook_matmul_op.register_fake
def _(x, codebook, index, v=None, u=None, bias=None, shared="rows"):
    check_codebook_matmul_args(x, codebook, index, v, u, bias, shared)
    return x.new_empty((*x.shape[:-1], codebook_matmul_out_features(codebook, index, shared)))


def _setup_context(ctx, inputs, output):
    x, codebook, index, v, u, bias, shared = inputs
    ctx.save_for_backward(x, codebook, index, v, u)
    ctx.shared = shared
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """rows:    t = x C^T, dt = scatter-add of dy into the K columns idx, dx = dt C, dC = dt^T x;
    columns: s = segment_sum(x), ds = dy C, dx = ds[:, idx], dC = dy^T s;
    residual as in lowrank_matmul: dx += (dy U) V, dV = (dy U)^T x, dU = dy^T (x V^T); db = sum dy.
    The index gets no gradient."""
    x, codebook, index, v, u = ctx.saved_tensors
    x2d, dy = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
    need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x2d = grad_c = grad_v = grad_u = grad_b = None
    if ctx.shared == "rows":
        if need_x or need_c:
            dt = segment_sum(dy, index, codebook.shape[0]).to(dy.dtype)  # (M, K): dy summed per codebook entry
            grad_x2d = dt @ codebook if need_x else None
            grad_c = dt.T @ x2d if need_c else None
    else:
        if need_x:
            grad_x2d = (dy @ codebook).index_select(1, index)
        if need_c:
            grad_c = dy.T @ segment_sum(x2d, index, codebook.shape[1]).to(dy.dtype)
    if v is not None:
        dz = dy @ u
        if need_x:
            grad_x2d = grad_x2d + dz @ v
        grad_v = dz.T @ x2d if ctx.needs_input_grad[3] else None
        grad_u = dy.T @ (x2d @ v.T) if ctx.needs_input_grad[4] else None
    if ctx.has_bias and ctx.needs_input_grad[5]:
        grad_b = dy.sum(0)
    grad_x = grad_x2d.reshape(x.shape) if need_x else None
    return grad_x, grad_c, None, grad_v, grad_u, grad_b, None


_codebook_matmul_op.register_autograd(_backward, setup_context=_setup_context)
