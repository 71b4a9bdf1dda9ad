"""Layer-by-layer compression from disk (lowrank_ops.streaming): the same model as in-memory sequential mode, bit for
bit; one decoder layer in memory at a time; the output opens with load_compressed and from_pretrained; refusals."""

import json

import pytest
import torch
from tiny_models import tiny_llama_gqa, word_tokenizer
from transformers import AutoModelForCausalLM

from lowrank_ops import (
    BaseResidualConfig,
    BasisConfig,
    LowRankConfig,
    SwscConfig,
    compress_,
    load_compressed,
    streaming,
)
from lowrank_ops.assets import tiny_llama
from lowrank_ops.streaming import compress_from_disk, resident_bytes

COMMON = dict(calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu", sequential=True)
CONFIGS = {
    "whiten-loss": LowRankConfig(method="whiten", allocator="loss", param_ratio=0.6, align=4, **COMMON),
    "whiten-fisher": LowRankConfig(method="whiten", allocator="fisher", param_ratio=0.6, align=4, score_tokens=96,
                                   **COMMON),
    "gptq-eora": BaseResidualConfig(base="gptq-int4-g16", rank=8, **COMMON),
    "swsc-columns": SwscConfig(shared="columns", clusters=8, bits=None, rank=4, residual="eora", n_iter=5, **COMMON),
}


def _tokens(n=6):
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_equals_in_memory_sequential(name, tmp_path):
    tiny_llama_gqa().save_pretrained(tmp_path / "source")
    reference = tiny_llama_gqa()
    expected = compress_(reference, CONFIGS[name], _tokens(), progress=False)
    report = compress_from_disk(tmp_path / "source", CONFIGS[name], _tokens(), tmp_path / "out", progress=False)
    assert [row.rank for row in report.layers] == [row.rank for row in expected.layers]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # outside tensors + one shard per decoder layer
    for loaded in (load_compressed(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        a, b = loaded.state_dict(), reference.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_decoder_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    """When a layer is written out, the model holds its outside tensors (embeddings, norm, lm_head) and that one
    compressed decoder layer: the layers before it are back on the meta device and the replaced modules are freed
    (measured at every release)."""
    model = tiny_llama(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                       max_position_embeddings=64)  # fmt: skip
    model.save_pretrained(tmp_path / "source")
    layer_bytes = resident_bytes(model.model.layers[0])
    outside = resident_bytes(model) - sum(resident_bytes(layer) for layer in model.model.layers)
    created = []

    class Spy(streaming.DiskLayers):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(streaming, "DiskLayers", Spy)
    config = LowRankConfig(method="whiten", param_ratio=0.6, align=4, **COMMON)
    compress_from_disk(tmp_path / "source", config, _tokens(), tmp_path / "out", progress=False)
    peak = created[0].peak_resident_bytes
    assert outside < peak <= outside + layer_bytes  # two layers would exceed it, six in memory would be 6x
    assert resident_bytes(model) > outside + 5 * layer_bytes


def test_refusals(tmp_path):
    tiny_llama_gqa().save_pretrained(tmp_path / "source")
    with pytest.raises(ValueError, match="selects on the whole model at once"):
        compress_from_disk(tmp_path / "source", LowRankConfig(method="whiten", allocator="sensitivity", **COMMON),
                           _tokens(), tmp_path / "out")  # fmt: skip
    with pytest.raises(ValueError, match="basis selection folds"):
        compress_from_disk(tmp_path / "source", BasisConfig(**COMMON), _tokens(), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        compress_from_disk(tmp_path, CONFIGS["whiten-loss"], _tokens(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_layer_by_layer(tmp_path, capsys):
    from lowrank_ops.cli import main

    tiny_llama_gqa().save_pretrained(tmp_path / "source")
    word_tokenizer().save_pretrained(tmp_path / "source")
    args = ["compress", "--model", str(tmp_path / "source"), "--method", "whiten", "--param-ratio", "0.6",
            "--align", "4", "--calib-tokens", "128", "--seq-len", "32", "--eval-tokens", "64", "--device", "cpu",
            "--layer-by-layer", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["config"]["sequential"] is True and "layer by layer" in result["variant"]
    assert result["compressed"]["perplexity"] > 1 and "dense" not in result
    assert "layer by layer" in capsys.readouterr().out
