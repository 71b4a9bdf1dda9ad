"""InputStatistics: streaming token count, mean |x| and Gram X^T X against a float64 one-shot reference.

Tolerances: float64 accumulation of fp16/bf16/fp32 inputs has exact products and ~1e-16 summation error, so it
must match the one-shot float64 reference to 1e-12 relative; float32 accumulation rounds each of T additions at
6e-8 (random-walk growth ~ sqrt(T) = 30 for these sizes), so 1e-5 relative.
"""

from __future__ import annotations

import io

import pytest
import torch
from helpers import relative_error, requires_gpu

from lowrank_ops.engine.stats import InputStatistics
from lowrank_ops.engine.svd import whitened_svd

F64 = torch.float64
N = 48


def batches(seed: int, dtype=torch.float32):
    """Batches of every rank the hooks see: (B, T, n), (T, n), a single token (n,), and an empty one."""
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (2 * torch.rand(N, generator=g) - 1)  # channel scales over two decades
    shapes = [(2, 37, N), (113, N), (N,), (0, N), (3, 5, 7, N), (64, N)]
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def reference(xs):
    X = torch.cat([x.reshape(-1, N).to(F64) for x in xs])
    return X.shape[0], X.abs().mean(0), X.mT @ X


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streaming_equals_one_shot_float64(dtype):
    xs = batches(1, dtype)
    stats = InputStatistics(N)
    for x in xs:
        stats.update(x)
    T, mean_abs, gram = reference(xs)
    assert stats.token_count == T == 2 * 37 + 113 + 1 + 105 + 64
    assert stats.n_updates == 5  # the empty batch does not count
    assert stats.gram.dtype == F64 and stats.gram.shape == (N, N)
    assert relative_error(stats.gram, gram) < 1e-12
    assert relative_error(stats.mean_abs, mean_abs) < 1e-12


def test_float32_gram_accumulation():
    xs = batches(2)
    stats = InputStatistics(N, gram_dtype=torch.float32)
    for x in xs:
        stats.update(x)
    assert stats.gram.dtype == torch.float32
    assert relative_error(stats.gram, reference(xs)[2]) < 1e-5


def test_chunking_and_offload_do_not_change_results():
    xs = batches(3)
    plain, chunked, offloaded = (
        InputStatistics(N),
        InputStatistics(N, chunk_tokens=7),
        InputStatistics(N, offload_to_cpu=True),
    )
    for x in xs:
        for s in (plain, chunked, offloaded):
            s.update(x)
    assert offloaded.device == torch.device("cpu")
    assert relative_error(chunked.gram, plain.gram) < 1e-14
    assert relative_error(offloaded.gram, plain.gram) < 1e-14
    torch.testing.assert_close(chunked.mean_abs, plain.mean_abs, rtol=1e-14, atol=0)


def test_merge_and_state_dict_round_trip():
    xs = batches(4)
    whole, first, second = InputStatistics(N, name="mlp.down_proj"), InputStatistics(N), InputStatistics(N)
    for i, x in enumerate(xs):
        whole.update(x)
        (first if i % 2 else second).update(x)
    merged = first.merge(second)
    assert merged is first and merged.token_count == whole.token_count
    assert relative_error(merged.gram, whole.gram) < 1e-14
    buffer = io.BytesIO()
    torch.save(whole.state_dict(), buffer)
    buffer.seek(0)
    restored = InputStatistics.from_state_dict(torch.load(buffer))
    assert restored.token_count == whole.token_count and restored.name == "mlp.down_proj"
    torch.testing.assert_close(restored.gram, whole.gram, rtol=0, atol=0)
    torch.testing.assert_close(restored.mean_abs, whole.mean_abs, rtol=0, atol=0)
    restored.update(xs[0])  # still a working accumulator
    assert restored.token_count == whole.token_count + xs[0].numel() // N
    empty = InputStatistics.from_state_dict(InputStatistics(N, gram=False).state_dict())
    assert not empty.track_gram and empty.token_count == 0


def test_gram_free_statistics():
    stats = InputStatistics(N, gram=False)
    xs = batches(5)
    for x in xs:
        stats.update(x)
    assert relative_error(stats.mean_abs, reference(xs)[1]) < 1e-12
    with pytest.raises(ValueError, match="created with gram=False"):
        _ = stats.gram


def test_inputs_requiring_grad_are_accepted_without_graph():
    x = torch.randn(10, N, requires_grad=True)
    stats = InputStatistics(N)
    stats.update(x * 2)
    assert not stats.gram.requires_grad


def test_feeds_whitened_svd():
    xs = batches(6)
    stats = InputStatistics(N)
    for x in xs:
        stats.update(x)
    W = torch.randn(32, N, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = whitened_svd(W, stats, 8)
    b = whitened_svd(W, reference(xs)[2], 8)
    assert relative_error(a.U @ a.V, b.U @ b.V) < 1e-9


def test_bad_input():
    stats = InputStatistics(N, name="layers.3.self_attn.q_proj")
    stats.update(torch.randn(4, N))
    with pytest.raises(
        ValueError,
        match=r"InputStatistics\('layers\.3\.self_attn\.q_proj'\): update 1: "
        r"x\.shape=\(4, 47\) must end in n_features=48",
    ):
        stats.update(torch.randn(4, 47))
    x = torch.randn(2, 6, N)
    x[1, 4, 9] = float("nan")
    with pytest.raises(ValueError, match=r"update 1: x contains NaN/Inf \(1 entries, first at index \(1, 4, 9\)"):
        stats.update(x)
    x[1, 4, 9] = float("-inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        stats.update(x)
    assert stats.token_count == 4, "a rejected batch must not be half-accumulated"
    with pytest.raises(TypeError, match="x.dtype=torch.int64 must be a floating dtype"):
        stats.update(torch.ones(3, N, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        stats.update([0.0] * N)
    with pytest.raises(ValueError, match="no tokens accumulated yet"):
        _ = InputStatistics(N).mean_abs
    with pytest.raises(ValueError, match="no tokens accumulated yet"):
        _ = InputStatistics(N).gram
    with pytest.raises(ValueError, match="n_features=0 must be an int >= 1"):
        InputStatistics(0)
    with pytest.raises(ValueError, match="gram_dtype=torch.float16"):
        InputStatistics(N, gram_dtype=torch.float16)
    with pytest.raises(ValueError, match="offload_to_cpu=True keeps accumulators on the CPU"):
        InputStatistics(N, offload_to_cpu=True, device="cuda")
    with pytest.raises(ValueError, match="cannot merge statistics of n_features=47"):
        stats.merge(InputStatistics(47))
    with pytest.raises(TypeError, match="merge expects an InputStatistics"):
        stats.merge(torch.zeros(N, N))


@requires_gpu
@pytest.mark.gpu
def test_cuda_accumulation_with_offload():
    xs = [x.cuda() for x in batches(7, torch.bfloat16)]
    on_gpu, offloaded = InputStatistics(N), InputStatistics(N, offload_to_cpu=True)
    for x in xs:
        on_gpu.update(x)
        offloaded.update(x)
    assert on_gpu.device.type == "cuda" and offloaded.gram.device.type == "cpu"
    ref = reference([x.cpu() for x in xs])[2]
    assert relative_error(on_gpu.gram.cpu(), ref) < 1e-12
    assert relative_error(offloaded.gram, ref) < 1e-12
