"""Fisher scores with one decoder layer in memory at a time (lowrank_ops.compress.sequential_scores) are the one-shot
whole-model scores up to rounding, on models whose layers return tensors (Llama) and tuples (GPT-2, Conv1D)."""

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama_gqa

import lowrank_ops.compress.factoring as factoring
import lowrank_ops.compress.sequential_scores as sequential_scores
from lowrank_ops import LowRankConfig, compress_

COMMON = dict(allocator="fisher", param_ratio=0.6, align=4, calib_tokens=6 * 32, seq_len=32,
              batch_size=3, score_tokens=96, device="cpu")  # fmt: skip


def _scores_given_to_selection(module, monkeypatch, model, config) -> tuple[list[torch.Tensor], list]:
    captured = []

    def spy(shapes, scores, *args, **kwargs):
        captured.extend(score.clone() for score in scores)
        return select(shapes, scores, *args, **kwargs)

    select = module.select_bases
    monkeypatch.setattr(module, "select_bases", spy)
    tokens = torch.randint(0, 100, (6, 32), generator=torch.Generator().manual_seed(0))
    report = compress_(model, config, tokens, progress=False)
    monkeypatch.undo()
    return captured, [row.rank for row in report.layers]


# The engine factors in float32, so the one-shot model, every target swapped for its full-rank factors, differs from
# the dense one by float32 rounding (about 1e-7 relative); its scores move by up to 2.3e-5 relative (measured, svd and
# whiten alike). The layer-by-layer computation keeps every other layer dense.
@pytest.mark.parametrize("method", ["svd", "whiten"])
@pytest.mark.parametrize("build", [tiny_llama_gqa, tiny_gpt2])
def test_layer_by_layer_scores_are_the_whole_model_scores(build, method, monkeypatch):
    one_shot, one_shot_ranks = _scores_given_to_selection(factoring, monkeypatch, build().double(),
                                                          LowRankConfig(method=method, **COMMON))  # fmt: skip
    layered, layered_ranks = _scores_given_to_selection(sequential_scores, monkeypatch, build().double(),
                                                        LowRankConfig(method=method, sequential=True, **COMMON))
    assert len(layered) == len(one_shot) > 0
    for expected, got in zip(one_shot, layered, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7 * float(expected.abs().max()))
    assert layered_ranks == one_shot_ranks


def test_a_wrong_gradient_is_caught(monkeypatch):
    """The comparison above can fail: dropping the tail's gradient scale (a loss summed instead of averaged over
    tokens) changes every score."""
    loss = factoring.lm_loss
    one_shot, _ = _scores_given_to_selection(factoring, monkeypatch, tiny_llama_gqa().double(),
                                             LowRankConfig(method="svd", **COMMON))  # fmt: skip
    monkeypatch.setattr(sequential_scores, "lm_loss", lambda model, ids: loss(model, ids) * ids.shape[1])
    layered, _ = _scores_given_to_selection(sequential_scores, monkeypatch, tiny_llama_gqa().double(),
                                            LowRankConfig(method="svd", sequential=True, **COMMON))  # fmt: skip
    assert not torch.allclose(layered[0], one_shot[0], rtol=1e-4)
