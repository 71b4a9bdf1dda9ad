"""LowRankLinear: exact identities of the truncated SVD, the nn.Linear contract, bad input."""

import pytest
import torch
from helpers import KERNEL_DEVICE, assert_close_to_reference, requires_gpu
from torch import nn

from lowrank_ops import LowRankLinear, use_backend
from lowrank_ops.rank import param_ratio


def _linear(m, n, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
    return layer


@pytest.mark.parametrize(("m", "n"), [(70, 130), (192, 576), (33, 33)])
def test_full_rank_reproduces_the_layer(m, n):
    layer = _linear(m, n)
    low = LowRankLinear.from_linear(layer, rank=min(m, n))
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(low(x), layer(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(low.to_linear().weight, layer.weight, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 24, 50])
def test_truncation_error_is_the_discarded_singular_energy(rank):
    """Eckart-Young: ||W - U V||_F^2 = sum_{i > r} sigma_i^2, and the factors share sqrt(Sigma) equally."""
    layer = _linear(90, 60, bias=False)
    low = LowRankLinear.from_linear(layer, rank=rank)
    sigma = torch.linalg.svdvals(layer.weight.detach())
    error = (layer.weight - low.to_linear().weight).norm() ** 2
    torch.testing.assert_close(error, (sigma[rank:] ** 2).sum(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(low.u.norm(dim=0), low.v.norm(dim=1), rtol=1e-9, atol=0)


def test_param_ratio_rounds_rank_down_to_alignment_and_explicit_rank_is_exact():
    layer = _linear(1536, 576, dtype=torch.float32)
    low = LowRankLinear.from_linear(layer, param_ratio=0.5)
    assert low.rank % 16 == 0 and low.param_ratio <= 0.5 and param_ratio(1536, 576, low.rank + 16) > 0.5
    assert LowRankLinear.from_linear(layer, rank=37).rank == 37
    assert LowRankLinear.from_linear(layer, param_ratio=0.5, align=1).rank == int(0.5 * 1536 * 576 / 2112)


def test_drop_in_contract():
    layer = _linear(48, 64, dtype=torch.float32)
    low = LowRankLinear.from_linear(layer, rank=16)
    assert (low.in_features, low.out_features) == (64, 48)
    assert list(low.state_dict()) == ["v", "u", "bias"]
    assert low.v.shape == (16, 64) and low.u.shape == (48, 16)
    text = repr(low)
    assert "rank=16" in text and f"param_ratio={16 * 112 / (48 * 64):.3f}" in text
    fresh = LowRankLinear(64, 48, 16)
    fresh.load_state_dict(low.state_dict())
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(fresh(x), low(x))
    assert LowRankLinear(64, 48, 16, bias=False).bias is None


def test_fresh_init_matches_linear_output_scale():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    dense_std = nn.Linear(256, 256, bias=False)(x).std()
    low_std = LowRankLinear(256, 256, 64, bias=False)(x).std()
    assert 0.8 < (low_std / dense_std).item() < 1.25, "fresh factors should have nn.Linear's output scale"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_forward_matches_float64(dtype):
    layer = _linear(211, 300, dtype=torch.float32)
    low = LowRankLinear.from_linear(layer, rank=24).to(device=KERNEL_DEVICE, dtype=dtype)
    x = torch.randn(3, 300, device=KERNEL_DEVICE, dtype=dtype)
    with use_backend("triton"):
        y = low(x)
    ref64 = low.double()(x.double())
    with use_backend("torch"):
        torch_same_dtype = low.to(dtype)(x)
    assert_close_to_reference(y, torch_same_dtype, ref64)


def test_torch_compile_module():
    low = LowRankLinear.from_linear(_linear(48, 64, dtype=torch.float32), rank=16)
    x = torch.randn(2, 64)
    compiled = torch.compile(low, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), low(x))


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"rank": 0}, ValueError, "rank=0 must satisfy 1 <= rank <= min(m, n) = 20"),
        ({"rank": 21}, ValueError, "rank=21 must satisfy"),
        ({"rank": 2.5}, TypeError, "rank=2.5 must be an int"),
        ({}, ValueError, "give exactly one of rank or param_ratio"),
        ({"rank": 4, "param_ratio": 0.5}, ValueError, "give exactly one of rank or param_ratio"),
        ({"param_ratio": -0.1}, ValueError, "ratio=-0.1 must be > 0"),
    ],
)
def test_from_linear_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc) as info:
        LowRankLinear.from_linear(_linear(20, 30), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_from_linear_rejects_non_finite_weights(bad):
    layer = _linear(20, 30)
    with torch.no_grad():
        layer.weight[3, 7] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf, first at index \(3, 7\)"):
        LowRankLinear.from_linear(layer, rank=4)


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match="expected an nn.Linear, got Conv1d"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), rank=1)


def test_constructor_bad_features():
    with pytest.raises(ValueError, match="in_features=0 must be an int >= 1"):
        LowRankLinear(0, 4, 1)


@requires_gpu
def test_cuda_graph_capture_of_module():
    low = LowRankLinear.from_linear(_linear(4096, 4096, dtype=torch.float32), rank=256).cuda().bfloat16()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    expected = low(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = low(x)
    graph.replay()
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("ratio", [1.5, 0.0, -0.2, True, "0.5"])
def test_from_linear_rejects_a_param_ratio_outside_0_1(ratio):
    # issue 21: param_ratio=1.5 was accepted (and clamped to full rank); the configs reject ratios above 1
    linear = nn.Linear(40, 24)
    with pytest.raises(ValueError, match=r"param_ratio=.* must be > 0 and <= 1"):
        LowRankLinear.from_linear(linear, param_ratio=ratio)
    assert LowRankLinear.from_linear(linear, param_ratio=1.0, align=1).rank == 15  # 1.0 = break-even, floor of 15


def test_from_linear_uses_the_randomized_svd_for_a_small_rank_within_one_percent_of_the_optimum():
    # issue 17: the README's 4096 x 4096 example ran a full SVD for 40-70 s on a CPU whatever the rank
    from lowrank_ops.modules.lowrank_linear import uses_randomized_svd

    assert uses_randomized_svd(4096, 4096, 256) and uses_randomized_svd(4096, 4096, 512)
    assert not uses_randomized_svd(4096, 4096, 1024) and not uses_randomized_svd(90, 60, 1)
    layer = _linear(600, 400, bias=False, dtype=torch.float32)  # Gaussian: the flat spectrum, randomized's worst case
    sigma = torch.linalg.svdvals(layer.weight.detach().double())
    optimum = sigma[32:].square().sum().sqrt()
    errors = {}
    for svd in ("auto", "randomized", "exact"):
        low = LowRankLinear.from_linear(layer, rank=32, svd=svd)
        errors[svd] = ((layer.weight.double() - low.to_linear().weight.double()).norm() / optimum).item()
    assert errors["auto"] == errors["randomized"] and 1.0 < errors["randomized"] < 1.01
    assert errors["exact"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="svd='lanczos' must be 'auto', 'exact' or 'randomized'"):
        LowRankLinear.from_linear(layer, rank=32, svd="lanczos")
