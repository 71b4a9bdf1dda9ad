"""torch.ops.lowrank_ops.lowrank_matmul: every backend against float64, awkward shapes, bad input, torch.library."""

import pytest
import torch
import triton
from helpers import KERNEL_DEVICE, assert_close_to_reference, requires_gpu

import lowrank_ops  # noqa: F401  (registers the op)
from lowrank_ops.backends import DECODE_MAX_M, use_backend
from lowrank_ops.kernels.lowrank_matmul import EXPAND_PREFETCH_ROW_BYTES, _launch_config, _lowrank_configs
from lowrank_ops.ops import lowrank_matmul
from lowrank_ops.ops.reference import lowrank_matmul_ref

op = torch.ops.lowrank_ops.lowrank_matmul

# (M, n, m, r): M = 1, 3, 17 (decode FMA / decode dot / tiled), n = 4095 (unaligned K tail), r = 1, 24, 200,
# odd m, a GQA k/v projection (192 x 576), and an M=64 tiled case with a ragged rank.
SHAPES = [
    (1, 4095, 33, 24),
    (3, 257, 130, 1),
    (17, 300, 211, 200),
    (5, 576, 192, 24),
    (16, 96, 576, 48),
    (64, 160, 97, 37),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(shape, dtype, device, bias=True, seed=0):
    """Factors scaled like a trained layer (unit-variance outputs), fresh per (shape, seed)."""
    m_rows, n, m, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m_rows, n, generator=g)
    v = torch.randn(r, n, generator=g) / n**0.5
    u = torch.randn(m, r, generator=g) / r**0.5
    b = torch.randn(m, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(v), cast(u), cast(b)


def _check(y, x, v, u, b):
    ref64 = lowrank_matmul_ref(*(None if t is None else t.double() for t in (x, v, u, b)))
    assert y.shape == ref64.shape and y.dtype == x.dtype
    assert_close_to_reference(y, lowrank_matmul_ref(x, v, u, b), ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_float64(shape, dtype):
    x, v, u, b = _inputs(shape, dtype, KERNEL_DEVICE, bias=shape[0] % 2 == 1, seed=hash(shape) % 1000)
    with use_backend("triton"):
        _check(op(x, v, u, b), x, v, u, b)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_torch_backend_matches_float64(dtype):
    x, v, u, b = _inputs((17, 300, 211, 200), dtype, "cpu")
    with use_backend("torch"):
        y = op(x, v, u, b)
    if dtype == torch.float64:
        torch.testing.assert_close(y, lowrank_matmul_ref(x, v, u, b), rtol=1e-12, atol=1e-12)
    else:
        _check(y, x, v, u, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_leading_dims_and_non_contiguous_x(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    _, v, u, b = _inputs((1, 130, 70, 24), torch.float32, device)
    base = torch.randn(2, 130, 7, device=device)
    x = base.transpose(1, 2)[:, ::2]  # (2, 4, 130), last-dim stride 7: neither contiguous nor viewable as 2-D
    assert not x.is_contiguous()
    with use_backend(backend):
        y = op(x, v, u, b)
    assert y.shape == (2, 4, 70)
    _check(y, x, v, u, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    _, v, u, b = _inputs((1, 64, 32, 16), torch.float32, device)
    with use_backend(backend):
        y = op(torch.empty(0, 64, device=device), v, u, b)
    assert y.shape == (0, 32)


def test_opcheck():
    x, v, u, b = _inputs((3, 64, 48, 16), torch.float32, "cpu")
    for args in ((x, v, u, b), (x, v, u, None)):
        torch.library.opcheck(op, args)


def test_gradients_match_autograd_of_reference():
    x, v, u, b = (t.double().requires_grad_() for t in _inputs((5, 40, 30, 8), torch.float64, "cpu"))
    torch.autograd.gradcheck(lambda *a: op(*a), (x, v, u, b))


def test_torch_compile_fullgraph():
    x, v, u, b = _inputs((4, 64, 48, 16), torch.float32, "cpu")
    compiled = torch.compile(lambda x: op(x, v, u, b) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), 2 * op(x, v, u, b))


# Bad input: each raises the right type and names the op, the value and the rule.
def _bad_cases():
    x, v, u, b = _inputs((2, 16, 12, 4), torch.float32, "cpu")
    return [
        ((x.numpy(), v, u, b), TypeError, "x must be a torch.Tensor"),
        ((x, v[0], u, b), ValueError, "v must be 2-D"),
        ((x, v, u[0], b), ValueError, "u must be 2-D"),
        ((x, v[:0], u[:, :0], b), ValueError, "rank=0 must be >= 1"),
        ((x, v, u[:, :3], b), ValueError, "u.shape[1]=3 must equal the rank"),
        ((x[:, :15], v, u, b), ValueError, "x.shape[-1]=15 must equal v.shape[1]=16"),
        ((x, torch.randn(13, 16), torch.randn(12, 13), b), ValueError, "rank=13 must be <= min(m, n) = 12"),
        ((x, v, u, b[:5]), ValueError, "bias.shape=(5,) must be (12,)"),
        ((x.half(), v, u, b), TypeError, "v.dtype=torch.float32 must equal x.dtype=torch.float16"),
        ((x.int(), v.int(), u.int(), None), TypeError, "x.dtype=torch.int32 must be one of"),
        ((x, v, u, b.to("meta")), ValueError, "bias is on meta but x is on cpu"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_with_op_value_and_rule(case):
    args, exc, message = _bad_cases()[case]
    for entry_point in (lowrank_matmul, op):
        if entry_point is op and exc is TypeError and "torch.Tensor" in message:
            continue  # the dispatcher itself rejects non-tensors before the op runs
        with pytest.raises(exc, match="lowrank_matmul: .*") as info:
            entry_point(*args)
        assert message in str(info.value)


def test_launch_plan_reduces_once_and_prefetches_all_of_u():
    """On an H100's 264 target programs: the shrink splits n as `_launch_config` plans (no cap from the expand any
    more: its last-arriving programs reduce the S partials once, and every expand program reads z (M, r) alone), the
    slices cover n, and wherever a row of U fits EXPAND_PREFETCH_ROW_BYTES (r <= 256 in 16 bits) an expand
    program's K-step covers the whole rank, so all of its U is fetched before gdc_wait."""
    for m_rows in (1, 2, 3, 4, 5, 16, 17, 64):
        for n, m, r in ((4096, 4096, 128), (4096, 4096, 256), (4096, 11008, 1024), (11008, 4096, 1024), (576, 192, 24)):
            for itemsize in (2, 4):
                shrink, expand = _lowrank_configs(m_rows, n, r, m, itemsize, 264, DECODE_MAX_M)
                split = shrink["split"]
                assert shrink == _launch_config(m_rows, r, n, 264, True, DECODE_MAX_M)
                assert (split - 1) * shrink["k_per_split"] < n <= split * shrink["k_per_split"]
                assert expand["split"] == 1
                if m_rows <= DECODE_MAX_M and triton.next_power_of_2(r) * itemsize <= EXPAND_PREFETCH_ROW_BYTES:
                    assert expand["BLOCK_K"] >= r, (m_rows, n, m, r, itemsize)
    for m_rows in (1, 16):  # 4096^2, r = 256 in bf16: 16 slices, and one K-step of U per expand program
        shrink, expand = _lowrank_configs(m_rows, 4096, 256, 4096, 2, 264, DECODE_MAX_M)
        assert shrink["split"] == 16 and expand["BLOCK_K"] == 256


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m_rows", [1, 4, 16, 128, 2048])
def test_gpu_llama_shapes(m_rows, dtype):
    x, v, u, b = _inputs((m_rows, 4096, 11008, 1024), dtype, "cuda", bias=False)
    with use_backend("triton"):
        _check(op(x, v, u, b), x, v, u, b)
    _check(op(x, v, u, b), x, v, u, b)  # AUTO


@requires_gpu
def test_gpu_cuda_graph_capture():
    x, v, u, b = _inputs((1, 4096, 4096, 256), torch.bfloat16, "cuda")
    op(x, v, u, b)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op(x, v, u, b)
    x.copy_(torch.randn_like(x))
    graph.replay()
    _check(y, x, v, u, b)


def test_eager_calls_without_autograd_skip_the_dispatch_and_agree_with_it(monkeypatch):
    """The public function runs the op's implementation directly when nothing needs a gradient (eager), and through
    the custom op otherwise: both give the same bits, and a call that records a gradient still reaches the op."""
    import importlib

    module = importlib.import_module("lowrank_ops.ops.lowrank_matmul")
    x, v, u, b = _inputs((3, 70, 33, 5), torch.float32, "cpu", seed=7)
    through_op = torch.ops.lowrank_ops.lowrank_matmul(x, v, u, b)
    calls = []
    real = module._lowrank_matmul_op
    monkeypatch.setattr(module, "_lowrank_matmul_op", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        assert torch.equal(module.lowrank_matmul(x, v.requires_grad_(True), u, b), through_op)
    assert torch.equal(module.lowrank_matmul(x, v.detach(), u, b), through_op)
    assert not calls, "no gradient to record: the dispatch is skipped"
    y = module.lowrank_matmul(x, v, u, b)
    assert calls and torch.equal(y.detach(), through_op)
    y.sum().backward()
    assert v.grad is not None and v.grad.shape == v.shape
    calls.clear()
    with torch.no_grad(), torch.profiler.profile() as prof:
        module.lowrank_matmul(x, v, u, b)
    assert calls, "under torch.profiler the call goes through the op"
    assert any(e.key == "lowrank_ops::lowrank_matmul" for e in prof.key_averages()), "so the profile names it"
