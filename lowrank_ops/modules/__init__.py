"""Drop-in nn.Modules backed by lowrank_ops ops. Every compressed layer class derives from `CompressedLinear`, whose
registry (class name -> class) serialization reads; every module of this package is imported here, so a new module
file registers its classes by existing."""

import importlib
import pkgutil

from lowrank_ops.modules.compressed import CompressedLinear
from lowrank_ops.modules.lowrank_linear import LowRankLinear
from lowrank_ops.modules.quant_lowrank_linear import QuantLowRankLinear
from lowrank_ops.modules.shared_channel_linear import SharedChannelLinear
from lowrank_ops.modules.sparse_lowrank_linear import SparseLowRankLinear

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CompressedLinear", "LowRankLinear", "QuantLowRankLinear", "SharedChannelLinear", "SparseLowRankLinear"]
