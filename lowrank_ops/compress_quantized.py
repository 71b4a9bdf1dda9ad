"""`compress_quantized_(model, EoraConfig, calibration)`: swap targeted Linear layers for a compressed base plus
a low-rank residual: QuantLowRankLinear for quantized bases, SparseLowRankLinear for 2:4 bases.

`compress_(model, EoraConfig(...))` dispatches here. Pipeline: find targets (surgery) -> calibrate when the base
(GPTQ, Wanda) or the residual (eora, lqer) needs statistics -> per layer: build the base
(`algorithms.eora.quantized_base`: packed in the layer's dtype, or 2:4-pruned and stored dense in it), fit the
residual against the STORED base (the packed weight's own dequantisation; the pruned weight in the layer's dtype)
(`algorithms.eora.residual_svd`) -> swap in the module. Layers that read the same input share one whitening (one
eigendecomposition of their Gram).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.eora import base_weight, parse_base_spec, quantized_base, residual_svd, residual_whitening
from lowrank_ops.calibration import calibration_windows, collect_input_statistics
from lowrank_ops.compress import REPORT_VALUE_BITS, CompressionReport, LayerResult, resolve_device
from lowrank_ops.configs import EoraConfig
from lowrank_ops.modules import QuantLowRankLinear, SparseLowRankLinear
from lowrank_ops.modules._base_residual import check_residual_rank
from lowrank_ops.quant_format import SCALE_DTYPES
from lowrank_ops.rank import discarded_energy
from lowrank_ops.sequential import compress_sequentially
from lowrank_ops.surgery import embedding_parameter_count, find_targets, linear_weight, replace_module


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


def compress_quantized_(
    model: nn.Module, config: EoraConfig, calibration: torch.Tensor | None = None, *, progress: bool = True
) -> CompressionReport:
    """Replace the targeted Linear layers of `model` in place by QuantLowRankLinear (quantized base + residual) or,
    for a 2:4 base, SparseLowRankLinear (pruned base stored dense + residual), as `config` says.

    calibration: token ids (N, seq_len), needed when config.needs_calibration; at most config.calib_tokens used.
    """
    if not isinstance(config, EoraConfig):
        raise TypeError(f"compress_quantized_: config must be an EoraConfig, got {type(config).__name__}")
    config.validate()
    spec = parse_base_spec(config.base)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    targets = find_targets(model, config.targets, config.ignore)
    for name, module in targets.items():  # every layer checked before any work
        m, n = linear_weight(module).shape
        check_residual_rank(config.rank, n, m, f"compress_ (base={config.base!r}): layer {name}")
    device = resolve_device(config.device)
    gram = spec.needs_gram or (config.rank > 0 and config.residual == "eora")
    windows = None
    if config.needs_calibration:
        needed_by = f"base={config.base!r} with residual={config.residual!r}"
        windows = calibration_windows(calibration, config.calib_tokens, needed_by)

    def compress_layers(layer_targets: dict[str, nn.Module], stats: dict, progress_bar: bool) -> list:
        whitenings: dict[tuple[int, int], object] = {}  # one per shared statistics object (q / k / v share one)
        items = tqdm(list(layer_targets.items()), desc="quantizing", unit="layer", disable=not progress_bar)
        return [_compress_layer(model, name, module, stats.get(name), spec, config, device, whitenings)
                for name, module in items]  # fmt: skip

    if config.sequential:  # each decoder layer calibrated on the outputs of the compressed layers before it
        tic = time.perf_counter()
        layers = compress_sequentially(model, targets, windows, gram=gram, batch_size=config.batch_size,
                                       device=device, progress=progress,
                                       compress_layer=lambda t, s: compress_layers(t, s, False))  # fmt: skip
        seconds["sequential"] = seconds["total"] = time.perf_counter() - tic
        return CompressionReport(config.to_dict(), layers, embedding_parameter_count(model), seconds)
    stats: dict = {}
    if windows is not None:
        tic = time.perf_counter()
        stats = collect_input_statistics(model, list(targets), windows, gram=gram, batch_size=config.batch_size,
                                         progress=progress)  # fmt: skip
        seconds["calibration"] = time.perf_counter() - tic
    tic = time.perf_counter()
    layers = compress_layers(targets, stats, progress)
    seconds["quantizing"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start
    return CompressionReport(config.to_dict(), layers, embedding_parameter_count(model), seconds)


def _compress_layer(model: nn.Module, name: str, module: nn.Module, layer_stats, spec, config: EoraConfig,
                    device: torch.device, whitenings: dict) -> QuantLayerResult:  # fmt: skip
    """Compress one targeted layer in place (base + residual, as `config` says) and return its report row.
    `whitenings` caches the residual whitening per shared statistics object."""
    weight = linear_weight(module).detach()
    m, n = weight.shape
    W = weight.to(device, torch.float32)
    if spec.kind == "prune":  # stored dense in the layer's dtype: the residual is fitted against that tensor
        dtype = weight.dtype
        base = quantized_base(W, spec, layer_stats).to(weight.device, dtype)
    else:
        dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
        base = quantized_base(W, spec, layer_stats, dtype=dtype)
    rank = config.rank
    if rank == 0:  # base only: nothing to fit, and no SVD just to report that the whole error is left
        u = v = None
        dropped = 1.0 if bool((base_weight(base).to(device) != W).any()) else 0.0
    else:
        whitening = None
        if config.residual != "svd":
            key = (id(layer_stats), n)
            if key not in whitenings:
                whitenings[key] = residual_whitening(config.residual, layer_stats, n, device=device)
            whitening = whitenings[key]
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
    replace_module(model, name, new)
    bits = new.bits_per_weight_at(REPORT_VALUE_BITS)
    return QuantLayerResult(name, m, n, rank, m * n + rank * (m + n), dropped, bits, nominal)
