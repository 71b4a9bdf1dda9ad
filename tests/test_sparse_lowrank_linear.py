"""SparseLowRankLinear (2:4-pruned base stored dense + low-rank residual) and compress_ with a 2:4 BaseResidualConfig:
the pattern, the forward against float64, storage accounting, save / load, to_dense, and corrupt inputs."""

import pytest
import torch
import torch.nn.functional as F
from helpers import drop_weights_digest
from tiny_models import tiny_gpt2, tiny_llama_gqa

from lowrank_ops.algorithms.quantize import prune_2to4
from lowrank_ops.calibration import collect_input_statistics
from lowrank_ops.compress import compress_
from lowrank_ops.configs import BaseResidualConfig
from lowrank_ops.formats import two_of_four_violation
from lowrank_ops.modules import SparseLowRankLinear
from lowrank_ops.serialization import WEIGHTS, load_compressed, save_compressed, to_dense
from lowrank_ops.surgery import find_targets, linear_weight


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=g)


def _config(**kwargs):
    defaults = dict(base="2:4-wanda", rank=8, calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu")
    return BaseResidualConfig(**{**defaults, **kwargs})


def _pruned(m, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return prune_2to4(torch.randn(m, n, generator=g).to(dtype))[0]


def test_two_of_four_violation_finds_the_first_bad_run_and_allows_zeros():
    W = _pruned(6, 11, seed=0)  # n = 11: two runs of 4 and a tail of 3 (at most 2 non-zeros)
    assert two_of_four_violation(W) is None
    W[:, 0] = 0.0  # fewer non-zeros than allowed is fine
    assert two_of_four_violation(W) is None
    W[3, 8:11] = 1.0  # tail run: 3 non-zeros > ceil(3 / 2)
    assert two_of_four_violation(W) == (3, 8, 3)
    W[2, 4:8] = 1.0
    assert two_of_four_violation(W) == (2, 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_float64_reference(dtype):
    m, n, rank = 40, 102, 6  # n % 4 == 2: a tail run
    g = torch.Generator().manual_seed(1)
    W = _pruned(m, n, seed=1, dtype=dtype)
    U = (0.1 * torch.randn(m, rank, generator=g)).to(dtype)
    V = (0.1 * torch.randn(rank, n, generator=g)).to(dtype)
    b = torch.randn(m, generator=g).to(dtype)
    module = SparseLowRankLinear.from_pruned(W, u=U, v=V, bias=b)
    W64 = W.double() + U.double() @ V.double()
    for M in (1, 3, 17):
        x = torch.randn(M, n, generator=g).to(dtype)
        ref = F.linear(x.double(), W64, b.double())
        torch_same_dtype = F.linear(x, W, b) + F.linear(F.linear(x, V), U)
        out = module(x)
        assert out.dtype == dtype and out.shape == (M, m)
        budget = 2 * (torch_same_dtype.double() - ref).abs().max().item() + 1e-6
        assert (out.double() - ref).abs().max().item() <= budget
    torch.testing.assert_close(module.to_linear().weight.double(), W64.to(dtype).double())
    assert torch.equal(module.to_linear(residual=False).weight, W)
    base_only = SparseLowRankLinear.from_pruned(W, bias=b)
    x = torch.randn(3, n, generator=g).to(dtype)
    assert base_only.rank == 0 and base_only.u is None
    torch.testing.assert_close(base_only(x), F.linear(x, W, b))


def test_storage_is_counted_dense_and_the_nominal_2to4_size_is_labelled():
    module = SparseLowRankLinear.from_pruned(_pruned(40, 100, seed=2, dtype=torch.float16),
                                             u=torch.randn(40, 5), v=torch.randn(5, 100))  # fmt: skip
    factors = (40 + 100) * 5 * 2
    assert module.storage_bytes == 40 * 100 * 2 + factors  # the dense fp16 base: 16 bits per weight
    assert module.bits_per_weight == pytest.approx(8 * (8000 + factors) / 4000)
    # compressed 2:4: 50 kept fp16 values per row + 2 bits of position each = 9 bits per weight, + factors
    assert module.nominal_2to4_bytes == 40 * 50 * 2 + 40 * 50 * 2 // 8 + factors
    assert module.nominal_2to4_bits_per_weight == pytest.approx(9.0 + 8 * factors / 4000)
    text = repr(module)
    assert "pattern=2:4" in text and "dense storage" in text and "nominal 2:4" in text
    assert module.u.dtype == torch.float16 and list(module.state_dict()) == ["v", "u", "weight"]


def test_bad_arguments_and_unpruned_weights_raise():
    W = _pruned(8, 16, seed=3)
    dense = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, columns 0..3 hold 4 non-zeros, at most 2"):
        SparseLowRankLinear.from_pruned(dense)
    with pytest.raises(ValueError, match="both u"):
        SparseLowRankLinear.from_pruned(W, u=torch.randn(8, 2))
    with pytest.raises(ValueError, match="must be"):
        SparseLowRankLinear.from_pruned(W, u=torch.randn(8, 2), v=torch.randn(2, 15))
    with pytest.raises(TypeError, match="floating"):
        SparseLowRankLinear.from_pruned(W.to(torch.int32))
    with pytest.raises(ValueError, match="rank=9"):
        SparseLowRankLinear(16, 8, rank=9)
    with pytest.raises(ValueError, match="break-even"):  # 8 x 16: break-even 5.3
        SparseLowRankLinear(16, 8, rank=6)
    module = SparseLowRankLinear.from_pruned(W, u=torch.randn(8, 2), v=torch.randn(2, 16))
    state = module.state_dict()
    state["weight"] = dense
    with pytest.raises(ValueError, match=r"load_state_dict: weight .* is not 2:4 sparse"):
        module.load_state_dict(state)
    assert torch.equal(module.weight, W)  # rejected before anything was copied


def _calibration_loss(reference, stats, model):
    """Sum over targeted layers of the relative calibration output error ||(W - W') X^T||^2 / ||W X^T||^2."""
    total = 0.0
    for name, layer_stats in stats.items():
        w = linear_weight(reference.get_submodule(name)).double()
        w2 = model.get_submodule(name).to_linear().weight.double()
        gram = layer_stats.gram
        total += (torch.trace((w - w2) @ gram @ (w - w2).T) / torch.trace(w @ gram @ w.T)).item()
    return total


def test_compress_builds_2to4_layers_and_eora_lowers_the_calibration_error():
    tokens, reference = _tokens(), tiny_llama_gqa()
    stats = collect_input_statistics(reference, list(find_targets(reference)), tokens, gram=True, progress=False)
    losses = {}
    for base in ("2:4-magnitude", "2:4-wanda"):
        for residual, rank in (("eora", 0), ("svd", 8), ("eora", 8)):
            model = tiny_llama_gqa()
            report = compress_(model, _config(base=base, residual=residual, rank=rank), tokens, progress=False)
            swapped = {n: m for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)}
            assert list(swapped) == [layer.name for layer in report.layers] and len(swapped) == 14
            for module in swapped.values():
                assert two_of_four_violation(module.weight) is None and module.rank == rank
                assert (module.weight != 0).sum().item() == module.weight.numel() // 2  # n = 48, 80: exactly 50 %
            layer = report.layers[0]
            # the report counts floats at 16 bits (deployment), the module what it stores (fp32 here): dense base both
            assert layer.bits_per_weight == pytest.approx(16 + 16 * rank * (48 + 48) / (48 * 48))
            module = swapped[layer.name]
            assert module.bits_per_weight == pytest.approx(32 + 32 * rank * (48 + 48) / (48 * 48))
            assert module.nominal_2to4_bits_per_weight_at(16) == layer.nominal_2to4_bits_per_weight
            assert layer.nominal_2to4_bits_per_weight < layer.bits_per_weight
            losses[(base, residual, rank)] = _calibration_loss(reference, stats, model)
        assert losses[(base, "eora", 8)] < 0.5 * losses[(base, "eora", 0)]  # measured 0.34 for both bases
        assert losses[(base, "eora", 8)] < losses[(base, "svd", 8)]
    # Wanda keeps the weights that matter on these inputs: a smaller base error than magnitude (measured 1.83 vs 1.90)
    assert losses[("2:4-wanda", "eora", 0)] < losses[("2:4-magnitude", "eora", 0)]


def test_save_load_is_bit_exact_to_dense_works_and_a_corrupt_base_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokens = tiny_llama_gqa(), _tokens()
    config = _config(residual="eora", rank=8)
    compress_(model, config, tokens, progress=False)
    out = save_compressed(model, tmp_path / "pruned", config=config, source="tiny")
    loaded, manifest = load_compressed(out, with_manifest=True)
    entry = manifest["layers"]["model.layers.0.mlp.down_proj"]
    assert entry["module"] == "SparseLowRankLinear" and entry["pattern"] == "2:4" and entry["rank"] == 8
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    probe = tokens[:2]
    logits = loaded(probe).logits
    assert torch.equal(model(probe).logits, logits)
    to_dense(loaded)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear"
    torch.testing.assert_close(loaded(probe).logits, logits, rtol=1e-4, atol=1e-4)

    tensors = load_file(str(out / WEIGHTS))
    key = "model.layers.1.self_attn.o_proj.weight"
    tensors[key] = tensors[key] + 1e-3  # every entry non-zero: not 2:4 any more
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_compressed(out)
    drop_weights_digest(out)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight .* is not 2:4 sparse"):
        load_compressed(out)


def test_gpt2_conv1d_layers_prune_and_convert_back_to_dense():
    model, tokens = tiny_gpt2(), _tokens(2)
    compress_(model, _config(base="2:4-magnitude", residual="svd", rank=4), progress=False)
    assert isinstance(model.transformer.h[0].mlp.c_fc, SparseLowRankLinear)
    logits = model(tokens).logits
    to_dense(model)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(model(tokens).logits, logits, rtol=1e-4, atol=1e-4)
