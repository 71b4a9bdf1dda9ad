"""Drop-in nn.Modules backed by lowrank_ops ops."""

from lowrank_ops.modules.lowrank_linear import LowRankLinear
from lowrank_ops.modules.quant_lowrank_linear import QuantLowRankLinear
from lowrank_ops.modules.shared_channel_linear import SharedChannelLinear
from lowrank_ops.modules.sparse_lowrank_linear import SparseLowRankLinear

__all__ = ["LowRankLinear", "QuantLowRankLinear", "SharedChannelLinear", "SparseLowRankLinear"]
