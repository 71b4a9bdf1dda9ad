"""`compress_shared_channels_(model, SwscConfig, calibration)`: swap targeted Linear layers for SharedChannelLinear.

`compress_(model, SwscConfig(...))` dispatches here. Pipeline: find targets (surgery) -> calibrate when the k-means is
activation-weighted or the residual needs statistics -> per layer: K from the config (clusters, or the largest K
that fits the bits budget), k-means of the channels (engine, batched over same-shape layers), the residual fitted
to the shared weight ROUNDED to the layer's dtype (what the module holds; `algorithms.eora.residual_svd`) -> swap in
SharedChannelLinear. Layers that read the same input share one whitening.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.eora import residual_svd, residual_whitening
from lowrank_ops.algorithms.swsc import bits_per_weight, check_clusters, clusters_for_bits, shared_weight
from lowrank_ops.calibration import calibration_windows, collect_input_statistics
from lowrank_ops.compress import REPORT_VALUE_BITS, CompressionReport, LayerResult, resolve_device
from lowrank_ops.configs import SwscConfig
from lowrank_ops.engine import kmeans_many
from lowrank_ops.modules import SharedChannelLinear
from lowrank_ops.quant_format import SCALE_DTYPES
from lowrank_ops.rank import discarded_energy
from lowrank_ops.surgery import embedding_parameter_count, find_targets, linear_weight, replace_module


@dataclass
class SharedLayerResult(LayerResult):
    """LayerResult of a SharedChannelLinear. rank is the residual's; kept_params counts codebook values, index entries
    and factor values; discarded_energy is the fraction of W - W_shared's energy (in the residual method's norm) the
    residual leaves; bits_per_weight is the storage cost with 16-bit values and int32 indices."""

    clusters: int = 0
    bits_per_weight: float = 0.0


def layer_clusters(config: SwscConfig, name: str, m: int, n: int) -> int:
    """K of one (m, n) layer: config.clusters (checked against its channels) or the most that fit config.bits with
    16-bit values (the fp16 / bf16 deployment; an fp32 model holds the same values in fp32 for evaluation)."""
    where = f"compress_ (swsc): layer {name}"
    if config.clusters is not None:
        return check_clusters(config.clusters, m, n, config.shared, where)
    rank = min(config.rank, m, n)
    return clusters_for_bits(m, n, config.bits, rank, config.shared, REPORT_VALUE_BITS, where)


def compress_shared_channels_(
    model: nn.Module, config: SwscConfig, calibration: torch.Tensor | None = None, *, progress: bool = True
) -> CompressionReport:
    """Replace the targeted Linear layers of `model` in place by SharedChannelLinear (codebook + residual, `config`).

    calibration: token ids (N, seq_len), needed when config.needs_calibration; at most config.calib_tokens used.
    """
    if not isinstance(config, SwscConfig):
        raise TypeError(f"compress_shared_channels_: config must be a SwscConfig, got {type(config).__name__}")
    config.validate()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    targets = find_targets(model, config.targets, config.ignore)
    device = resolve_device(config.device)
    clusters = {}
    for name, module in targets.items():  # every layer's K is checked before any work starts
        m, n = linear_weight(module).shape
        clusters[name] = layer_clusters(config, name, m, n)

    stats: dict = {}
    if config.needs_calibration:
        needed_by = f"swsc with weighted={config.weighted}, residual={config.residual!r}"
        windows = calibration_windows(calibration, config.calib_tokens, needed_by)
        tic = time.perf_counter()
        gram = config.rank > 0 and config.residual == "eora"
        stats = collect_input_statistics(
            model, list(targets), windows, gram=gram, batch_size=config.batch_size, progress=progress
        )
        seconds["calibration"] = time.perf_counter() - tic

    tic = time.perf_counter()
    points = {name: linear_weight(module).detach() for name, module in targets.items()}
    if config.shared == "columns":
        points = {name: W.mT for name, W in points.items()}
    importance = None
    if config.weighted:  # feature weights for shared rows, point weights for shared columns (algorithms.swsc)
        importance = {name: stats[name].mean_abs.square().to(torch.float32) for name in targets}
    by = {"weights" if config.shared == "rows" else "point_weights": importance}
    codebooks = kmeans_many(points, clusters, n_iter=config.n_iter, seed=config.seed, device=device,
                            progress=progress, **by)  # fmt: skip
    seconds["kmeans"] = time.perf_counter() - tic

    tic = time.perf_counter()
    whitenings: dict[tuple[int, int], object] = {}
    layers = []
    for name, module in tqdm(list(targets.items()), desc="residuals", unit="layer", disable=not progress):
        weight = linear_weight(module).detach()
        m, n = weight.shape
        dtype = _module_dtype(weight)
        centroids = codebooks[name].centroids
        codebook = (centroids if config.shared == "rows" else centroids.mT).to(dtype)  # what the module holds
        index = codebooks[name].labels.to(torch.int32)
        W = weight.to(device, torch.float32)
        W_shared = shared_weight(codebook, index, config.shared).to(torch.float32)
        rank = min(config.rank, m, n)
        method = config.residual if rank > 0 else "svd"  # rank 0: no residual (and maybe no statistics)
        whitening = None
        if method != "svd":
            key = (id(stats[name]), n)
            if key not in whitenings:
                whitenings[key] = residual_whitening(method, stats[name], n, device=device)
            whitening = whitenings[key]
        factors = residual_svd(W, W_shared, whitening, rank, method)
        u = factors.U.to(weight.device, dtype) if rank else None
        v = factors.V.to(weight.device, dtype) if rank else None
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        new = SharedChannelLinear.from_parts(codebook.to(weight.device), index.to(weight.device), config.shared,
                                             u=u, v=v, bias=bias)  # fmt: skip
        new.dense_class = type(module).__name__
        replace_module(model, name, new)
        dropped = float(discarded_energy(factors.singular_values.to(torch.float64), rank, relative=True))
        kept = codebook.numel() + index.numel() + rank * (m + n)
        bits = bits_per_weight(m, n, clusters[name], rank, config.shared, REPORT_VALUE_BITS)
        layers.append(SharedLayerResult(name, m, n, rank, kept, dropped, clusters[name], bits))
    seconds["residuals"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start
    return CompressionReport(config.to_dict(), layers, embedding_parameter_count(model), seconds)


def _module_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp16 / bf16 / fp32 layers keep their dtype (the kernels' dtypes); anything else is stored in float32."""
    return weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32
