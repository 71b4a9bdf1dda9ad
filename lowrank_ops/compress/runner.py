"""`compress_(model, config, calibration)`: the one skeleton every method runs through.

    targets (surgery) -> per-layer checks -> device -> calibration windows
    one-shot:    statistics of every target -> method.select (global step) -> method.fit per layer
    sequential:  [whole-model selection, if the method's needs one] -> per decoder layer: statistics of its targets
                 on the outputs of the compressed layers before it -> method.select over that layer's targets ->
                 method.fit per target (lowrank_ops.compress.sequential)
    -> method.finish -> CompressionReport

Under torch.distributed (`torchrun`), the calibration windows are sharded and the statistics summed, the global step
runs on process 0 and is broadcast, layer fits are spread over the processes and every fitted module is shared, and
`finish` runs on process 0 (lowrank_ops.compress.distributed).

What a global step does in sequential mode (the statistics of a later layer do not exist until the earlier ones are
compressed, so a step over every layer at once is impossible without a pass over the whole model):
- selections that only read statistics and weights run per decoder layer, with the same budget rule: the "uniform"
  allocator (unchanged), the "loss" allocator and basis selection by "energy" (the budget is met per decoder layer,
  not across them), SWSC's k-means (unchanged: K is a per-layer rule);
- selections that need the whole model run once, first, on the uncompressed model; each layer keeps the rank they
  give it and is then refitted sequentially at that rank (its leading bases in the new statistics). "fisher" scores
  come from a forward and a backward sweep over the decoder layers, one in memory at a time
  (`compress.sequential_scores`, equal to the whole-model backward up to rounding); the "sensitivity" allocator's
  perplexity probes run on the whole model held where it is (not possible from disk).
The quality each choice costs on SmolLM2 is in README.md ("Sequential mode").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.calibration import calibration_windows, collect_input_statistics
from lowrank_ops.compress.distributed import World
from lowrank_ops.compress.method import CompressionMethod, method_for
from lowrank_ops.compress.report import CompressionReport
from lowrank_ops.compress.sequential import LayerIO, compress_sequentially
from lowrank_ops.configs import CompressionConfig
from lowrank_ops.integrations.transformers import attach_quantization_config
from lowrank_ops.surgery import embedding_parameter_count, find_targets, replace_module


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False")
    return torch.device(str(device))


@dataclass
class Run:
    """One call of compress_: what every method step may read, and the caches the runner owns."""

    model: nn.Module
    config: CompressionConfig
    device: torch.device  # where decompositions run
    windows: torch.Tensor | None  # calibration token ids (N, seq_len), or None when the method needs none
    progress: bool
    cache_dir: str | os.PathLike | None = None
    inputs: dict = field(default_factory=dict)  # method-specific keyword inputs of compress_ (train / heldout)
    world: World = field(default_factory=World)  # the processes sharing this compression (one without torchrun)
    seconds: dict[str, float] = field(default_factory=dict)
    _whitenings: dict = field(default_factory=dict)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def whitening(self, kind: str, stats, n_features: int, build: Callable[[], object]):
        """`build()` once per (kind, statistics object, width): layers that read the same input share one statistics
        object (q / k / v, gate / up), hence one Cholesky or eigendecomposition. The cache holds the statistics
        object itself, so its id cannot be reused by a later one while the entry lives."""
        key = (kind, id(stats), n_features)
        if key not in self._whitenings:
            self._whitenings[key] = (stats, build())
        return self._whitenings[key][1]

    @property
    def local_windows(self) -> torch.Tensor | None:
        """The calibration windows this process accumulates statistics on (all of them in a single process)."""
        return self.world.shard(self.windows)

    def clear_caches(self) -> None:
        self._whitenings.clear()

    def replace(self, name: str, module: nn.Module) -> None:
        replace_module(self.model, name, module)

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - tic


def compress_(
    model: nn.Module,
    config: CompressionConfig,
    calibration: torch.Tensor | None = None,
    *,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    train: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
    layer_io: LayerIO | None = None,
) -> CompressionReport:
    """Compress the targeted Linear layers of `model` in place as `config` says; returns the per-layer report.

    calibration: token ids (N, seq_len) for configs that need data (`config.needs_calibration`); at most
        config.calib_tokens tokens are used (for BasisConfig: the TARGET application's text).
    cache_dir: where the "sensitivity" allocator caches its table (default ~/.cache/lowrank_ops).
    train / heldout: BasisConfig only: target token ids for re-learning the coefficients (train_steps > 0).
    layer_io: sequential mode only: how a decoder layer is brought to the device and put away (default: moved);
        `lowrank_ops.streaming` passes one that reads it from disk and writes it out.
    """
    method = method_for(config)
    config.validate()
    method.check_inputs(train=train, heldout=heldout)
    if layer_io is not None and not config.sequential:
        raise ValueError("compress_: layer_io is used by sequential mode only (config.sequential=True)")
    start = time.perf_counter()
    targets = find_targets(model, config.targets, config.ignore)
    method.check_layers(targets)
    windows = None
    if config.needs_calibration:
        windows = calibration_windows(calibration, config.calib_tokens, method.calibration_purpose)
    world = World.current()
    run = Run(model, config, resolve_device(config.device), windows, progress and world.is_main, cache_dir,
              inputs=dict(train=train, heldout=heldout), world=world)  # fmt: skip
    layers = _sequential(run, method, targets, layer_io) if config.sequential else _one_shot(run, method, targets)
    report = method.report_type(config.to_dict(), layers, embedding_parameter_count(model), run.seconds)
    if world.is_main:  # the other processes' models are discarded (only process 0 evaluates and saves)
        with run.timed("finish"):
            method.finish(run, report)
    attach_quantization_config(model, report.config)  # model.save_pretrained now writes what from_pretrained opens
    run.seconds["total"] = time.perf_counter() - start
    return report


def _statistics(run: Run, method: CompressionMethod, targets: dict[str, nn.Module]) -> dict:
    need = method.statistics()
    if need is None or run.windows is None:
        return {}
    with run.timed("calibration"):
        stats = collect_input_statistics(run.model, list(targets), run.local_windows, gram=need.gram,
                                         batch_size=run.config.batch_size, progress=run.progress)  # fmt: skip
        run.world.all_reduce_statistics(stats)
    return stats


def _select(run: Run, method: CompressionMethod, targets: dict[str, nn.Module], stats: dict):
    """The method's global step, made once (by process 0) and shared."""
    with run.timed("selection"):
        return run.world.broadcast(method.select(run, targets, stats) if run.world.is_main else None)


def _fit_all(run: Run, method: CompressionMethod, targets: dict[str, nn.Module], stats: dict, plan, progress: bool):
    """Every target fitted (by the process that owns it) and shared; the report rows in target order."""
    names = list(targets)
    owners = run.world.owners([targets[name] for name in names])
    mine = [name for name, owner in zip(names, owners, strict=True) if owner == run.world.rank]
    rows = {}
    with run.timed(method.fit_label):
        for name in tqdm(mine, desc=method.fit_label, unit="layer", disable=not progress):
            rows[name] = method.fit(run, name, targets[name], stats.get(name), plan)
        return [run.world.share_module(run.model, name, owner, rows.get(name))
                for name, owner in zip(names, owners, strict=True)]  # fmt: skip


def _one_shot(run: Run, method: CompressionMethod, targets: dict[str, nn.Module]) -> list:
    stats = _statistics(run, method, targets)
    plan = _select(run, method, targets, stats)
    return _fit_all(run, method, targets, stats, plan, run.progress)


def _sequential(run: Run, method: CompressionMethod, targets: dict[str, nn.Module], layer_io: LayerIO | None) -> list:
    whole_model_plan = None
    if method.whole_model_selection() and method.layer_by_layer_selection():
        with run.timed("selection"):
            plan = method.select_layer_by_layer(run, targets, layer_io or LayerIO())
            whole_model_plan = run.world.broadcast(plan if run.world.is_main else None)
    elif method.whole_model_selection():
        if layer_io is not None:
            raise ValueError(f"compress_: {run.config.describe()} selects on the whole model at once (perplexity "
                             "probes); it cannot run with a layer_io")  # fmt: skip
        stats = _statistics(run, method, targets)
        whole_model_plan = method.ranks_only(_select(run, method, targets, stats))
        del stats
        run.clear_caches()

    def compress_decoder_layer(layer_targets: dict[str, nn.Module], layer_stats: dict) -> list:
        run.world.all_reduce_statistics(layer_stats)
        plan = whole_model_plan
        if plan is None:
            plan = _select(run, method, layer_targets, layer_stats)
        rows = _fit_all(run, method, layer_targets, layer_stats, plan, progress=False)
        run.clear_caches()  # this layer's statistics are dropped now: nothing may hold on to them
        return rows

    need = method.statistics()
    with run.timed("sequential"):
        return compress_sequentially(run.model, targets, run.local_windows, gram=need is not None and need.gram,
                                     batch_size=run.config.batch_size, device=run.device,
                                     compress_layer=compress_decoder_layer, progress=run.progress,
                                     layer_io=layer_io)  # fmt: skip
