"""Triton kernels of lowrank-ops, and the launcher of aten's int4 CPU kernel (`quant_lowrank_matmul_cpu`), installed
as the subpackage `lowrank_ops.kernels` (setup.py package_dir).

Import them as `lowrank_ops.kernels.<op>`; this directory is never installed as a top-level `kernels`
package (that name belongs to Hugging Face's kernel hub).
"""
