"""Application-specific basis selection: scores against float64 definitions, the budget, folding s, re-learning,
new bases from the residual's eigen-directions, the data split, bad input."""

import pytest
import torch
from tiny_models import tiny_llama_gqa

from lowrank_ops import LowRankLinear
from lowrank_ops.algorithms.allocation import layer_cost
from lowrank_ops.algorithms.basis_selection import GradientScores, energy_scores, select_bases
from lowrank_ops.calibration import collect_input_statistics
from lowrank_ops.compress import compress_
from lowrank_ops.compress.factoring import lm_loss
from lowrank_ops.configs import BasisConfig, LowRankConfig, config_from_json
from lowrank_ops.engine import whitened_svd
from lowrank_ops.serialization import load_compressed, save_compressed
from lowrank_ops.surgery import find_targets, linear_weight


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0, period=None):
    """Random windows; with `period`, each window repeats a random motif of that length (learnable structure)."""
    g = torch.Generator().manual_seed(seed)
    if period is None:
        return torch.randint(3, vocab, (n_windows, seq_len), generator=g)
    motifs = torch.randint(3, vocab, (n_windows, period), generator=g)
    return motifs.repeat(1, seq_len // period + 1)[:, :seq_len]


def _config(**kwargs):
    defaults = dict(calib_tokens=6 * 32, seq_len=32, batch_size=3, align=4, device="cpu", score_tokens=4 * 32)
    return BasisConfig(**{**defaults, **kwargs})


def test_energy_scores_match_the_float64_definition_and_dropping_a_set_costs_their_sum():
    torch.manual_seed(0)
    m, n, T = 24, 40, 300
    W = torch.randn(m, n, dtype=torch.float64)
    X = torch.randn(T, n, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    for stats in (None, (X.abs().mean(0)).sqrt(), X.T @ X):  # svd, asvd-style diagonal, whitened bases
        U, V, _ = whitened_svd(W, stats, min(m, n))
        s = torch.rand(min(m, n), dtype=torch.float64) + 0.5
        scores = energy_scores(U, V, X.T @ X, s)
        brute = torch.stack([(s[i] * torch.outer(U[:, i], V[i]) @ X.T).square().sum() for i in range(min(m, n))])
        torch.testing.assert_close(scores, brute, rtol=1e-9, atol=1e-9)
        drop = torch.tensor([1, 5, 6, 20])
        error = (s[drop] * U[:, drop] @ V[drop] @ X.T).square().sum()  # the u_i are orthogonal: no cross terms
        torch.testing.assert_close(error, scores[drop].sum(), rtol=1e-9, atol=1e-9)
    # whitened basis scored on its own Gram: the scores are the squared singular values of W S
    U, V, sigma = whitened_svd(W, X.T @ X, min(m, n))
    torch.testing.assert_close(energy_scores(U, V, X.T @ X), sigma.square(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("relative", [True, False])
def test_selection_hits_the_budget_with_aligned_ranks_and_keeps_the_top_scores(relative):
    shapes = [(48, 48), (24, 48), (24, 48), (80, 48), (48, 80), (17, 33)]
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(min(s), generator=g, dtype=torch.float64) ** 3 for s in shapes]
    total = sum(m * n for m, n in shapes)
    for ratio in (0.5, 0.7, 0.9):
        selection = select_bases(shapes, scores, ratio, align=4, relative=relative)
        cost = sum(layer_cost(m, n, r) for (m, n), r in zip(shapes, selection.ranks))
        assert cost <= ratio * total
        # no further aligned block of any factored layer fits (the greedy stopped at the budget)
        blocks = [4 * (m + n) for (m, n), r in zip(shapes, selection.ranks) if r is not None]
        assert cost + min(blocks) > ratio * total or all(r is None for r in selection.ranks)
        for score, rank, kept in zip(scores, selection.ranks, selection.kept):
            if rank is None:
                assert kept is None
                continue
            assert rank % 4 == 0 and kept.numel() == rank
            assert set(kept.tolist()) == set(torch.topk(score, rank).indices.tolist())


def test_folding_coefficients_is_exact_and_keeps_state_dict_keys_stable():
    torch.manual_seed(0)
    module = LowRankLinear(40, 24, 8, dtype=torch.float64)
    x = torch.randn(5, 40, dtype=torch.float64)
    plain = module(x)
    assert set(module.state_dict()) == {"u", "v", "bias"}
    module.add_coefficients()
    torch.testing.assert_close(module(x), plain, rtol=0, atol=0)  # s = 1 changes nothing
    with torch.no_grad():
        module.s.copy_(torch.randn(8, dtype=torch.float64))
    assert set(module.state_dict()) == {"u", "v", "bias", "s"}
    expected = x @ (module.u @ torch.diag(module.s) @ module.v).T + module.bias
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)
    dense = module.to_linear()
    module.fold_coefficients()
    assert not module.has_coefficients and set(module.state_dict()) == {"u", "v", "bias"}
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.to_linear().weight, dense.weight, rtol=1e-12, atol=1e-12)
    # appending bases grows the rank and adds their product
    u_new, v_new = torch.randn(24, 3, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    before = module.to_linear().weight
    module.append_bases(u_new, v_new)
    assert module.rank == 11 and module.u.shape == (24, 11) and module.v.shape == (11, 40)
    torch.testing.assert_close(module.to_linear().weight, before + u_new @ v_new, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already has coefficients"):
        module.add_coefficients().add_coefficients()
    with pytest.raises(ValueError, match=r"rank=25 must satisfy"):
        module.append_bases(torch.randn(24, 14, dtype=torch.float64), torch.randn(14, 40, dtype=torch.float64))


def test_gradient_scores_match_the_chain_rule_through_the_dense_weight():
    """s_i dL/ds_i = s_i u_i^T (dL/dW) v_i for W = U diag(s) V: compared with the gradient of a dense layer holding
    that W (an independent path through autograd), per window, in float64."""
    model = tiny_llama_gqa().double()
    name = "model.layers.1.mlp.down_proj"
    low = LowRankLinear.from_linear(model.get_submodule(name), rank=16).double().add_coefficients()
    with torch.no_grad():
        low.s.uniform_(0.5, 1.5)
    dense = torch.nn.Linear(low.in_features, low.out_features, bias=False, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(low.u @ torch.diag(low.s) @ low.v)
    windows, scores, per_window = _tokens(3), GradientScores(16), []
    for window in windows.split(1):
        model.model.layers[1].mlp.down_proj = low
        (grad,) = torch.autograd.grad(lm_loss(model, window), [low.s])
        scores.update(low.s, grad)
        model.model.layers[1].mlp.down_proj = dense
        (grad_w,) = torch.autograd.grad(lm_loss(model, window), [dense.weight])
        per_window.append(low.s.detach() * ((low.u.detach().T @ grad_w) * low.v.detach()).sum(1))
    per_window = torch.stack(per_window)
    assert per_window.abs().max() > 0
    torch.testing.assert_close(scores.taylor(), per_window.mean(0).abs(), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(scores.fisher(), per_window.square().mean(0), rtol=1e-6, atol=1e-16)


def test_energy_selection_on_the_whitened_basis_equals_whitening_with_the_loss_allocator():
    """With the target Gram as both whitening and score, selection by energy IS truncation and the allocation is the
    loss allocator's: two pipelines, one answer."""
    tokens = _tokens()
    a, b = tiny_llama_gqa(), tiny_llama_gqa()
    report = compress_(a, _config(param_ratio=0.6, score="energy"), tokens, progress=False)
    whiten = LowRankConfig(method="whiten", allocator="loss", param_ratio=0.6, calib_tokens=6 * 32, seq_len=32,
                           batch_size=3, align=4, device="cpu")  # fmt: skip
    reference = compress_(b, whiten, tokens, progress=False)
    assert [layer.rank for layer in report.layers] == [layer.rank for layer in reference.layers]
    assert report.param_ratio == pytest.approx(reference.param_ratio) and report.param_ratio <= 0.6
    for layer in report.layers:
        assert layer.kept_beyond_leading == 0
        if layer.rank is not None:
            ours, theirs = a.get_submodule(layer.name), b.get_submodule(layer.name)
            torch.testing.assert_close(ours.to_linear().weight, theirs.to_linear().weight, rtol=1e-4, atol=1e-5)


def test_new_bases_start_from_the_leading_eigen_directions_of_the_target_residual():
    tokens = _tokens()
    model, reference = tiny_llama_gqa(), tiny_llama_gqa()
    report = compress_(model, _config(param_ratio=0.7, score="fisher", new_rank=4), tokens, progress=False)
    names = list(find_targets(reference))
    stats = collect_input_statistics(reference, names, tokens, gram=True, progress=False)
    checked = 0
    for layer in report.layers:
        if layer.rank is None or layer.new_bases == 0:
            continue
        module, k, r = model.get_submodule(layer.name), layer.new_bases, layer.kept_bases
        W = linear_weight(reference.get_submodule(layer.name)).detach().double()
        W_kept = (module.u[:, :r] @ module.v[:r]).detach().double()
        dW = W - W_kept
        # EoRA optimum: the best rank-k correction of dW in the target norm ||(.) X^T||, i.e. whitened SVD of dW
        U, V, _ = whitened_svd(dW, stats[layer.name].gram.double(), k, gram_method="eigh")
        torch.testing.assert_close((module.u[:, r:] @ module.v[r:]).double(), U @ V, rtol=1e-3, atol=1e-5)
        G = stats[layer.name].gram.double()
        corrected = dW - (module.u[:, r:] @ module.v[r:]).double()
        assert torch.trace(corrected @ G @ corrected.T) < torch.trace(dW @ G @ dW.T)
        assert layer.kept_params == (r + k) * (layer.out_features + layer.in_features)
        checked += 1
    assert checked > 0
    assert report.param_ratio <= 0.7


def test_relearning_lowers_the_heldout_loss_is_deterministic_and_saves_plain_modules(tmp_path):
    calibration, train, heldout = (_tokens(count, seed=seed, period=5) for count, seed in ((6, 0), (8, 1), (3, 2)))
    config = _config(param_ratio=0.5, score="taylor", new_rank=4, train_steps=6, eval_every=2, lr=0.05, patience=3)
    models, reports = [], []
    for _ in range(2):
        model = tiny_llama_gqa()
        reports.append(compress_(model, config, calibration, train=train, heldout=heldout, progress=False))
        models.append(model)
    history = reports[0].training
    assert history["best_heldout_loss"] < history["initial_heldout_loss"]
    assert history == reports[1].training
    for name, module in models[0].named_modules():
        if isinstance(module, LowRankLinear):
            assert not module.has_coefficients
            torch.testing.assert_close(module.u, models[1].get_submodule(name).u, rtol=0, atol=0)
    final = sum(lm_loss(models[0], w[None]).item() for w in heldout) / len(heldout)
    assert final == pytest.approx(history["best_heldout_loss"], rel=1e-4)  # the best state was restored and folded
    save_compressed(models[0], tmp_path / "m", config=config)
    loaded, manifest = load_compressed(tmp_path / "m", with_manifest=True)
    assert manifest["config"]["kind"] == "basis" and config_from_json(config.to_json()) == config
    torch.testing.assert_close(loaded(heldout).logits, models[0](heldout).logits, rtol=0, atol=0)


def test_bad_inputs_raise_with_the_rule():
    for bad, message in [
        (dict(param_ratio=0.0), "param_ratio=0.0 must be in (0, 1]"),
        (dict(param_ratio=1.2), "param_ratio=1.2 must be in (0, 1]"),
        (dict(train_steps=-1), "train_steps=-1 must be an int >= 0"),
        (dict(new_rank=-2), "new_rank=-2 must be an int >= 0"),
        (dict(score="random"), "score='random' must be one of"),
        (dict(basis="qr"), "basis='qr' must be one of"),
        (dict(lr=0.0), "lr=0.0 must be a number > 0"),
    ]:
        with pytest.raises(ValueError) as info:
            _config(**bad)
        assert message in str(info.value)
    model = tiny_llama_gqa()
    with pytest.raises(ValueError, match="needs calibration token ids"):
        compress_(model, _config(), None, progress=False)
    with pytest.raises(ValueError, match="pass train=... and heldout="):
        compress_(model, _config(train_steps=2), _tokens(), progress=False)
    with pytest.raises(ValueError, match="used by BasisConfig only"):
        compress_(model, LowRankConfig(method="svd", device="cpu"), None, train=_tokens(), progress=False)
    with pytest.raises(ValueError, match="leaves nothing"):
        compress_(model, _config(param_ratio=0.1, new_rank=40), _tokens(), progress=False)
    assert all(not isinstance(m, LowRankLinear) for m in model.modules())  # nothing was swapped


class _CharTokenizer:
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % 100 for c in text]}


def test_target_data_splits_are_disjoint_deterministic_and_short_data_is_rejected(tmp_path):
    from lowrank_ops.data import python_stdlib_split
    from lowrank_ops.pipeline import target_windows

    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "x.py").write_text("skipped = True\n")
    for i in range(40):
        (root / ("pkg" if i % 2 else ".") / f"m{i}.py").write_text(f"value_{i} = {i}\n" * 20)
    names = ("calibration", "train", "heldout", "test")
    splits = {s: [f["path"] for f in python_stdlib_split(s, root=root)] for s in names}
    every = [p for paths in splits.values() for p in paths]
    assert len(every) == len(set(every)) == 40 and not any("site-packages" in p for p in every)
    assert [len(v) for v in splits.values()] == [20, 8, 4, 8]
    assert splits["test"] == [f["path"] for f in python_stdlib_split("test", root=root)]
    assert splits["test"] != [f["path"] for f in python_stdlib_split("test", seed=1, root=root)]
    with pytest.raises(ValueError, match="split='dev' must be one of"):
        python_stdlib_split("dev", root=root)

    tokenizer, budgets = _CharTokenizer(), {"calibration": 640, "train": 320, "heldout": 64, "test": 320}
    text = tmp_path / "app.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 60)
    windows = target_windows(tokenizer, [str(text)], 32, budgets)
    assert {k: tuple(v.shape) for k, v in windows.items()} == {
        "calibration": (20, 32), "train": (10, 32), "heldout": (2, 32), "test": (10, 32)}  # fmt: skip
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 10)
    with pytest.raises(ValueError, match="too short"):
        target_windows(tokenizer, [str(short)], 32, budgets)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        target_windows(tokenizer, [str(tmp_path / "missing.py")], 32, budgets)


def test_cli_basis_arguments():
    from lowrank_ops.cli import build_parser, main

    args = build_parser().parse_args(["compress", "--method", "basis", "--target-data", "a.py", "b.py",
                                      "--param-ratio", "0.6", "--train-steps", "10", "--new-rank", "16"])  # fmt: skip
    assert (args.method, args.target_data, args.param_ratio, args.train_steps, args.new_rank) == (
        "basis", ["a.py", "b.py"], 0.6, 10, 16)  # fmt: skip
    with pytest.raises(ValueError, match="train_steps=-3"):
        main(["compress", "--method", "basis", "--train-steps", "-3", "--no-eval"])
    with pytest.raises(ValueError, match=r"--method svd ignores --target-data \(basis\)"):
        main(["compress", "--method", "svd", "--target-data", "a.py", "--no-eval"])
