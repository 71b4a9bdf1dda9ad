"""lowrank-ops: GPU kernels and compression tools for low-rank and factored LLM inference.

Public face: the modules, `env_report()`, and the ops (importing the package registers
`torch.ops.lowrank_ops.*`). Everything else is imported from its own module.
"""

from lowrank_ops import ops  # noqa: F401  (registers torch.ops.lowrank_ops.*)
from lowrank_ops.backends import Backend, BackendUnavailableError, use_backend
from lowrank_ops.env import env_report
from lowrank_ops.modules import LowRankLinear, QuantLowRankLinear

__version__ = "0.1.0"
__all__ = [
    "Backend",
    "BackendUnavailableError",
    "LowRankLinear",
    "QuantLowRankLinear",
    "env_report",
    "use_backend",
    "__version__",
]
