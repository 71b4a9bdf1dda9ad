"""The contract between the runner and a compression method, and the registry that maps a config type to its method.

A method provides only what differs between methods (`CompressionMethod`): which calibration statistics it needs,
per-layer checks made before any work, an optional global selection step between the statistics and the fitting
(allocation, scores, a shared k-means), how to fit one layer, and an optional last step over the whole model.
Everything else -- targets, device, calibration windows, statistics, the whitening cache, the per-layer loop, the
sequential driver, the report -- is the runner's (`lowrank_ops.compress.runner`).

A method registers itself with `@register_method`; `lowrank_ops.compress` imports every module of
`lowrank_ops.compress.methods`, so a new file there is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from lowrank_ops.compress.report import CompressionReport, LayerResult
from lowrank_ops.configs import CompressionConfig

if TYPE_CHECKING:
    from lowrank_ops.compress.runner import Run
    from lowrank_ops.compress.sequential import LayerIO


@dataclass(frozen=True)
class StatisticsNeed:
    """Input statistics a method reads: mean |x| per input channel always, the Gram X^T X when `gram`."""

    gram: bool


class CompressionMethod:
    """One method's part of `compress_`. An instance lives for one call and may keep state between its steps."""

    config_type: ClassVar[type[CompressionConfig]]
    report_type: ClassVar[type[CompressionReport]] = CompressionReport
    fit_label: ClassVar[str] = "compressing"  # progress-bar label and `seconds` key of the per-layer loop

    def __init__(self, config: CompressionConfig):
        self.config = config

    def check_inputs(self, **extra) -> None:
        """Reject keyword inputs of compress_ this method does not use (only basis selection takes train / heldout)."""
        given = sorted(key for key, value in extra.items() if value is not None)
        if given:
            raise ValueError(f"compress_: {given} are used by BasisConfig only, not {type(self.config).__name__}")

    def check_layers(self, targets: dict[str, nn.Module]) -> None:
        """Checks of every targeted layer, made before any work starts (ranks against break-even, cluster counts)."""

    def statistics(self) -> StatisticsNeed | None:
        """The calibration statistics the method reads, or None."""
        return None

    @property
    def calibration_purpose(self) -> str:
        """What the calibration data is for, in the error raised when none is given."""
        return self.config.describe()

    def whole_model_selection(self) -> bool:
        """Whether `select` needs the whole model (a perplexity probe or a backward pass through every layer). In
        sequential mode such a selection runs once, first, on the uncompressed model, and only the rank it gives each
        layer is kept (`ranks_only`); any other selection runs per decoder layer on that layer's statistics."""
        return False

    def layer_by_layer_selection(self) -> bool:
        """Whether the whole-model selection can also be made with one decoder layer in memory at a time
        (`select_layer_by_layer`); sequential mode then uses it, and layer-by-layer compression from disk needs it."""
        return False

    def select_layer_by_layer(self, run: Run, targets: dict[str, nn.Module], layer_io: LayerIO) -> Any:
        """The whole-model selection with each decoder layer brought in and put away by `layer_io`; its result is
        what `ranks_only` of `select`'s would be."""
        raise NotImplementedError(f"{type(self).__name__} has no layer-by-layer selection")

    def select(self, run: Run, targets: dict[str, nn.Module], stats: dict) -> Any:
        """The global step over `targets` (all of them, or one decoder layer's in sequential mode); its result is
        passed to every `fit`. Default: none."""
        return None

    def ranks_only(self, plan: Any) -> Any:
        """A whole-model selection reduced to what a sequential fit can use (see `whole_model_selection`)."""
        raise NotImplementedError(f"{type(self).__name__} has no whole-model selection")

    def fit(self, run: Run, name: str, module: nn.Module, stats, plan: Any) -> LayerResult:
        """Compress one targeted layer in place (`run.replace`) and return its report row."""
        raise NotImplementedError

    def finish(self, run: Run, report: CompressionReport) -> None:
        """A last step over the whole compressed model (re-learning, folding). Default: none."""


_METHODS: dict[type[CompressionConfig], type[CompressionMethod]] = {}


def register_method(method: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: `method` compresses configs of `method.config_type`."""
    if method.config_type in _METHODS:
        raise ValueError(f"register_method: {method.config_type.__name__} already has {_METHODS[method.config_type]}")
    _METHODS[method.config_type] = method
    return method


def method_for(config: CompressionConfig) -> CompressionMethod:
    """The registered method of `config`'s type, bound to it."""
    method = _METHODS.get(type(config))
    if method is None:
        known = ", ".join(cls.__name__ for cls in _METHODS)
        raise TypeError(f"compress_: config must be one of {known}; got {type(config).__name__}")
    return method(config)


def registered_configs() -> list[type[CompressionConfig]]:
    return list(_METHODS)
