"""Quantized base + low-rank residual: EoRA / SVD / LQER residuals, base specs, QuantLowRankLinear, compress_ with
BaseResidualConfig, save / load."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_gpt2, tiny_llama_gqa

from lowrank_ops import QuantLowRankLinear
from lowrank_ops.algorithms.eora import (
    base_weight,
    compensate,
    quantized_base,
    residual_svd,
    residual_whitening,
)
from lowrank_ops.calibration import collect_input_statistics
from lowrank_ops.compress import compress_
from lowrank_ops.configs import BaseResidualConfig, config_from_json
from lowrank_ops.engine import InputStatistics
from lowrank_ops.formats import parse_base_spec
from lowrank_ops.quant_format import dequantize_packed
from lowrank_ops.rank import discarded_energy
from lowrank_ops.serialization import load_compressed, save_compressed, to_dense
from lowrank_ops.surgery import find_targets, linear_weight


def _correlated_inputs(T, n, seed):
    """Tokens X (T, n) with correlated channels and a few outlier channels (what makes whitening matter)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.4 * torch.randn(n, n, generator=g)
    X = torch.randn(T, n, generator=g) @ mix
    X[:, :4] *= 8.0
    return X.double()


def _problem(m=48, n=80, T=400, seed=0, spec="int3-g32"):
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(m, n, generator=g)
    X = _correlated_inputs(T, n, seed)
    stats = InputStatistics(n, gram=True)
    stats.update(X)
    return W, quantized_base(W, spec), stats


def _calib_error(W, W_hat, U, V, gram):
    E = W.double() - W_hat.double() - U.double() @ V.double()
    return torch.trace(E @ gram.double() @ E.T).item()


@pytest.mark.parametrize("rank", [1, 8, 24])
def test_eora_is_optimal_in_the_calibration_norm_and_its_loss_is_the_discarded_energy(rank):
    W, base, stats = _problem()
    W_hat = base_weight(base)
    errors = {}
    for method in ("eora", "lqer", "svd"):
        U, V = compensate(W, W_hat, stats, rank, method)
        assert U.shape == (48, rank) and V.shape == (rank, 80)
        errors[method] = _calib_error(W, W_hat, U, V, stats.gram)
    base_error = _calib_error(W, W_hat, torch.zeros(48, 0), torch.zeros(0, 80), stats.gram)
    # Eckart-Young in the whitened space: exact ordering (up to rounding), and a real gain on these inputs
    assert errors["eora"] <= errors["lqer"] * (1 + 1e-9) and errors["eora"] <= errors["svd"] * (1 + 1e-9)
    assert errors["eora"] < 0.95 * errors["svd"] and errors["eora"] < base_error
    # loss identity: ||(dW - U V) X^T||_F^2 == sum_{i >= r} sigma_i(dW S)^2
    sigma = residual_svd(W, W_hat, stats, rank, "eora").singular_values
    assert discarded_energy(sigma, rank).item() == pytest.approx(errors["eora"], rel=1e-6)
    assert discarded_energy(sigma, 0).item() == pytest.approx(base_error, rel=1e-6)


def test_full_rank_eora_removes_the_error_and_rank_deficient_grams_drop_directions():
    W, base, stats = _problem(m=24, n=40, T=400)
    W_hat = base_weight(base)
    U, V = compensate(W, W_hat, stats, 24, "eora")  # W S is (24, 40): rank 24 is exact
    assert _calib_error(W, W_hat, U, V, stats.gram) < 1e-8 * _calib_error(W, W_hat, U[:, :0], V[:0], stats.gram)
    # fewer tokens than channels: eigh drops the collapsed directions; the identity still holds
    W, base, stats = _problem(m=24, n=40, T=16, seed=3)
    W_hat = base_weight(base)
    result = residual_svd(W, W_hat, stats, 8, "eora")
    assert residual_whitening("eora", stats, 40).rank == 16
    err = _calib_error(W, W_hat, result.U, result.V, stats.gram)
    assert discarded_energy(result.singular_values, 8).item() == pytest.approx(err, rel=1e-6)


def test_lqer_scales_by_mean_abs_and_rank_zero_is_base_only():
    W, base, stats = _problem()
    whitening = residual_whitening("lqer", stats, 80)
    assert whitening.kind == "diagonal"
    torch.testing.assert_close(whitening.scale, stats.mean_abs.double())
    U, V = compensate(W, base_weight(base), stats, 0, "eora")
    assert U.shape == (48, 0) and V.shape == (0, 80)
    module = QuantLowRankLinear.from_packed(base)
    assert module.rank == 0 and module.u is None and "rank=0" in repr(module)
    x = torch.randn(5, 80)
    torch.testing.assert_close(module(x), F.linear(x, dequantize_packed(base, torch.float32)))


def test_residual_is_fitted_against_the_packed_base():
    """The stored (fp16-rounded) scales define W_hat: full-rank compensation against it reproduces W exactly."""
    W, _, stats = _problem(m=24, n=40)
    packed = quantized_base(W, "int4-g32", dtype=torch.float16)
    W_hat = base_weight(packed)
    assert torch.equal(W_hat, dequantize_packed(packed, torch.float32))
    U, V = compensate(W, W_hat, None, 24, "svd")
    torch.testing.assert_close(W_hat + U @ V, W, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8, 3])
def test_module_forward_matches_float64_reference(dtype, bits):
    m, n, rank = 40, 100, 6  # n not a multiple of the group: a partial last group
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(m, n, generator=g)
    packed = quantized_base(W, f"int{bits}-g32", dtype=dtype)
    U = (0.1 * torch.randn(m, rank, generator=g)).to(dtype)
    V = (0.1 * torch.randn(rank, n, generator=g)).to(dtype)
    b = torch.randn(m, generator=g).to(dtype)
    module = QuantLowRankLinear.from_packed(packed, u=U, v=V, bias=b)
    W_hat64 = dequantize_packed(packed, torch.float64)
    for M in (1, 3, 17):
        x = torch.randn(M, n, generator=g).to(dtype)
        ref = F.linear(x.double(), W_hat64 + U.double() @ V.double(), b.double())
        torch_same_dtype = F.linear(x, W_hat64.to(dtype), b) + F.linear(F.linear(x, V), U)
        out = module(x)
        assert out.dtype == dtype and out.shape == (M, m)
        budget = 2 * (torch_same_dtype.double() - ref).abs().max().item() + 1e-6
        assert (out.double() - ref).abs().max().item() <= budget
    dense = module.to_linear()
    torch.testing.assert_close(dense.weight.double(), (W_hat64 + U.double() @ V.double()).to(dtype).double())


def test_module_storage_repr_and_bad_arguments():
    W = torch.randn(40, 100)
    packed = quantized_base(W, "int4-g32", dtype=torch.float16)
    U, V = torch.randn(40, 5), torch.randn(5, 100)
    module = QuantLowRankLinear.from_packed(packed, u=U, v=V)
    # codes 40 x 13 int32 words, scales + zeros 2 x 40 x 4 fp16, factors (40 + 100) x 5 fp16
    assert module.storage_bytes == 40 * 13 * 4 + 2 * 40 * 4 * 2 + 140 * 5 * 2
    assert module.bits_per_weight == pytest.approx(8 * 4120 / 4000)
    assert module.bits_per_weight_at(16) == pytest.approx(module.bits_per_weight)  # stored at 16 bits already
    fp32 = QuantLowRankLinear.from_packed(quantized_base(W, "int4-g32", dtype=torch.float32), u=U, v=V)
    assert fp32.bits_per_weight == pytest.approx(8 * (40 * 13 * 4 + 2 * 40 * 4 * 4 + 140 * 5 * 4) / 4000)
    assert fp32.bits_per_weight_at(16) == pytest.approx(module.bits_per_weight)  # what a compress_ report shows
    text = repr(module)
    assert all(s in text for s in ("bits=4", "group_size=32", "rank=5", "bits_per_weight=8.240"))
    assert module.u.dtype == torch.float16 and list(module.state_dict()) == [
        "v", "u", "qweight", "scales", "zeros"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="both u"):
        QuantLowRankLinear.from_packed(packed, u=U)
    with pytest.raises(ValueError, match="must be"):
        QuantLowRankLinear.from_packed(packed, u=U, v=torch.randn(5, 99))
    with pytest.raises(ValueError, match="rank=41"):
        QuantLowRankLinear(100, 40, 4, 32, rank=41)
    # break-even of a 40 x 100 weight: 4000 / 140 = 28.6; rank 28 is the largest residual that still saves
    assert QuantLowRankLinear(100, 40, 4, 32, rank=28).rank == 28
    with pytest.raises(ValueError, match=r"rank=29 must satisfy 0 <= rank < m n / \(m \+ n\) = 28.6"):
        QuantLowRankLinear(100, 40, 4, 32, rank=29)
    with pytest.raises(ValueError, match="rank=-1"):
        QuantLowRankLinear(100, 40, 4, 32, rank=-1)
    with pytest.raises(ValueError, match="bits=5"):
        QuantLowRankLinear(100, 40, 5, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantLowRankLinear(100, 40, 4, 12)


def test_bad_specs_and_configs_raise():
    assert parse_base_spec("gptq-int4").group_size == 128
    assert parse_base_spec("int4-g64-sym").symmetric
    for bad in ("int5-g128", "int4-g12", "int4-g0", "fp8", "2:4-random", "gptq-int4-g", ""):
        with pytest.raises(ValueError, match="parse_base_spec"):
            parse_base_spec(bad)
    with pytest.raises(TypeError):
        parse_base_spec(4)
    W = torch.randn(16, 64)
    with pytest.raises(ValueError, match="Gram"):
        quantized_base(W, "gptq-int4-g32")
    with pytest.raises(ValueError, match="Gram"):
        quantized_base(W, "2:4-wanda")
    with pytest.raises(ValueError, match="needs calibration statistics"):
        compensate(W, W, None, 4, "eora")
    with pytest.raises(ValueError, match="method='pca'"):
        compensate(W, W, None, 4, "pca")
    with pytest.raises(ValueError, match="0 <= rank <= min"):
        compensate(W, W, None, 17, "svd")
    for bad, message in [
        (dict(base="int5-g128"), "base='int5-g128' is invalid"),
        (dict(residual="pca"), "residual='pca' must be one of"),
        (dict(rank=-1), "rank=-1 must be an int >= 0"),
        (dict(calib_tokens=8, seq_len=32), "calib_tokens=8 must be >= seq_len=32"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            BaseResidualConfig(**bad)
    config = BaseResidualConfig(base="gptq-int4-g32", rank=8, residual="lqer", targets=["re:.*mlp.*"])
    assert config_from_json(config.to_json()) == config and config.needs_calibration
    assert not BaseResidualConfig(base="int4", residual="svd").needs_calibration
    with pytest.raises(ValueError, match="needs calibration"):  # Wanda needs the Gram: no calibration data given
        config = BaseResidualConfig(base="2:4-wanda", residual="svd", rank=8, device="cpu")
        compress_(tiny_llama_gqa(), config, progress=False)


def test_two_of_four_bases_are_dense_and_compensated():
    W, _, stats = _problem()
    for spec in ("2:4-magnitude", "2:4-wanda"):
        pruned = quantized_base(W, spec, stats)
        assert pruned.shape == W.shape and (pruned == 0).sum().item() == W.numel() // 2
        errors = {
            method: _calib_error(W, pruned, *compensate(W, pruned, stats, 8, method), stats.gram)
            for method in ("eora", "svd")
        }
        assert errors["eora"] <= errors["svd"] * (1 + 1e-9)


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=g)


def _config(**kwargs):
    defaults = dict(base="int4-g32", rank=8, calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu")
    return BaseResidualConfig(**{**defaults, **kwargs})


def _calibration_loss(reference, model, tokens):
    """Sum over targeted layers of the relative calibration output error, through the Gram."""
    names = list(find_targets(reference))
    stats = collect_input_statistics(reference, names, tokens, gram=True, progress=False)
    total = 0.0
    for name in names:
        w = linear_weight(reference.get_submodule(name)).double()
        w2 = model.get_submodule(name).to_linear().weight.double()
        gram = stats[name].gram
        total += (torch.trace((w - w2) @ gram @ (w - w2).T) / torch.trace(w @ gram @ w.T)).item()
    return total


def test_compress_with_eora_config_improves_on_the_base_and_on_plain_svd():
    tokens = _tokens()
    losses = {}
    for residual, rank in (("eora", 0), ("svd", 8), ("eora", 8)):
        model = tiny_llama_gqa()
        report = compress_(model, _config(residual=residual, rank=rank), tokens, progress=False)
        assert len(report.layers) == 14
        swapped = [n for n, m in model.named_modules() if isinstance(m, QuantLowRankLinear)]
        assert swapped == [layer.name for layer in report.layers]
        assert all(layer.rank == rank for layer in report.layers)
        losses[(residual, rank)] = _calibration_loss(tiny_llama_gqa(), model, tokens)
    assert losses[("eora", 8)] < 0.5 * losses[("eora", 0)]
    assert losses[("eora", 8)] < losses[("svd", 8)] < losses[("eora", 0)]


def test_save_load_round_trip_is_bit_exact_and_to_dense_works(tmp_path):
    model, tokens = tiny_llama_gqa(), _tokens()
    config = _config(base="gptq-int4-g32", residual="eora", rank=8)
    compress_(model, config, tokens, progress=False)
    out = save_compressed(model, tmp_path / "quantized", config=config, source="tiny")
    loaded, manifest = load_compressed(out, with_manifest=True)
    entry = manifest["layers"]["model.layers.0.self_attn.k_proj"]
    assert entry["module"] == "QuantLowRankLinear" and (entry["bits"], entry["group_size"], entry["rank"]) == (4, 32, 8)
    assert manifest["config"] == config.to_dict()
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert after["model.layers.0.self_attn.k_proj.qweight"].dtype == torch.int32
    probe = tokens[:2]
    assert torch.equal(model(probe).logits, loaded(probe).logits)
    logits = loaded(probe).logits
    to_dense(loaded)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear"
    torch.testing.assert_close(loaded(probe).logits, logits, rtol=1e-4, atol=1e-4)


def test_sequential_gptq_matches_one_shot_on_the_first_layer_and_feeds_quantized_outputs_forward():
    tokens = _tokens()
    one_shot, sequential = tiny_llama_gqa(), tiny_llama_gqa()
    config = dict(base="gptq-int4-g32", residual="eora", rank=8)
    compress_(one_shot, _config(**config), tokens, progress=False)
    report = compress_(sequential, _config(**config, sequential=True), tokens, progress=False)
    assert len(report.layers) == 14 and all(layer.rank == 8 for layer in report.layers)
    assert report.config["sequential"] is True and "sequential" in report.seconds
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    for name in ("qweight", "scales", "zeros", "u", "v"):  # layer 0 sees the same inputs either way
        assert torch.equal(getattr(sequential.get_submodule(first), name), getattr(one_shot.get_submodule(first), name))
    # layer 1 was calibrated on the outputs of the quantized layer 0: its GPTQ codes or residual differ
    a, b = sequential.get_submodule(second), one_shot.get_submodule(second)
    assert not (torch.equal(a.qweight, b.qweight) and torch.equal(a.u, b.u))
    assert all(not m._forward_pre_hooks for m in sequential.modules())
    assert next(sequential.parameters()).device.type == "cpu" and torch.isfinite(sequential(tokens[:1]).logits).all()
    with pytest.raises(ValueError, match="sequential=True needs calibration statistics, and int4-g32 \\+ svd r=8"):
        _config(base="int4-g32", residual="svd", sequential=True)


def test_compress_rejects_a_rank_at_or_above_a_layers_break_even_before_any_work():
    model = tiny_llama_gqa()  # k_proj / v_proj are 24 x 48: break-even 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer model.layers.0.self_attn.k_proj: rank=16 must satisfy"):
        compress_(model, _config(rank=16), _tokens(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_gpt2_conv1d_layers_quantize_and_convert_back_to_dense():
    model, tokens = tiny_gpt2(), _tokens(2)
    compress_(model, _config(residual="svd", rank=4), progress=False)
    assert isinstance(model.transformer.h[0].mlp.c_fc, QuantLowRankLinear)
    logits = model(tokens).logits
    to_dense(model)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(model(tokens).logits, logits, rtol=1e-4, atol=1e-4)
