"""Triton kernels for the low-rank linear y = (x V^T) U^T + b.

Shapes: x (M, n) (the op flattens leading dims), V (r, n), U (m, r), b (m,), y (M, m). Both factors are
row-major, so each factor product is a "rows of W times x" product and one kernel serves both:

    _lowrank_matmul_kernel:  out[s] = (sum_t a[t]) . w^T   (+ bias, cast to out dtype)
        a   (SPLIT_IN, M, K)   partial sums of the input, summed while loading (SPLIT_IN = 1 for x)
        w   (N, K)             one factor, row-major
        out (SPLIT_OUT, M, N)  program (pid_n, pid_m, pid_s) owns BLOCK_N rows of w and K-slice pid_s

    shrink: a = x (1, M, n),  w = V (r, n) -> z (S, M, r) fp32 partials, split-K over n into S slices
    expand: a = z (S, M, r),  w = U (m, r) -> y (1, M, m) in x's dtype, bias in the epilogue

Why split-K without atomics: at decode the shrink has only r output columns (r = 256 -> 256 rows of V),
too few rows of work to put ~2 programs on each of an H100's 132 SMs, yet V is 2 MB that must stream at full
bandwidth. Splitting n into S slices multiplies the programs by S; the S fp32 partials (S * M * r * 4 bytes,
<= 256 KB) are summed by the expand as it loads z, so no memset, no atomics, and the result is
deterministic.

Split count and expand tiles (`_lowrank_configs`; the cap is kernels/launch.py's, shared with the other ops).
Every expand program re-reads all S partials of its M rows, so S costs L2 bytes and, on the tl.dot path, shared
memory (Triton's pipeliner stages the S partial tiles of each K-step). S is capped so that the re-reads,
cdiv(m, BLOCK_N) x M x r x 4 bytes per split, stay within the weight bytes r (m + n) x itemsize, and the
staged tiles, S x BLOCK_M x BLOCK_K x 4 bytes, within 32 KB per stage. The expand's N-tile is widened where
that cap binds, because the re-reads per split scale with the number of expand programs along m: the tl.dot
decode expand (4 < M <= 16) uses 16 x 64 x 64 tiles instead of `_launch_config`'s 16 x 16 x 128, the FMA
expand at 1 < M <= 4 takes BLOCK_K = 64 and the wider BLOCK_N that its register budget then allows. M = 1 is
unchanged (S = 16: its re-reads are 64 KB per split). sm_90a compile (scripts/check_sm90_compile.py), 4096^2,
r = 128, bf16, M = 16: before, S = 16 and 256 expand programs re-read 32 MB of partials for 2 MB of weights
and asked for 270336 B of shared memory (an H100 block may use 232448) with 255 registers and a 56 B stack
(spills); after, S = 4 (32 shrink programs), 64 expand programs re-read 2 MB, 49152 B, 134 registers, no
spills. M = 64 went from 540672 B (S = 16) to 49152 B (S = 1). Not timed on a GPU: whether the lost shrink
programs (128 -> 32 at M = 16; 32 -> 2 at M = 64, where the shrink's 64-row tiles leave r / 64 programs per
slice) cost more than the re-reads saved is for benchmarks/bench_lowrank_matmul.py on an H100.

Why two chained launches instead of one persistent kernel: with programmatic dependent launch (PDL, sm_90+)
the expand grid is launched while the shrink still runs; every expand program loads its first chunk of U
(which does not depend on z) before `gdc_wait`, so the launch gap and the first U fetch overlap the shrink.
The shrink does NOT prefetch V: the kernel before it may write V (an optimizer step before a forward; the op
has autograd) or x, so it waits before its first load and triggers the expand only after that wait. This is
also what makes the expand's U prefetch safe: once the expand starts, every kernel before the shrink has
finished, and the shrink never writes U (issue 20; tests/test_hopper_plans.py runs both kernels with PDL
hazards poisoned). The CUDA decode kernels (csrc/) follow the same rule. A grid-wide handoff inside one kernel
would need a device-wide barrier and a co-resident grid; PDL gives the overlap without either. This choice
is to be confirmed by the H100 benchmark (GPU figures pending at the time of writing).

Inner product, per launch configuration (`_launch_config`, `_expand_config`):
- M <= 4 ("FMA"): a [BLOCK_M, 1, BLOCK_K] x [1, BLOCK_N, BLOCK_K] broadcast product reduced over K in fp32.
  BLOCK_M * BLOCK_N * BLOCK_K <= 4096 keeps the product at 32 fp32 registers per thread with 4 warps.
- M > 4 ("DOT"): tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles. Operands are promoted to fp32 and
  multiplied in TF32 on the GPU for fp16/bf16 inputs: they are exact in TF32 (10-bit mantissa), only the fp32
  intermediate z is rounded, to 10 bits -- finer than torch's two-GEMM path, which rounds z to the
  activation dtype. fp32 inputs use 3xTF32 (`launch.dot_flags`): plain TF32 would round x, V, U and z to 10
  mantissa bits (relative rounding 2^-11 against fp32's 2^-24), far outside the tests' accuracy rule. Under
  the CPU interpreter tl.dot runs in IEEE fp32 (its bf16 tl.dot is wrong). Every tl.dot dimension is >= 16,
  as the GPU compiler requires.
Accumulation is fp32 throughout; offsets along rows are int64 (11008 x 4096 x M stays far from 2^31 but
the leading-dim stride of a large x need not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_ops.kernels.launch import (
    MAX_SPLIT,
    cap_split,
    device_info,
    dot_flags,
    partial_split_cap,
    target_programs,
)


@triton.jit
def _lowrank_matmul_kernel(
    a_ptr,  # (SPLIT_IN, M, K)  fp16 / bf16 / fp32
    w_ptr,  # (N, K)
    bias_ptr,  # (N,) or dummy when HAS_BIAS is False
    out_ptr,  # (SPLIT_OUT, M, N)
    M,
    N,
    K,
    K_PER_SPLIT,  # K-slice of one program along grid axis 2; multiple of BLOCK_K
    stride_as,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_os,
    stride_om,
    stride_on,
    SPLIT_IN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_W: tl.constexpr,  # fetch w's first chunk before gdc_wait: only when the previous kernel cannot write w
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)

    if USE_PDL and not PREFETCH_W:
        # The op's first launch: the previous kernel may be anything, including one that writes w (an optimizer
        # step before a forward), so nothing is read before the wait. Triggering only after it means that once the
        # dependent (the expand) starts, every kernel before this one has finished: it may prefetch its own weight.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    w = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k[None, :] < k_end), other=0.0)
    if USE_PDL and PREFETCH_W:
        # The expand: its only unfinished predecessor is the shrink, which writes `a` and never w, so the first
        # chunk of w is fetched before waiting.
        tl.extra.cuda.gdc_launch_dependents()  # the next op's first launch waits before it reads anything
        tl.extra.cuda.gdc_wait()  # `a` is written by the previous kernel

    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = m_mask[:, None] & (offs_k[None, :] < k_end)
        a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for t in tl.static_range(SPLIT_IN):
            a += tl.load(a_rows + t * stride_as + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
        # Register double buffer: issue the next weight chunk before consuming this one.
        w_ptrs += BLOCK_K * stride_wk
        w_next = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k[None, :] + BLOCK_K < k_end), other=0.0)
        if USE_DOT:
            acc += tl.dot(a, tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        w = w_next

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


FMA_MAX_M = 4  # above this, tl.dot tiles (BLOCK_M = 16) beat the broadcast product's register footprint
FMA_PRODUCT_ELEMS = 4096  # BLOCK_M * BLOCK_N * BLOCK_K of the broadcast product: 32 fp32 regs/thread, 4 warps
EXPAND_DOT_BLOCK_N = 64  # tl.dot decode expand: 4x fewer programs than 16 re-read the partials (module docstring)
EXPAND_BLOCK_K = 64  # expand K-step at 1 < M <= 16; 128 with BLOCK_N = 64 reached 255 registers (bf16) and
# spilled (fp32, 3xTF32) in the sm_90a compile


def _launch_config(
    m_rows: int, n_out: int, k_in: int, target_programs: int, allow_split: bool, decode_max_m: int
) -> dict:
    """Blocks and split count for one factor product out (M, N) = a (M, K) . w (N, K)^T. `decode_max_m`: the
    largest M given decode tiles (16 x 16 tl.dot); the caller's dispatch bound (lowrank_ops.backends.DECODE_MAX_M),
    passed down so that dispatch and tiles agree without the kernels importing the dispatch layer."""
    k_pow2 = triton.next_power_of_2(k_in)
    if m_rows <= FMA_MAX_M:
        block_m = triton.next_power_of_2(m_rows)
        block_k = min(256, k_pow2)
        block_n = max(1, min(FMA_PRODUCT_ELEMS // (block_m * block_k), triton.next_power_of_2(n_out)))
        use_dot = False
    elif m_rows <= decode_max_m:
        block_m, block_n, block_k, use_dot = 16, 16, max(16, min(128, k_pow2)), True
    else:
        block_m, block_n, block_k, use_dot = 64, 64, max(16, min(64, k_pow2)), True
    programs = triton.cdiv(n_out, block_n) * triton.cdiv(m_rows, block_m)
    k_blocks = triton.cdiv(k_in, block_k)
    split = max(1, min(k_blocks, MAX_SPLIT, target_programs // programs)) if allow_split else 1
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k_in, k_per_split)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, split=split, k_per_split=k_per_split
    )


def _expand_config(m_rows: int, m_out: int, rank: int, target: int, decode_max_m: int) -> dict:
    """Blocks of the expand: `_launch_config`'s, with a wider N-tile at 1 < M <= decode_max_m so that fewer
    programs re-read the partials and the split cap allows more slices (module docstring)."""
    cfg = _launch_config(m_rows, m_out, rank, target, False, decode_max_m)
    if cfg["USE_DOT"] and m_rows <= decode_max_m:
        cfg["BLOCK_N"], cfg["BLOCK_K"] = EXPAND_DOT_BLOCK_N, min(cfg["BLOCK_K"], EXPAND_BLOCK_K)
    elif not cfg["USE_DOT"] and m_rows > 1:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], EXPAND_BLOCK_K)
        cfg["BLOCK_N"] = min(FMA_PRODUCT_ELEMS // (cfg["BLOCK_M"] * cfg["BLOCK_K"]), triton.next_power_of_2(m_out))
    return cfg


def _lowrank_configs(
    m_rows: int, n_in: int, rank: int, m_out: int, itemsize: int, target: int, decode_max_m: int
) -> tuple[dict, dict]:
    """(shrink, expand) launch configurations. The shrink's split count is capped by the shared rule of
    kernels/launch.py: the expand's programs, cdiv(m, BLOCK_N) along its N, each re-read the S partials of their
    M rows over r, cdiv(m, BLOCK_N) x M x r x 4 bytes per split, against the weight bytes r (m + n) x itemsize."""
    shrink = _launch_config(m_rows, rank, n_in, target, True, decode_max_m)
    expand = _expand_config(m_rows, m_out, rank, target, decode_max_m)
    reads_per_split = triton.cdiv(m_out, expand["BLOCK_N"]) * m_rows * rank * 4
    weight_bytes = rank * (m_out + n_in) * itemsize
    cap = partial_split_cap(weight_bytes, reads_per_split, expand["BLOCK_M"], expand["BLOCK_K"], expand["USE_DOT"])
    return cap_split(shrink, n_in, cap), expand


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: dict,
    precision: str,
    use_pdl: bool,
    prefetch_w: bool,
):
    """out (S_out, M, N) = sum_t a[t] (S_in, M, K) . w (N, K)^T (+ bias) with the blocks in `cfg`; `prefetch_w`:
    the previous kernel in the stream cannot write w (see the kernel)."""
    split_in, m_rows, k_in = a.shape
    n_out = w.shape[0]
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(m_rows, cfg["BLOCK_M"]), out.shape[0])
    extra = {"launch_pdl": True} if use_pdl else {}
    _lowrank_matmul_kernel[grid](
        a, w, bias if bias is not None else w, out,
        m_rows, n_out, k_in, cfg["k_per_split"],
        a.stride(0), a.stride(1), a.stride(2),
        w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        SPLIT_IN=split_in,
        HAS_BIAS=bias is not None,
        USE_DOT=cfg["USE_DOT"],
        DOT_PRECISION=precision,
        USE_PDL=use_pdl,
        PREFETCH_W=prefetch_w,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=4,
        **extra,
    )  # fmt: skip


def lowrank_matmul_triton(
    x2d: torch.Tensor, v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, decode_max_m: int
) -> torch.Tensor:
    """Launch shrink then expand for a 2-D x (M, n). Inputs are validated by the op (lowrank_ops.ops), which also
    passes its decode bound `decode_max_m` (the largest M on decode tiles)."""
    m_rows, n_in = x2d.shape
    rank, m_out = v.shape[0], u.shape[0]
    device_index, use_pdl = device_info(x2d)
    _, precision = dot_flags(x2d.dtype)  # operands are fp32 in this kernel: TF32 (exact for 16-bit x), 3xTF32 for fp32
    target = target_programs(device_index)
    shrink, expand = _lowrank_configs(m_rows, n_in, rank, m_out, x2d.element_size(), target, decode_max_m)

    z = torch.empty((shrink["split"], m_rows, rank), device=x2d.device, dtype=torch.float32)
    _launch(x2d.unsqueeze(0), v, None, z, shrink, precision, use_pdl, prefetch_w=False)
    y = torch.empty((1, m_rows, m_out), device=x2d.device, dtype=x2d.dtype)
    _launch(z, u, bias, y, expand, precision, use_pdl, prefetch_w=True)
    return y[0]
