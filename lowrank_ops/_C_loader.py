"""Loads the optional C++/CUDA extension `lowrank_ops._C` built by setup.py from csrc/.

The package works without it (Triton and torch backends). `extension_unavailable_reason()` says why it is not
there; `cuda_ops()` lists the public torch.ops.lowrank_ops ops that have a CUDA kernel in the loaded extension:
a public op counts only when its backend-private op (CUDA_KERNEL_OPS, registered by csrc/bindings.cpp) exists
after the import, so a missing or older extension lists nothing it cannot run.
"""

from __future__ import annotations

import functools
import importlib

import torch

# Public op -> the backend-private op csrc/bindings.cpp registers for its CUDA kernel.
CUDA_KERNEL_OPS: dict[str, str] = {
    "lowrank_matmul": "lowrank_matmul_cuda",
    "quant_lowrank_matmul": "quant_lowrank_matmul_cuda",
}


@functools.cache
def _load():
    try:
        return importlib.import_module("lowrank_ops._C"), None
    except ImportError as exc:
        return None, (
            f"the C++/CUDA extension lowrank_ops._C is not built ({exc}); it builds when torch has CUDA and nvcc "
            "is found: python3 -m pip install --no-build-isolation -e ."
        )


def extension() -> object | None:
    return _load()[0]


def extension_unavailable_reason() -> str | None:
    return _load()[1]


@functools.cache
def cuda_ops() -> frozenset[str]:
    """Public ops whose private CUDA op the loaded extension registered (empty without the extension)."""
    if extension() is None:
        return frozenset()
    return frozenset(op for op, private in CUDA_KERNEL_OPS.items() if hasattr(torch.ops.lowrank_ops, private))
