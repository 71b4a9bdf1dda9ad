"""SwscConfig: shared channels (k-means codebook) plus a low-rank residual, per layer.

check_layers: each layer's K (config.clusters, or the largest K that fits config.bits next to the residual), before
any work. select: the k-means of every target's channels (engine, batched over same-shape layers; a layer's result
does not depend on the batch it ran in), activation-weighted unless config.weighted is False. fit: the residual
fitted to the shared weight ROUNDED to the layer's dtype (what the module holds; `algorithms.eora.residual_svd`),
then SharedChannelLinear. Layers that read the same input share one whitening.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank_ops.algorithms.eora import residual_svd, residual_whitening
from lowrank_ops.compress.method import CompressionMethod, StatisticsNeed, register_method
from lowrank_ops.compress.report import REPORT_VALUE_BITS, LayerResult
from lowrank_ops.configs import SwscConfig
from lowrank_ops.engine import kmeans_many
from lowrank_ops.formats import bits_per_weight, check_clusters, clusters_for_bits, shared_weight
from lowrank_ops.modules import SharedChannelLinear
from lowrank_ops.modules._base_residual import check_residual_rank
from lowrank_ops.options import Residual, SharedDim
from lowrank_ops.quant_format import SCALE_DTYPES
from lowrank_ops.rank import discarded_energy
from lowrank_ops.surgery import linear_weight


@dataclass
class SharedLayerResult(LayerResult):
    """LayerResult of a SharedChannelLinear. rank is the residual's; kept_params counts codebook values, index entries
    and factor values; discarded_energy is the fraction of W - W_shared's energy (in the residual method's norm) the
    residual leaves; bits_per_weight is the storage cost with 16-bit values and int32 indices."""

    clusters: int = 0
    bits_per_weight: float = 0.0


def layer_clusters(config: SwscConfig, name: str, m: int, n: int) -> int:
    """K of one (m, n) layer: config.clusters (checked against its channels) or the most that fit config.bits with
    16-bit values (the fp16 / bf16 deployment; an fp32 model holds the same values in fp32 for evaluation).

    The residual rank is explicit, so it is honoured exactly or refused: a rank at or above the layer's break-even
    rank m n / (m + n) is an error (as for eora's residual), and so is a layer whose codebook, index and residual
    together would store at least as many bits as the dense 16-bit weight."""
    where = f"compress_ (swsc): layer {name}"
    if config.clusters is None:
        rank = check_residual_rank(config.rank, n, m, where)
        return clusters_for_bits(m, n, config.bits, rank, config.shared, REPORT_VALUE_BITS, where)
    clusters = check_clusters(config.clusters, m, n, config.shared, where)
    rank = check_residual_rank(config.rank, n, m, where)
    bits = bits_per_weight(m, n, clusters, rank, config.shared, REPORT_VALUE_BITS)
    if bits >= REPORT_VALUE_BITS:
        raise ValueError(f"{where}: clusters={clusters} with a rank-{rank} residual stores {bits:.2f} bits per weight "
                         f"for a ({m}, {n}) weight, not less than the dense {REPORT_VALUE_BITS}-bit weight; lower "
                         "the clusters or the rank")  # fmt: skip
    return clusters


@register_method
class SharedChannelsMethod(CompressionMethod):
    config_type = SwscConfig
    fit_label = "residuals"
    config: SwscConfig

    def check_layers(self, targets) -> None:
        self.clusters = {}
        for name, module in targets.items():
            m, n = linear_weight(module).shape
            self.clusters[name] = layer_clusters(self.config, name, m, n)

    def statistics(self) -> StatisticsNeed | None:
        if not self.config.needs_calibration:
            return None
        return StatisticsNeed(gram=self.config.rank > 0 and self.config.residual == Residual.eora)

    def select(self, run, targets, stats) -> dict:
        """Codebooks of every target (k-means results by name)."""
        config = self.config
        points = {name: linear_weight(module).detach() for name, module in targets.items()}
        if config.shared == SharedDim.columns:
            points = {name: W.mT for name, W in points.items()}
        importance = None
        if config.weighted:  # feature weights for shared rows, point weights for shared columns (algorithms.swsc)
            importance = {name: stats[name].mean_abs.square().to(torch.float32) for name in targets}
        by = {"weights" if config.shared == SharedDim.rows else "point_weights": importance}
        with run.timed("kmeans"):
            return kmeans_many(points, {name: self.clusters[name] for name in targets}, n_iter=config.n_iter,
                               seed=config.seed, device=run.device, progress=run.progress, **by)  # fmt: skip

    def fit(self, run, name, module, stats, codebooks: dict) -> SharedLayerResult:
        config = self.config
        weight = linear_weight(module).detach()
        m, n = weight.shape
        dtype = weight.dtype if weight.dtype in SCALE_DTYPES else torch.float32  # the kernels' dtypes, else float32
        centroids = codebooks[name].centroids
        codebook = (centroids if config.shared == SharedDim.rows else centroids.mT).to(dtype)  # what the module holds
        index = codebooks[name].labels.to(torch.int32)
        W = weight.to(run.device, torch.float32)
        W_shared = shared_weight(codebook, index, config.shared).to(torch.float32)
        rank = config.rank  # checked against the break-even rank in check_layers (layer_clusters)
        method = config.residual if rank > 0 else Residual.svd  # rank 0: no residual (and maybe no statistics)
        whitening = None
        if method != Residual.svd:
            whitening = run.whitening(f"residual-{method}", stats, n,
                                      lambda: residual_whitening(method, stats, n, device=run.device))  # fmt: skip
        factors = residual_svd(W, W_shared, whitening, rank, method)
        u = factors.U.to(weight.device, dtype) if rank else None
        v = factors.V.to(weight.device, dtype) if rank else None
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        new = SharedChannelLinear.from_parts(codebook.to(weight.device), index.to(weight.device), config.shared,
                                             u=u, v=v, bias=bias)  # fmt: skip
        new.dense_class = type(module).__name__
        run.replace(name, new)
        dropped = float(discarded_energy(factors.singular_values.to(torch.float64), rank, relative=True))
        kept = codebook.numel() + index.numel() + rank * (m + n)
        bits = bits_per_weight(m, n, self.clusters[name], rank, config.shared, REPORT_VALUE_BITS)
        return SharedLayerResult(name, m, n, rank, kept, dropped, self.clusters[name], bits)
