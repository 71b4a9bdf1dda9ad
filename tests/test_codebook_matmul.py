"""torch.ops.lowrank_ops.codebook_matmul (SWSC shared channels): every backend against float64 in both shared
modes, awkward shapes, bad input, torch.library, dispatch, and benchmarks/bench_codebook.py on a tiny CPU grid."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import KERNEL_DEVICE, assert_close_to_reference, relative_error, requires_gpu

import lowrank_ops  # noqa: F401  (registers the op)
from lowrank_ops import benchmarking as bm
from lowrank_ops.backends import Backend, select_backend, use_backend
from lowrank_ops.ops import codebook_matmul
from lowrank_ops.ops.reference import codebook_matmul_ref

op = torch.ops.lowrank_ops.codebook_matmul
REPO = Path(__file__).resolve().parents[1]

# (M, n, m, K, r): M = 1 (GEMV path, split-K over n into 3 slices), 3 (FMA, BLOCK_M 4, rank 1, odd n), 5 (tl.dot
# 16-tiles, split-K 2), 17 (tl.dot 64-tiles, several output blocks, no residual); K = 5, 6, 33, 40 (no tile
# multiple), odd m. The interpreter runs programs one by one: the shapes are small and the tiles large.
SHAPES = [
    (1, 600, 70, 5, 8),
    (3, 257, 130, 40, 1),
    (5, 2000, 37, 6, 16),
    (17, 96, 211, 33, 0),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
MODES = ["rows", "columns"]


def _inputs(shape, shared, dtype, device, bias=True, seed=0):
    """(x, codebook, index, v, u, bias) scaled so that the shared part, the residual and the bias each have
    about unit variance: dropping or misplacing any of them is far outside the accuracy rule."""
    m_rows, n, m, k, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m_rows, n, generator=g)
    if shared == "rows":
        codebook = torch.randn(k, n, generator=g) / n**0.5
        index = torch.randint(0, k, (m,), generator=g, dtype=torch.int32)
    else:
        codebook = torch.randn(m, k, generator=g) / n**0.5  # segment sums of n / K entries: unit-variance y
        index = torch.randint(0, k, (n,), generator=g, dtype=torch.int32)
    v = torch.randn(r, n, generator=g) / n**0.5 if r else None
    u = torch.randn(m, r, generator=g) / r**0.5 if r else None
    b = torch.randn(m, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(codebook), index.to(device), cast(v), cast(u), cast(b)


def _float64(args):
    return tuple(t.double() if t is not None and t.is_floating_point() else t for t in args)


def _check(y, args, shared):
    ref64 = codebook_matmul_ref(*_float64(args), shared=shared)
    assert y.shape == ref64.shape and y.dtype == args[0].dtype
    assert_close_to_reference(y, codebook_matmul_ref(*args, shared=shared), ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_float64(shape, shared, dtype):
    args = _inputs(shape, shared, dtype, KERNEL_DEVICE, bias=shape[0] % 2 == 1, seed=sum(shape))
    with use_backend("triton"):
        _check(op(*args, shared), args, shared)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("shared", MODES)
def test_torch_backend_matches_float64(shared, dtype):
    for shape in ((17, 300, 97, 24, 16), (1, 4095, 33, 7, 0)):
        args = _inputs(shape, shared, dtype, "cpu", seed=shape[1])
        with use_backend("torch"):
            y = op(*args, shared)
        if dtype == torch.float64:
            torch.testing.assert_close(y, codebook_matmul_ref(*args, shared=shared), rtol=1e-12, atol=1e-12)
        else:
            _check(y, args, shared)


@pytest.mark.parametrize("shared", MODES)
def test_index_residual_and_bias_all_matter(shared):
    """Guards the tests above: a wrong index, a dropped residual or a dropped bias is far outside the rule."""
    x, c, idx, v, u, b = _float64(_inputs((3, 64, 40, 6, 8), shared, torch.float32, "cpu"))
    full = codebook_matmul_ref(x, c, idx, v, u, b, shared)
    shifted = (idx + 1) % 6
    assert relative_error(codebook_matmul_ref(x, c, shifted, v, u, b, shared), full) > 0.3
    assert relative_error(codebook_matmul_ref(x, c, idx, None, None, b, shared), full) > 0.3
    assert relative_error(codebook_matmul_ref(x, c, idx, v, u, None, shared), full) > 0.3


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_leading_dims_and_non_contiguous_x(backend, shared):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    _, c, idx, v, u, b = _inputs((1, 130, 70, 9, 24), shared, torch.float32, device)
    base = torch.randn(2, 130, 7, device=device)
    x = base.transpose(1, 2)[:, ::2]  # (2, 4, 130), last-dim stride 7: neither contiguous nor viewable as 2-D
    assert not x.is_contiguous()
    args = (x, c, idx, v, u, b)
    with use_backend(backend):
        y = op(*args, shared)
    assert y.shape == (2, 4, 70)
    _check(y, args, shared)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    for shared in MODES:
        _, c, idx, v, u, b = _inputs((1, 64, 32, 5, 16), shared, torch.float32, device)
        with use_backend(backend):
            y = op(torch.empty(0, 64, device=device), c, idx, v, u, b, shared)
        assert y.shape == (0, 32)


def test_triton_masks_out_of_range_index_entries():
    """Documented: index values are the module's to validate; the Triton path never reads outside t, an entry
    outside [0, K) contributes nothing."""
    x, c, idx, _, _, _ = _inputs((1, 64, 8, 5, 0), "rows", torch.float32, KERNEL_DEVICE)
    bad = idx.clone()
    bad[2], bad[5] = 5, -1
    with use_backend("triton"):
        y = op(x, c, bad, None, None, None, "rows")
    expected = codebook_matmul_ref(x, c, idx.clamp(0, 4), shared="rows")
    expected[:, [2, 5]] = 0
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_opcheck():
    for shared, residual in (("rows", True), ("columns", True), ("rows", False), ("columns", False)):
        x, c, idx, v, u, b = _inputs((3, 48, 40, 6, 16 if residual else 0), shared, torch.float32, "cpu")
        torch.library.opcheck(op, (x, c, idx, v, u, b if residual else None, shared))


@pytest.mark.parametrize("shared", MODES)
def test_gradients_match_finite_differences(shared):
    x, c, idx, v, u, b = _inputs((3, 20, 12, 4, 3), shared, torch.float64, "cpu")
    x, c, v, u, b = (t.requires_grad_() for t in (x, c, v, u, b))
    # fast_mode: random projections of the Jacobian instead of every column (tiny CPU GEMMs stall under load)
    torch.autograd.gradcheck(lambda x, c, v, u, b: op(x, c, idx, v, u, b, shared), (x, c, v, u, b), fast_mode=True)


@pytest.mark.parametrize("shared", MODES)
def test_gradient_of_x_alone_without_residual(shared):
    x, c, idx, _, _, _ = _inputs((2, 16, 10, 3, 0), shared, torch.float64, "cpu")
    x.requires_grad_()
    torch.autograd.gradcheck(lambda x: op(x, c, idx, None, None, None, shared), (x,), fast_mode=True)


def test_torch_compile_fullgraph():
    rows = _inputs((4, 64, 48, 6, 16), "rows", torch.float32, "cpu")
    cols = _inputs((4, 64, 48, 6, 0), "columns", torch.float32, "cpu", bias=False)
    x = rows[0]

    def f(x):
        return op(x, *rows[1:], "rows") + codebook_matmul(x, *cols[1:], shared="columns") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


def test_auto_backend_follows_the_m_rule(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    for m_rows, expected in ((1, Backend.TRITON), (64, Backend.TRITON), (65, Backend.TORCH), (2048, Backend.TORCH)):
        assert select_backend("codebook_matmul", cuda, m_rows, "auto") is expected
    assert select_backend("codebook_matmul", torch.device("cpu"), 1, "auto") is Backend.TORCH


# Bad input: each raises the right type and names the op, the value and the rule.
def _bad_cases():
    x, c, idx, v, u, b = _inputs((2, 16, 12, 5, 4), "rows", torch.float32, "cpu")
    _, cc, cidx, _, _, _ = _inputs((2, 16, 12, 5, 4), "columns", torch.float32, "cpu")
    return [
        ((x.numpy(), c, idx, v, u, b, "rows"), TypeError, "x must be a torch.Tensor"),
        ((x, c, idx, v, u, b, "both"), ValueError, "shared='both' must be one of ('rows', 'columns')"),
        ((x, c, idx, v, u, b, 1), TypeError, "shared must be a str"),
        ((x[0, 0], c, idx, v, u, b, "rows"), ValueError, "x must have at least 1 dimension"),
        ((x.int(), c, idx, None, None, None, "rows"), TypeError, "x.dtype=torch.int32 must be one of"),
        ((x, c[0], idx, v, u, b, "rows"), ValueError, "codebook must be 2-D (K, n) for shared='rows'"),
        ((x, c[:, :15], idx, v, u, b, "rows"), ValueError, "codebook.shape[1]=15 must equal n=x.shape[-1]=16"),
        ((x, c[:0], idx, v, u, b, "rows"), ValueError, "the codebook must have K >= 1 entries"),
        ((x, cc[:, :0], cidx, v, u, b, "columns"), ValueError, "the codebook must have K >= 1 entries"),
        ((x, c, idx.long(), v, u, b, "rows"), TypeError, "index.dtype=torch.int64 must be torch.int32"),
        ((x, c, idx[None], v, u, b, "rows"), ValueError, "index must be 1-D, got index.shape=(1, 12)"),
        ((x, c, idx[:0], None, None, None, "rows"), ValueError, "must have m >= 1 entries"),
        ((x, c, idx[:11], v, u, b, "rows"), ValueError, "u.shape=(12, 4) must be (m, r) = (11, 4)"),
        ((x, cc, cidx[:15], v, u, b, "columns"), ValueError, "index.shape[0]=15 must equal n=x.shape[-1]=16"),
        ((x, cc[:, :5].T.contiguous(), cidx, v, u, b, "columns"), ValueError, "u.shape=(12, 4) must be (m, r) = (5,"),
        ((x, c, idx, v, None, b, "rows"), ValueError, "v and u must both be given or both be None"),
        ((x, c, idx, v[0], u, b, "rows"), ValueError, "v must be 2-D (r, n)"),
        ((x, c, idx, v, u[0], b, "rows"), ValueError, "u must be 2-D (m, r)"),
        ((x, c, idx, v[:0], u[:, :0], b, "rows"), ValueError, "rank=0 must be >= 1"),
        ((x, c, idx, v[:, :15], u, b, "rows"), ValueError, "v.shape[1]=15 must equal n=x.shape[-1]=16"),
        ((x, c, idx, torch.randn(13, 16), torch.randn(12, 13), b, "rows"), ValueError,
         "rank=13 must be <= min(m, n) = 12"),
        ((x, c, idx, v, u, b[:5], "rows"), ValueError, "bias.shape=(5,) must be (12,)"),
        ((x, c.double(), idx, v, u, b, "rows"), TypeError, "codebook.dtype=torch.float64 must equal x.dtype"),
        ((x.half(), c.half(), idx, v, u.half(), b.half(), "rows"), TypeError,
         "v.dtype=torch.float32 must equal x.dtype=torch.float16"),
        ((x, c, idx.to("meta"), v, u, b, "rows"), ValueError, "index is on meta but x is on cpu"),
        ((x, c, idx, v, u, b.to("meta"), "rows"), ValueError, "bias is on meta but x is on cpu"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_with_op_value_and_rule(case):
    args, exc, message = _bad_cases()[case]
    for entry_point in (lambda *a: codebook_matmul(*a[:6], shared=a[6]), op):
        if entry_point is op and exc is TypeError and ("torch.Tensor" in message or "must be a str" in message):
            continue  # the dispatcher itself rejects these argument types before the op runs
        with pytest.raises(exc, match="codebook_matmul: .*") as info:
            entry_point(*args)
        assert message in str(info.value)


def test_bench_codebook_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_codebook", REPO / "benchmarks" / "bench_codebook.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--out", str(tmp_path), "--quick", "--shapes", "48x64", "--ks", "8", "--ranks", "0,16", "--ms", "1,3"]
    argv += ["--target-ms", "1", "--max-sets", "2", "--threads", "1"]
    if torch.cuda.is_available():
        argv += ["--providers", "dense,torch_materialise,lowrank_ops"]
    assert bench.main(argv) == 0
    path = tmp_path / f"codebook-{bm.environment_header()['device_slug']}.json"
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = bm.read_results(path)
    rows = data["rows"]
    assert data["header"]["bench"] == "codebook" and data["header"]["plot"]["x"] == "K"
    assert {r["shared"] for r in rows} == {"rows", "columns"}
    # per (mode, rank, M): one dense row and one row per codebook provider at the single K
    assert len(rows) == 2 * 2 * 2 * (1 + 2)
    for r in rows:
        assert r["error"] is None and r["median_us"] > 0 and r["rel_err"] < 2e-2, r
        if r["provider"] != "dense":
            cost = bench.codebook_matmul_cost(r["shared"], r["M"], r["m"], r["n"], r["K"], r["rank"], 2)
            assert (r["bytes"], r["flops"]) == (cost.bytes, cost.flops)


# -------------------------------------------------------------------------------------------------- GPU only


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("m_rows", [1, 4, 16, 64, 128])
def test_gpu_llama_shapes(m_rows, shared, dtype):
    for m, n in ((11008, 4096), (4096, 11008)):
        for k, r in ((256, 0), (1024, 128)):
            args = _inputs((m_rows, n, m, k, r), shared, dtype, "cuda", bias=False, seed=m_rows)
            with use_backend("triton"):
                _check(op(*args, shared), args, shared)
            _check(op(*args, shared), args, shared)  # AUTO


@requires_gpu
def test_gpu_cuda_graph_capture_and_pdl_chain():
    """Three layers back to back (each reads the previous one's output: the PDL ordering), in a graph."""
    layers = [
        (_inputs((1, 4096, 4096, 1024, 128), "rows", torch.bfloat16, "cuda", seed=1)[1:], "rows"),
        (_inputs((1, 4096, 4096, 256, 0), "columns", torch.bfloat16, "cuda", seed=2)[1:], "columns"),
        (_inputs((1, 4096, 4096, 256, 64), "rows", torch.bfloat16, "cuda", seed=3)[1:], "rows"),
    ]
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)

    def chain(h):
        outs = []
        for weights, shared in layers:
            h = op(h, *weights, shared)
            outs.append(h)
        return outs

    chain(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        inputs = [x, *outs[:-1]]
        for (weights, shared), h, y in zip(layers, inputs, outs):
            _check(y, (h, *weights), shared)


@pytest.mark.parametrize("shared", MODES)
def test_eager_calls_without_autograd_skip_the_dispatch_and_agree_with_it(monkeypatch, shared):
    """As for lowrank_matmul: eager calls with nothing to differentiate run the implementation directly, with the
    same bits as the custom op; a call recording a gradient (of the codebook here) goes through the op."""
    import importlib

    module = importlib.import_module("lowrank_ops.ops.codebook_matmul")
    x, codebook, index, v, u, b = _inputs((3, 64, 40, 8, 4), shared, torch.float32, "cpu", seed=8)
    through_op = torch.ops.lowrank_ops.codebook_matmul(x, codebook, index, v, u, b, shared)
    calls = []
    real = module._codebook_matmul_op
    monkeypatch.setattr(module, "_codebook_matmul_op", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(module.codebook_matmul(x, codebook, index, v, u, b, shared=shared), through_op)
    assert not calls, "no gradient to record: the dispatch is skipped"
    codebook.requires_grad_(True)
    y = module.codebook_matmul(x, codebook, index, v, u, b, shared=shared)
    assert calls and torch.equal(y.detach(), through_op)
    y.sum().backward()
    assert codebook.grad is not None and codebook.grad.shape == codebook.shape
