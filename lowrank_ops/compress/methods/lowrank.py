"""LowRankConfig: U V factors of every targeted layer by svd / asvd / whiten, ranks from one of four allocators.

select: the allocator's ranks -- "uniform" per layer; "loss" a greedy over every layer's discarded whitened energy
(one SVD per layer); "sensitivity" ASVD's perplexity probes (cached table) and one global threshold; "fisher" the
selection of individual bases by their empirical-Fisher loss change (`compress.factoring.select_by_score`).
fit: the layer's leading `rank` bases (or, for "fisher", the bases selected, their coefficients folded into U).
In sequential and layer-by-layer mode "fisher" scores with one decoder layer in memory at a time
(`compress.sequential_scores`: the one-shot gradients up to rounding) and keeps the ranks of its selection.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowrank_ops.algorithms.allocation import allocate_by_loss, allocate_by_sensitivity, allocate_uniform, layer_cost
from lowrank_ops.algorithms.basis_selection import selection_ratio
from lowrank_ops.compress.factoring import (
    BasisPlan,
    factor_layer,
    lowrank_module,
    select_by_score,
    selected_module,
    selection_result,
)
from lowrank_ops.compress.method import CompressionMethod, StatisticsNeed, register_method
from lowrank_ops.compress.report import LayerResult
from lowrank_ops.compress.sequential_scores import select_by_score_layer_by_layer
from lowrank_ops.configs import LowRankConfig
from lowrank_ops.options import Allocator, BasisScore, Method
from lowrank_ops.rank import discarded_energy, rank_for_param_ratio
from lowrank_ops.surgery import linear_weight


@register_method
class LowRankMethod(CompressionMethod):
    config_type = LowRankConfig
    fit_label = "factoring"
    config: LowRankConfig

    def statistics(self) -> StatisticsNeed | None:
        return None if self.config.method == Method.svd else StatisticsNeed(gram=self.config.method == Method.whiten)

    def whole_model_selection(self) -> bool:
        return self.config.allocator in (Allocator.sensitivity, Allocator.fisher)

    def layer_by_layer_selection(self) -> bool:
        return self.config.allocator == Allocator.fisher

    def select_layer_by_layer(self, run, targets, layer_io) -> BasisPlan:
        config = self.config
        shapes = [tuple(linear_weight(module).shape) for module in targets.values()]
        need = self.statistics()
        return select_by_score_layer_by_layer(run, targets, layer_io, basis=config.method, alpha=config.alpha,
                                              gram=need is not None and need.gram, kind=BasisScore.fisher,
                                              ratio=selection_ratio(shapes, config.param_ratio, 0),
                                              align=config.align, score_tokens=config.score_tokens)  # fmt: skip

    def _factor(self, run, module, stats):
        return factor_layer(run, module, stats, self.config.method, self.config.alpha)

    def select(self, run, targets, stats) -> BasisPlan:
        config = self.config
        shapes = [tuple(linear_weight(module).shape) for module in targets.values()]
        if config.allocator == Allocator.fisher:
            return select_by_score(run, targets, stats, basis=config.method, alpha=config.alpha,
                                   score=BasisScore.fisher, ratio=selection_ratio(shapes, config.param_ratio, 0),
                                   align=config.align, score_tokens=config.score_tokens)  # fmt: skip
        if config.allocator == Allocator.uniform:
            ranks = allocate_uniform(shapes, config.param_ratio, config.align)
        elif config.allocator == Allocator.loss:
            energies = [self._factor(run, module, stats.get(name)).singular_values.square().cpu()
                        for name, module in tqdm(targets.items(), desc="spectra", unit="layer",
                                                 disable=not run.progress)]  # fmt: skip
            ranks = allocate_by_loss(shapes, energies, config.param_ratio, config.align)
        else:
            table = self._sensitivity_table(run, targets, stats)
            ranks = allocate_by_sensitivity(shapes, table, config.param_ratio, config.align)
        return BasisPlan(dict(zip(targets, ranks, strict=True)))

    def ranks_only(self, plan: BasisPlan) -> BasisPlan:
        return plan.ranks_only()

    def fit(self, run, name, module, stats, plan: BasisPlan) -> LayerResult:
        m, n = linear_weight(module).shape
        rank = plan.ranks[name]
        if rank is None:
            return LayerResult(name, m, n, None, m * n, 0.0)
        if name in plan.kept:  # bases selected on these very factors ("fisher")
            run.replace(name, selected_module(plan, name).fold_coefficients())
            return selection_result(plan, name)
        factors = self._factor(run, module, stats)
        run.replace(name, lowrank_module(module, factors, rank))
        kept = min(rank, factors.singular_values.shape[-1])
        dropped = discarded_energy(factors.singular_values, kept, relative=True)
        return LayerResult(name, m, n, rank, layer_cost(m, n, rank), float(dropped))

    def _sensitivity_table(self, run, targets, stats) -> list[dict]:
        """ASVD sensitivity: table[l][rho] = calibration perplexity with only layer l factored at ratio rho.

        One SVD per layer serves every candidate ratio. Cached as JSON keyed by the model's targeted weights,
        the method, alpha, the candidate ratios, the alignment and the probe windows."""
        from lowrank_ops.evaluate import perplexity

        config = self.config
        windows = max(1, config.sensitivity_tokens // run.windows.shape[1])
        probe = run.windows[:windows, : config.sensitivity_tokens]
        cache_path = self._sensitivity_cache_path(targets, probe, run.cache_dir)
        if cache_path.is_file():
            return [{float(k): v for k, v in row.items()} for row in json.loads(cache_path.read_text())]
        table = []
        for name, module in tqdm(targets.items(), desc="sensitivity", unit="layer", disable=not run.progress):
            factors = self._factor(run, module, stats.get(name))
            m, n = linear_weight(module).shape
            row = {}
            for ratio in config.sensitivity_ratios:
                run.replace(name, lowrank_module(module, factors, rank_for_param_ratio(m, n, ratio, config.align)))
                try:
                    row[ratio] = perplexity(run.model, probe, batch_size=config.batch_size, progress=False)
                finally:
                    run.replace(name, module)
            table.append(row)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(cache_path)
        return table

    def _sensitivity_cache_path(self, targets, probe: torch.Tensor, cache_dir) -> Path:
        config = self.config
        digest = hashlib.sha256()
        for name, module in targets.items():
            weight = linear_weight(module).detach()
            digest.update(f"{name}{tuple(weight.shape)}".encode())
            digest.update(weight.float().flatten()[:: max(1, weight.numel() // 4096)].cpu().numpy().tobytes())
        digest.update(json.dumps([config.method, config.alpha, config.sensitivity_ratios, config.align]).encode())
        digest.update(probe.cpu().numpy().tobytes())
        root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "lowrank_ops"
        return root / f"sensitivity-{digest.hexdigest()[:24]}.json"
