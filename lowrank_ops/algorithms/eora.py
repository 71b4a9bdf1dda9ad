"""Compressed base plus low-rank residual: EoRA and its baselines (pure functions).

A layer W (m, n) = (out, in) is replaced by a compressed base W_hat (group-wise int3 / int4 / int8, RTN or GPTQ, or
2:4 pruned; `lowrank_ops.algorithms.quantize`) plus a rank-r residual U V (U (m, r), V (r, n)) that compensates the
base's error dW = W - W_hat:

    y = W_hat x + U (V x) + b.

Every residual method is the engine's whitened primitive (`lowrank_ops.engine.whitened_svd`) applied to dW; they
differ only in the whitening S (S S^T ~ X^T X), i.e. in the norm in which U V approximates dW:

- "eora"  (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
  Approximation", arXiv:2410.21271): the calibration Gram G = X^T X = Q Lambda Q^T by float64 eigh, eigenvalues
  <= n eps64 lambda_max (and negative ones) dropped, S = Q_k Lambda_k^{1/2}; SVD of dW S, folded back with
  S^+ = Lambda_k^{-1/2} Q_k^T (`gram_method="eigh"`). This minimises the calibration output error
  ||(dW - U V) X^T||_F exactly (Eckart-Young in the whitened space), so at equal rank no other residual has a
  smaller calibration error, and the loss equals the discarded eigen-weighted energy sum_{i >= r} sigma_i(dW S)^2.
- "svd"   (ZeroQuant-V2, Yao et al. 2023, "ZeroQuant-V2: Exploring Post-training Quantization in LLMs from
  Comprehensive Study to Low Rank Compensation", arXiv:2303.08302, LoRC): S = I, plain truncated SVD of dW.
- "lqer"  (Zhang et al. 2024, "LQER: Low-Rank Quantization Error Reconstruction for LLMs", arXiv:2402.02446,
  the L2QER variant): S = diag(s) with s_j the mean absolute activation of input channel j over the calibration
  tokens, (1 / T) sum_t |x_tj| (`InputStatistics.mean_abs`). LQER normalises s by a constant; a positive multiple of
  S gives the same U V, so none is applied here. Channels never active (s_j = 0) get no residual.

Bases are named by spec strings (grammar and parser: `lowrank_ops.formats.parse_base_spec`):

    [gptq-]int{2,3,4,8}[-g<group_size>][-sym]     e.g. "int4-g128", "int3-g128", "int8-g128", "gptq-int4-g128",
                                                 "gptq-int4" (group 128 by default), "int4-g32-sym"
    2:4-magnitude | 2:4-wanda                    2:4 semi-structured pruning, stored dense

GPTQ uses the calibration Gram as its Hessian, with act_order (columns by decreasing H_jj, static groups; see
GPTQ_ACT_ORDER), and Wanda the per-channel input norm sqrt(G_jj); RTN and magnitude
need no statistics. The residual is always computed against the base the kernel will run: for a quantized base that
is `quant_format.dequantize_packed` of the PACKED weight (whose stored, rounded scales define W_hat), never the
quantizer's unrounded values.
"""

from __future__ import annotations

import torch

from lowrank_ops.algorithms.quantize import input_norm_from_gram, prune_2to4, quantize_gptq, quantize_rtn
from lowrank_ops.engine import WhitenedSVD, whitened_svd
from lowrank_ops.engine.stats import InputStatistics
from lowrank_ops.engine.svd import Whitening, _check_matrix, as_whitening, whitening_from_scale
from lowrank_ops.formats import BaseSpec, parse_base_spec
from lowrank_ops.options import Residual
from lowrank_ops.quant_format import SCALE_DTYPES, PackedQuantWeight, dequantize_packed

GPTQ_ACT_ORDER = True
"""GPTQ bases quantize columns by decreasing H_jj (static groups). Measured on SmolLM2-135M, int4-g128, 8192
calibration tokens, Wikipedia test perplexity (CPU): 42.0 with act_order, 48.7 without -- worse than RTN's 45.3,
although without it the per-layer output error was already 2-4x below RTN's (benchmarks/results/eora_quality-cpu.md)."""

_WHITENING_KIND = {"eora": "eigh", "svd": "identity", "lqer": "diagonal"}


def _gram_of(stats, where: str, why: str):
    if isinstance(stats, InputStatistics):
        if not stats.track_gram:
            raise ValueError(f"{where}: {why} needs the calibration Gram; accumulate the statistics with gram=True")
        return stats.gram
    if isinstance(stats, torch.Tensor) and stats.ndim == 2:
        return stats
    raise ValueError(
        f"{where}: {why} needs the calibration Gram X^T X (n, n) or an InputStatistics with gram=True, "
        f"got {type(stats).__name__ if not isinstance(stats, torch.Tensor) else tuple(stats.shape)}"
    )


def quantized_base(
    W: torch.Tensor, base_spec: str | BaseSpec, stats=None, *, dtype: torch.dtype | None = None
) -> PackedQuantWeight | torch.Tensor:
    """The compressed base of W (m, n) named by `base_spec` (module docstring).

    Quantized specs return a PackedQuantWeight whose scales and zeros are stored in `dtype` (default: W's dtype when
    it is fp16 / bf16 / fp32, else fp32); 2:4 specs return the pruned weight, dense, in W's dtype.
    stats: the layer's InputStatistics (gram=True) or Gram (n, n); needed by "gptq-*" and "2:4-wanda", unused
    otherwise.
    """
    where = "quantized_base"
    spec = base_spec if isinstance(base_spec, BaseSpec) else parse_base_spec(base_spec)
    _check_matrix(W, where, name="W", batched=False)
    if spec.kind == "prune":
        if spec.prune_method == "wanda":
            norm = input_norm_from_gram(_gram_of(stats, where, f"base {spec.spec!r}"))
            return prune_2to4(W, "wanda", norm.to(W.device))[0]
        return prune_2to4(W, "magnitude")[0]
    if dtype is None:
        dtype = W.dtype if W.dtype in SCALE_DTYPES else torch.float32
    if spec.algorithm == "gptq":
        gram = _gram_of(stats, where, f"base {spec.spec!r} (GPTQ's Hessian)")
        qw = quantize_gptq(W, gram.to(W.device), spec.bits, spec.group_size, symmetric=spec.symmetric,
                           act_order=GPTQ_ACT_ORDER)
    else:
        qw = quantize_rtn(W, spec.bits, spec.group_size, symmetric=spec.symmetric)
    return qw.pack(dtype)


def base_weight(base: PackedQuantWeight | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat (m, n) in `dtype` of a base from `quantized_base`: the packed weight's own dequantisation (its stored
    scales define W_hat), or the dense pruned weight."""
    if isinstance(base, PackedQuantWeight):
        return dequantize_packed(base, dtype)
    if isinstance(base, torch.Tensor):
        return base.detach().to(dtype)
    raise TypeError(f"base_weight: expected a PackedQuantWeight or a dense tensor, got {type(base).__name__}")


def residual_whitening(method: str, stats, n_features: int, device: torch.device | str | None = None) -> Whitening:
    """The S of a residual method (module docstring) for n_features inputs.

    stats: "eora": an InputStatistics with a Gram, a Gram (n, n) or an eigh Whitening; "svd": anything (ignored);
    "lqer": an InputStatistics (its mean |x|), a scale (n,) or a diagonal Whitening. A prebuilt Whitening of the
    method's kind is returned as is (layers that share an input share one eigendecomposition).
    """
    where = "residual_whitening"
    method = Residual.parse(method, where, "method")
    if method == "svd":
        return Whitening.identity(n_features)
    if isinstance(stats, Whitening):
        if stats.kind != _WHITENING_KIND[method]:
            raise ValueError(
                f"{where}: method={method!r} needs a {_WHITENING_KIND[method]!r} whitening, got a {stats.kind!r} one"
            )
        return as_whitening(stats, n_features)
    if stats is None:
        raise ValueError(f"{where}: method={method!r} needs calibration statistics of the layer's inputs")
    if method == "eora":
        gram = _gram_of(stats, where, "method='eora'")
        return as_whitening(gram, n_features, gram_method="eigh", device=device)
    if isinstance(stats, InputStatistics):
        scale = stats.mean_abs
    elif isinstance(stats, torch.Tensor) and stats.ndim == 1:
        scale = stats
    else:
        raise ValueError(
            f"{where}: method='lqer' needs the mean |x| per channel: an InputStatistics or a scale (n,), "
            f"got {type(stats).__name__ if not isinstance(stats, torch.Tensor) else tuple(stats.shape)}"
        )
    scale = scale.to(torch.float64)
    if device is not None:
        scale = scale.to(device)
    return as_whitening(whitening_from_scale(scale), n_features)


def compensate(
    W: torch.Tensor, W_hat: torch.Tensor, stats, rank: int, method: str = "eora"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual factors U (m, r), V (r, n) with U V ~ dW = W - W_hat in the norm of `method` (module docstring).

    W, W_hat: (m, n); dW is formed in float32 (float64 if either is float64). stats: as `residual_whitening`.
    rank: 0 <= r <= min(m, n); r = 0 gives empty factors (base only). Factors are float32 (float64 for float64
    inputs) on W's device. See `residual_svd` for the singular values (the loss identity).
    """
    U, V, _ = residual_svd(W, W_hat, stats, rank, method)
    return U, V


def residual_svd(W: torch.Tensor, W_hat: torch.Tensor, stats, rank: int, method: str = "eora"):
    """`compensate` plus the singular values sigma of dW S: a WhitenedSVD(U, V, singular_values). The residual's
    loss in the method's norm is ||(dW - U V) S||_F^2 = sum_{i >= r} sigma_i^2 (`rank.discarded_energy`); for
    "eora" that is the calibration output error ||(dW - U V) X^T||_F^2."""
    where = "compensate"
    _check_matrix(W, where, name="W", batched=False)
    _check_matrix(W_hat, where, name="W_hat", batched=False)
    if tuple(W_hat.shape) != tuple(W.shape):
        raise ValueError(f"{where}: W_hat.shape={tuple(W_hat.shape)} must equal W.shape={tuple(W.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{where}: rank={rank!r} must be an int")
    m, n = W.shape
    if not 0 <= rank <= min(m, n):
        raise ValueError(f"{where}: rank={rank} must satisfy 0 <= rank <= min(m, n) = {min(m, n)} for W ({m}, {n})")
    compute = torch.float64 if torch.float64 in (W.dtype, W_hat.dtype) else torch.float32
    dW = W.detach().to(compute) - W_hat.detach().to(device=W.device, dtype=compute)
    whitening = residual_whitening(method, stats, n, device=W.device)
    if rank == 0:
        sigma = torch.linalg.svdvals(whitening.apply(dW).to(torch.float64)).to(compute)
        return WhitenedSVD(dW.new_zeros(m, 0), dW.new_zeros(0, n), sigma)
    return whitened_svd(dW, whitening, rank)
