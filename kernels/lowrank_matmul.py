"""Triton kernels for the low-rank linear y = (x V^T) U^T + b.

Shapes: x (M, n) (the op flattens leading dims), V (r, n), U (m, r), b (m,), y (M, m). Both factors are
row-major, so each factor product is a "rows of W times x" product and one kernel serves both:

    _lowrank_matmul_kernel:  out[s] = (sum_t a[t]) . w^T   (+ bias, cast to out dtype)
        a   (SPLIT_IN, M, K)   partial sums of the input, summed while loading (SPLIT_IN = 1 for x and for z)
        w   (N, K)             one factor, row-major
        out (SPLIT_OUT, M, N)  program (pid_n, pid_m, pid_s) owns BLOCK_N rows of w and K-slice pid_s

    shrink: a = x (1, M, n),  w = V (r, n) -> partials (S, M, r) fp32, split-K over n into S slices, and
            z = sum_s partials[s] (M, r) in slot S of the same buffer (REDUCE: the split-K handoff below)
    expand: a = z (1, M, r),  w = U (m, r) -> y (1, M, m) in x's dtype, bias in the epilogue

Why split-K: at decode the shrink has only r output columns (r = 256 -> 256 rows of V), too few rows of work to
put ~2 programs on each of an H100's 132 SMs, yet V is 2 MB that must stream at full bandwidth. Splitting n into
S slices (up to MAX_SPLIT = 16, `_launch_config`) multiplies the programs by S.

Split-K handoff (issue 19, part 4): the S partials are reduced once, by the shrink, not by every expand program.
Each program stores its partial tile, then (one thread, after a block barrier so that every thread's store comes
first) adds 1 to its tile's arrival counter with acq_rel semantics at GPU scope. The program that draws S - 1
arrives last: every other slice's partial is visible to it, and it sums the S partials in the fixed order
s = 0 .. S - 1 (its own term from registers: the value it stored), writes z and sets the counter back to 0. The
sum is the same bits whichever program arrives last (tests/test_hopper_plans.py runs the slices in both orders),
so results stay deterministic; no memset and no launch is added: the counters live in one zeroed int32 buffer
per (device, stream) (`_arrival_counters`) that every shrink leaves zero, also across CUDA graph replays. Before,
every expand program re-read all S partials of its rows: cdiv(m, BLOCK_N) x S x M x r x 4 bytes of L2 traffic
(4 MB at 4096^2, r = 256, M = 1, S = 16) and S staged partial tiles per K-step in shared memory on the tl.dot
path, which capped S (at 4 for M = 16, r = 128); now the reduction reads S x M x r x 4 bytes once (16 KB there),
each expand program reads z (M x r x 4 bytes), and S is no longer capped. The cost is a serial tail on the
shrink's last program per tile (one atomic round trip, then S loads from L2); whether that tail or the re-reads
cost more is for an H100 to tell (benchmarks/bench_lowrank_matmul.py).

Expand tiles (`_expand_config`). At M = 1 a K-step is min(256, r) columns; at 1 < M <= 16 it covers the whole
rank wherever a row of U fits EXPAND_PREFETCH_ROW_BYTES (r <= 256 in fp16 / bf16), else EXPAND_BLOCK_K = 64.
Where one K-step covers the rank (ONE_STEP) the kernel has no K loop and no second weight buffer, which is what
lets a 64 x 256 tl.dot tile compile without spills (sm_90a numbers at the constant). The tl.dot decode expand
(4 < M <= 16) uses 16 x 64 tiles (64 programs at m = 4096).

Why two chained launches instead of one persistent kernel: with programmatic dependent launch (PDL, sm_90+)
the expand grid is launched while the shrink still runs; every expand program loads its first chunk of U
(which does not depend on z) before `gdc_wait` -- all of its U wherever one K-step covers the rank (r <= 256 at
16 bits) -- so the launch gap and the U fetch overlap the shrink.
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
    device_info,
    dot_flags,
    target_programs,
)


@triton.jit
def _load_a(a_rows, stride_as, stride_ak, m_mask, offs_k, k_end, SPLIT_IN: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_K: tl.constexpr):  # fmt: skip
    """sum_t a[t] over the (BLOCK_M, BLOCK_K) tile at columns offs_k (masked to k_end), in fp32."""
    a_mask = m_mask[:, None] & (offs_k[None, :] < k_end)
    a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for t in tl.static_range(SPLIT_IN):
        a += tl.load(a_rows + t * stride_as + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _product(acc, a, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a . w^T: a (BLOCK_M, BLOCK_K) fp32, w (BLOCK_N, BLOCK_K)."""
    if USE_DOT:
        acc += tl.dot(a, tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
    else:
        acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _lowrank_matmul_kernel(
    a_ptr,  # (SPLIT_IN, M, K)  fp16 / bf16 / fp32
    w_ptr,  # (N, K)
    bias_ptr,  # (N,) or dummy when HAS_BIAS is False
    out_ptr,  # (SPLIT_OUT, M, N), or (SPLIT_OUT + 1, M, N) fp32 with REDUCE: the partials, then their sum
    count_ptr,  # REDUCE: (cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N),) int32 arrival counters, zero before and after
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
    REDUCE: tl.constexpr,  # the last of the SPLIT_OUT programs of a tile sums the partials into slot SPLIT_OUT
    ONE_STEP: tl.constexpr,  # K <= BLOCK_K and no split: one chunk of w, no K loop
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
    if ONE_STEP:
        # The whole K range is the one chunk of w already loaded: no loop, no second weight buffer.
        acc = _product(acc, _load_a(a_rows, stride_as, stride_ak, m_mask, offs_k, k_end, SPLIT_IN, BLOCK_M, BLOCK_K),
                       w, USE_DOT, DOT_PRECISION)  # fmt: skip
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = _load_a(a_rows, stride_as, stride_ak, m_mask, offs_k, k_end, SPLIT_IN, BLOCK_M, BLOCK_K)
            # Register double buffer: issue the next weight chunk before consuming this one.
            w_ptrs += BLOCK_K * stride_wk
            w_next = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k[None, :] + BLOCK_K < k_end), other=0.0)
            acc = _product(acc, a, w, USE_DOT, DOT_PRECISION)
            w = w_next

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tile_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(tile_ptrs + pid_s * stride_os, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    if REDUCE:
        # Split-K handoff (module docstring): the program that arrives last at its tile's counter sums the S
        # partials in the fixed order s = 0 .. S - 1 (its own from registers: the value it stored), so the sum is
        # the same whichever program arrives last. The barrier puts every thread's store before thread 0's
        # release; the acquire orders the loads after the other programs' releases.
        splits = tl.num_programs(2)
        count = count_ptr + pid_m * tl.num_programs(0) + pid_n
        tl.debug_barrier()
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == splits - 1:
            z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, splits):
                part = tl.load(tile_ptrs + s * stride_os, mask=out_mask & (s != pid_s), other=0.0)
                z += tl.where(s == pid_s, acc, part)
            tl.store(tile_ptrs + splits * stride_os, z, mask=out_mask)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")  # zero again for the next launch / graph replay


FMA_MAX_M = 4  # above this, tl.dot tiles (BLOCK_M = 16) beat the broadcast product's register footprint
FMA_PRODUCT_ELEMS = 4096  # BLOCK_M * BLOCK_N * BLOCK_K of the broadcast product: 32 fp32 regs/thread, 4 warps
EXPAND_DOT_BLOCK_N = 64  # tl.dot decode expand: 64 programs at m = 4096, each reading z (M, r) once
EXPAND_BLOCK_K = 64  # expand K-step at 1 < M <= 16 when U's rows do not fit one step; 128 with BLOCK_N = 64
# reached 255 registers (bf16) and spilled (fp32, 3xTF32) in the sm_90a compile
EXPAND_PREFETCH_ROW_BYTES = 512  # a row of U (r x itemsize bytes, r rounded up to a power of 2) up to this size
# is one expand K-step, fetched whole before gdc_wait: r <= 256 in fp16 / bf16, r <= 128 in fp32. sm_90a compile,
# M = 16, 64-row tiles: bf16 r = 256 / 200 take 115 / 164 registers; fp32 r = 256 (3xTF32) spills (448 B at 64 x 256,
# 56 B at 32 x 256, 3096 B at 16 x 256)


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


def _expand_config(m_rows: int, m_out: int, rank: int, itemsize: int, target: int, decode_max_m: int) -> dict:
    """Blocks of the expand: `_launch_config`'s, except at 1 < M <= decode_max_m: a K-step covering the whole rank
    where a row of U fits EXPAND_PREFETCH_ROW_BYTES (all of the program's U is fetched before the wait), else
    EXPAND_BLOCK_K; tl.dot tiles EXPAND_DOT_BLOCK_N wide (module docstring). M = 1 already has BLOCK_K =
    min(256, r) from `_launch_config`."""
    cfg = _launch_config(m_rows, m_out, rank, target, False, decode_max_m)
    if m_rows == 1 or m_rows > decode_max_m:
        return cfg
    r_pow2 = max(16, triton.next_power_of_2(rank))
    whole = r_pow2 * itemsize <= EXPAND_PREFETCH_ROW_BYTES
    cfg["BLOCK_K"] = r_pow2 if whole else min(cfg["BLOCK_K"], EXPAND_BLOCK_K)
    if cfg["USE_DOT"]:
        cfg["BLOCK_N"] = EXPAND_DOT_BLOCK_N
    else:
        cfg["BLOCK_N"] = min(FMA_PRODUCT_ELEMS // (cfg["BLOCK_M"] * cfg["BLOCK_K"]), triton.next_power_of_2(m_out))
    return cfg


def _lowrank_configs(
    m_rows: int, n_in: int, rank: int, m_out: int, itemsize: int, target: int, decode_max_m: int
) -> tuple[dict, dict]:
    """(shrink, expand) launch configurations. The shrink splits n as `_launch_config` plans (up to MAX_SPLIT
    slices for ~PROGRAMS_PER_SM programs per SM): its last-arriving programs reduce the partials once, so no
    expand program reads more than z, and the split count no longer costs the expand bytes or shared memory."""
    return _launch_config(m_rows, rank, n_in, target, True, decode_max_m), _expand_config(
        m_rows, m_out, rank, itemsize, target, decode_max_m
    )


_counters: dict[tuple[torch.device, int | None], torch.Tensor] = {}
_grown_out_of: list[torch.Tensor] = []


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` int32 arrival counters of the split-K handoff, all zero. One buffer per (device, stream),
    zeroed when it is allocated and left zero by every shrink (the last program of each tile resets its counter),
    so a call costs no memset launch and a CUDA graph replays with the buffer it captured. Per stream because
    two shrinks running at once must not share counters; a buffer that grows stays referenced, since a captured
    graph may still use it. Allocate outside graph capture (a warm-up call), or the zeroing is captured too."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    buffer = _counters.get((device, stream))
    if buffer is None or buffer.numel() < count:
        if buffer is not None:
            _grown_out_of.append(buffer)
        buffer = torch.zeros(max(count, 2 * (0 if buffer is None else buffer.numel())), dtype=torch.int32,
                             device=device)  # fmt: skip
        _counters[(device, stream)] = buffer
    return buffer


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: dict,
    precision: str,
    use_pdl: bool,
    prefetch_w: bool,
    counters: torch.Tensor | None = None,
):
    """out (S_out, M, N) = sum_t a[t] (S_in, M, K) . w (N, K)^T (+ bias) with the blocks in `cfg`; `prefetch_w`:
    the previous kernel in the stream cannot write w (see the kernel). With `counters` (the shrink), `out` is
    (S + 1, M, N) fp32 and the grid's S slices write out[:S], their sum out[S]."""
    split_in, m_rows, k_in = a.shape
    n_out = w.shape[0]
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), triton.cdiv(m_rows, cfg["BLOCK_M"]), cfg["split"])
    extra = {"launch_pdl": True} if use_pdl else {}
    _lowrank_matmul_kernel[grid](
        a, w, bias if bias is not None else w, out, counters if counters is not None else out,
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
        REDUCE=counters is not None,
        ONE_STEP=cfg["split"] == 1 and k_in <= cfg["BLOCK_K"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg.get("num_warps", 4),
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

    split = shrink["split"]
    partials = torch.empty((split + 1, m_rows, rank), device=x2d.device, dtype=torch.float32)  # slot `split`: z
    tiles = triton.cdiv(rank, shrink["BLOCK_N"]) * triton.cdiv(m_rows, shrink["BLOCK_M"])
    counters = _arrival_counters(x2d.device, tiles)
    _launch(x2d.unsqueeze(0), v, None, partials, shrink, precision, use_pdl, prefetch_w=False, counters=counters)
    y = torch.empty((1, m_rows, m_out), device=x2d.device, dtype=x2d.dtype)
    _launch(partials[split:], u, bias, y, expand, precision, use_pdl, prefetch_w=True)
    return y[0]
