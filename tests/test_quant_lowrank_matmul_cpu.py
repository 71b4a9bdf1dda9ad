"""The CPU backend of quant_lowrank_matmul (aten's int4 CPU kernel on a cached packing): float64 parity on awkward
shapes at bits 2 / 3 / 4, the packing cache and its invalidation, and the dispatch rules that route calls to it."""

import gc
import importlib

import pytest
import torch
from test_quant_lowrank_matmul import _check, _inputs

import lowrank_ops  # noqa: F401  (registers the op)
from lowrank_ops import backends
from lowrank_ops.backends import Backend, BackendUnavailableError, select_backend, use_backend
from lowrank_ops.kernels import quant_lowrank_matmul_cpu as cpu_kernel
from lowrank_ops.modules import QuantLowRankLinear

op = torch.ops.lowrank_ops.quant_lowrank_matmul
CPU = torch.device("cpu")
OP = "quant_lowrank_matmul"
pytestmark = pytest.mark.skipif(
    backends.cpu_unavailable_reason(OP, CPU) is not None, reason=str(backends.cpu_unavailable_reason(OP, CPU))
)

# (M, n, m, r, group_size): M = 1, 3, 17 and CPU_MAX_M; n = 576 at g = 128 (SmolLM2: 4.5 groups, x padded), n = 200
# at g = 32 (partial group), n = 4095 (odd, partial group); m not a multiple of 16 (padded rows); r = 0, 1, 24, 37;
# a GQA k/v projection (192 x 576); g = 256 with n = 513; g = 96 and 512, which the kernel runs as groups of 32 / 256.
SHAPES = [
    (2, 576, 40, 8, 96),
    (1, 1100, 32, 5, 512),
    (1, 576, 192, 24, 128),
    (3, 200, 33, 1, 32),
    (17, 576, 70, 0, 128),
    (17, 200, 97, 24, 32),
    (1, 4095, 100, 37, 128),
    (2, 513, 48, 3, 256),
    (backends.CPU_MAX_M, 136, 65, 37, 64),
]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_backend_matches_float64(shape, bits):
    args = _inputs(shape, bits, torch.bfloat16, "cpu", bias=shape[0] % 2 == 1, seed=hash((shape, bits)) % 1000)
    with use_backend("cpu"):
        y = op(*args)
    _check(y, args)
    torch.testing.assert_close(op(*args), y, rtol=0, atol=0)  # AUTO picks the CPU backend here


def test_leading_dims_non_contiguous_x_and_empty_batch():
    _, q, s, z, v, u, b, bits, g = _inputs((1, 130, 70, 24, 32), 4, torch.bfloat16, "cpu")
    x = torch.randn(2, 130, 7).bfloat16().transpose(1, 2)[:, ::2]  # (2, 4, 130), not contiguous
    with use_backend("cpu"):
        y = op(x, q, s, z, v, u, b, bits, g)
        assert op(x[:0], q, s, z, v, u, b, bits, g).shape == (0, 4, 70)
    assert y.shape == (2, 4, 70)
    _check(y, (x, q, s, z, v, u, b, bits, g))


def test_packing_is_made_once_and_remade_when_the_layer_changes(monkeypatch):
    calls = []
    pack = cpu_kernel.pack_for_cpu
    monkeypatch.setattr(cpu_kernel, "pack_for_cpu", lambda *a: calls.append(1) or pack(*a))
    args = _inputs((3, 200, 33, 4, 32), 4, torch.bfloat16, "cpu", seed=1)
    x, q, s, z, v, u, b, bits, g = args
    with use_backend("cpu"):
        y1 = op(*args)
        op(*args)
        assert len(calls) == 1
        other = _inputs((3, 200, 33, 4, 32), 4, torch.bfloat16, "cpu", seed=2)
        for i in (1, 2, 3, 4, 5, 6):  # qweight, scales, zeros, v, u, bias
            with torch.no_grad():
                args[i].copy_(other[i])  # in place, as load_state_dict does: the version counter moves
            y2 = op(*args)
            _check(y2, args)
        assert len(calls) == 7 and not torch.equal(y1, y2)
        assert id(q) in cpu_kernel._CACHE
    key = id(q)
    del args, q
    gc.collect()
    assert key not in cpu_kernel._CACHE


def test_module_load_state_dict_and_dtype_cast_reach_the_cpu_backend():
    a = _inputs((1, 576, 192, 16, 128), 4, torch.bfloat16, "cpu", bias=True, seed=3)
    b = _inputs((1, 576, 192, 16, 128), 4, torch.bfloat16, "cpu", bias=True, seed=4)
    layer = QuantLowRankLinear(576, 192, bits=4, group_size=128, rank=16, dtype=torch.bfloat16)
    x = a[0]
    for args in (a, b):
        _, q, s, z, v, u, bias, _, _ = args
        layer.load_state_dict({"qweight": q, "scales": s, "zeros": z, "v": v, "u": u, "bias": bias})
        with torch.no_grad(), use_backend("cpu"):
            y = layer(x)
        _check(y, (x, *args[1:]))
    layer32 = layer.float()  # fp32 activations: the torch backend (aten's kernel is vectorized for bf16 only)
    with torch.no_grad(), use_backend("torch"):
        expected = layer32(x.float())
    with torch.no_grad():
        torch.testing.assert_close(layer32(x.float()), expected, rtol=0, atol=0)


def test_inference_tensors_run_the_torch_backend():
    with torch.inference_mode():
        args = _inputs((1, 200, 33, 4, 32), 4, torch.bfloat16, "cpu")
        with use_backend("torch"):
            expected = op(*args)
        torch.testing.assert_close(op(*args), expected, rtol=0, atol=0)
        with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="inference tensors"):
            op(*args)


@pytest.mark.parametrize(
    ("dtype", "bits", "group_size", "scale_dtype", "match"),
    [
        (torch.float32, 4, 32, None, "takes bfloat16 activations, got torch.float32"),
        (torch.float16, 4, 32, None, "takes bfloat16 activations, got torch.float16"),
        (torch.bfloat16, 8, 32, None, "bits 2, 3, 4"),
        (torch.bfloat16, 4, 16, None, r"groups of \(32, 64, 128, 256\): group_size must be a multiple .*, got 16"),
        (torch.bfloat16, 4, 32, torch.float32, "scales / zeros in x's dtype"),
    ],
)
def test_arguments_the_kernel_cannot_take_run_the_torch_backend(dtype, bits, group_size, scale_dtype, match):
    """AUTO falls back to the torch backend (bit-identical to requesting it); requesting 'cpu' says why not."""
    x, q, s, z, v, u, b, _, _ = _inputs((2, 64, 40, 8, group_size), bits, dtype, "cpu")
    if scale_dtype is not None:
        s, z = s.to(scale_dtype), z.to(scale_dtype)
    args = (x, q, s, z, v, u, b, bits, group_size)
    with use_backend("torch"):
        expected = op(*args)
    torch.testing.assert_close(op(*args), expected, rtol=0, atol=0)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match=match):
        op(*args)


def test_dispatch_rules():
    assert select_backend(OP, CPU, 1, "auto") is Backend.CPU
    assert select_backend(OP, CPU, backends.CPU_MAX_M, "auto") is Backend.CPU
    assert select_backend(OP, CPU, backends.CPU_MAX_M + 1, "auto") is Backend.TORCH
    assert select_backend(OP, CPU, 10**4, "cpu") is Backend.CPU  # requested: any M
    assert select_backend(OP, CPU, 1, "auto", cpu_unsupported="no") is Backend.TORCH
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' is unavailable: why not"):
        select_backend(OP, CPU, 1, "cpu", cpu_unsupported="why not")
    with pytest.raises(BackendUnavailableError, match="lowrank_matmul has no CPU backend"):
        select_backend("lowrank_matmul", CPU, 1, "cpu")
    assert select_backend("lowrank_matmul", CPU, 1, "auto") is Backend.TORCH
    with pytest.raises(BackendUnavailableError, match="needs a CPU tensor"):
        select_backend(OP, torch.device("cuda", 0), 1, "cpu")


def test_unvectorized_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    backends._cpu_kernel_unavailable_reason.cache_clear()
    try:
        assert select_backend(OP, CPU, 1, "auto") is Backend.TORCH
        with pytest.raises(BackendUnavailableError, match="this CPU runs DEFAULT"):
            select_backend(OP, CPU, 1, "cpu")
    finally:
        backends._cpu_kernel_unavailable_reason.cache_clear()


def test_eager_calls_without_autograd_skip_the_dispatch_and_agree_with_it(monkeypatch):
    """The public function runs the op's implementation directly when nothing needs a gradient (eager), and through
    the custom op otherwise: both give the same bits, and a call that records a gradient still reaches the op."""
    qmod = importlib.import_module("lowrank_ops.ops.quant_lowrank_matmul")  # the package exports the function

    x, q, s, z, v, u, b, bits, group_size = _inputs((3, 576, 192, 24, 128), 4, torch.bfloat16, "cpu", bias=True,
                                                    seed=4)  # fmt: skip
    through_op = op(x, q, s, z, v, u, b, bits, group_size)
    calls = []
    real = qmod._quant_lowrank_matmul_op
    monkeypatch.setattr(qmod, "_quant_lowrank_matmul_op", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(qmod.quant_lowrank_matmul(x, q, s, z, v, u, b, bits, group_size), through_op)
    assert not calls, "no gradient to record: the dispatch is skipped"
    v = v.clone().requires_grad_(True)
    y = qmod.quant_lowrank_matmul(x, q, s, z, v, u, b, bits, group_size)
    assert calls and torch.equal(y.detach(), through_op)
    y.float().sum().backward()
    assert v.grad is not None and v.grad.shape == v.shape


@pytest.mark.parametrize(("group_size", "n", "expected"),
                         [(128, 576, 64), (128, 640, 128), (96, 576, 32), (512, 1100, 256), (128, 200, 128),
                          (32, 200, 32), (16, 576, None), (48, 576, None)])  # fmt: skip
def test_kernel_group_size(group_size, n, expected):
    """The largest of aten's group sizes that divides the layer's, preferring one that divides n (no padded copy of
    x): SmolLM2's n = 576 at g = 128 runs as groups of 64."""
    assert cpu_kernel.kernel_group_size(group_size, n) == expected
    if expected is not None:
        args = _inputs((1, n, 16, 0, group_size), 4, torch.bfloat16, "cpu", bias=False, seed=5)
        packing = cpu_kernel.cached_packing(*args[1:], n)
        assert packing.group_size == expected and packing.k == -(-n // expected) * expected


def test_repeated_calls_skip_the_checks_and_agree_with_the_full_path(monkeypatch):
    """A call that repeats one on an unchanged layer runs the cached packing without the argument checks; anything
    that could change the outcome (the layer's tensors, bits, x's dtype / width, a gradient, the backend asked for,
    M above CPU_MAX_M) goes through the full path again."""
    qmod = importlib.import_module("lowrank_ops.ops.quant_lowrank_matmul")
    checks = []
    real_checks = qmod.check_quant_lowrank_matmul_args
    monkeypatch.setattr(qmod, "check_quant_lowrank_matmul_args", lambda *a: checks.append(1) or real_checks(*a))
    x, q, s, z, v, u, b, bits, g = args = _inputs((3, 576, 192, 24, 128), 4, torch.bfloat16, "cpu", seed=6)
    with torch.no_grad():
        first = qmod.quant_lowrank_matmul(*args)
        assert len(checks) == 1
        assert torch.equal(qmod.quant_lowrank_matmul(x[None], *args[1:])[0], first) and len(checks) == 1
        _check(first, args)

        def full_path_again(*call_args):
            before = len(checks)
            y = qmod.quant_lowrank_matmul(*call_args)
            assert len(checks) > before  # (twice through the custom op, which checks again)
            return y

        v2 = v.clone()  # equal values, another tensor: repacked
        assert torch.equal(full_path_again(x, q, s, z, v2, u, b, bits, g), first)
        assert torch.equal(qmod.quant_lowrank_matmul(x, q, s, z, v2, u, b, bits, g), first)
        args3 = _inputs((3, 576, 192, 24, 128), 3, torch.bfloat16, "cpu", seed=6)
        y3 = full_path_again(*args3)
        _check(y3, args3)
        # the same tensors read as 4-bit codes: the same W_hat, packed the 4-bit way (codes as they are, the zero term
        # in the fp32 shrink / expand, where (q - 8) s and (8 - z) s cancel: more than 1.75x bf16's own rounding)
        y4 = full_path_again(*args3[:-2], 4, 128)
        torch.testing.assert_close(y4, y3, rtol=0.02, atol=0.02 * y3.abs().max().item())
        with pytest.raises(TypeError, match="scales.dtype"):
            full_path_again(x.float(), q, s, z, v2, u, b, bits, g)
        big = torch.randn(backends.CPU_MAX_M + 1, 576).bfloat16()
        with use_backend("torch"):
            expected_big = op(big, q, s, z, v2, u, b, bits, g)
        assert torch.equal(full_path_again(big, q, s, z, v2, u, b, bits, g), expected_big)
        with use_backend("torch"):
            _check(full_path_again(x, q, s, z, v2, u, b, bits, g), args)
        with pytest.raises(ValueError, match="x.shape"):
            full_path_again(x[:, :500], q, s, z, v2, u, b, bits, g)
    v_grad = v2.clone().requires_grad_(True)
    y = full_path_again(x, q, s, z, v_grad, u, b, bits, g)
    assert y.requires_grad


def test_module_compiles_fullgraph_after_eager_calls():
    """torch.compile(fullgraph=True) of a layer whose packing an eager call already cached: the traced call takes the
    custom op (dynamo never looks into the cache) and gives the eager bits."""
    _, q, s, z, v, u, bias, _, _ = _inputs((1, 576, 192, 16, 128), 4, torch.bfloat16, "cpu", bias=True, seed=9)
    layer = QuantLowRankLinear(576, 192, bits=4, group_size=128, rank=16, dtype=torch.bfloat16)
    layer.load_state_dict({"qweight": q, "scales": s, "zeros": z, "v": v, "u": u, "bias": bias})
    x = torch.randn(2, 576).bfloat16()
    with torch.no_grad():
        eager = layer(x)
        assert id(layer.qweight) in cpu_kernel._CACHE
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), eager)
