"""BaseResidualConfig: a quantized (RTN / GPTQ) or 2:4-pruned base plus a low-rank residual, per layer.

fit: build the base (`algorithms.eora.quantized_base`: packed in the layer's dtype, or 2:4-pruned and stored dense in
it), fit the residual against the STORED base (the packed weight's own dequantisation; the pruned weight in the layer's
dtype) with `algorithms.eora.residual_svd`, swap in QuantLowRankLinear / SparseLowRankLinear. No global step. Layers
that read the same input share one whitening (one eigendecomposition of their Gram).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank_ops.algorithms.eora import base_weight, quantized_base, residual_svd, residual_whitening
from lowrank_ops.compress.method import CompressionMethod, StatisticsNeed, register_method
from lowrank_ops.compress.report import REPORT_VALUE_BITS, LayerResult
from lowrank_ops.configs import BaseResidualConfig
from lowrank_ops.formats import parse_base_spec
from lowrank_ops.modules import QuantLowRankLinear, SparseLowRankLinear
from lowrank_ops.modules._base_residual import check_residual_rank
from lowrank_ops.options import Residual
from lowrank_ops.quant_format import SCALE_DTYPES
from lowrank_ops.rank import discarded_energy
from lowrank_ops.surgery import linear_weight


@dataclass
class QuantLayerResult(LayerResult):
    """LayerResult of a quantized or 2:4 layer. kept_params counts the base's m n entries plus the residual's
    r (m + n) (so the report's param_ratio is >= 1: parameters, not bytes; a 2:4 base is stored dense); bits_per_weight
    is the storage cost with floats at REPORT_VALUE_BITS (`bits_per_weight_at`: packed codes as stored, scales, zero
    points and factors at 16 bits; a 2:4 base counts its dense storage); nominal_2to4_bits_per_weight, for 2:4 bases
    only, what the compressed 2:4 format would take (`SparseLowRankLinear.nominal_2to4_bits_per_weight_at`, not
    stored in this package yet);
    discarded_energy is the fraction of the base error's energy, in the residual method's norm, that the residual
    leaves (1.0 at rank 0; for "eora" the calibration output error ||(dW - U V) X^T||^2 / ||dW X^T||^2)."""

    bits_per_weight: float = 0.0
    nominal_2to4_bits_per_weight: float | None = None


@register_method
class BaseResidualMethod(CompressionMethod):
    config_type = BaseResidualConfig
    fit_label = "quantizing"
    config: BaseResidualConfig

    def __init__(self, config: BaseResidualConfig):
        super().__init__(config)
        self.spec = parse_base_spec(config.base)

    def check_layers(self, targets) -> None:
        for name, module in targets.items():
            m, n = linear_weight(module).shape
            check_residual_rank(self.config.rank, n, m, f"compress_ (base={self.config.base!r}): layer {name}")

    def statistics(self) -> StatisticsNeed | None:
        if not self.config.needs_calibration:
            return None
        eora = self.config.rank > 0 and self.config.residual == Residual.eora
        return StatisticsNeed(gram=self.spec.needs_gram or eora)

    def fit(self, run, name, module, stats, plan) -> QuantLayerResult:
        config, spec = self.config, self.spec
        weight = linear_weight(module).detach()
        m, n = weight.shape
        W = weight.to(run.device, torch.float32)
        if spec.kind == "prune":  # stored dense in the layer's dtype: the residual is fitted against that tensor
            dtype = weight.dtype
            base = quantized_base(W, spec, stats).to(weight.device, dtype)
        else:
            dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
            base = quantized_base(W, spec, stats, dtype=dtype)
        rank = config.rank
        if rank == 0:  # base only: nothing to fit, and no SVD just to report that the whole error is left
            u = v = None
            dropped = 1.0 if bool((base_weight(base).to(run.device) != W).any()) else 0.0
        else:
            whitening = None
            if config.residual != Residual.svd:
                whitening = run.whitening(f"residual-{config.residual}", stats, n,
                                          lambda: residual_whitening(config.residual, stats, n, device=run.device))
            factors = residual_svd(W, base_weight(base), whitening, rank, config.residual)
            u = factors.U.to(weight.device, dtype)
            v = factors.V.to(weight.device, dtype)
            kept = min(rank, factors.singular_values.shape[-1])
            dropped = float(discarded_energy(factors.singular_values.to(torch.float64), kept, relative=True))
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        if spec.kind == "prune":
            new = SparseLowRankLinear.from_pruned(base, u=u, v=v, bias=bias)
            nominal = new.nominal_2to4_bits_per_weight_at(REPORT_VALUE_BITS)
        else:
            new = QuantLowRankLinear.from_packed(base.to(weight.device), u=u, v=v, bias=bias)
            nominal = None
        new.dense_class = type(module).__name__
        run.replace(name, new)
        bits = new.bits_per_weight_at(REPORT_VALUE_BITS)
        return QuantLayerResult(name, m, n, rank, m * n + rank * (m + n), dropped, bits, nominal)
