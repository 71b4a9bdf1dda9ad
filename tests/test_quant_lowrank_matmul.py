"""torch.ops.lowrank_ops.quant_lowrank_matmul and its packed format: every backend against float64, awkward
shapes (partial groups, n not a multiple of 8, odd m, r = 0 / 1), bad input, torch.library, dispatch."""

import pytest
import torch
from helpers import KERNEL_DEVICE, assert_close_to_reference, relative_error, requires_gpu

import lowrank_ops  # noqa: F401  (registers the op)
from lowrank_ops import backends, quant_format
from lowrank_ops.backends import Backend, select_backend, use_backend
from lowrank_ops.ops import quant_lowrank_matmul, quant_lowrank_matmul_packed
from lowrank_ops.ops.reference import quant_lowrank_matmul_ref
from lowrank_ops.quant_format import LAYOUT_VERSION, PackedQuantWeight, dequantize_packed, pack, unpack_codes

op = torch.ops.lowrank_ops.quant_lowrank_matmul

# (M, n, m, r, group_size): M = 1 (GEMV), 3 and 17 (tl.dot tiles, BLOCK_M 16 / 32), 64 (BLOCK_M 64); n = 576
# with g = 128 (SmolLM2: 4.5 groups), n = 200 with g = 32 (partial group, 25 words), n = 136 (17 words); r = 0,
# 1, 24, 37; odd m; a GQA k/v projection (192 x 576).
SHAPES = [
    (1, 576, 192, 24, 128),
    (3, 200, 33, 1, 32),
    (17, 576, 70, 0, 128),
    (17, 200, 97, 24, 32),
    (1, 200, 130, 0, 32),
    (64, 136, 65, 37, 64),
]
DTYPES = [torch.float16, torch.bfloat16]


def _quantized(m, n, bits, group_size, dtype, device, g):
    """Random codes over the full range, positive scales and integer zero points, packed; unit-variance W_hat x."""
    groups = quant_format.num_groups(n, group_size)
    codes = torch.randint(0, 2**bits, (m, n), generator=g, dtype=torch.uint8)
    scales = (0.5 + torch.rand(m, groups, generator=g)) * (2.0 / 2**bits) * (3.0 / n) ** 0.5
    zeros = torch.randint(0, 2**bits, (m, groups), generator=g).float()
    return pack(codes.to(device), scales.to(device), zeros.to(device), bits, group_size, dtype)


def _inputs(shape, bits, dtype, device, bias=True, seed=0):
    """Op arguments (x, qweight, scales, zeros, v, u, bias, bits, group_size), fresh per (shape, bits, seed).
    The residual is as large as the base (unit variance each), so a missing or wrong expand cannot pass."""
    m_rows, n, m, r, group_size = shape
    g = torch.Generator().manual_seed(seed)
    packed = _quantized(m, n, bits, group_size, dtype if dtype != torch.float64 else torch.float32, device, g)
    x = torch.randn(m_rows, n, generator=g)
    v = torch.randn(r, n, generator=g) / n**0.5 if r else None
    u = torch.randn(m, r, generator=g) / r**0.5 if r else None
    b = torch.randn(m, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(x), packed.qweight, packed.scales, packed.zeros, cast(v), cast(u), cast(b), bits, group_size)


def _float64(args):
    x, q, s, z, v, u, b, bits, group_size = args
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return (d(x), q, d(s), d(z), d(v), d(u), d(b), bits, group_size)


def _check(y, args):
    ref64 = quant_lowrank_matmul_ref(*_float64(args))
    assert y.shape == ref64.shape and y.dtype == args[0].dtype
    assert_close_to_reference(y, quant_lowrank_matmul_ref(*args), ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_float64(shape, bits, dtype):
    args = _inputs(shape, bits, dtype, KERNEL_DEVICE, bias=shape[0] % 2 == 1, seed=hash((shape, bits)) % 1000)
    with use_backend("triton"):
        _check(op(*args), args)


@pytest.mark.parametrize(("bits", "dtype"), [(3, torch.bfloat16), (4, torch.float32), (8, torch.float32)], ids=str)
def test_triton_3bit_and_fp32(bits, dtype):
    for shape in ((1, 200, 40, 24, 32), (5, 200, 40, 24, 32)):
        args = _inputs(shape, bits, dtype, KERNEL_DEVICE, seed=bits)
        with use_backend("triton"):
            _check(op(*args), args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_triton_large_m_dequantise_then_gemm(bits, dtype):
    """M > FUSED_MAX_M: one Triton dequantisation pass, then GEMMs; the pass matches the torch dequantisation."""
    from lowrank_ops.kernels.quant_lowrank_matmul import FUSED_MAX_M, dequantize_triton

    args = _inputs((FUSED_MAX_M + 6, 200, 48, 24, 32), bits, dtype, KERNEL_DEVICE, seed=7)
    x, q, s, z, _, _, _, _, g = args
    w = dequantize_triton(q, s, z, bits, g, x.shape[1], dtype)
    torch.testing.assert_close(w, quant_format.dequantize(q, s, z, bits, g, x.shape[1], dtype), rtol=0, atol=0)
    with use_backend("triton"):
        _check(op(*args), args)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("residual", [True, False])
def test_torch_backend_matches_float64(dtype, residual):
    args = _inputs((17, 200, 97, 24 if residual else 0, 32), 4, dtype, "cpu")
    with use_backend("torch"):
        y = op(*args)
    if dtype == torch.float64:
        torch.testing.assert_close(y, quant_lowrank_matmul_ref(*args), rtol=1e-12, atol=1e-12)
    else:
        _check(y, args)


def test_residual_and_bias_are_added():
    """Guards the tests above: dropping the residual or the bias is far outside the accuracy rule."""
    args = _inputs((3, 200, 33, 24, 32), 4, torch.float32, "cpu")
    full = quant_lowrank_matmul_ref(*_float64(args))
    no_res = quant_lowrank_matmul_ref(*_float64(args[:4] + (None, None) + args[6:]))
    no_bias = quant_lowrank_matmul_ref(*_float64(args[:6] + (None,) + args[7:]))
    assert relative_error(no_res, full) > 0.3 and relative_error(no_bias, full) > 0.3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rank_zero_tensors_mean_no_residual(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x, q, s, z, _, _, b, bits, g = _inputs((3, 200, 33, 0, 32), 4, torch.float32, device)
    with use_backend(backend):
        y0 = op(x, q, s, z, x.new_empty(0, 200), x.new_empty(33, 0), b, bits, g)
        y1 = op(x, q, s, z, None, None, b, bits, g)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_leading_dims_and_non_contiguous_x(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    _, q, s, z, v, u, b, bits, g = _inputs((1, 130, 70, 24, 32), 4, torch.float32, device)
    base = torch.randn(2, 130, 7, device=device)
    x = base.transpose(1, 2)[:, ::2]  # (2, 4, 130), last-dim stride 7: neither contiguous nor viewable as 2-D
    assert not x.is_contiguous()
    args = (x, q, s, z, v, u, b, bits, g)
    with use_backend(backend):
        y = op(*args)
    assert y.shape == (2, 4, 70)
    _check(y, args)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    _, q, s, z, v, u, b, bits, g = _inputs((1, 64, 32, 16, 32), 8, torch.float32, device)
    with use_backend(backend):
        y = op(torch.empty(0, 64, device=device), q, s, z, v, u, b, bits, g)
    assert y.shape == (0, 32)


def test_packed_entry_point_checks_layout_version():
    x, *_ = _inputs((2, 64, 32, 0, 32), 4, torch.float32, "cpu")
    g = torch.Generator().manual_seed(3)
    packed = _quantized(32, 64, 4, 32, torch.float32, "cpu", g)
    y = quant_lowrank_matmul_packed(x, packed)
    torch.testing.assert_close(y, x @ dequantize_packed(packed).T)
    old = PackedQuantWeight(**{**packed.__dict__, "layout_version": LAYOUT_VERSION + 1})
    with pytest.raises(ValueError, match=f"layout_version={LAYOUT_VERSION + 1} is not this package's LAYOUT_VERSION"):
        quant_lowrank_matmul_packed(x, old)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=63 must equal the packed weight's n=64"):
        quant_lowrank_matmul_packed(x[:, :63], packed)


def test_opcheck():
    for args in (
        _inputs((3, 200, 48, 16, 32), 4, torch.float32, "cpu"),
        _inputs((2, 64, 40, 0, 32), 8, torch.float32, "cpu", bias=False),
    ):
        torch.library.opcheck(op, args)


def test_gradients_match_autograd_of_reference():
    x, q, s, z, v, u, b, bits, g = _inputs((3, 20, 12, 3, 8), 4, torch.float64, "cpu")
    x, v, u, b = (t.requires_grad_() for t in (x, v, u, b))
    # fast_mode: random projections of the Jacobian instead of every column (tiny CPU GEMMs stall under load)
    torch.autograd.gradcheck(lambda x, v, u, b: op(x, q, s, z, v, u, b, bits, g), (x, v, u, b), fast_mode=True)


def test_torch_compile_fullgraph():
    x, q, s, z, v, u, b, bits, g = _inputs((4, 64, 48, 16, 32), 4, torch.float32, "cpu")
    compiled = torch.compile(lambda x: op(x, q, s, z, v, u, b, bits, g) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), 2 * op(x, q, s, z, v, u, b, bits, g))


def test_auto_backend_is_triton_at_every_m_on_gpu(monkeypatch):
    """The one rule this op adds to select_backend: its Triton backend has a large-M path of its own."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    for m_rows in (1, 64, 65, 2048):
        assert select_backend("quant_lowrank_matmul", cuda, m_rows, "auto") is Backend.TRITON
    assert select_backend("lowrank_matmul", cuda, 2048, "auto") is Backend.TORCH
    assert select_backend("quant_lowrank_matmul", torch.device("cpu"), backends.CPU_MAX_M + 1, "auto") is Backend.TORCH
    assert "quant_lowrank_matmul" in backends.TRITON_ALL_M_OPS


# Bad input: each raises the right type and names the op, the value and the rule.
def _bad_cases():
    x, q, s, z, v, u, b, bits, g = _inputs((2, 20, 12, 4, 8), 4, torch.float32, "cpu")
    q8 = torch.zeros(12, 20, dtype=torch.uint8)
    s8, z8 = torch.ones(12, 3), torch.zeros(12, 3)
    return [
        ((x.numpy(), q, s, z, v, u, b, bits, g), TypeError, "x must be a torch.Tensor"),
        ((x, q, s, z, v, u, b, True, g), TypeError, "bits must be an int"),
        ((x, q, s, z, v, u, b, 5, g), ValueError, "bits=5 must be one of (2, 3, 4, 8)"),
        ((x, q, s, z, v, u, b, bits, 0), ValueError, "group_size=0 must be >= 1"),
        ((x, q, s, z, v, u, b, bits, 12), ValueError, "group_size=12 must be a multiple of 8 for bits=4"),
        ((x[0, 0], q, s, z, v, u, b, bits, g), ValueError, "x must have at least 1 dimension"),
        ((x.int(), q, s, z, None, None, None, bits, g), TypeError, "x.dtype=torch.int32 must be one of"),
        ((x, q8, s8, z8, v, u, b, 4, g), TypeError, "qweight.dtype=torch.uint8 must be torch.int32 for bits=4"),
        ((x, q[:, :2], s, z, v, u, b, bits, g), ValueError, "qweight.shape[1]=2 must be 3 for n=x.shape[-1]=20"),
        ((x, q8[:, :16], s8, z8, v, u, b, 8, g), ValueError, "qweight.shape[1]=16 must be 20"),
        ((x, q, s[:, :2], z, v, u, b, bits, g), ValueError, "scales.shape=(12, 2) must be (m, ceil(n / group_size))"),
        ((x, q, s, z[:5], v, u, b, bits, g), ValueError, "zeros.shape=(5, 3) must be"),
        ((x, q, s.half(), z.half(), v, u, b, bits, g), TypeError, "scales.dtype=torch.float16 must equal x.dtype"),
        ((x, q, s, z.double(), v, u, b, bits, g), TypeError, "zeros.dtype=torch.float64 must equal scales.dtype"),
        ((x, q, s, z, v, None, b, bits, g), ValueError, "v and u must both be given or both be None"),
        ((x, q, s, z, v[0], u, b, bits, g), ValueError, "v must be 2-D (r, n)"),
        ((x, q, s, z, v[:, :19], u, b, bits, g), ValueError, "v.shape[1]=19 must equal n=x.shape[-1]=20"),
        ((x, q, s, z, v, u[:, :3], b, bits, g), ValueError, "u.shape=(12, 3) must be (m, r) = (12, 4)"),
        ((x, q, s, z, torch.randn(13, 20), torch.randn(12, 13), b, bits, g), ValueError,
         "rank=13 must be <= min(m, n) = 12"),
        ((x, q, s, z, v, u, b[:5], bits, g), ValueError, "bias.shape=(5,) must be (12,)"),
        ((x, q, s, z, v.double(), u, b, bits, g), TypeError, "v.dtype=torch.float64 must equal x.dtype=torch.float32"),
        ((x, q, s, z, v, u, b.to("meta"), bits, g), ValueError, "bias is on meta but x is on cpu"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_with_op_value_and_rule(case):
    args, exc, message = _bad_cases()[case]
    for entry_point in (quant_lowrank_matmul, op):
        if entry_point is op and exc is TypeError and ("torch.Tensor" in message or "must be an int" in message):
            continue  # the dispatcher itself rejects these argument types before the op runs
        with pytest.raises(exc, match="quant_lowrank_matmul: .*") as info:
            entry_point(*args)
        assert message in str(info.value)


# ------------------------------------------------------------------------------------------- packed format


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 200, 576])
def test_pack_unpack_round_trip_and_dequantize(bits, n):
    g = torch.Generator().manual_seed(n * 10 + bits)
    group_size = 32
    packed = _quantized(9, n, bits, group_size, torch.bfloat16, "cpu", g)
    codes = unpack_codes(packed)
    assert codes.dtype == torch.uint8 and codes.shape == (9, n) and int(codes.max()) <= 2**bits - 1
    again = pack(codes, packed.scales, packed.zeros, bits, group_size, torch.bfloat16)
    assert torch.equal(again.qweight, packed.qweight)
    assert packed.qweight.dtype == quant_format.qweight_dtype(bits)
    assert packed.qweight.shape == (9, quant_format.packed_width(n, bits))
    assert packed.scales.dtype == packed.zeros.dtype == torch.bfloat16
    assert packed.layout_version == LAYOUT_VERSION and packed.shape == (9, n)
    s = packed.scales.double().repeat_interleave(group_size, dim=1)[:, :n]
    z = packed.zeros.double().repeat_interleave(group_size, dim=1)[:, :n]
    expected = (codes.double() - z) * s
    torch.testing.assert_close(dequantize_packed(packed, torch.float64), expected, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_packed(packed), expected.to(torch.bfloat16), rtol=0, atol=0)


def test_int4_layout_bit_positions():
    """Column k sits at bits 4 (k % 8) of word k // 8; viewed as bytes, byte b holds columns 2b (low), 2b+1."""
    n = 20
    codes = torch.zeros(n, n, dtype=torch.uint8)
    codes[torch.arange(n), torch.arange(n)] = (torch.arange(n) % 15 + 1).to(torch.uint8)
    ones = torch.ones(n, 3)
    packed = pack(codes, ones, ones, 4, 8, torch.float32)
    words = packed.qweight.to(torch.int64) % 2**32  # unsigned view of the int32 words
    for k in range(n):
        expected = torch.zeros(3, dtype=torch.int64)
        expected[k // 8] = int(codes[k, k]) << (4 * (k % 8))
        assert torch.equal(words[k], expected), k
    as_bytes = packed.qweight.view(torch.uint8)  # little-endian
    assert torch.equal((as_bytes & 0xF)[:, : n // 2], codes[:, 0::2]) and torch.equal(
        as_bytes[:, : n // 2] >> 4, codes[:, 1::2]
    )
    assert (words[:, 2] >> 16 == 0).all()  # columns 20..23 are zero padding


def test_pack_rejects_bad_codes_and_shapes():
    ones = torch.ones(4, 1)
    with pytest.raises(ValueError, match=r"codes span \[0, 16\], outside \[0, 15\] for bits=4"):
        pack(torch.full((4, 16), 16, dtype=torch.uint8).index_fill_(1, torch.tensor([0]), 0), ones, ones, 4, 16,
             torch.float16)  # fmt: skip
    with pytest.raises(ValueError, match=r"scales.shape=\(4, 2\) must be \(4, 1\)"):
        pack(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), ones, 4, 16, torch.float16)
    with pytest.raises(TypeError, match="codes.dtype=torch.float32 must be an integer dtype"):
        pack(torch.zeros(4, 16), ones, ones, 4, 16, torch.float16)
    with pytest.raises(TypeError, match="dtype=torch.int8 must be one of"):
        pack(torch.zeros(4, 16, dtype=torch.uint8), ones, ones, 4, 16, torch.int8)
    with pytest.raises(ValueError, match="group_size=4 must be a multiple of 8 for bits=3"):
        pack(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 4), torch.ones(4, 4), 3, 4, torch.float16)


# -------------------------------------------------------------------------------------------------- GPU only


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m_rows", [1, 4, 16, 64, 128, 2048])
def test_gpu_llama_shapes(m_rows, bits, dtype):
    for m, n in ((11008, 4096), (4096, 11008)):
        args = _inputs((m_rows, n, m, 128, 128), bits, dtype, "cuda", bias=False, seed=m_rows)
        with use_backend("triton"):
            _check(op(*args), args)
        _check(op(*args), args)  # AUTO


@requires_gpu
def test_gpu_cuda_graph_capture_and_pdl_chain():
    """Two layers back to back (the second reads the first's output: the PDL ordering), captured in a graph."""
    a1 = _inputs((1, 4096, 4096, 128, 128), 4, torch.bfloat16, "cuda", seed=1)
    a2 = _inputs((1, 4096, 4096, 0, 128), 4, torch.bfloat16, "cuda", seed=2)
    a3 = _inputs((1, 4096, 4096, 64, 128), 4, torch.bfloat16, "cuda", seed=3)
    x = a1[0]

    def chain(x):
        y1 = op(x, *a1[1:])
        y2 = op(y1, *a2[1:])
        return y1, y2, op(y2, *a3[1:])

    chain(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _check(outs[0], (x, *a1[1:]))
        _check(outs[1], (outs[0], *a2[1:]))
        _check(outs[2], (outs[1], *a3[1:]))
