"""PEFT LoRA export of the residual of QuantLowRankLinear / SparseLowRankLinear layers: the file format read back and
recomputed by hand, loaded by `peft` itself onto the base-only dense model (skipped when peft is not installed), and
the CLI path compress --method eora --base 2:4-wanda -> export-lora."""

import copy
import functools
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_gpt2, tiny_llama_gqa, word_tokenizer
from torch import nn

from lowrank_ops.compress import compress_
from lowrank_ops.configs import BaseResidualConfig
from lowrank_ops.modules import QuantLowRankLinear, SparseLowRankLinear
from lowrank_ops.peft_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_unambiguous_paths,
    export_lora_adapter,
    read_lora_adapter,
)
from lowrank_ops.serialization import to_dense
from lowrank_ops.surgery import replace_module

RESIDUAL = (QuantLowRankLinear, SparseLowRankLinear)


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=g)


@functools.cache
def _compressed(maker, base, rank0="re:.*(k_proj|attn\\.c_proj)", rank8="re:.*(v_proj|c_attn)"):
    """A tiny model compressed with `base` + EoRA in three passes (a pass skips layers already replaced): layers
    matching `rank0` without a residual, those matching `rank8` at rank 8, the others at rank 12 -- mixed ranks, all
    below every layer's break-even (16 for the llama's 24 x 48 v_proj). Cached: tests must not modify it (they
    convert deep copies)."""
    model, tokens = maker(), _tokens()
    common = dict(base=base, calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu")
    compress_(model, BaseResidualConfig(rank=0, targets=[rank0], **common), tokens, progress=False)
    compress_(model, BaseResidualConfig(rank=8, targets=[rank8], **common), tokens, progress=False)
    compress_(model, BaseResidualConfig(rank=12, **common), tokens, progress=False)
    return model, tokens


class _ManualLora(nn.Module):
    """base(x) + scaling * B (A x), peft's LoRA forward, written out."""

    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x):
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.a), self.b)


@pytest.mark.parametrize("base", ["int4-g32", "2:4-wanda"])
def test_adapter_files_reproduce_the_compressed_model_on_its_base(tmp_path, base):
    model, tokens = _compressed(tiny_llama_gqa, base)
    out = export_lora_adapter(model, tmp_path / "adapter", base_model_name_or_path="/models/base")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config, factors = read_lora_adapter(out)
    residual = {n: m for n, m in model.named_modules() if isinstance(m, RESIDUAL)}
    exported = [n for n, m in residual.items() if m.rank > 0]
    assert len(exported) == 12 and not any("k_proj" in n for n in exported)  # rank-0 layers are skipped
    assert config["target_modules"] == exported and sorted(factors) == sorted(exported)
    assert (config["peft_type"], config["task_type"], config["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert not config["use_rslora"] and not config["fan_in_fan_out"] and config["lora_dropout"] == 0.0
    assert config["base_model_name_or_path"] == "/models/base"
    assert config["r"] == config["lora_alpha"] == 12  # the most common rank
    assert config["rank_pattern"] == config["alpha_pattern"] == {n: residual[n].rank for n in exported}
    assert sorted(set(config["rank_pattern"].values())) == [8, 12]
    for name in exported:
        a, b = factors[name]
        assert torch.equal(a, residual[name].v.detach()) and torch.equal(b, residual[name].u.detach())
        assert a.shape == (residual[name].rank, residual[name].in_features)  # lora_A (r, in)
        assert b.shape == (residual[name].out_features, residual[name].rank)  # lora_B (out, r)
    # serve by hand: the base-only dense model plus scaling * B A x with peft's scaling lora_alpha / r
    served = to_dense(copy.deepcopy(model), residual=False)
    for name, (a, b) in factors.items():
        scaling = config["alpha_pattern"][name] / config["rank_pattern"][name]
        assert scaling == 1.0
        replace_module(served, name, _ManualLora(served.get_submodule(name), a, b, scaling))
    probe = tokens[:2]
    torch.testing.assert_close(served(probe).logits, model(probe).logits, rtol=1e-5, atol=1e-5)
    # without the adapter the base alone is measurably different: the residual matters
    base_only = to_dense(copy.deepcopy(model), residual=False)
    assert (base_only(probe).logits - model(probe).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("maker", [tiny_llama_gqa, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_peft_loads_the_adapter_with_scaling_one_and_matches_the_compressed_model(tmp_path, maker):
    pytest.importorskip("peft")
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, tokens = _compressed(maker, "int4-g32")
    out = export_lora_adapter(model, tmp_path / "adapter")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] == (maker is tiny_gpt2)  # GPT-2's Conv1D: B A is transposed only when merging
    base = to_dense(copy.deepcopy(model), residual=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message) or "pattern" in str(w.message)]
    lora = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(lora) == sorted(config["target_modules"])
    for name, layer in lora.items():
        assert layer.r["default"] == config["rank_pattern"][name] and layer.scaling["default"] == 1.0
    probe = tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(probe).logits, model(probe).logits, rtol=1e-5, atol=1e-5)


def test_nothing_to_export_and_ambiguous_paths_raise(tmp_path):
    model = tiny_llama_gqa()
    compress_(model, BaseResidualConfig(base="int4-g32", rank=0, device="cpu"), progress=False)
    with pytest.raises(ValueError, match="nothing to export"):
        export_lora_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    check_unambiguous_paths(["model", "model.layers.1.mlp", "model.layers.11.mlp"], ["model.layers.1.mlp"])
    with pytest.raises(ValueError, match="would also match module 'encoder.mlp.fc'"):
        check_unambiguous_paths(["mlp.fc", "encoder.mlp.fc"], ["mlp.fc"])
    with pytest.raises(ValueError, match="would also match module 'h.1xfc'"):  # a regex '.' matches any character
        check_unambiguous_paths(["h.1.fc", "h.1xfc"], ["h.1.fc"])


def test_cli_compresses_with_a_2to4_wanda_base_and_exports_the_adapter_and_its_base(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_ops.cli import main
    from lowrank_ops.serialization import load_compressed

    source = tmp_path / "tiny"
    tiny_llama_gqa().save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    compressed = tmp_path / "compressed"
    args = ["compress", "--model", str(source), "--method", "eora", "--base", "2:4-wanda", "--calib-tokens", "128",
            "--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--no-eval", "--out", str(compressed)]
    with pytest.raises(ValueError, match="rank=64 must satisfy .* break-even"):  # k_proj 24 x 48: break-even 16
        main([*args, "--rank", "64"])
    assert not compressed.exists()
    assert main([*args, "--rank", "12"]) == 0
    assert "2:4-wanda + eora r=12" in capsys.readouterr().out
    model, manifest = load_compressed(compressed, with_manifest=True)
    assert {e["module"] for e in manifest["layers"].values()} == {"SparseLowRankLinear"}
    assert {e["rank"] for e in manifest["layers"].values()} == {12}

    adapter, base_dir = tmp_path / "adapter", tmp_path / "base"
    assert main(["export-lora", str(compressed), "--out", str(adapter), "--base-out", str(base_dir)]) == 0
    text = capsys.readouterr().out
    assert "14 layers (ranks [12], 0 rank-0 layers skipped)" in text and str(base_dir) in text
    config, factors = read_lora_adapter(adapter)
    assert config["base_model_name_or_path"] == os.path.relpath(base_dir)  # portable: relative to the working dir
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert AutoTokenizer.from_pretrained(base_dir).bos_token == "<s>"
    assert isinstance(base.model.layers[0].mlp.up_proj, nn.Linear)
    assert torch.equal(base.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    for name, (a, b) in factors.items():
        replace_module(base, name, _ManualLora(base.get_submodule(name), a, b, 1.0))
    probe = _tokens(2)
    torch.testing.assert_close(base(probe).logits, model(probe).logits, rtol=1e-5, atol=1e-5)


def test_export_lora_records_the_base_relative_to_the_working_directory_and_autopeft_loads_the_pair(
    tmp_path, monkeypatch, capsys
):
    from peft import AutoPeftModelForCausalLM

    from lowrank_ops.cli import main
    from lowrank_ops.serialization import load_compressed, save_compressed

    model = tiny_llama_gqa()
    compress_(model, BaseResidualConfig(base="int4-g32", rank=8, residual="svd", device="cpu"), progress=False)
    save_compressed(model, tmp_path / "runs" / "eora", source="tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["export-lora", "runs/eora", "--out", "runs/adapter", "--base-out", str(tmp_path / "runs/base")]) == 0
    config, _ = read_lora_adapter(tmp_path / "runs" / "adapter")
    assert config["base_model_name_or_path"] == "runs/base"  # an absolute --base-out too: no machine's path
    served = AutoPeftModelForCausalLM.from_pretrained("runs/adapter").eval()
    probe = _tokens(2)
    torch.testing.assert_close(served(probe).logits, load_compressed("runs/eora")(probe).logits, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    assert main(["export-lora", "runs/eora", "--out", "runs/adapter", "--base-out", "runs/base", "--base-model",
                 "me/eora-base"]) == 0  # fmt: skip
    assert read_lora_adapter(tmp_path / "runs" / "adapter")[0]["base_model_name_or_path"] == "me/eora-base"
