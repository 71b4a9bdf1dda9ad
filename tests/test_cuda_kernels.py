"""The CUDA backend (csrc/ decode kernels, issue 9): dispatch rules on any machine; on a GPU with the extension built,
parity with float64 and with the Triton backend on awkward shapes, and clear errors from the private ops.

GPU tests run with LOWRANK_OPS_TEST_GPU=1 on a machine where `python3 -m pip install --no-build-isolation -e .`
built lowrank_ops._C; elsewhere they skip and say why."""

import pytest
import torch
from helpers import assert_close_to_reference, relative_error

import lowrank_ops  # noqa: F401  (registers the ops)
from lowrank_ops import _C_loader, backends
from lowrank_ops.backends import Backend, BackendUnavailableError, select_backend, use_backend
from lowrank_ops.ops.reference import lowrank_matmul_ref, quant_lowrank_matmul_ref
from lowrank_ops.quant_format import PackedQuantWeight, num_groups, pack, to_layout_v2

lowrank_op = torch.ops.lowrank_ops.lowrank_matmul
quant_op = torch.ops.lowrank_ops.quant_lowrank_matmul
CUDA = torch.device("cuda", 0)


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if _C_loader.extension() is None:
        return _C_loader.extension_unavailable_reason()
    if not {"lowrank_matmul", "quant_lowrank_matmul"} <= _C_loader.cuda_ops():
        return f"the extension registers only {sorted(_C_loader.cuda_ops())}"
    return None


requires_cuda_kernels = pytest.mark.skipif(_cuda_skip_reason() is not None, reason=str(_cuda_skip_reason()))


# ------------------------------------------------------------------------------------------------ dispatch (CPU)


def test_cuda_ops_reflect_the_loaded_extension():
    if _C_loader.extension() is None:
        assert _C_loader.cuda_ops() == frozenset()
    else:
        assert _C_loader.cuda_ops() <= set(_C_loader.CUDA_KERNEL_OPS)


@pytest.mark.skipif(_C_loader.extension() is not None, reason="the extension is built here")
@pytest.mark.parametrize("op", ["lowrank_matmul", "quant_lowrank_matmul"])
@pytest.mark.parametrize("device", [torch.device("cpu"), CUDA])
def test_requested_cuda_without_extension_names_the_reason(op, device):
    with pytest.raises(BackendUnavailableError, match=rf"{op}: backend 'cuda' is unavailable: .*") as info:
        select_backend(op, device, 1, "cuda")
    if device.type == "cuda":
        assert _C_loader.extension_unavailable_reason() in str(info.value)
    else:
        assert "needs a CUDA tensor" in str(info.value)


def test_requested_cuda_above_decode_rows_names_the_limit(monkeypatch):
    monkeypatch.setattr(_C_loader, "extension_unavailable_reason", lambda: None)
    monkeypatch.setattr(_C_loader, "cuda_ops", lambda: frozenset({"lowrank_matmul"}))
    assert select_backend("lowrank_matmul", CUDA, backends.CUDA_MAX_M, "cuda") is Backend.CUDA
    with pytest.raises(BackendUnavailableError, match=r"decode kernels for M <= 16 rows of x, got M=17"):
        select_backend("lowrank_matmul", CUDA, backends.CUDA_MAX_M + 1, "cuda")
    with pytest.raises(BackendUnavailableError, match="registers no quant_lowrank_matmul kernel"):
        select_backend("quant_lowrank_matmul", CUDA, 1, "cuda")


def test_auto_never_picks_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_C_loader, "extension_unavailable_reason", lambda: None)
    monkeypatch.setattr(_C_loader, "cuda_ops", lambda: frozenset(_C_loader.CUDA_KERNEL_OPS))
    for op in _C_loader.CUDA_KERNEL_OPS:
        for m_rows in (1, 16):
            assert select_backend(op, CUDA, m_rows, "auto") is not Backend.CUDA


def test_cuda_dtype_rule():
    assert backends.cuda_dtype_unavailable_reason(torch.bfloat16) is None
    assert "float16 / bfloat16" in backends.cuda_dtype_unavailable_reason(torch.float32)


# ------------------------------------------------------------------------------------------------------ GPU only

DTYPES = [torch.float16, torch.bfloat16]
# (n, m): n = 4095 (no 16-byte path for x and V), 4096, 576 (SmolLM2); odd m = 1537.
SHAPES = [(4095, 1537), (4096, 1537), (576, 192), (4096, 4096)]
RANKS = [1, 24, 200, 256]
ROWS = [1, 2, 3, 7, 16]  # one per M tile the kernels instantiate (1, 2, 4, 8, 16)


def _lowrank_inputs(rows, n, m, r, dtype, bias, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, n, generator=g, device="cuda").to(dtype)
    v = (torch.randn(r, n, generator=g, device="cuda") / n**0.5).to(dtype)
    u = (torch.randn(m, r, generator=g, device="cuda") / r**0.5).to(dtype)
    b = torch.randn(m, generator=g, device="cuda").to(dtype) if bias else None
    return x, v, u, b


def _check_lowrank(y, x, v, u, b):
    ref64 = lowrank_matmul_ref(*(None if t is None else t.double() for t in (x, v, u, b)))
    assert y.shape == ref64.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert_close_to_reference(y, lowrank_matmul_ref(x, v, u, b), ref64)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lowrank_cuda_matches_float64_and_triton(shape, r, rows, dtype):
    n, m = shape
    if r > min(n, m):
        pytest.skip(f"rank {r} > min(m, n) = {min(n, m)} is not a valid factorisation")
    x, v, u, b = _lowrank_inputs(rows, n, m, r, dtype, bias=(r + rows) % 2 == 0, seed=n + m + r + rows)
    with use_backend("cuda"):
        y = lowrank_op(x, v, u, b)
    _check_lowrank(y, x, v, u, b)
    with use_backend("triton"):
        y_triton = lowrank_op(x, v, u, b)
    ref64 = lowrank_matmul_ref(*(None if t is None else t.double() for t in (x, v, u, b)))
    # Both accumulate in fp32 from the same inputs: they differ by output rounding, at most a few units of it.
    assert relative_error(y, y_triton) <= 4 * torch.finfo(dtype).eps + relative_error(y_triton, ref64)


@requires_cuda_kernels
def test_lowrank_cuda_unaligned_and_strided_x():
    """x a strided view (row stride 4100, offset by 1 element: no 16-byte path), leading dims, poisoned output."""
    _, v, u, b = _lowrank_inputs(1, 4096, 1537, 24, torch.bfloat16, bias=True, seed=7)
    base = torch.randn(2, 3, 4100, device="cuda").to(torch.bfloat16)
    x = base[..., 1:4097]
    with use_backend("cuda"):
        y = lowrank_op(x, v, u, b)
    assert y.shape == (2, 3, 1537)
    _check_lowrank(y, x, v, u, b)


@requires_cuda_kernels
def test_lowrank_cuda_graph_capture():
    x, v, u, b = _lowrank_inputs(1, 4096, 4096, 256, torch.bfloat16, bias=True, seed=3)
    with use_backend("cuda"):
        lowrank_op(x, v, u, b)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lowrank_op(x, v, u, b)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _check_lowrank(y, x, v, u, b)


def _quant_inputs(rows, n, m, r, group_size, bits, dtype, bias, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = torch.randint(0, 2**bits, (m, n), generator=g, device="cuda", dtype=torch.uint8)
    groups = num_groups(n, group_size)
    scales = (0.5 + torch.rand(m, groups, generator=g, device="cuda")) * (2.0 / 2**bits) * (3.0 / n) ** 0.5
    zeros = torch.randint(0, 2**bits, (m, groups), generator=g, device="cuda").float()
    packed = pack(codes, scales, zeros, bits, group_size, dtype)
    x = torch.randn(rows, n, generator=g, device="cuda").to(dtype)
    v = u = None
    if r > 0:
        v = (torch.randn(r, n, generator=g, device="cuda") / n**0.5).to(dtype)
        u = (0.3 * torch.randn(m, r, generator=g, device="cuda") / r**0.5).to(dtype)
    b = torch.randn(m, generator=g, device="cuda").to(dtype) if bias else None
    return x, packed.qweight, packed.scales, packed.zeros, v, u, b, bits, group_size


def _check_quant(y, args):
    x, q, s, z, v, u, b, bits, group_size = args
    ref64 = quant_lowrank_matmul_ref(
        x.double(), q, s.double(), z.double(), *(None if t is None else t.double() for t in (v, u, b)), bits, group_size
    )
    assert y.shape == ref64.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert_close_to_reference(y, quant_lowrank_matmul_ref(*args), ref64)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("r", [0, *RANKS])
@pytest.mark.parametrize(("n", "m", "group_size", "bits"), [(4095, 1537, 128, 4), (4096, 1537, 32, 3),
                                                             (576, 192, 8, 4), (4096, 4096, 128, 4)])  # fmt: skip
def test_quant_cuda_matches_float64_and_triton(n, m, group_size, bits, r, rows, dtype):
    if r > min(n, m):
        pytest.skip(f"rank {r} > min(m, n) = {min(n, m)} is not a valid residual")
    args = _quant_inputs(rows, n, m, r, group_size, bits, dtype, bias=rows != 3, seed=n + m + r + rows)
    with use_backend("cuda"):
        y = quant_op(*args)
    _check_quant(y, args)
    with use_backend("triton"):
        y_triton = quant_op(*args)
    x, q, s, z, v, u, b, bits, group_size = args
    ref64 = quant_lowrank_matmul_ref(
        x.double(), q, s.double(), z.double(), *(None if t is None else t.double() for t in (v, u, b)), bits, group_size
    )
    assert relative_error(y, y_triton) <= 4 * torch.finfo(dtype).eps + 2 * relative_error(y_triton, ref64)


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("r", [0, 128])
@pytest.mark.parametrize(("n", "m", "group_size", "bits"), [(4096, 4096, 128, 4), (4095, 1537, 32, 3),
                                                             (576, 192, 16, 2)])  # fmt: skip
def test_quant_cuda_v2_matches_float64(n, m, group_size, bits, r, rows, dtype):
    """The int4 kernel v2 on a GPU (private op, layout v2 from quant_format.to_layout_v2): the accuracy rule against
    float64, as under the emulator (tests/test_cuda_emulated.py); 4096^2 g128 runs its aligned variant."""
    if r > min(n, m):
        pytest.skip(f"rank {r} > min(m, n) = {min(n, m)} is not a valid residual")
    args = _quant_inputs(rows, n, m, r, group_size, bits, dtype, bias=rows != 3, seed=n + m + r + rows)
    x, q, s, z, v, u, b, bits, group_size = args
    packed_v2 = to_layout_v2(PackedQuantWeight(q, s, z, bits, group_size, (m, n)))
    y = torch.ops.lowrank_ops.quant_lowrank_matmul_v2_cuda(x, packed_v2.qweight, packed_v2.scales, packed_v2.zeros,
                                                           v, u, b, m, group_size)  # fmt: skip
    _check_quant(y, args)


@requires_cuda_kernels
def test_quant_cuda_unsupported_arguments_raise_backend_unavailable():
    args = list(_quant_inputs(1, 256, 64, 8, 128, 4, torch.bfloat16, bias=False, seed=0))
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="scales / zeros in x's dtype"):
        quant_op(*args[:2], args[2].float(), args[3].float(), *args[4:])
    x32 = args[0].float()
    fp32 = [x32, args[1], args[2].float(), args[3].float(), None, None, None, 4, 128]
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="float16 / bfloat16"):
        quant_op(*fp32)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="M=17"):
        quant_op(torch.randn(17, 256, device="cuda", dtype=torch.bfloat16), *args[1:])


@requires_cuda_kernels
def test_private_ops_name_the_tensor_and_the_rule():
    x, v, u, b = _lowrank_inputs(2, 256, 64, 8, torch.float16, bias=True, seed=0)
    private = torch.ops.lowrank_ops.lowrank_matmul_cuda
    with pytest.raises(ValueError, match=r"x.shape\[0\]=M=17 must be in 1 .. 16"):
        private(torch.randn(17, 256, device="cuda", dtype=torch.float16), v, u, b)
    with pytest.raises(TypeError, match=r"u.dtype=BFloat16 must be Half"):
        private(x, v, u.bfloat16(), b)
    with pytest.raises(ValueError, match=r"u must be contiguous \(row-major\), got u.shape=\(64, 8\)"):
        private(x, v, u.t().contiguous().t(), b)
    with pytest.raises(ValueError, match=r"v.shape\[1\]=255 must equal n=x.shape\[1\]=256"):
        private(x, v[:, :255].contiguous(), u, b)
    with pytest.raises(ValueError, match=r"bias.shape=\(63,\) must be \(64,\)"):
        private(x, v, u, b[:63])
    with pytest.raises(ValueError, match=r"v is on cpu but x is on cuda"):
        private(x, v.cpu(), u, b)
    args = _quant_inputs(1, 256, 64, 8, 128, 4, torch.float16, bias=False, seed=0)
    quant_private = torch.ops.lowrank_ops.quant_lowrank_matmul_cuda
    with pytest.raises(ValueError, match=r"qweight.shape=\(64, 31\) must be \(m, ceil\(n / 8\)\) = \(m, 32\)"):
        quant_private(args[0], args[1][:, :31].contiguous(), *args[2:])
    with pytest.raises(ValueError, match=r"bits=8 must be 2, 3 or 4"):
        quant_private(*args[:7], 8, 128)
    with pytest.raises(ValueError, match=r"group_size=12 must be a positive multiple of 8"):
        quant_private(*args[:8], 12)
