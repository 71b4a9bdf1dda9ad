"""Triton kernels of lowrank-ops, and the launcher of aten's int4 CPU kernel (`quant_lowrank_matmul_cpu`), installed
as the subpackage `lowrank_ops.kernels` (setup.py package_dir).

Import them as `lowrank_ops.kernels.<op>`; this directory is never installed as a top-level `kernels`
package (that name belongs to Hugging Face's kernel hub).
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a subprocess by tests/test_build.py
    # Imported as a top-level `kernels`: Python runs from the root of a source checkout (`python`, `python -c`,
    # `python -m` put the current directory first on sys.path), so this directory shadows Hugging Face's `kernels`,
    # which transformers >= 5 imports when its models load (ImportError: cannot import name 'CUDAProperties'). Load
    # the real package in this module's place (the import system returns what sys.modules holds at the end). Where
    # none is installed this module stays: transformers' probe imports it, finds no version and moves on (raising
    # here instead breaks that probe in transformers 5.19).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    )
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
