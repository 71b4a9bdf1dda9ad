"""Model surgery on tiny models built from transformers configs (no downloads): Llama (GQA), GPT-2 (Conv1D), OPT."""

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama_gqa, tiny_opt
from torch import nn

from lowrank_ops.surgery import (
    as_linear,
    embedding_parameter_count,
    find_targets,
    is_conv1d,
    linear_weight,
    replace_module,
)


def test_llama_defaults_find_every_projection_with_gqa_shapes_and_skip_lm_head():
    targets = find_targets(tiny_llama_gqa())
    assert len(targets) == 2 * 7
    assert not any("lm_head" in name or "embed" in name for name in targets)
    k_proj = targets["model.layers.0.self_attn.k_proj"]
    assert tuple(linear_weight(k_proj).shape) == (24, 48)  # 2 kv heads x 12 head dim: narrower than q


def test_gpt2_conv1d_weight_is_seen_transposed():
    model = tiny_gpt2()
    targets = find_targets(model)
    assert set(n.rsplit(".", 1)[1] for n in targets) == {"c_attn", "c_proj", "c_fc"} and len(targets) == 8
    c_fc = targets["transformer.h.0.mlp.c_fc"]
    assert is_conv1d(c_fc) and tuple(linear_weight(c_fc).shape) == (128, 32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(as_linear(c_fc)(x), c_fc(x))


def test_opt_defaults():
    names = find_targets(tiny_opt())
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_patterns_by_class_name_qualified_name_and_regex_with_ignore():
    model = tiny_llama_gqa()
    assert "lm_head" in find_targets(model, ["Linear"], ignore=[])
    assert list(find_targets(model, ["model.layers.1.mlp.up_proj"])) == ["model.layers.1.mlp.up_proj"]
    mlp = find_targets(model, [r"re:.*\.mlp\..*"], ignore=[r"re:.*down_proj"])
    assert len(mlp) == 4 and all("down" not in n for n in mlp)


def test_generic_fallback_for_unknown_family():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10)

    assert list(find_targets(Tiny())) == ["proj"]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["re:.*nonexistent.*"], "match no Linear/Conv1D layer of LlamaForCausalLM; its Linear layers include"),
        (["re:("], "is not a valid regex"),
        ([""], "must be a non-empty string"),
    ],
)
def test_bad_patterns(targets, message):
    with pytest.raises(ValueError, match="find_targets: ") as info:
        find_targets(tiny_llama_gqa(), targets)
    assert message in str(info.value)


def test_replace_module_and_embedding_count():
    model = tiny_llama_gqa()
    old = replace_module(model, "model.layers.0.mlp.up_proj", nn.Identity())
    assert isinstance(old, nn.Linear) and isinstance(model.model.layers[0].mlp.up_proj, nn.Identity)
    vocab, hidden = 128, 48
    tied = model.config.tie_word_embeddings
    assert embedding_parameter_count(model) == vocab * hidden * (1 if tied else 2)
