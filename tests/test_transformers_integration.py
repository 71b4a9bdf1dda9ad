"""`import lowrank_ops; AutoModelForCausalLM.from_pretrained(dir)` opens a saved compressed model exactly as
`load_compressed` does; `save_pretrained` round-trips; forgetting the import is as loud as transformers allows."""

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama_gqa
from transformers import AutoModelForCausalLM

from lowrank_ops import (
    BaseResidualConfig,
    LowRankConfig,
    SwscConfig,
    compress_,
    load_compressed,
    save_compressed,
    to_dense,
)
from lowrank_ops.assets import tiny_llama
from lowrank_ops.integrations.transformers import QUANT_METHOD, REGISTERED
from lowrank_ops.modules import CompressedLinear

COMMON = dict(calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu")
CONFIGS = {
    "lowrank-whiten-fisher": LowRankConfig(method="whiten", allocator="fisher", param_ratio=0.6, align=4,
                                           score_tokens=64, **COMMON),
    "int4-eora": BaseResidualConfig(base="int4-g16", rank=8, **COMMON),
    "2:4-wanda-svd": BaseResidualConfig(base="2:4-wanda", rank=8, residual="svd", **COMMON),
    "swsc-columns": SwscConfig(shared="columns", clusters=8, bits=None, rank=4, residual="eora", n_iter=5, **COMMON),
}  # fmt: skip


def _tokens(n=6, seed=0):
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert REGISTERED and QUANT_METHOD in AUTO_QUANTIZER_MAPPING and QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_pretrained_equals_load_compressed_and_save_pretrained_round_trips(name, tmp_path):
    tokens = _tokens()
    model = tiny_llama_gqa()
    compress_(model, CONFIGS[name], tokens, progress=False)
    out = save_compressed(model, tmp_path / "saved", config=CONFIGS[name], source="tiny")
    quantization_config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization_config["quant_method"] == "lowrank_ops" and quantization_config["format_version"] == 1
    assert quantization_config["config"]["kind"] == CONFIGS[name].kind
    compressed = {n for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(quantization_config["modules"]) == compressed

    checked = load_compressed(out)
    opened = AutoModelForCausalLM.from_pretrained(out)
    _same_tensors(checked, opened)
    assert all(type(opened.get_submodule(n)) is type(m) for n, m in checked.named_modules())
    assert torch.equal(opened(tokens[:2]).logits, checked(tokens[:2]).logits)

    opened.save_pretrained(tmp_path / "resaved")
    _same_tensors(opened, AutoModelForCausalLM.from_pretrained(tmp_path / "resaved"))
    # a model compressed in this process saves with transformers' own save_pretrained too
    model.save_pretrained(tmp_path / "direct")
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "direct")
    assert torch.equal(direct(tokens[:2]).logits, model(tokens[:2]).logits)
    # back to dense: nothing claims compressed layers any more, and it saves as a plain model
    to_dense(opened)
    assert getattr(opened.config, "quantization_config", None) is None and not opened.is_quantized
    opened.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_bf16_with_tied_embeddings_and_gpt2_conv1d(tmp_path):
    tokens = _tokens()
    model = tiny_llama(vocab_size=128, hidden_size=48, intermediate_size=80, max_position_embeddings=64,
                       tie_word_embeddings=True)  # fmt: skip
    compress_(model, LowRankConfig(method="whiten", param_ratio=0.6, align=4, **COMMON), tokens, progress=False)
    out = save_compressed(model.to(torch.bfloat16), tmp_path / "bf16")
    opened = AutoModelForCausalLM.from_pretrained(out)
    _same_tensors(load_compressed(out), opened)
    assert opened.lm_head.weight is opened.model.embed_tokens.weight
    assert opened.model.layers[0].mlp.up_proj.u.dtype == torch.bfloat16

    gpt2 = tiny_gpt2()
    compress_(gpt2, LowRankConfig(method="svd", param_ratio=0.7, align=4, device="cpu"), progress=False)
    out = save_compressed(gpt2, tmp_path / "gpt2")
    opened = AutoModelForCausalLM.from_pretrained(out)  # GPT-2's init rescales c_proj.weight: must be skipped
    assert torch.equal(opened(tokens[:2]).logits, gpt2(tokens[:2]).logits)


def test_a_broken_pattern_is_caught_on_from_pretrained(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama_gqa()
    compress_(model, BaseResidualConfig(base="2:4-magnitude", rank=4, residual="svd", device="cpu"), progress=False)
    out = save_compressed(model, tmp_path / "sparse")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.randn_like(tensors["model.layers.0.mlp.up_proj.weight"])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layer model.layers.0.mlp.up_proj"):
        AutoModelForCausalLM.from_pretrained(out)


def test_without_import_lowrank_ops_transformers_warns_and_the_layers_are_dense_and_random(tmp_path):
    """What a user who forgot `import lowrank_ops` sees: transformers' warning naming the method and a load report
    listing the compressed layers' weights as MISSING; the model is dense and wrong. Run in a fresh interpreter (the
    registration is process-wide)."""
    model = tiny_llama_gqa()
    compress_(model, LowRankConfig(method="svd", param_ratio=0.6, align=4, device="cpu"), progress=False)
    out = save_compressed(model, tmp_path / "saved")
    script = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
              "assert 'lowrank_ops' not in sys.modules\n"
              "print(type(m.model.layers[0].mlp.up_proj).__name__)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "Linear"
    assert "Unknown quantization type, got lowrank_ops" in done.stderr
    assert "MISSING" in done.stderr and "mlp.up_proj.weight" in done.stderr
