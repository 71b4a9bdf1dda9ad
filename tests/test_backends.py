"""select_backend: the one dispatch point. Rules from lowrank_ops/backends.py, device capability mocked."""

import logging

import pytest
import torch

from lowrank_ops import backends
from lowrank_ops.backends import Backend, BackendUnavailableError, select_backend, use_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a compute-capability-9.0 GPU is present and the interpreter is off."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake H100")


def test_auto_on_cpu_uses_torch_and_logs_once(caplog):
    backends._log_fallback_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="lowrank_ops"):
        for _ in range(3):
            assert select_backend("lowrank_matmul", CPU, 1, "auto") is Backend.TORCH
    assert len(caplog.records) == 1 and "torch backend" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("m_rows", "expected"),
    [
        (1, Backend.TRITON),
        (16, Backend.TRITON),
        (17, Backend.TRITON),
        (64, Backend.TRITON),
        (65, Backend.TORCH),
        (2048, Backend.TORCH),
    ],
)
def test_auto_on_gpu_by_rows(fake_gpu, m_rows, expected):
    assert select_backend("lowrank_matmul", CUDA, m_rows, "auto") is expected


def test_auto_on_old_gpu_falls_back_to_torch(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_backend("lowrank_matmul", CUDA, 1, "auto") is Backend.TORCH
    with pytest.raises(BackendUnavailableError, match="compute capability >= 8.0"):
        select_backend("lowrank_matmul", CUDA, 1, "triton")


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="lowrank_matmul: backend 'triton' is unavailable: .*interpreter"):
        select_backend("lowrank_matmul", CPU, 1, "triton")


def test_explicit_triton_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("lowrank_matmul", CPU, 1, "triton") is Backend.TRITON


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_explicit_cuda_backend_raises_with_reason(device):
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        select_backend("lowrank_matmul", device, 1, "cuda")


def test_explicit_torch_always_works():
    assert select_backend("lowrank_matmul", CPU, 10**6, "torch") is Backend.TORCH


def test_use_backend_and_env_var(monkeypatch):
    monkeypatch.setenv("LOWRANK_OPS_BACKEND", "torch")
    assert backends.requested_backend() is Backend.TORCH
    with use_backend("triton"):
        assert backends.requested_backend() is Backend.TRITON
    assert backends.requested_backend() is Backend.TORCH
    monkeypatch.setenv("LOWRANK_OPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LOWRANK_OPS_BACKEND='fastest' is not one of"):
        backends.requested_backend()


def test_op_raises_for_unavailable_explicit_backend():
    import lowrank_ops  # noqa: F401

    x, v, u = torch.randn(2, 8), torch.randn(4, 8), torch.randn(6, 4)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        lowrank_ops.ops.lowrank_matmul(x, v, u)
