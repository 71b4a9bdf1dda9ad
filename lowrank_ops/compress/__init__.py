"""The compression verb, `compress_(model, config, calibration)`, and what it returns.

Layout (bottom up; docs/ARCHITECTURE.md): `report` (LayerResult, CompressionReport), `method` (the contract between
the runner and a method, and the registry keyed on the config type), `sequential` (the layer-by-layer driver),
`factoring` (pieces the low-rank methods share), `runner` (the skeleton: `compress_`), `methods/` (one module per
method, each registered on import).
"""

from lowrank_ops.compress import methods
from lowrank_ops.compress.method import CompressionMethod, StatisticsNeed, register_method, registered_configs
from lowrank_ops.compress.report import REPORT_VALUE_BITS, CompressionReport, LayerResult
from lowrank_ops.compress.runner import Run, compress_, resolve_device

methods.import_all()

__all__ = [
    "REPORT_VALUE_BITS",
    "CompressionMethod",
    "CompressionReport",
    "LayerResult",
    "Run",
    "StatisticsNeed",
    "compress_",
    "register_method",
    "registered_configs",
    "resolve_device",
]
