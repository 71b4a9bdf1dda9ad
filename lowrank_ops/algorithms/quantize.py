"""Compressed bases for `quant_lowrank_matmul`: group-wise RTN and GPTQ quantization, 2:4 pruning (pure functions).

W is (m, n) = (out, in) as in nn.Linear; g = group_size; G = ceil(n / g) groups per row, the last one partial when
g does not divide n (SmolLM2: n = 576, g = 128 -> 4 full groups and one of 64); maxq = 2^bits - 1; h = 2^(bits-1).

The format contract (shared with `lowrank_ops.quant_format` and the kernels)
----------------------------------------------------------------------------
A `QuantizedWeight` holds unsigned codes q (m, n) uint8 in [0, maxq], scales s (m, G) float32 > 0 and zero points
z (m, G) float32, and DEFINES the quantized weight as

    W_hat[i, j] = (q[i, j] - z[i, j // g]) * s[i, j // g]                                      (computed in fp32)

`dequantize` is the torch reference of exactly this expression (same fp32 operations as `quant_format.dequantize`,
so both give bit-identical W_hat for fp32 scales). Zero points are always integers in [0, maxq] (stored as float so
the kernels need no cast; integers <= 256 are exact in fp16 and bf16, so packing never moves them). Packing with
16-bit scales (`QuantizedWeight.pack(torch.float16)`) rounds the scales: the packed weight then defines a slightly
different W_hat, and a residual (EoRA's dW = W - W_hat) must be computed against `quant_format.dequantize_packed`.

Grids (one per row and group; w ranges over the group's entries)
----------------------------------------------------------------
- asymmetric: lo = min(min w, 0), hi = max(max w, 0), s = (hi - lo) / maxq, z = round(-lo / s) in [0, maxq].
  The range is widened to contain 0 (as GPTQ's and AWQ's quantizers do) so that the integer zero point needs no
  clamping: the grid {(k - z) s : k = 0 .. maxq} then starts within s/2 of lo and ends within s/2 of hi, and every
  entry is within s/2 of a grid point.
- symmetric: z = h (no zero point to learn: code h is w = 0), grid {(k - h) s} = {-h s, .., (h - 1) s}, and
  s = max(max(w, 0) / (h - 1), max(-w, 0) / h): the smallest step whose signed grid covers the group, using the
  extra negative code (-h) instead of leaving it idle. It is never coarser than the textbook max|w| / (h - 1), and
  unlike GPTQ's 2 max|w| / maxq it keeps the extreme that sets s on the grid, so quantization is idempotent.
- why the zero point is rounded to an integer (so 0 is a grid point), measured on SmolLM2 (RTN, every targeted
  layer, Wikipedia test 8192 tokens, dense 32.76): the float zero point z = -min w / s of a plain min-max grid
  (GGUF Q4_1 / HQQ style; the kernels would read it unchanged) has a slightly SMALLER weight error (-4 % relative
  Frobenius on every layer, -4 % median calibration output error) yet perplexity 54.6 against 45.3 at int4-g128
  and 750 against 160 at int3-g128. Widening the range to contain 0 changes nothing there (45.26 either way);
  rounding z does. Off the zero-aligned grid every near-zero weight of a group (most of them) rounds to the same
  offset grid point, a common bias per group that each layer passes on as a DC error. The float grid wins only
  where it reproduces the weights' own source grid: int4-g32 is then lossless on this Q4_1 model (32.762; the
  integer grid gives 41.48), a property of the checkpoint rather than of the grid.
Both: round half to even; every entry satisfies |w - w_hat| <= s / 2 (up to fp32 rounding of w / s), and
quantize(dequantize(q)) reproduces q (codes and zero points exactly, scales to an ulp). A group of zeros gets s = 1
(codes = z, W_hat = 0): no division by zero. bits = 3 codes use 3 of the 4 bits of a packed slot.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers")
---------------------------------------------------------------------------------------------------------------
Minimises the calibration output error ||(W - W_hat) X^T||_F^2 = sum_i (w_i - w_hat_i)^T H (w_i - w_hat_i) over rows
w_i, with H = X^T X the Gram of the layer's inputs (`InputStatistics.gram`; any positive multiple gives the same
result, so the unnormalised sum is used as is -- the reference implementation's 2 X^T X / T is one such multiple).
Columns are quantized left to right; after column j the not-yet-quantized columns F absorb its error by the OBS
update  W[:, F] -= (w_j - q_j) / [H_F^-1]_jj * [H_F^-1]_{j, F}.  With U the upper Cholesky factor of H^-1
(H^-1 = U^T U), row j of U is [H_F^-1]_{j, F} / sqrt([H_F^-1]_jj) for F = {j, j+1, ..}, so

    err_j = (w_j - q_j) / U_jj,        W[:, k] -= err_j U_jk   for k > j.

Lazy batch: inside a block of `block_size` columns the updates touch the block only; the columns right of it get
Err_block U[block, right] in one GEMM when the block is done (identical in exact arithmetic, GEMM-bound on GPU).
The loop is over columns (n sequential steps, each vectorised over all m rows); there is no loop over rows.
- Dampening: H + lambda I with lambda = damp * mean(diag H) (mean over all n channels). If the Cholesky still fails,
  damp climbs 1e-4, 1e-3, .., 1 (the first that works) with a GptqDampingWarning, never silently.
- Dead inputs (H_jj = 0: channel j never active in calibration): row and column j of H are zeroed and H_jj set to
  mean(diag H), which decouples column j: it is quantized round-to-nearest at its original value and passes no error
  on. (The reference implementation zeroes W[:, j] instead; that is free on the calibration set but wrong for any
  input that does use channel j.)
- U is computed in float64 without forming H^-1: with J the reversal permutation, J H J = L L^T (Cholesky), so
  H = R R^T with R = J L J upper triangular and H^-1 = R^-T R^-1, i.e. U = R^-1 = J L^-1 J. It equals the
  reference's cholesky(cholesky_inverse(cholesky(H)), upper=True) and needs one factorisation instead of two.
  The column loop runs in float32; results are deterministic.
- Groups: the scale and zero of a group are computed from its current weights when the loop reaches the group's
  first column, as in the reference implementation -- here with every earlier update applied, including the
  lazy batch's pending ones when the group starts inside a block or reaches past it (the reference reads them before
  the in-block updates). With `act_order` the columns are processed in
  order of decreasing H_jj; since this format's groups are runs of consecutive ORIGINAL columns, the group
  parameters are then computed once, up front, from the original W ("static groups", as AutoGPTQ's
  static_groups=True): each column is quantized on the grid of its original group, whatever the processing order.
- With H diagonal (in particular H = I) all off-diagonal entries of U are 0, no error is propagated, and GPTQ returns
  exactly quantize_rtn's codes, scales and zeros, with or without act_order.

2:4 semi-structured pruning
---------------------------
In every run of 4 consecutive input columns (j = 4k .. 4k + 3) of each row, keep the 2 entries with the largest score
and zero the others. Scores: magnitude |w_ij|; Wanda (Sun et al. 2023) |w_ij| * ||x_j||, with ||x_j|| the l2 norm of
input channel j over the calibration tokens, sqrt(G_jj) (`input_norm_from_gram`). Ties keep the lower column index.
When n is not a multiple of 4 the tail run of L = n mod 4 columns keeps ceil(L / 2) entries (L = 1: 1, 2: 1, 3: 2),
i.e. 50 % sparsity everywhere; only n % 4 == 0 weights are usable by sparse tensor-core kernels. Pruned weights
are stored dense.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F

from lowrank_ops.engine.stats import InputStatistics
from lowrank_ops.engine.svd import _check_finite, _check_matrix, _checked_gram
from lowrank_ops.quant_format import PackedQuantWeight, check_format_args, dequantize_codes, num_groups, pack

PRUNE_METHODS = ("magnitude", "wanda")
_DAMP_LADDER = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""Relative dampening quantize_gptq tries, in order, above the requested `damp` when H + lambda I is not positive
definite; at 1 (lambda = mean(diag H)) a failure means H is not a Gram matrix."""


class GptqDampingWarning(UserWarning):
    """quantize_gptq had to raise the dampening above the requested `damp` for H + lambda I to be positive definite."""


@dataclasses.dataclass
class QuantizedWeight:
    """A group-wise quantized (m, n) weight; W_hat[i, j] = (codes[i, j] - zeros[i, j // g]) * scales[i, j // g].

    codes      uint8   (m, n)  in [0, 2^bits - 1]
    scales     float32 (m, G)  > 0, G = ceil(n / group_size)
    zeros      float32 (m, G)  integers in [0, 2^bits - 1] (2^(bits-1) everywhere when symmetric)
    bits       3, 4 or 8
    group_size g (the last group of a row may be partial)
    symmetric  whether the grid was symmetric (zeros fixed at 2^(bits-1))
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the quantized weight."""
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (m, n) in `dtype`; see the module-level `dequantize`."""
        return dequantize(self, dtype)

    def pack(self, dtype: torch.dtype = torch.float16) -> PackedQuantWeight:
        """The packed form read by `quant_lowrank_matmul` (`quant_format.pack`), scales and zeros stored in `dtype`."""
        return pack(self.codes, self.scales, self.zeros, self.bits, self.group_size, dtype)


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------


def _check_bool(value, where: str, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name}={value!r} must be a bool")


def _check_quantized(qw, where: str) -> tuple[int, int, int]:
    """(m, n, G) of a consistent QuantizedWeight, else TypeError / ValueError."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{where}: expected a QuantizedWeight, got {type(qw).__name__}")
    check_format_args(where, qw.bits, qw.group_size)
    if not isinstance(qw.codes, torch.Tensor) or qw.codes.dtype != torch.uint8 or qw.codes.ndim != 2:
        raise TypeError(f"{where}: codes must be a uint8 (m, n) tensor, got {getattr(qw.codes, 'dtype', qw.codes)}")
    m, n = qw.codes.shape
    groups = num_groups(n, qw.group_size)
    for name, t in (("scales", qw.scales), ("zeros", qw.zeros)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating tensor, got {type(t).__name__}")
        if tuple(t.shape) != (m, groups):
            raise ValueError(
                f"{where}: {name}.shape={tuple(t.shape)} must be (m, ceil(n / group_size)) = {(m, groups)} "
                f"for codes.shape={(m, n)}, group_size={qw.group_size}"
            )
    return m, n, groups


def _float_weight(W, where: str) -> torch.Tensor:
    """W (m, n) checked (floating, 2-D, non-empty, finite: the error names the first bad index) and as float32."""
    _check_matrix(W, where, name="W", batched=False)
    return W.detach().to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# grids
# ----------------------------------------------------------------------------------------------------------------


def _group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (...,) float32 of the groups w (..., k) (the grids of the module docstring). Zero padding in
    w changes nothing: both grids contain 0 by construction."""
    maxq = 2**bits - 1
    hi = w.amax(dim=-1).clamp_min(0.0)
    lo = w.amin(dim=-1).clamp_max(0.0)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = torch.maximum(hi / (half - 1), -lo / half)
    else:
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a group of zeros: any step reproduces it
    if symmetric:
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        zero = torch.round(-lo / scale).clamp_(0, maxq)
    return scale, zero


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(w / s) + z, 0, maxq) as float32 (broadcasting)."""
    return (torch.round(w / scale) + zero).clamp_(0, 2**bits - 1)


def _expand(t: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """(m, G) -> (m, n): column j takes group j // group_size."""
    return t.repeat_interleave(group_size, dim=1)[:, :n]


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat (m, n) = (codes - zeros[:, j // g]) * scales[:, j // g] in `dtype`: the torch reference of the format.

    Computed in float32 (float64 when dtype is float64) and rounded once to `dtype`; in float32 the result is
    bit-identical to `quant_format.dequantize` of the packed weight with float32 scales.
    """
    where = "dequantize"
    _check_quantized(qw, where)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dequantize: dtype={dtype!r} must be a floating torch.dtype")
    return dequantize_codes(qw.codes, qw.scales, qw.zeros, qw.group_size, dtype)


# ----------------------------------------------------------------------------------------------------------------
# round to nearest
# ----------------------------------------------------------------------------------------------------------------


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedWeight:
    """Group-wise round-to-nearest quantization of W (m, n) on the asymmetric or symmetric grid (module docstring).

    Every entry satisfies |W - W_hat| <= scale / 2 of its group (up to fp32 rounding of W / scale).
    bits in (2, 3, 4, 8); group_size >= 1 and a multiple of 8 for bits <= 4 (packed words must not straddle groups).
    """
    where = "quantize_rtn"
    check_format_args(where, bits, group_size)
    _check_bool(symmetric, where, "symmetric")
    w = _float_weight(W, where)
    m, n = w.shape
    groups = num_groups(n, group_size)
    wg = F.pad(w, (0, groups * group_size - n)).view(m, groups, group_size)
    scale, zero = _group_params(wg, bits, symmetric)
    codes = _codes(wg, scale[..., None], zero[..., None], bits).view(m, groups * group_size)[:, :n]
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scale, zero, bits, group_size, symmetric)


# ----------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float, mean_diag: float, where: str) -> torch.Tensor:
    """U (n, n) float64 upper triangular with (H + lambda I)^-1 = U^T U, lambda = damp * mean_diag, raised through
    _DAMP_LADDER (one warning) when the Cholesky fails. U = J L^-1 J with J H J = L L^T (module docstring)."""
    n = H.shape[0]
    flipped = H.flip(0, 1)
    for rel in (damp,) + tuple(r for r in _DAMP_LADDER if r > damp):
        damped = flipped.clone()
        damped.diagonal().add_(rel * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            break
    else:
        raise ValueError(
            f"{where}: H + lambda I is not positive definite even with lambda = {rel:g} x mean(diag H) "
            f"= {rel * mean_diag:.3e} (H ({n}x{n}) is not a Gram matrix X^T X?)"
        )
    if rel != damp:
        warnings.warn(
            f"{where}: H + lambda I ({n}x{n}) is not numerically positive definite with damp={damp:g}; "
            f"used damp={rel:g} (lambda = {rel * mean_diag:.3e})",
            GptqDampingWarning,
            stacklevel=3,
        )
    del flipped
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


def _gptq_hessian(gram, n: int, device: torch.device, where: str) -> torch.Tensor:
    """The checked Gram as float64 on `device`, symmetrised."""
    if isinstance(gram, InputStatistics):
        gram = gram.gram
    H = _checked_gram(gram, where)
    if H.shape[0] != n:
        raise ValueError(f"{where}: gram.shape={tuple(H.shape)} must be (n, n) = ({n}, {n}) for W's n={n} columns")
    H = H.to(device=device, dtype=torch.float64)
    return (H + H.mT).mul_(0.5)  # a new tensor: quantize_gptq modifies it in place


def quantize_gptq(
    W: torch.Tensor,
    gram: torch.Tensor | InputStatistics,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ quantization of W (m, n) using the calibration Gram H = X^T X (n, n) (see the module docstring).

    Args:
        W: (m, n) weight (any floating dtype; computed in float32).
        gram: X^T X of the layer's inputs (any positive multiple), or an InputStatistics accumulated with gram=True.
        bits, group_size, symmetric: the grid, as in `quantize_rtn`.
        damp: lambda = damp * mean(diag H) is added to the diagonal (>= 0; raised with a warning if insufficient).
        block_size: columns per lazy-batch block (>= 1; a speed knob: the result agrees to fp32 rounding).
        act_order: process columns by decreasing H_jj, with static groups (computed from the original W).

    Returns a QuantizedWeight in the same format as `quantize_rtn` (groups in original column order).
    """
    where = "quantize_gptq"
    check_format_args(where, bits, group_size)
    _check_bool(symmetric, where, "symmetric")
    _check_bool(act_order, where, "act_order")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0.0:
        raise ValueError(f"{where}: damp={damp!r} must be a float >= 0 (relative to mean(diag H))")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{where}: block_size={block_size!r} must be an int")
    if block_size < 1:
        raise ValueError(f"{where}: block_size={block_size} must be >= 1")
    w = _float_weight(W, where).clone()
    m, n = w.shape
    H = _gptq_hessian(gram, n, w.device, where)

    diag = H.diagonal().clone()
    mean_diag = float(diag.mean())
    if mean_diag <= 0.0:
        raise ValueError(f"{where}: the Gram matrix is zero (no calibration tokens, or every input channel dead)")
    alive = diag > 0
    H.mul_(alive[:, None]).mul_(alive[None, :])  # in place: H is n^2 float64 (1 GB at n = 11008)
    H.diagonal().add_((~alive).to(H.dtype), alpha=mean_diag)

    groups = num_groups(n, group_size)
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        H = H[perm][:, perm]
        # static groups: parameters of the original groups; column k of the permuted W uses group perm[k] // g
        wg = F.pad(w, (0, groups * group_size - n)).view(m, groups, group_size)
        scales, zeros = _group_params(wg, bits, symmetric)
        col_group = perm // group_size
        col_scale, col_zero = scales[:, col_group], zeros[:, col_group]
        w = w[:, perm]
    else:
        perm = None
        scales = torch.empty(m, groups, dtype=torch.float32, device=w.device)
        zeros = torch.empty_like(scales)
    U = _upper_cholesky_of_inverse(H, float(damp), mean_diag, where).to(torch.float32)
    del H

    codes = torch.empty_like(w)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block = w[:, i1:i2]  # view: the in-block updates land in w
        U1 = U[i1:i2, i1:i2]
        err = torch.zeros(m, i2 - i1, dtype=torch.float32, device=w.device)
        for i in range(i2 - i1):
            j = i1 + i
            if perm is None:
                if j % group_size == 0:  # a group starts: its parameters from its current (updated) weights
                    hi = min(j + group_size, n)
                    current = block[:, i : min(hi, i2) - i1]
                    if hi > i2:  # the group reaches past this block: add the block's pending updates
                        rest = w[:, i2:hi] - err[:, :i] @ U[i1:j, i2:hi]
                        current = torch.cat([current, rest], dim=1)
                    scales[:, j // group_size], zeros[:, j // group_size] = _group_params(current, bits, symmetric)
                s, z = scales[:, j // group_size], zeros[:, j // group_size]
            else:
                s, z = col_scale[:, j], col_zero[:, j]
            col = block[:, i]
            c = _codes(col, s, z, bits)
            codes[:, j] = c
            e = (col - (c - z) * s) / U1[i, i]
            block[:, i + 1 :].addr_(e, U1[i, i + 1 :], alpha=-1.0)
            err[:, i] = e
        if i2 < n:
            w[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
    return QuantizedWeight(codes.to(torch.uint8).contiguous(), scales, zeros, bits, group_size, symmetric)


# ----------------------------------------------------------------------------------------------------------------
# 2:4 pruning
# ----------------------------------------------------------------------------------------------------------------


def input_norm_from_gram(stats: torch.Tensor | InputStatistics) -> torch.Tensor:
    """||x_j|| = sqrt(G_jj) (n,) float64, Wanda's per-channel input norm, from a Gram X^T X or an InputStatistics."""
    where = "input_norm_from_gram"
    gram = stats.gram if isinstance(stats, InputStatistics) else stats
    G = _checked_gram(gram, where)
    return G.diagonal().to(torch.float64).clamp_min(0.0).sqrt()


def _two_of_four_mask(score: torch.Tensor) -> torch.Tensor:
    """Boolean (m, n): the 2 largest scores of every 4 consecutive columns (ceil(L / 2) of a tail of L columns)."""
    m, n = score.shape
    runs = -(-n // 4)
    padded = F.pad(score, (0, 4 * runs - n), value=float("-inf")).view(m, runs, 4)
    order = padded.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(4, device=score.device).expand_as(order))
    keep = torch.full((runs, 1), 2, device=score.device)
    tail = n - 4 * (runs - 1)
    keep[-1] = (tail + 1) // 2
    return (rank < keep).view(m, 4 * runs)[:, :n]


def prune_2to4(
    W: torch.Tensor, method: str = "magnitude", input_norm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 semi-structured pruning of W (m, n) along the input dimension (module docstring).

    method="magnitude": score |w_ij|; input_norm must be None.
    method="wanda":     score |w_ij| * input_norm_j, input_norm (n,) >= 0 = ||x_j|| (`input_norm_from_gram`).
    Returns (W_pruned, mask): W_pruned has W's dtype with the dropped entries set to 0; mask (m, n) bool is True
    where kept -- exactly 2 per run of 4 columns, ceil(L / 2) in a tail run of L = n mod 4 columns.
    """
    where = "prune_2to4"
    if method not in PRUNE_METHODS:
        raise ValueError(f"{where}: method={method!r} must be one of {PRUNE_METHODS}")
    _check_matrix(W, where, name="W", batched=False)
    n = W.shape[1]
    if method == "magnitude":
        if input_norm is not None:
            raise ValueError(f"{where}: input_norm is only used by method='wanda'; pass None with method='magnitude'")
        score = W.detach().abs()
    else:
        if input_norm is None:
            raise ValueError(f"{where}: method='wanda' needs input_norm (n,) = ||x_j||, e.g. input_norm_from_gram")
        if not isinstance(input_norm, torch.Tensor) or not input_norm.is_floating_point():
            raise TypeError(f"{where}: input_norm must be a floating torch.Tensor, got {type(input_norm).__name__}")
        if tuple(input_norm.shape) != (n,):
            raise ValueError(f"{where}: input_norm.shape={tuple(input_norm.shape)} must be (n,) = ({n},)")
        _check_finite(input_norm, where, "input_norm")
        if bool((input_norm < 0).any()):
            raise ValueError(
                f"{where}: input_norm has negative entries (min {float(input_norm.min()):.3e}); norms >= 0"
            )
        # float64: the product of a float32 |w| and a norm keeps the order of |w| for equal norms (no new ties)
        score = W.detach().abs().to(torch.float64) * input_norm.to(device=W.device, dtype=torch.float64)
    mask = _two_of_four_mask(score)
    return W.masked_fill(~mask, 0), mask
