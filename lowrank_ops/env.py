"""`env_report()`: what this machine offers lowrank-ops (versions, GPU, backends and why not)."""

from __future__ import annotations

import platform

import torch

from lowrank_ops import _C_loader
from lowrank_ops.backends import (
    cpu_unavailable_reason,
    cuda_unavailable_reason,
    triton_interpreting,
    triton_unavailable_reason,
)

OPS = ("lowrank_matmul", "quant_lowrank_matmul", "codebook_matmul")


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"
    return getattr(module, "__version__", "unknown")


def env_report() -> dict:
    """A JSON-able dict: versions, devices, and for each backend of each op "available" or the reason not."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    backends = {
        op: {
            "torch": "available",
            "triton": triton_unavailable_reason(device) or "available",
            "cuda": cuda_unavailable_reason(op, device) or "available",
            "cpu": cpu_unavailable_reason(op, torch.device("cpu")) or "available",
        }
        for op in OPS
    }
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "transformers": _version("transformers"),
        "triton_interpreter": triton_interpreting(),
        "device": str(device),
        "gpu": gpu,
        "cuda_extension": _C_loader.extension_unavailable_reason() or "built",
        "backends": backends,
    }


def format_env_report(report: dict) -> str:
    lines = [
        f"lowrank-ops on {report['platform']}, Python {report['python']}",
        f"torch {report['torch']} (CUDA {report['torch_cuda']}), triton {report['triton']}, numpy {report['numpy']}, "
        f"transformers {report['transformers']}",
    ]
    gpu = report["gpu"]
    lines.append(
        f"GPU: {gpu['name']} (sm_{gpu['compute_capability'].replace('.', '')}, {gpu['sm_count']} SMs, "
        f"{gpu['memory_gib']} GiB)"
        if gpu
        else "GPU: none (CPU only)"
    )
    lines.append(f"CUDA extension: {report['cuda_extension']}")
    for op, status in report["backends"].items():
        lines.append(f"{op}:")
        lines.extend(f"  {backend:7s} {reason}" for backend, reason in status.items())
    return "\n".join(lines)
