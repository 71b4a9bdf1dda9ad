"""Triton kernels for SWSC shared-channel linears (issue 6): y = x W^T + (x V^T) U^T + b with W never materialised.

Shapes: x (M, n) (the op flattens leading dims), V (r, n), U (m, r), b (m,), y (M, m); r = 0 means no residual.
- shared="rows":    C (K, n), idx (m,) int32:  W = C[idx],     y = t[:, idx] + z U^T + b,    t = x C^T
- shared="columns": C (m, K), idx (n,) int32:  W = C[:, idx],  y = s C^T + z U^T + b,        s = segment_sum(x, idx)
where z = x V^T. Both modes are a cheap "shrink" to K + r numbers per row of x, then an "expand" to m outputs.

Two launches, chained with programmatic dependent launch (PDL, sm_90+) as in kernels/lowrank_matmul.py:

    1. _codebook_shrink_kernel  p (S, M, K + r) fp32 = x . [A; V]^T, split-K over n into S slices (no atomics,
       no memset; the expand sums the S partials while loading them: deterministic).
         rows:    A = C, the dense (K, n) codebook, read once (the big weight of this mode).
         columns: A = one-hot(idx)^T, A[j, f] = [idx[f] == j], built in registers from idx: p[:, :, j] is then
                  the segment sum of x without atomics (a scatter-add needs a zeroed buffer, i.e. one more launch,
                  and is not deterministic). Cost: K n compare-FMAs per row of x (4 M at n = 4096, K = 1024,
                  ~0.5 us of issue spread over the chip at M = 1; tl.dot tiles for M > 4) and no DRAM bytes
                  besides idx and x, which the one-hot programs re-read from L2.
       Program (pid_n, pid_m, pid_s) owns BLOCK_N rows of A (pid_n < cdiv(K, BLOCK_N)) or of V (the others),
       so one grid streams both without stacking [C; V] in memory.
    2. _codebook_expand_kernel  y (M, m): program (pid_n, pid_m) owns BLOCK_N outputs.
         rows:    gather sum_s p[s, :, idx[i]] (partials that live in L2, see below);
         columns: GEMV / GEMM of the s partials with rows of C over K (the big weight of this mode);
       then + sum_s p[s, :, K:] . U[i]^T (the low-rank expand) and the bias; cast, store.
       Out-of-range index entries are masked (they contribute nothing): never a read outside p.

Bytes (4096^2, K = 1024, r = 128, M = 1, bf16): C 8.4 MB + V 1.0 MB + U 1.0 MB + idx 16 KB = 10.5 MB, 3.5 us at
the measured 3.0 TB/s, against 33.6 MB (11.2 us) for the dense W. Each codebook entry is used once per row of
x: rows shared, C streams once through the shrink and the gather reads S x M x 4 bytes per output from the
partials (S x M x (K + r) x 4 bytes in all: 14 KB here), which stay in L2, so no codebook is staged in shared
memory. Gathering codebook rows C[idx[i]] inside a GEMV instead would read m rows of n through L2, as many L2
bytes as the dense layer. Columns shared, the shrink reads only V, x and idx, and C streams once through the
expand. The partials are (S, M, K + r), K fastest: the expand's loads of them are 16-byte vectors and its
tl.dot operand is K-contiguous; the rows-shared gather at M > 1 pays one L2 sector per (row, output).

Split count (`_shrink_config`): lowrank_matmul's rule (~2 programs per SM, at most 16 slices), capped because
every expand program re-reads all S partials of its rows over its reduction: the re-reads stay within the op's
weight bytes (PARTIAL_READ_RATIO) and, on the tl.dot path, the S partial tiles that Triton stages in shared
memory per K-step stay within PARTIAL_STAGE_BYTES (see `_shrink_config` for the sm_90 numbers). The cap is the
rule of kernels/launch.py, shared with lowrank_matmul and quant_lowrank_matmul.

PDL ordering (as in kernels/lowrank_matmul.py): the shrink, the op's first launch, waits (`gdc_wait`) before
it loads anything, since the kernel before it may write x or the weights (an optimizer step before a forward;
the op has autograd), and triggers the expand (`gdc_launch_dependents`) only after that wait. The expand, whose
only unfinished predecessor is then the shrink, loads what the shrink never writes (its first idx / U / C rows)
before its `gdc_wait`, and triggers the next kernel first. Every kernel executes gdc_wait, so "kernel done"
implies "its predecessor done". tests/test_hopper_plans.py runs both with PDL hazards poisoned (issue 20).

Inner products (`_rows_product`, shared by both kernels; blocks from lowrank_matmul's `_launch_config`):
- M = 1 (GEMV): a (BLOCK_N, BLOCK_K) fp32 accumulator in the weight tile's layout, reduced once after the loop;
  the row of x (or of the partials) is loaded through a pointer tile of identical rows so that it has the same
  layout (16-byte loads, L1 hits) -- a 1-D load was converted through shared memory with two barriers per
  K-step in the sm_90 SASS.
- 1 < M <= 4 ("FMA"): [BLOCK_M, BLOCK_N, BLOCK_K] broadcast products accumulated in a 3-D fp32 register tile and
  reduced over K once, after the loop. BLOCK_M * BLOCK_N * BLOCK_K <= 4096: 32 fp32 registers per thread.
- M > 4 ("DOT"): tl.dot tiles, every dimension >= 16. The shrink multiplies 16-bit x by the 16-bit C / V /
  one-hot (exact 0 / 1) tiles in their dtype with fp32 accumulation, as cuBLAS does; the expand multiplies the
  fp32 partials by the weights in TF32 (partials rounded to 10 mantissa bits: as fine as fp16, finer than
  bf16). fp32 inputs use 3xTF32 throughout; the CPU interpreter runs IEEE fp32 (its bf16 tl.dot is wrong).
Accumulation is fp32 throughout; row offsets are int64.

Evidence so far (no GPU was available when this was written): correct under the CPU interpreter against float64
(tests/test_codebook_matmul.py). Every kernel variant of the headline shapes (M = 1, 3, 16, 64; fp16, bf16,
fp32; both modes; r = 0 and 128) compiles for sm_90a offline (scripts/check_sm90_compile.py) with no spills
and <= 82 KB of shared memory; at M = 1 the K loops are barrier-free with 16-byte loads (SASS). Not timed: the
issue's targets (<= 5 us at 4096^2, K = 1024, r = 128,
M = 1; >= 2.5x faster than dense bf16 at M = 1..16) await benchmarks/bench_codebook.py on an H100, as do the
block sizes and the tiled range 16 < M <= 64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lowrank_ops.kernels.launch import cap_split, device_info, dot_flags, partial_split_cap, target_programs
from lowrank_ops.kernels.lowrank_matmul import _launch_config

NUM_WARPS = 4


@triton.jit
def _load_w(w_ptr, offs_n, n_mask, offs_k, k_end, stride_wn, stride_wk, ONEHOT: tl.constexpr, W_DTYPE: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of the weight rows offs_n over columns offs_k (masked to k_end). ONEHOT: w_ptr
    is idx (n,) and the tile is [idx[k] == row] in W_DTYPE."""
    if ONEHOT:
        # idx through a (BLOCK_N, BLOCK_K) pointer tile of identical rows: the tile gets the layout of the compare
        # (a 1-D load would be converted through shared memory every K-step)
        entry = tl.load(
            w_ptr + offs_n[:, None] * 0 + offs_k[None, :] * stride_wk, mask=offs_k[None, :] < k_end, other=-1
        )
        # via fp32, not bool.to(W_DTYPE): the CPU interpreter turns True into the bf16 bit pattern 0x0001
        w = tl.where(entry == offs_n[:, None], 1.0, 0.0).to(W_DTYPE)
    else:
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        w = tl.load(w_ptrs, mask=n_mask[:, None] & (offs_k[None, :] < k_end), other=0.0)
    return w


@triton.jit
def _rows_product(
    acc,  # (BLOCK_M, BLOCK_N) fp32; returned plus sum_k a[m, k] w[n, k] over k in [k_start, k_end)
    a_ptr,  # (SPLIT_IN, M, *) x (SPLIT_IN = 1) or fp32 partials, summed while loading
    stride_as,
    stride_am,
    stride_ak,
    w_ptr,  # (N, *) weight rows, or idx (*,) when ONEHOT
    stride_wn,
    stride_wk,
    m0,  # first row of a of this program's BLOCK_M rows
    M,
    offs_n,
    n_mask,
    k_start,
    k_end,
    SPLIT_IN: tl.constexpr,
    ONEHOT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,  # False: a and w are 16-bit and multiplied in their dtype (shrink only)
    DOT_PRECISION: tl.constexpr,
    PDL_SYNC: tl.constexpr,  # trigger dependents and wait for the previous kernel after the first weight load
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    if USE_DOT and not DOT_FP32:
        w_dtype = a_ptr.dtype.element_ty  # a one-hot tile multiplies x in x's dtype on the tensor cores
    else:
        w_dtype = tl.float32
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # The weight does not depend on the previous kernel: fetch its first chunk before waiting on it.
    w = _load_w(w_ptr, offs_n, n_mask, offs_k, k_end, stride_wn, stride_wk, ONEHOT, w_dtype)
    if PDL_SYNC:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may launch and prefetch its own weights
        tl.extra.cuda.gdc_wait()  # `a` is written by the previous kernel
    if BLOCK_M == 1:
        # GEMV: a is one row, loaded through a (BLOCK_N, BLOCK_K) pointer tile whose rows are all that row, so it
        # gets the weight tile's register layout (16-byte loads, L1 hits after the first) instead of a 1-D
        # layout converted through shared memory (STSM + 2 barriers per K-step in the sm_90 SASS of a 1-D load);
        # the (BLOCK_N, BLOCK_K) accumulator is reduced once, after the loop.
        a_row = a_ptr + m0.to(tl.int64) * stride_am + offs_n[:, None] * 0
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        if not USE_DOT:
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:
            a = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for t in tl.static_range(SPLIT_IN):
                a_ptrs = a_row + t * stride_as + offs_k[None, :] * stride_ak
                a += tl.load(a_ptrs, mask=offs_k[None, :] < k_end, other=0.0).to(tl.float32)
        else:
            a_mask = m_mask[:, None] & (offs_k[None, :] < k_end)
            if SPLIT_IN == 1:
                a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
            else:
                a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
                for t in tl.static_range(SPLIT_IN):
                    a += tl.load(a_rows + t * stride_as + offs_k[None, :] * stride_ak, mask=a_mask, other=0.0)
        # Register double buffer: issue the next weight chunk before consuming this one.
        w_next = _load_w(w_ptr, offs_n, n_mask, offs_k + BLOCK_K, k_end, stride_wn, stride_wk, ONEHOT, w_dtype)
        if BLOCK_M == 1:
            acc2 += w.to(tl.float32) * a
        elif USE_DOT:
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=DOT_PRECISION)
            else:
                acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
        else:
            acc3 += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w = w_next
    if BLOCK_M == 1:
        acc += tl.sum(acc2, axis=1)[None, :]
    elif not USE_DOT:
        acc += tl.sum(acc3, axis=2)
    return acc


@triton.jit
def _codebook_shrink_kernel(
    x_ptr,  # (M, n)  fp16 / bf16 / fp32
    a_ptr,  # rows: C (K, n) in x's dtype; columns (ONEHOT): idx (n,) int32
    v_ptr,  # (R, n) in x's dtype, or a dummy when R = 0 (no program reads it)
    p_ptr,  # (SPLIT, M, K + R) fp32 partials: program axis 2 writes slice pid_s
    M,
    K,
    R,
    N_IN,
    K_PER_SPLIT,  # n-slice of one program along grid axis 2; multiple of BLOCK_K
    BLOCKS_A,  # cdiv(K, BLOCK_N): programs pid_n < BLOCKS_A own rows of A, the others rows of V
    stride_xm,
    stride_xk,
    stride_an,
    stride_ak,
    stride_vn,
    stride_vk,
    stride_ps,
    stride_pm,
    stride_pj,
    ONEHOT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, N_IN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_PDL:
        # The op's first launch: the previous kernel may write x, C, idx or V (an optimizer step before a forward),
        # so nothing is read before the wait, and the expand may start only after it: then every kernel before
        # this one has finished, and the expand's prefetch of idx / C / U (which this kernel never writes) is safe.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if pid_n < BLOCKS_A:
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j_mask = offs_j < K
        acc = _rows_product(
            acc, x_ptr, 0, stride_xm, stride_xk, a_ptr, stride_an, stride_ak, m0, M, offs_j, j_mask,
            k_start, k_end, 1, ONEHOT, USE_DOT, DOT_FP32, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        out_j = offs_j
    else:
        offs_j = (pid_n - BLOCKS_A) * BLOCK_N + tl.arange(0, BLOCK_N)
        j_mask = offs_j < R
        acc = _rows_product(
            acc, x_ptr, 0, stride_xm, stride_xk, v_ptr, stride_vn, stride_vk, m0, M, offs_j, j_mask,
            k_start, k_end, 1, False, USE_DOT, DOT_FP32, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        out_j = K + offs_j
    p_ptrs = p_ptr + pid_s * stride_ps + out_j[None, :] * stride_pj + offs_m[:, None].to(tl.int64) * stride_pm
    tl.store(p_ptrs, acc, mask=m_mask[:, None] & j_mask[None, :])


@triton.jit
def _codebook_expand_kernel(
    p_ptr,  # (SPLIT, M, K + R) fp32 shrink partials: t (rows) or s (columns) in [0, K), z in [K, K + R)
    w_ptr,  # rows (GATHER): idx (m,) int32; columns: C (m, K) in y's dtype
    u_ptr,  # (m, R) in y's dtype, or a dummy when HAS_RESIDUAL is False
    bias_ptr,  # (m,) or a dummy when HAS_BIAS is False
    y_ptr,  # (M, m)  fp16 / bf16 / fp32
    M,
    N_OUT,
    K,
    R,
    stride_ps,
    stride_pm,
    stride_pj,
    stride_wn,
    stride_wk,
    stride_un,
    stride_ur,
    stride_ym,
    stride_yn,
    SPLIT: tl.constexpr,  # number of shrink partials to sum
    GATHER: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    z_ptr = p_ptr + K * stride_pj  # the residual's partials: columns [K, K + R) of p
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATHER:
        entry = tl.load(w_ptr + offs_n * stride_wn, mask=n_mask, other=0)  # idx: not written by the shrink
        valid = n_mask & (entry >= 0) & (entry < K)
        if HAS_RESIDUAL:
            acc = _rows_product(
                acc, z_ptr, stride_ps, stride_pm, stride_pj, u_ptr, stride_un, stride_ur, m0, M, offs_n,
                n_mask, 0, R, SPLIT, False, USE_DOT, True, DOT_PRECISION, USE_PDL, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        elif USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # the partials are written by the shrink
        g_ptrs = p_ptr + entry[None, :] * stride_pj + offs_m[:, None].to(tl.int64) * stride_pm
        g_mask = m_mask[:, None] & valid[None, :]
        for t in tl.static_range(SPLIT):
            acc += tl.load(g_ptrs + t * stride_ps, mask=g_mask, other=0.0)
    else:
        acc = _rows_product(
            acc, p_ptr, stride_ps, stride_pm, stride_pj, w_ptr, stride_wn, stride_wk, m0, M, offs_n, n_mask,
            0, K, SPLIT, False, USE_DOT, True, DOT_PRECISION, USE_PDL, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_RESIDUAL:
            acc = _rows_product(
                acc, z_ptr, stride_ps, stride_pm, stride_pj, u_ptr, stride_un, stride_ur, m0, M, offs_n,
                n_mask, 0, R, SPLIT, False, USE_DOT, True, DOT_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


MIN_BLOCK_N = 16  # the FMA expand halves BLOCK_N down to this until its grid reaches the target program count


def _expand_config(m_rows: int, m_out: int, k_red: int, target_programs: int, decode_max_m: int) -> dict:
    """Blocks of the expand: lowrank_matmul's choice for a (M, m) = (M, k_red) . (m, k_red)^T product. On the FMA
    path (M <= 4) BLOCK_N is halved while the grid is short of the target program count: the rows-shared expand
    has little or no reduction (k_red = r or 0) and would otherwise get BLOCK_N = 4096 / BLOCK_K rows per program.
    The tl.dot tiles keep their BLOCK_N: each program re-reads its BLOCK_M rows of partials, so narrower programs
    would multiply that L2 traffic."""
    cfg = _launch_config(m_rows, m_out, max(k_red, MIN_BLOCK_N), target_programs, False, decode_max_m)
    m_blocks = triton.cdiv(m_rows, cfg["BLOCK_M"])
    while (
        not cfg["USE_DOT"]
        and cfg["BLOCK_N"] > MIN_BLOCK_N
        and triton.cdiv(m_out, cfg["BLOCK_N"]) * m_blocks < target_programs
    ):
        cfg["BLOCK_N"] //= 2
    return cfg


def _shrink_config(
    m_rows: int,
    m_out: int,
    n_in: int,
    entries: int,
    rank: int,
    rows: bool,
    itemsize: int,
    ec: dict,
    target: int,
    decode_max_m: int,
) -> dict:
    """Blocks and split-K count of the shrink (K + r outputs over n), the split capped so that the expand's
    re-reads of the S partials stay within PARTIAL_READ_RATIO x the op's weight bytes. Every expand program reads
    all S partials of its BLOCK_M rows over its reduction (r rows-shared, K + r columns-shared), and rows-shared
    also gathers S values per output: without this cap, columns-shared at M = 16 (S = 3, 256 programs) would read
    57 MB of partials for 10.5 MB of weights. On the tl.dot path Triton's pipeliner also stages the S partial
    tiles of every K-step in shared memory: S x BLOCK_M x BLOCK_K x 4 bytes is kept <= PARTIAL_STAGE_BYTES (sm_90
    compile of rows-shared 4096 x 11008, K = 1024, r = 128, M = 64: 462 KB at S = 14, 279 KB at S = 8, over the
    227 KB an H100 block may use; 57 KB at M = 16, S = 3)."""
    cfg = _launch_config(m_rows, entries + rank, n_in, target, True, decode_max_m)
    weight_bytes = ((entries * n_in if rows else m_out * entries) + rank * (m_out + n_in)) * itemsize
    m_pad = triton.cdiv(m_rows, ec["BLOCK_M"]) * ec["BLOCK_M"]
    k_red = rank if rows else entries + rank
    per_split = triton.cdiv(m_out, ec["BLOCK_N"]) * m_pad * k_red * 4 + (m_out * m_rows * 4 if rows else 0)
    return cap_split(cfg, n_in, partial_split_cap(weight_bytes, per_split, ec["BLOCK_M"], ec["BLOCK_K"], ec["USE_DOT"]))


def codebook_matmul_triton(
    x2d: torch.Tensor,
    codebook: torch.Tensor,
    index: torch.Tensor,
    v: torch.Tensor | None,
    u: torch.Tensor | None,
    bias: torch.Tensor | None,
    shared: str,
    decode_max_m: int,
) -> torch.Tensor:
    """Shrink then expand for a 2-D x (M, n), M >= 1. Inputs are validated by the op (lowrank_ops.ops), which also
    passes its decode bound `decode_max_m` (the largest M on decode tiles, see lowrank_matmul's `_launch_config`)."""
    m_rows, n_in = x2d.shape
    rows = shared == "rows"
    entries = codebook.shape[0] if rows else codebook.shape[1]
    m_out = index.shape[0] if rows else codebook.shape[0]
    rank = 0 if v is None else v.shape[0]
    device_index, use_pdl = device_info(x2d)
    target = target_programs(device_index)
    dot_fp32, precision = dot_flags(x2d.dtype)
    extra = {"launch_pdl": True} if use_pdl else {}

    ec = _expand_config(m_rows, m_out, rank if rows else entries + rank, target, decode_max_m)
    sc = _shrink_config(m_rows, m_out, n_in, entries, rank, rows, x2d.element_size(), ec, target, decode_max_m)
    split = sc["split"]
    p = torch.empty((split, m_rows, entries + rank), device=x2d.device, dtype=torch.float32)
    a_src, a_strides = (codebook, codebook.stride()) if rows else (index, (0, index.stride(0)))
    v_arg = v if rank > 0 else x2d
    blocks_a = triton.cdiv(entries, sc["BLOCK_N"])
    grid = (blocks_a + triton.cdiv(rank, sc["BLOCK_N"]), triton.cdiv(m_rows, sc["BLOCK_M"]), split)
    _codebook_shrink_kernel[grid](
        x2d, a_src, v_arg, p,
        m_rows, entries, rank, n_in, sc["k_per_split"], blocks_a,
        x2d.stride(0), x2d.stride(1),
        a_strides[0], a_strides[1],
        v_arg.stride(0), v_arg.stride(1),
        p.stride(0), p.stride(1), p.stride(2),
        ONEHOT=not rows, USE_DOT=sc["USE_DOT"], DOT_FP32=dot_fp32, DOT_PRECISION=precision, USE_PDL=use_pdl,
        BLOCK_M=sc["BLOCK_M"], BLOCK_N=sc["BLOCK_N"], BLOCK_K=sc["BLOCK_K"],
        num_warps=NUM_WARPS,
        **extra,
    )  # fmt: skip

    y = torch.empty((m_rows, m_out), device=x2d.device, dtype=x2d.dtype)
    w_arg, w_strides = (index, (index.stride(0), 0)) if rows else (codebook, codebook.stride())
    u_arg = u if rank > 0 else y
    grid = (triton.cdiv(m_out, ec["BLOCK_N"]), triton.cdiv(m_rows, ec["BLOCK_M"]))
    _codebook_expand_kernel[grid](
        p, w_arg, u_arg, bias if bias is not None else y, y,
        m_rows, m_out, entries, rank,
        p.stride(0), p.stride(1), p.stride(2),
        w_strides[0], w_strides[1],
        u_arg.stride(0), u_arg.stride(1),
        y.stride(0), y.stride(1),
        SPLIT=split, GATHER=rows, HAS_RESIDUAL=rank > 0, HAS_BIAS=bias is not None,
        USE_DOT=ec["USE_DOT"], DOT_PRECISION=precision, USE_PDL=use_pdl,
        BLOCK_M=ec["BLOCK_M"], BLOCK_N=ec["BLOCK_N"], BLOCK_K=ec["BLOCK_K"],
        num_warps=NUM_WARPS,
        **extra,
    )  # fmt: skip
    return y
