"""Triton kernels of lowrank-ops, installed as the subpackage `lowrank_ops.kernels` (setup.py package_dir).

Import them as `lowrank_ops.kernels.<op>`; this directory is never installed as a top-level `kernels`
package (that name belongs to Hugging Face's kernel hub).
"""
