"""Drop-in nn.Modules backed by lowrank_ops ops."""

from lowrank_ops.modules.lowrank_linear import LowRankLinear

__all__ = ["LowRankLinear"]
