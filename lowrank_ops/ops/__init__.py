"""torch.library ops of the namespace `lowrank_ops`; each op dispatches through `select_backend`."""

from lowrank_ops.ops.lowrank_matmul import lowrank_matmul
from lowrank_ops.ops.reference import lowrank_matmul_ref

__all__ = ["lowrank_matmul", "lowrank_matmul_ref"]
