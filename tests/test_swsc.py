"""SWSC: shared channels (k-means codebook) plus a low-rank residual -- algorithm, module, compress_, save / load."""

import json

import pytest
import torch
from helpers import drop_weights_digest, relative_error
from tiny_models import tiny_gpt2, tiny_llama_gqa

from lowrank_ops.algorithms.eora import residual_svd
from lowrank_ops.algorithms.swsc import share_channels
from lowrank_ops.backends import use_backend
from lowrank_ops.compress import compress_
from lowrank_ops.configs import SwscConfig, config_from_json
from lowrank_ops.formats import bits_per_weight, clusters_for_bits, shared_weight, storage_bits
from lowrank_ops.modules import SharedChannelLinear
from lowrank_ops.serialization import load_compressed, save_compressed, to_dense
from lowrank_ops.surgery import find_targets, linear_weight


def _clustered_matrix(m, n, k, noise, seed=0):
    """m rows drawn around k random centres (so k-means has a clear answer) plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, n, generator=g)
    labels = torch.arange(m) % k
    return centres[labels] + noise * torch.randn(m, n, generator=g), labels


def test_storage_accounting_counts_codebook_index_and_factors():
    m, n = 96, 40
    assert storage_bits(m, n, 8, 4, "rows") == 16 * (8 * n + 4 * (m + n)) + 32 * m
    assert storage_bits(m, n, 8, 4, "columns") == 16 * (8 * m + 4 * (m + n)) + 32 * n
    assert bits_per_weight(m, n, 8, 0, "rows", value_bits=32) == (32 * 8 * n + 32 * m) / (m * n)
    for shared in ("rows", "columns"):
        k = clusters_for_bits(m, n, 6.0, 4, shared)
        assert bits_per_weight(m, n, k, 4, shared) <= 6.0 < bits_per_weight(m, n, k + 1, 4, shared)
    assert clusters_for_bits(m, n, 30.0, 0, "rows") == m  # capped at the number of channels
    with pytest.raises(ValueError, match="cannot hold one cluster plus a rank-30 residual"):
        clusters_for_bits(m, n, 2.0, 30, "rows")


@pytest.mark.parametrize("shared", ["rows", "columns"])
def test_share_channels_finds_planted_clusters_and_reconstructs_at_full_k(shared):
    W, labels = _clustered_matrix(60, 24, 5, noise=1e-3)
    W = W if shared == "rows" else W.T.contiguous()
    result = share_channels(W, 5, shared=shared, seed=1)
    assert result.index.dtype == torch.int32
    approx = shared_weight(result.codebook, result.index, shared)
    assert approx.shape == W.shape
    assert relative_error(approx, W) < 1e-2
    # same partition as the planted one (labels may be permuted)
    index = result.index.long()
    assert all(len(set(index[labels == j].tolist())) == 1 for j in range(5))
    full = share_channels(W, 60, shared=shared)
    assert torch.equal(shared_weight(full.codebook, full.index, shared), W)
    again = share_channels(W, 5, shared=shared, seed=1)
    assert torch.equal(again.codebook, result.codebook) and torch.equal(again.index, result.index)


@pytest.mark.parametrize("shared", ["rows", "columns"])
def test_importance_weights_trade_unweighted_error_for_weighted_error(shared):
    """sum_f importance_f ||W_:f - W_shared_:f||^2 (the diagonal output error) drops when the k-means is weighted:
    feature weights for shared rows, point weights for shared columns."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 32, generator=g)
    importance = torch.ones(32)
    importance[:4] = 100.0  # four input channels carry most of the activation energy

    def error(result, weights):
        diff = W - shared_weight(result.codebook, result.index, shared)
        return float((diff.square() * weights).sum())

    clusters = 8
    plain = share_channels(W, clusters, shared=shared, seed=0)
    weighted = share_channels(W, clusters, shared=shared, importance=importance, seed=0)
    assert error(weighted, importance) < 0.75 * error(plain, importance)  # measured 0.53 (rows), 0.07 (columns)
    assert error(plain, 1.0) < error(weighted, 1.0)
    assert weighted.inertia == pytest.approx(error(weighted, importance), rel=1e-5)


def test_share_channels_bad_input():
    W = torch.randn(10, 6)
    with pytest.raises(ValueError, match="clusters=11 is larger than the 10 rows"):
        share_channels(W, 11)
    with pytest.raises(ValueError, match="clusters=7 is larger than the 6 columns"):
        share_channels(W, 7, shared="columns")
    with pytest.raises(ValueError, match="clusters=0 must be an int >= 1"):
        share_channels(W, 0)
    with pytest.raises(ValueError, match="shared='diag' must be one of"):
        share_channels(W, 2, shared="diag")
    with pytest.raises(ValueError, match=r"point_weights.shape=\(10,\) must be \(6,\)"):  # one per input channel
        share_channels(W, 2, shared="columns", importance=torch.ones(10))
    bad = W.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        share_channels(bad, 2)


def _module(shared, dtype, rank=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n, k = 37, 29, 7
    codebook = torch.randn((k, n) if shared == "rows" else (m, k), generator=g)
    index = torch.randint(0, k, (m if shared == "rows" else n,), generator=g)
    u = torch.randn(m, rank, generator=g) if rank else None
    v = torch.randn(rank, n, generator=g) if rank else None
    b = torch.randn(m, generator=g) if bias else None
    parts = dict(u=None if u is None else u.to(dtype), v=None if v is None else v.to(dtype),
                 bias=None if b is None else b.to(dtype))  # fmt: skip
    module = SharedChannelLinear.from_parts(codebook.to(dtype), index, shared, **parts)
    return module


@pytest.mark.parametrize("shared", ["rows", "columns"])
@pytest.mark.parametrize("rank,bias", [(3, True), (0, False)])
def test_module_forward_matches_float64_dense_weight(shared, rank, bias):
    module = _module(shared, torch.float32, rank, bias)
    dense64 = module.to_linear().double()
    x = torch.randn(2, 5, module.in_features)
    with use_backend("torch"):
        y = module(x)
    expected = dense64(x.double())
    assert relative_error(y, expected) < 1e-5
    with torch.no_grad():
        W = module.shared_weight(torch.float64)
        if rank:
            W = W + module.u.double() @ module.v.double()
    assert relative_error(dense64.weight, W) < 1e-6  # to_linear sums in float32


def test_module_storage_repr_state_dict_and_index_checks():
    module = _module("rows", torch.float16)
    assert module.codebook.shape == (7, 29) and module.index.shape == (37,)
    assert set(module.state_dict()) == {"codebook", "index", "u", "v", "bias"}
    assert module.bits_per_weight == pytest.approx(bits_per_weight(37, 29, 7, 3, "rows"))
    assert module.storage_bytes * 8 == storage_bits(37, 29, 7, 3, "rows")
    assert "shared='rows', clusters=7, rank=3" in repr(module)
    state = module.state_dict()
    state["index"] = state["index"].clone()
    state["index"][5] = 7
    with pytest.raises(ValueError, match=r"index\[5\]=7 is outside \[0, 7\)"):
        module.load_state_dict(state)
    with pytest.raises(ValueError, match=r"index\[0\]=-1 is outside"):
        SharedChannelLinear.from_parts(torch.randn(3, 4), torch.tensor([-1, 0, 2, 1]))
    with pytest.raises(ValueError, match="clusters=5 is larger than the 4 rows"):
        SharedChannelLinear(8, 4, 5)
    with pytest.raises(ValueError, match="give both u"):
        SharedChannelLinear.from_parts(torch.randn(3, 4), torch.tensor([1, 0, 2]), u=torch.randn(3, 1))
    with pytest.raises(TypeError, match="index must be an integer"):
        SharedChannelLinear.from_parts(torch.randn(3, 4), torch.tensor([1.0, 0.0, 2.0]))


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=g)


def _config(**kwargs):
    defaults = dict(calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu", n_iter=20)
    return SwscConfig(**{**defaults, **kwargs})


def test_config_validation_and_json_round_trip():
    config = _config(clusters=4, bits=None, rank=2, residual="eora")
    assert config_from_json(config.to_json()) == config
    assert config.needs_calibration and not _config(weighted=False).needs_calibration
    for bad, message in [
        (dict(clusters=4), "give exactly one of clusters or bits"),
        (dict(bits=None), "give exactly one of clusters or bits"),
        (dict(bits=0), "bits=0 must be a number in (0, 16)"),
        (dict(bits=None, clusters=0), "clusters=0 must be an int >= 1"),
        (dict(rank=-1), "rank=-1 must be an int >= 0"),
        (dict(residual="pca"), "residual='pca' must be one of"),
        (dict(shared="diag"), "shared='diag' must be one of"),
    ]:
        with pytest.raises(ValueError) as info:
            _config(**bad)
        assert message in str(info.value)


def _output_error(model, reference, tokens):
    with torch.no_grad():
        return relative_error(model(tokens).logits, reference(tokens).logits)


@pytest.mark.parametrize(
    "options",
    [dict(residual="svd"), dict(residual="eora", shared="columns", weighted=False),
     dict(residual="svd", shared="columns")],
)
def test_compress_swaps_every_target_and_the_residual_lowers_the_output_error(options):
    dense = tiny_llama_gqa()
    tokens = _tokens()
    errors = {}
    for rank in (0, 4):
        model = tiny_llama_gqa()
        report = compress_(model, _config(bits=None, clusters=8, rank=rank, **options), tokens, progress=False)
        modules = [m for m in model.modules() if isinstance(m, SharedChannelLinear)]
        assert len(modules) == len(report.layers) == 14
        assert all(m.clusters == 8 and m.rank == rank and m.shared == options.get("shared", "rows") for m in modules)
        errors[rank] = _output_error(model, dense, tokens)
    assert errors[4] < errors[0] < 1.0


def test_bits_budget_is_met_per_layer_and_reported():
    model = tiny_llama_gqa()
    report = compress_(model, _config(bits=6.0, rank=2), _tokens(), progress=False)
    for layer in report.layers:
        assert layer.bits_per_weight <= 6.0
        assert bits_per_weight(layer.out_features, layer.in_features, layer.clusters + 1, 2, "rows") > 6.0
    assert report.bits_per_weight <= 6.0
    assert "storage of the targeted layers" in report.format_table()
    assert json.loads(json.dumps(report.to_dict()))["bits_per_weight"] == pytest.approx(report.bits_per_weight)


def test_compressed_residual_is_fitted_to_the_stored_codebook():
    model = tiny_llama_gqa()
    name = "model.layers.0.mlp.down_proj"
    W = linear_weight(find_targets(model)[name]).detach().clone()
    compress_(model, _config(bits=None, clusters=5, rank=3, weighted=False, targets=[name]), progress=False)
    module = model.get_submodule(name)
    expected = residual_svd(W, module.shared_weight(torch.float32), None, 3, "svd")
    assert torch.allclose(module.u @ module.v, expected.U @ expected.V, atol=1e-5)


def test_compress_rejects_too_many_clusters_before_any_work():
    model = tiny_llama_gqa()
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.k_proj: clusters=30 is larger than the 24"):
        compress_(model, _config(bits=None, clusters=30, rank=4, weighted=False), progress=False)
    assert not any(isinstance(m, SharedChannelLinear) for m in model.modules())


def test_an_explicit_rank_is_honoured_exactly_or_refused_like_eoras_before_any_work():
    # the trial: --clusters 4 --rank 40 was clamped to 24 on k_proj (24 x 48) and stored more bits than dense
    model = tiny_llama_gqa()
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.q_proj: rank=40 must satisfy 0 <= rank < "
                                         r"m n / \(m \+ n\) = 24.0 .*break-even"):  # fmt: skip
        compress_(model, _config(bits=None, clusters=4, rank=40, weighted=False), progress=False)
    with pytest.raises(ValueError, match=r"k_proj: rank=16 must satisfy .* = 16.0"):  # k_proj 24 x 48: r* = 16
        compress_(model, _config(bits=None, clusters=4, rank=16, weighted=False), progress=False)
    with pytest.raises(ValueError, match=r"q_proj: clusters=24 with a rank-12 residual stores 16.67 bits per weight"):
        compress_(model, _config(bits=None, clusters=24, rank=12, weighted=False), progress=False)
    assert not any(isinstance(m, SharedChannelLinear) for m in model.modules())
    report = compress_(model, _config(bits=None, clusters=4, rank=12, weighted=False), progress=False)
    assert {layer.rank for layer in report.layers} == {12}
    assert all(layer.bits_per_weight < 16 for layer in report.layers)


def test_save_load_round_trip_is_bit_exact_and_to_dense_works(tmp_path):
    model = tiny_llama_gqa()
    tokens = _tokens()
    config = _config(bits=8.0, rank=2)
    compress_(model, config, tokens, progress=False)
    save_compressed(model, tmp_path / "out", config=config)
    loaded, manifest = load_compressed(tmp_path / "out", with_manifest=True)
    assert manifest["config"]["kind"] == "swsc"
    assert set(manifest["layers"]) == set(find_targets(tiny_llama_gqa()))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
        reference = model(tokens).logits
        to_dense(loaded)
        assert not any(isinstance(m, SharedChannelLinear) for m in loaded.modules())
        assert relative_error(loaded(tokens).logits, reference) < 1e-5


def test_corrupt_index_in_a_saved_file_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama_gqa()
    compress_(model, _config(bits=None, clusters=4, rank=0, weighted=False), progress=False)
    out = save_compressed(model, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.index"
    tensors[key][2] = 4
    save_file(tensors, out / "model.safetensors")
    drop_weights_digest(out)  # the per-layer check behind the digest
    with pytest.raises(ValueError, match=r"index\[2\]=4 is outside \[0, 4\)"):
        load_compressed(out)


def test_gpt2_conv1d_layers_share_channels_and_convert_back():
    model = tiny_gpt2()
    tokens = _tokens()
    reference = tiny_gpt2()
    compress_(model, _config(bits=None, clusters=16, rank=4, weighted=True), tokens, progress=False)
    assert all(m.dense_class == "Conv1D" for m in model.modules() if isinstance(m, SharedChannelLinear))
    with torch.no_grad():
        compressed = model(tokens).logits
        to_dense(model)
        assert relative_error(model(tokens).logits, compressed) < 1e-5
        assert relative_error(compressed, reference(tokens).logits) < 1.0
