"""`compress_(model, config, calibration)`: the one in-place verb that factors a model's Linear layers.

Pipeline: find targets (surgery) -> calibrate (hooks fill the engine's statistics) -> choose S per layer
(algorithms.lowrank.whitening_for) -> allocate ranks (algorithms.allocation) -> factor each layer with the
engine's whitened SVD -> swap in LowRankLinear. Returns a CompressionReport listing each layer's rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.allocation import allocate_by_loss, allocate_by_sensitivity, allocate_uniform, layer_cost
from lowrank_ops.algorithms.lowrank import whitening_for
from lowrank_ops.calibration import calibration_windows, collect_input_statistics
from lowrank_ops.configs import BasisConfig, EoraConfig, LowRankConfig, SwscConfig
from lowrank_ops.engine import WhitenedSVD, whitened_svd
from lowrank_ops.modules import LowRankLinear
from lowrank_ops.rank import discarded_energy, rank_for_param_ratio
from lowrank_ops.sequential import compress_sequentially
from lowrank_ops.surgery import embedding_parameter_count, find_targets, linear_weight, replace_module

REPORT_VALUE_BITS = 16
"""Width at which float values (factors, codebooks, scales, zero points, dense weights) are counted in bit budgets
and reports: fp16 / bf16, the deployment dtype, whatever dtype the compression ran in (a float32 run on a CPU stores
twice the float bytes; the modules' own `bits_per_weight` counts what they store)."""


@dataclass
class LayerResult:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense (a factored layer would not save parameters)
    kept_params: int
    discarded_energy: float | None  # fraction of the (whitened) energy of W S dropped by the truncation


@dataclass
class CompressionReport:
    config: dict
    layers: list[LayerResult]
    embedding_params: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def targeted_params(self) -> int:
        return sum(layer.out_features * layer.in_features for layer in self.layers)

    @property
    def kept_params(self) -> int:
        return sum(layer.kept_params for layer in self.layers)

    @property
    def param_ratio(self) -> float:
        """Fraction of the targeted Linear parameters kept (embeddings and lm_head excluded)."""
        return self.kept_params / self.targeted_params

    @property
    def bits_per_weight(self) -> float | None:
        """Storage bits per targeted weight with floats at REPORT_VALUE_BITS, for layers that report it (quantized /
        shared-channel layers; dense layers count REPORT_VALUE_BITS); None when no layer does (plain low-rank:
        param_ratio is the headline)."""
        if not any(hasattr(layer, "bits_per_weight") for layer in self.layers):
            return None
        bits = sum(getattr(layer, "bits_per_weight", REPORT_VALUE_BITS) * layer.out_features * layer.in_features
                   for layer in self.layers)  # fmt: skip
        return bits / self.targeted_params

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "param_ratio": self.param_ratio,
            "bits_per_weight": self.bits_per_weight,
            "targeted_params": self.targeted_params,
            "kept_params": self.kept_params,
            "embedding_and_lm_head_params": self.embedding_params,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def format_table(self) -> str:
        bits = self.bits_per_weight
        bits_header = f" {'bits/w':>7s}" if bits is not None else ""
        lines = [f"{'layer':48s} {'shape':>11s} {'rank':>6s} {'kept':>6s} {'dropped energy':>14s}{bits_header}"]
        for layer in self.layers:
            rank = "dense" if layer.rank is None else str(layer.rank)
            kept = layer.kept_params / (layer.out_features * layer.in_features)
            dropped = "" if layer.discarded_energy is None else f"{layer.discarded_energy:.4f}"
            shape = f"{layer.out_features}x{layer.in_features}"
            layer_bits = f" {getattr(layer, 'bits_per_weight', REPORT_VALUE_BITS):7.3f}" if bits is not None else ""
            lines.append(f"{layer.name:48s} {shape:>11s} {rank:>6s} {kept:6.3f} {dropped:>14s}{layer_bits}")
        lines.append(
            f"targeted params kept: {self.kept_params:,} / {self.targeted_params:,} = {self.param_ratio:.4f} "
            f"(embeddings + lm_head, not targeted: {self.embedding_params:,})"
        )
        if bits is not None:
            lines.append(f"storage of the targeted layers: {bits:.3f} bits per weight ({REPORT_VALUE_BITS}-bit floats)")
        return "\n".join(lines)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False")
    return torch.device(device)


class _LayerFactorer:
    """Factors targeted layers at full rank on the compute device (one exact SVD of W S per call);
    truncating the folded factors to [:, :r] / [:r] gives the factors of any rank r."""

    def __init__(self, model, targets: dict[str, nn.Module], config: LowRankConfig, stats, device: torch.device):
        self.targets, self.config, self.stats, self.device = targets, config, stats, device
        self._whitenings: dict[tuple[int, int], object] = {}

    def whitening(self, name: str):
        stats = self.stats.get(name)
        n = linear_weight(self.targets[name]).shape[1]
        key = (id(stats), n)  # layers sharing an input share statistics, hence one Cholesky
        if key not in self._whitenings:
            self._whitenings[key] = whitening_for(self.config.method, stats, n, self.config.alpha, self.device)
        return self._whitenings[key]

    def factor(self, name: str) -> WhitenedSVD:
        weight = linear_weight(self.targets[name]).detach().to(self.device, torch.float32)
        return whitened_svd(weight, self.whitening(name), rank=min(weight.shape))


def _lowrank_module(original: nn.Module, factors: WhitenedSVD, rank: int) -> LowRankLinear:
    weight = linear_weight(original)
    m, n = weight.shape
    module = LowRankLinear(n, m, rank, bias=original.bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        module.u.copy_(factors.U[:, :rank])
        module.v.copy_(factors.V[:rank])
        if original.bias is not None:
            module.bias.copy_(original.bias.detach())
    module.dense_class = type(original).__name__
    return module


def factor_and_swap(model, targets: dict[str, nn.Module], factorer: _LayerFactorer, ranks, progress=True):
    """Replace each target with its LowRankLinear at the given rank (None: stays dense); one row per layer."""
    results = []
    for (name, module), rank in tqdm(
        list(zip(targets.items(), ranks)), desc="factoring", unit="layer", disable=not progress
    ):
        m, n = linear_weight(module).shape
        if rank is None:
            results.append(LayerResult(name, m, n, None, m * n, 0.0))
            continue
        factors = factorer.factor(name)
        replace_module(model, name, _lowrank_module(module, factors, rank))
        kept = min(rank, factors.singular_values.shape[-1])
        dropped = discarded_energy(factors.singular_values, kept, relative=True)
        results.append(LayerResult(name, m, n, rank, layer_cost(m, n, rank), float(dropped)))
    return results


def compress_(
    model: nn.Module,
    config: LowRankConfig | EoraConfig | SwscConfig,
    calibration: torch.Tensor | None = None,
    *,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    train: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
) -> CompressionReport:
    """Factor the targeted Linear layers of `model` in place according to `config`.

    calibration: token ids (N, seq_len) for methods / allocators that need data ("asvd", "whiten",
        allocator "sensitivity"); at most config.calib_tokens tokens are used.
    cache_dir: where the sensitivity table is cached (default ~/.cache/lowrank_ops).
    train / heldout: BasisConfig only: target token ids for re-learning the coefficients (train_steps > 0).
    """
    if isinstance(config, BasisConfig):  # application-specific basis selection: its own pipeline
        from lowrank_ops.basis import compress_basis_

        return compress_basis_(model, config, calibration, train=train, heldout=heldout, progress=progress)
    if train is not None or heldout is not None:
        raise ValueError(f"compress_: train / heldout are used by BasisConfig only, not {type(config).__name__}")
    if isinstance(config, EoraConfig):  # quantized base + low-rank residual: its own pipeline
        from lowrank_ops.compress_quantized import compress_quantized_

        return compress_quantized_(model, config, calibration, progress=progress)
    if isinstance(config, SwscConfig):  # shared channels (k-means codebook) + low-rank residual
        from lowrank_ops.compress_shared import compress_shared_channels_

        return compress_shared_channels_(model, config, calibration, progress=progress)
    if not isinstance(config, LowRankConfig):
        raise TypeError(
            f"compress_: config must be a LowRankConfig, EoraConfig or SwscConfig, got {type(config).__name__}"
        )
    config.validate()
    if config.allocator == "fisher":  # per-basis selection: the basis-selection pipeline with calibration as target
        from lowrank_ops.basis import compress_basis_

        report = compress_basis_(model, config.as_basis_selection(), calibration, progress=progress)
        report.config = config.to_dict()
        return report
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    targets = find_targets(model, config.targets, config.ignore)
    names = list(targets)
    device = resolve_device(config.device)
    if config.needs_calibration:
        needed_by = f"method={config.method!r} with allocator={config.allocator!r}"
        calibration = calibration_windows(calibration, config.calib_tokens, needed_by)

    if config.sequential:
        tic = time.perf_counter()

        def compress_layer(layer_targets, layer_stats):
            factorer = _LayerFactorer(model, layer_targets, config, layer_stats, device)
            shapes = [tuple(linear_weight(module).shape) for module in layer_targets.values()]
            ranks = allocate_uniform(shapes, config.param_ratio, config.align)
            return factor_and_swap(model, layer_targets, factorer, ranks, progress=False)

        layers = compress_sequentially(model, targets, calibration, gram=config.method == "whiten",
                                       batch_size=config.batch_size, device=device, compress_layer=compress_layer,
                                       progress=progress)  # fmt: skip
        seconds["sequential"] = seconds["total"] = time.perf_counter() - tic
        return CompressionReport(config.to_dict(), layers, embedding_parameter_count(model), seconds)

    stats = {}
    if config.method != "svd":
        tic = time.perf_counter()
        stats = collect_input_statistics(
            model, names, calibration, gram=config.method == "whiten", batch_size=config.batch_size, progress=progress
        )
        seconds["calibration"] = time.perf_counter() - tic

    factorer = _LayerFactorer(model, targets, config, stats, device)
    shapes = [tuple(linear_weight(targets[name]).shape) for name in names]
    tic = time.perf_counter()
    if config.allocator == "uniform":
        ranks = allocate_uniform(shapes, config.param_ratio, config.align)
    elif config.allocator == "loss":
        energies = [
            factorer.factor(name).singular_values.square().cpu()
            for name in tqdm(names, desc="spectra", unit="layer", disable=not progress)
        ]
        ranks = allocate_by_loss(shapes, energies, config.param_ratio, config.align)
    else:
        table = sensitivity_table(model, targets, factorer, calibration, config, progress, cache_dir)
        ranks = allocate_by_sensitivity(shapes, table, config.param_ratio, config.align)
    seconds["allocation"] = time.perf_counter() - tic

    tic = time.perf_counter()
    layers = factor_and_swap(model, targets, factorer, ranks, progress)
    seconds["factoring"] = time.perf_counter() - tic
    seconds["total"] = time.perf_counter() - start
    return CompressionReport(config.to_dict(), layers, embedding_parameter_count(model), seconds)


def sensitivity_table(model, targets, factorer, calibration, config, progress=True, cache_dir=None) -> list[dict]:
    """ASVD sensitivity: table[l][rho] = calibration perplexity with only layer l factored at ratio rho.

    One SVD per layer serves every candidate ratio. Cached as JSON keyed by the model's targeted weights,
    the method, alpha, the candidate ratios, the alignment and the probe windows."""
    from lowrank_ops.evaluate import perplexity

    windows = max(1, config.sensitivity_tokens // calibration.shape[1])
    probe = calibration[:windows, : config.sensitivity_tokens]
    cache_path = _sensitivity_cache_path(targets, config, probe, cache_dir)
    if cache_path.is_file():
        return [{float(k): v for k, v in row.items()} for row in json.loads(cache_path.read_text())]
    table = []
    for name, module in tqdm(targets.items(), desc="sensitivity", unit="layer", disable=not progress):
        factors = factorer.factor(name)
        m, n = linear_weight(module).shape
        row = {}
        for ratio in config.sensitivity_ratios:
            rank = rank_for_param_ratio(m, n, ratio, config.align)
            replace_module(model, name, _lowrank_module(module, factors, rank))
            try:
                row[ratio] = perplexity(model, probe, batch_size=config.batch_size, progress=False)
            finally:
                replace_module(model, name, module)
        table.append(row)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table))
    tmp.replace(cache_path)
    return table


def _sensitivity_cache_path(targets, config: LowRankConfig, probe: torch.Tensor, cache_dir) -> Path:
    digest = hashlib.sha256()
    for name, module in targets.items():
        weight = linear_weight(module).detach()
        digest.update(f"{name}{tuple(weight.shape)}".encode())
        digest.update(weight.float().flatten()[:: max(1, weight.numel() // 4096)].cpu().numpy().tobytes())
    digest.update(json.dumps([config.method, config.alpha, config.sensitivity_ratios, config.align]).encode())
    digest.update(probe.cpu().numpy().tobytes())
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "lowrank_ops"
    return root / f"sensitivity-{digest.hexdigest()[:24]}.json"
