"""lowrank-ops: GPU kernels and compression tools for low-rank and factored LLM inference.

Public face: the `compress_` verb and its configs, save / load, the modules, `env_report()`, and the ops
(importing the package registers `torch.ops.lowrank_ops.*`). Everything else is imported from its own module.
"""

from lowrank_ops import ops  # noqa: F401  (registers torch.ops.lowrank_ops.*)
from lowrank_ops._version import __version__
from lowrank_ops.backends import Backend, BackendUnavailableError, use_backend
from lowrank_ops.compress import CompressionReport, compress_
from lowrank_ops.configs import BaseResidualConfig, BasisConfig, EoraConfig, LowRankConfig, SwscConfig
from lowrank_ops.env import env_report
from lowrank_ops.integrations import transformers as _transformers  # noqa: F401  (registers from_pretrained support)
from lowrank_ops.modules import LowRankLinear, QuantLowRankLinear, SharedChannelLinear, SparseLowRankLinear
from lowrank_ops.serialization import load_compressed, save_compressed, to_dense

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "CompressionReport",
    "BaseResidualConfig",
    "BasisConfig",
    "EoraConfig",
    "LowRankConfig",
    "LowRankLinear",
    "QuantLowRankLinear",
    "SharedChannelLinear",
    "SparseLowRankLinear",
    "SwscConfig",
    "compress_",
    "env_report",
    "load_compressed",
    "save_compressed",
    "to_dense",
    "use_backend",
    "__version__",
]
