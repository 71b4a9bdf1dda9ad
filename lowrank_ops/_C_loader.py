"""Loads the optional C++/CUDA extension `lowrank_ops._C` built by setup.py from csrc/.

The package works without it (Triton and torch backends). `extension_unavailable_reason()` says why it is not
there; `CUDA_OPS` lists the torch.ops.lowrank_ops ops the extension registers as CUDA kernels (none until
the CUDA decode kernels land, issue 9).
"""

from __future__ import annotations

import functools
import importlib

CUDA_OPS: frozenset[str] = frozenset()


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
