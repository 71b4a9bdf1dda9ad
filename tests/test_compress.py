"""compress_ on tiny models: configs, calibration hooks, the three methods, allocators, save / load / to_dense."""

import json

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama_gqa

from lowrank_ops import LowRankLinear
from lowrank_ops.assets import tiny_llama
from lowrank_ops.calibration import collect_input_statistics
from lowrank_ops.compress import compress_
from lowrank_ops.configs import (
    BaseResidualConfig,
    BasisConfig,
    LowRankConfig,
    SwscConfig,
    config_from_dict,
    config_from_json,
)
from lowrank_ops.serialization import load_compressed, read_manifest, save_compressed, to_dense
from lowrank_ops.surgery import find_targets, linear_weight


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=g)


def _config(**kwargs):
    defaults = dict(calib_tokens=6 * 32, seq_len=32, batch_size=3, align=4, device="cpu")
    return LowRankConfig(**{**defaults, **kwargs})


def test_config_json_round_trip_and_validation():
    config = _config(method="asvd", allocator="loss", param_ratio=0.8, targets=["re:.*mlp.*"])
    assert config_from_json(config.to_json()) == config
    for bad, message in [
        (dict(method="pca"), "method='pca' must be one of"),
        (dict(allocator="magic"), "allocator='magic' must be one of"),
        (dict(param_ratio=1.5), "param_ratio=1.5 must be in (0, 1]"),
        (dict(param_ratio=0.0), "param_ratio=0.0 must be in (0, 1]"),
        (dict(calib_tokens=10), "calib_tokens=10 must be >= seq_len=32"),
        (dict(targets="Linear"), "must be a list of pattern strings"),
    ]:
        with pytest.raises(ValueError) as info:
            _config(**bad)
        assert message in str(info.value)
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({**config.to_dict(), "rank": 3})


def test_calibration_shares_statistics_between_layers_reading_the_same_input_and_removes_hooks():
    model = tiny_llama_gqa()
    names = list(find_targets(model))
    stats = collect_input_statistics(model, names, _tokens(), gram=True, batch_size=4, progress=False)
    layer0 = "model.layers.0."
    assert stats[layer0 + "self_attn.q_proj"] is stats[layer0 + "self_attn.v_proj"]
    assert stats[layer0 + "mlp.gate_proj"] is stats[layer0 + "mlp.up_proj"]
    assert stats[layer0 + "self_attn.o_proj"] is not stats[layer0 + "self_attn.q_proj"]
    assert stats[layer0 + "mlp.down_proj"].token_count == 6 * 32
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_are_removed_when_calibration_fails():
    model = tiny_llama_gqa()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="NaN|Inf|non-finite"):
        collect_input_statistics(model, list(find_targets(model)), _tokens(), gram=True, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def _calibration_loss(model_before, model_after, tokens):
    """Sum over targeted layers of the relative output error on the calibration inputs, via the Gram."""
    names = list(find_targets(model_before))
    stats = collect_input_statistics(model_before, names, tokens, gram=True, progress=False)
    total = 0.0
    for name in names:
        w = linear_weight(model_before.get_submodule(name)).double()
        after = model_after.get_submodule(name)
        w2 = (after.u @ after.v).double() if isinstance(after, LowRankLinear) else linear_weight(after).double()
        g = stats[name].gram
        total += (torch.trace((w - w2) @ g @ (w - w2).T) / torch.trace(w @ g @ w.T)).item()
    return total


def test_whitening_is_optimal_on_calibration_data_and_reports_its_exact_loss():
    tokens = _tokens()
    losses, reports = {}, {}
    for method in ("svd", "asvd", "whiten"):
        model = tiny_llama_gqa()
        reports[method] = compress_(model, _config(method=method, param_ratio=0.6), tokens, progress=False)
        losses[method] = _calibration_loss(tiny_llama_gqa(), model, tokens)
    assert losses["whiten"] < losses["asvd"] < losses["svd"]
    # whitened truncation loss == discarded singular energy of W S (reported per layer)
    reported = sum(layer.discarded_energy for layer in reports["whiten"].layers)
    assert reported == pytest.approx(losses["whiten"], rel=1e-3)


@pytest.mark.parametrize("allocator", ["uniform", "loss", "sensitivity"])
def test_allocators_meet_the_budget_and_list_every_layer(allocator, tmp_path):
    model = tiny_llama_gqa()
    config = _config(method="whiten", allocator=allocator, param_ratio=0.5, sensitivity_ratios=[0.2, 0.4, 0.6, 0.8])
    report = compress_(model, config, _tokens(), progress=False, cache_dir=tmp_path)
    assert report.param_ratio <= 0.5 and len(report.layers) == 14
    swapped = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    assert swapped == [layer.name for layer in report.layers if layer.rank is not None]
    assert all(layer.rank is None or layer.rank % 4 == 0 for layer in report.layers)
    assert "targeted params kept" in report.format_table()
    if allocator == "sensitivity":
        assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1
        again = compress_(tiny_llama_gqa(), config, _tokens(), progress=False, cache_dir=tmp_path)
        assert [layer.rank for layer in again.layers] == [layer.rank for layer in report.layers]


def test_loss_allocator_beats_uniform_on_calibration_loss():
    tokens = _tokens()
    losses = {}
    for allocator in ("uniform", "loss"):
        model = tiny_llama_gqa()
        compress_(model, _config(method="whiten", allocator=allocator, param_ratio=0.5), tokens, progress=False)
        losses[allocator] = _calibration_loss(tiny_llama_gqa(), model, tokens)
    assert losses["loss"] <= losses["uniform"]


def test_gpt2_conv1d_layers_compress_and_convert_back_to_dense():
    model, reference = tiny_gpt2(), tiny_gpt2()
    compress_(model, _config(method="svd", param_ratio=0.7), progress=False)
    assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear)
    tokens = _tokens(2)
    compressed_logits = model(tokens).logits
    to_dense(model)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    torch.testing.assert_close(model(tokens).logits, compressed_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model(tokens).logits, reference(tokens).logits, atol=1e-3)


@pytest.mark.parametrize("make", [lambda: tiny_llama(vocab_size=128, hidden_size=48, intermediate_size=80,
                                                       max_position_embeddings=64, tie_word_embeddings=True),
                                   tiny_gpt2], ids=["llama-tied", "gpt2"])  # fmt: skip
def test_save_load_keeps_tied_embeddings(tmp_path, make):
    """SmolLM2 and GPT-2 tie lm_head to the input embedding: the file holds the tensor once, the loaded model must
    tie it again (regression: loading `make compress`'s output failed with a missing embed_tokens.weight)."""
    model = make()
    compress_(model, _config(method="svd", param_ratio=0.7), progress=False)
    loaded = load_compressed(save_compressed(model, tmp_path / "tied", config=None, source="tiny"))
    head, embedding = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
    assert head.data_ptr() == embedding.data_ptr()
    tokens = _tokens(2)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_a_tied_embedding_is_saved_under_the_input_embedding_name(tmp_path):
    """The file keeps the input embedding's name (as save_pretrained does), not lm_head.weight: vLLM skips
    lm_head.weight of a tied model, and served SmolLM2 saved the old way with an uninitialised embedding (token 0 at
    every step). Files saved before, which hold lm_head.weight only, still load, tied."""
    from helpers import drop_weights_digest
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tiny_llama(vocab_size=128, hidden_size=48, intermediate_size=80, max_position_embeddings=64,
                       tie_word_embeddings=True)  # fmt: skip
    model.config.architectures = None  # as transformers leaves a model loaded from GGUF (SmolLM2)
    compress_(model, _config(method="svd", param_ratio=0.7), progress=False)
    out = save_compressed(model, tmp_path / "tied", config=None, source="tiny")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert metadata == {"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    tokens = _tokens(2)
    tensors = load_file(out / "model.safetensors")  # the layout safetensors' save_model wrote before
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, out / "model.safetensors", metadata={"model.embed_tokens.weight": "lm_head.weight"})
    drop_weights_digest(out)
    loaded = load_compressed(out)
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


@pytest.mark.parametrize("config", [
    _config(method="whiten", param_ratio=0.7),
    BaseResidualConfig(base="int4-g16", rank=4, calib_tokens=6 * 32, seq_len=32, device="cpu"),
    BaseResidualConfig(base="2:4-magnitude", rank=4, residual="svd", calib_tokens=6 * 32, seq_len=32, device="cpu"),
    SwscConfig(clusters=8, bits=None, rank=2, calib_tokens=6 * 32, seq_len=32, device="cpu"),
], ids=["lowrank", "int4", "2:4", "swsc"])  # fmt: skip
def test_a_bfloat16_model_loads_back_in_bfloat16_bit_exact(tmp_path, config):
    """Compressed modules are rebuilt in the dtype they were saved in (they used to come back as float32 factors
    inside a bfloat16 model)."""
    model = tiny_llama_gqa().to(torch.bfloat16)
    compress_(model, config, _tokens(), progress=False)
    loaded = load_compressed(save_compressed(model, tmp_path / "bf16", config=config, source="tiny"))
    before, after = model.state_dict(), loaded.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    # .to(bfloat16) also rounded the rotary inv_freq buffer (not saved; the loaded model rebuilds it in float32)
    model.model.rotary_emb.inv_freq = loaded.model.rotary_emb.inv_freq.clone()
    tokens = _tokens(2)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_llama_gqa()
    config = _config(method="asvd", param_ratio=0.6)
    compress_(model, config, _tokens(), progress=False)
    out = save_compressed(model, tmp_path / "compressed", config=config, source="tiny")
    assert not list(tmp_path.glob(".compressed*")), "no temporary directory may be left behind"
    loaded, manifest = load_compressed(out, with_manifest=True)
    assert manifest["config"] == config.to_dict() and manifest["source"] == "tiny"
    assert manifest == read_manifest(out)
    assert isinstance(load_compressed(out), torch.nn.Module)  # issue 17: `model = load_compressed(dir)` is the model
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tokens = _tokens(2)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert json.loads((out / "lowrank_ops.json").read_text())["layers"]["model.layers.0.mlp.up_proj"]["rank"] > 0


def test_fisher_allocator_is_training_free_basis_selection_on_the_calibration_text(tmp_path):
    from lowrank_ops.configs import BasisConfig

    tokens = _tokens()
    config = _config(method="whiten", allocator="fisher", param_ratio=0.6)
    assert config.needs_calibration and _config(method="svd", allocator="fisher").needs_calibration
    model, reference = tiny_llama_gqa(), tiny_llama_gqa()
    report = compress_(model, config, tokens, progress=False)
    assert report.config == config.to_dict() and report.param_ratio <= 0.6 + 1e-9
    assert all(isinstance(model.get_submodule(layer.name), (LowRankLinear, torch.nn.Linear)) for layer in report.layers)
    basis = BasisConfig(param_ratio=0.6, basis="whiten", score="fisher", calib_tokens=6 * 32, seq_len=32,
                        batch_size=3, align=4, device="cpu")  # fmt: skip
    compress_(reference, basis, tokens, progress=False)
    same, other = model.state_dict(), reference.state_dict()
    assert same.keys() == other.keys() and all(torch.equal(same[k], other[k]) for k in same)
    out = save_compressed(model, tmp_path / "fisher", config=config, source="tiny")
    loaded, manifest = load_compressed(out, with_manifest=True)
    assert manifest["config"]["allocator"] == "fisher"
    assert torch.equal(loaded(tokens[:2]).logits, model(tokens[:2]).logits)
    with pytest.raises(ValueError, match="needs calibration token ids"):
        compress_(tiny_llama_gqa(), _config(method="svd", allocator="fisher"), progress=False)


def test_unfolded_coefficients_survive_save_and_load(tmp_path):
    model = tiny_llama_gqa()
    config = _config(method="svd", param_ratio=0.6)
    compress_(model, config, progress=False)
    layer = model.model.layers[1].mlp.down_proj
    layer.add_coefficients(torch.linspace(0.5, 2.0, layer.rank))
    out = save_compressed(model, tmp_path / "with_s", config=config, source="tiny")
    loaded, manifest = load_compressed(out, with_manifest=True)
    assert manifest["layers"]["model.layers.1.mlp.down_proj"]["coefficients"] is True
    assert "coefficients" not in manifest["layers"]["model.layers.1.mlp.up_proj"]
    assert loaded.model.layers[1].mlp.down_proj.has_coefficients
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tokens = _tokens(2)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)


def test_bad_input():
    model = tiny_llama_gqa()
    with pytest.raises(ValueError, match="needs calibration token ids"):
        compress_(model, _config(method="whiten"))
    with pytest.raises(ValueError, match="match no Linear"):
        compress_(model, _config(method="svd", targets=["re:nothing"]))
    with pytest.raises(TypeError, match="config must be one of BaseResidualConfig, BasisConfig, LowRankConfig"):
        compress_(model, {"method": "svd"})
    with pytest.raises(FileNotFoundError, match="has no lowrank_ops.json"):
        load_compressed(".")


def test_sequential_mode_matches_the_one_shot_mode_on_the_first_layer_and_feeds_compressed_outputs_forward():
    tokens = _tokens()
    one_shot, sequential = tiny_llama_gqa(), tiny_llama_gqa()
    compress_(one_shot, _config(method="whiten", param_ratio=0.6), tokens, progress=False)
    report = compress_(sequential, _config(method="whiten", param_ratio=0.6, sequential=True), tokens, progress=False)
    assert report.param_ratio <= 0.6 and len(report.layers) == 14
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(sequential.get_submodule(first).u, one_shot.get_submodule(first).u)
    # layer 1 was calibrated on the outputs of the compressed layer 0, so its factors differ
    assert not torch.allclose(sequential.get_submodule(second).u, one_shot.get_submodule(second).u, atol=1e-4)
    assert all(not m._forward_pre_hooks for m in sequential.modules())
    assert torch.isfinite(sequential(tokens[:1]).logits).all()


def _ranks(report):
    return [layer.rank for layer in report.layers]


def _first_layer_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.0.") and "_proj" in k}


SEQUENTIAL_CASES = {  # config, how the sequential result relates to the one-shot one
    "whiten-loss": (lambda: _config(method="whiten", allocator="loss", param_ratio=0.6), "budget per layer"),
    "asvd-sensitivity": (lambda: _config(method="asvd", allocator="sensitivity", param_ratio=0.6,
                                         sensitivity_ratios=[0.3, 0.6, 0.9], sensitivity_tokens=64), "same ranks"),
    "whiten-fisher": (lambda: _config(method="whiten", allocator="fisher", param_ratio=0.6, score_tokens=64),
                      "same ranks"),
    "swsc-columns": (lambda: SwscConfig(shared="columns", clusters=8, bits=None, rank=4, residual="eora", n_iter=10,
                                        calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu"),
                     "same first layer"),
    "basis-energy": (lambda: BasisConfig(param_ratio=0.6, align=4, score="energy", calib_tokens=6 * 32, seq_len=32,
                                         batch_size=3, device="cpu"), "budget per layer"),
    "basis-fisher-new-trained": (lambda: BasisConfig(param_ratio=0.6, align=4, score_tokens=64, new_rank=4,
                                                     train_steps=2, eval_every=1, calib_tokens=6 * 32, seq_len=32,
                                                     batch_size=3, device="cpu"), "same ranks"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SEQUENTIAL_CASES))
def test_sequential_mode_works_for_every_method(case, tmp_path):
    """Every method runs layer by layer. Selections that need the whole model (sensitivity probes, gradient scores)
    run once on the uncompressed model: the same ranks as one-shot. Per-layer selections meet the budget per decoder
    layer. SWSC's k-means is per layer: the first decoder layer (same inputs in both modes) is identical."""
    make, relation = SEQUENTIAL_CASES[case]
    tokens = _tokens()
    extra = dict(train=_tokens(4, seed=1), heldout=_tokens(2, seed=2)) if "trained" in case else {}
    one_shot, sequential = tiny_llama_gqa(), tiny_llama_gqa()
    config = make()
    reference = compress_(one_shot, config, tokens, progress=False, cache_dir=tmp_path, **extra)
    config.sequential = True
    report = compress_(sequential, config, tokens, progress=False, cache_dir=tmp_path, **extra)
    assert report.config["sequential"] and len(report.layers) == 14
    assert all(not m._forward_pre_hooks for m in sequential.modules())
    assert torch.isfinite(sequential(tokens[:1]).logits).all()
    if relation == "same ranks":
        assert _ranks(report) == _ranks(reference)
    elif relation == "same first layer":
        first, again = _first_layer_state(sequential), _first_layer_state(one_shot)
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
        assert not torch.equal(sequential.model.layers[1].mlp.down_proj.u, one_shot.model.layers[1].mlp.down_proj.u)
    else:  # the budget holds in every decoder layer, hence overall
        for index in range(2):
            rows = [layer for layer in report.layers if layer.name.startswith(f"model.layers.{index}.")]
            size = sum(layer.out_features * layer.in_features for layer in rows)
            kept = sum(layer.kept_params for layer in rows) / size
            assert kept <= 0.6 + 1e-9
    out = save_compressed(sequential, tmp_path / "saved", config=config, source="tiny")
    loaded = load_compressed(out)
    assert torch.equal(loaded(tokens[:2]).logits, sequential(tokens[:2]).logits)


def test_sequential_needs_calibration_statistics():
    with pytest.raises(ValueError, match="sequential=True needs calibration statistics, and svd / uniform"):
        _config(method="svd", sequential=True)
    with pytest.raises(ValueError, match="sequential=True needs calibration statistics, and svd / loss"):
        _config(method="svd", allocator="loss", sequential=True)
    assert _config(method="svd", allocator="fisher", sequential=True).sequential  # the scores calibrate
