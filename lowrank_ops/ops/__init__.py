"""torch.library ops of the namespace `lowrank_ops`; each op dispatches through `select_backend`."""

from lowrank_ops.ops.codebook_matmul import codebook_matmul
from lowrank_ops.ops.lowrank_matmul import lowrank_matmul
from lowrank_ops.ops.quant_lowrank_matmul import quant_lowrank_matmul, quant_lowrank_matmul_packed
from lowrank_ops.ops.reference import codebook_matmul_ref, lowrank_matmul_ref, quant_lowrank_matmul_ref

__all__ = [
    "codebook_matmul",
    "codebook_matmul_ref",
    "lowrank_matmul",
    "lowrank_matmul_ref",
    "quant_lowrank_matmul",
    "quant_lowrank_matmul_packed",
    "quant_lowrank_matmul_ref",
]
