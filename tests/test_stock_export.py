"""The quantized base written for stock engines (`export-lora --base-format compressed-tensors`,
`lowrank_ops.compressed_tensors_format`): the packed tensors decoded by a float64 reference of compressed-tensors'
documented pack-quantized math, written here from the format description and not from the exporter; refusals; and
stock transformers loading the exported directory through the `compressed-tensors` package (skipped without it),
alone and with the PEFT adapter, against the package's own model. vLLM: tests/test_vllm_stock.py."""

import json
import math

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama_gqa

from lowrank_ops.compress import compress_
from lowrank_ops.compressed_tensors_format import export_group_size, quantization_config, to_compressed_tensors
from lowrank_ops.configs import BaseResidualConfig, LowRankConfig
from lowrank_ops.modules import QuantLowRankLinear
from lowrank_ops.peft_export import export_saved_model
from lowrank_ops.quant_format import dequantize_packed, pack
from lowrank_ops.serialization import load_compressed, save_compressed, to_dense


def _reference_w(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """compressed-tensors pack-quantized, decoded in float64: value k of a row sits at bits (k % (32 / b)) * b of word
    k // (32 / b) as an unsigned field holding q + 2^(b-1); zero points likewise along the output dim; W = (q - z) s."""
    m, n = tensors["weight_shape"].tolist()
    per_word, mask, offset = 32 // bits, (1 << bits) - 1, 1 << (bits - 1)

    def fields(words: torch.Tensor, count: int) -> torch.Tensor:  # unpack along dim 1
        unsigned = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.empty(words.shape[0], count, dtype=torch.int64)
        for k in range(count):
            out[:, k] = (unsigned[:, k // per_word] >> (bits * (k % per_word))) & mask
        return out

    q = fields(tensors["weight_packed"], n) - offset
    z = fields(tensors["weight_zero_point"].t(), m).t() - offset
    assert tensors["weight_scale"].shape == (m, n // group_size)
    column_group = torch.arange(n) // group_size
    return (q - z[:, column_group]).double() * tensors["weight_scale"].double()[:, column_group]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, group_size", [(37, 72, 32), (9, 45, 16), (33, 256, 64), (1, 7, 8)])
def test_packed_weights_decode_to_the_package_w_hat_bit_for_bit(bits, dtype, m, n, group_size):
    """Odd m, n not a multiple of the group (exported with gcd(n, g): 8, 1, 64, 1), every code and zero point value;
    the float64 decode equals W_hat in float64, and decoded in the scales' dtype (compressed-tensors' own arithmetic:
    q - z, then one rounding of the product) equals the package's W_hat in that dtype."""
    g = torch.Generator().manual_seed(m * 1000 + n + bits)
    top = 2**bits - 1
    groups = -(-n // group_size)
    codes = torch.randint(0, top + 1, (m, n), generator=g)
    codes.view(-1)[: top + 1] = torch.arange(top + 1)[: codes.numel()]  # every code value occurs
    zeros = torch.randint(0, top + 1, (m, groups), generator=g).float()
    zeros.view(-1)[:2] = torch.tensor([0.0, float(top)])[: zeros.numel()]
    scales = torch.rand(m, groups, generator=g) * 0.02 + 1e-3
    packed = pack(codes, scales, zeros, bits, group_size, dtype)
    tensors = to_compressed_tensors(packed)
    exported_group = export_group_size(n, group_size)
    assert exported_group == (group_size if n % group_size == 0 else math.gcd(n, group_size))
    assert tensors["weight_packed"].dtype == tensors["weight_zero_point"].dtype == torch.int32
    assert tensors["weight_packed"].shape == (m, -(-n * bits // 32))
    assert tensors["weight_zero_point"].shape == (-(-m * bits // 32), n // exported_group)
    assert tensors["weight_scale"].dtype == dtype
    w64 = _reference_w(tensors, bits, exported_group)
    assert torch.equal(w64, dequantize_packed(packed, torch.float64))
    q_minus_z = w64 / tensors["weight_scale"].double()[:, torch.arange(n) // exported_group]
    in_dtype = q_minus_z.to(dtype) * tensors["weight_scale"][:, torch.arange(n) // exported_group]
    assert torch.equal(in_dtype, dequantize_packed(packed))
    if bits == 4:  # the 4-bit pack-quantized words are layout v1's words
        assert torch.equal(tensors["weight_packed"], packed.qweight)


def test_quantization_config_lists_each_scheme_with_its_layers():
    config = quantization_config({(4, 16): ["a.q", "a.k"], (2, 32): ["b.up"]})
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["ignore"] == []
    groups = list(config["config_groups"].values())
    assert [g["targets"] for g in groups] == [["b.up"], ["a.q", "a.k"]]
    weights = groups[1]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"],
            weights["type"]) == (4, 16, "group", False, "int")  # fmt: skip
    assert groups[1]["input_activations"] is None and groups[1]["format"] == "pack-quantized"


def _tokens(n_windows=4, seq_len=32, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=g)


def _saved(tmp_path, maker, config, name="model"):
    model = maker()
    compress_(model, config, _tokens(), progress=False)
    save_compressed(model, tmp_path / name)
    return tmp_path / name


COMMON = dict(calib_tokens=4 * 32, seq_len=32, batch_size=2, device="cpu")


def test_refusals_are_one_line_and_write_nothing(tmp_path):
    cases = {
        "int3": (tiny_llama_gqa, BaseResidualConfig(base="int3-g16", rank=4, **COMMON), "3-bit base"),
        "sparse": (tiny_llama_gqa, BaseResidualConfig(base="2:4-magnitude", rank=4, **COMMON),
                   "is a SparseLowRankLinear"),
        "conv1d": (tiny_gpt2, BaseResidualConfig(base="int4-g16", rank=4, **COMMON), "replaced a Conv1D"),
        "lowrank": (tiny_llama_gqa, LowRankConfig(method="svd", param_ratio=0.5, align=1, **COMMON),
                    "is a LowRankLinear"),
    }  # fmt: skip
    for name, (maker, config, message) in cases.items():
        saved = _saved(tmp_path, maker, config, name)
        with pytest.raises(ValueError, match=message) as info:
            export_saved_model(saved, tmp_path / f"{name}-ad", base_out=tmp_path / f"{name}-base",
                               base_format="compressed-tensors")  # fmt: skip
        assert "\n" not in str(info.value)
        assert not (tmp_path / f"{name}-ad").exists() and not (tmp_path / f"{name}-base").exists()
    with pytest.raises(ValueError, match="give --base-out"):
        export_saved_model(tmp_path / "int3", tmp_path / "x", base_format="compressed-tensors")
    with pytest.raises(ValueError, match="base_format='gptq' must be one of"):
        export_saved_model(tmp_path / "int3", tmp_path / "x", base_out=tmp_path / "y", base_format="gptq")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny_llama_gqa (n = 48 and 80, neither a multiple of 32) with an int4-g32 + EoRA rank-8 base, saved, exported:
    (source directory, adapter, base)."""
    root = tmp_path_factory.mktemp("stock")
    saved = _saved(root, tiny_llama_gqa, BaseResidualConfig(base="int4-g32", rank=8, **COMMON))
    summary = export_saved_model(saved, root / "adapter", base_out=root / "base", base_format="compressed-tensors")
    assert summary["base_format"] == "compressed-tensors" and summary["base_groups"] == [(4, 16)]
    return saved, root / "adapter", root / "base"


def test_exported_directory_holds_packed_tensors_and_config(exported):
    from safetensors.torch import load_file

    saved, _, base = exported
    config = json.loads((base / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    model = load_compressed(saved)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLowRankLinear)}
    (group,) = config["config_groups"].values()
    assert group["targets"] == list(layers) and group["weights"]["group_size"] == 16
    tensors = load_file(base / "model.safetensors")
    for name, module in layers.items():
        assert f"{name}.weight" not in tensors and f"{name}.u" not in tensors
        own = {key: tensors[f"{name}.{key}"] for key in ("weight_packed", "weight_scale", "weight_zero_point",
                                                         "weight_shape")}  # fmt: skip
        assert torch.equal(_reference_w(own, 4, 16), module.dequantized_weight(torch.float64))
    assert json.loads((base / "lowrank_ops_base.json").read_text())["format"] == "compressed-tensors"


@pytest.mark.parametrize("dequantize", [False, True])
def test_stock_transformers_loads_the_base_and_peft_the_adapter(exported, dequantize):
    """transformers + compressed-tensors (no lowrank_ops module in the loaded model): every weight equals W_hat bit for
    bit, so the base's logits equal the package's base-only model exactly (same weights, same dense layers); with
    the adapter (PEFT on the dequantized load, `dequantize=True`) the logits match the compressed model within
    rtol = atol = 1e-5 (float32, logits of size ~1: W_hat x + U (V x) is summed in another order by the package's
    op than by PEFT's separate products; test_peft_export holds the dense base to the same bound)."""
    pytest.importorskip("compressed_tensors", reason="transformers loads compressed-tensors checkpoints with it")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    saved, adapter, base = exported
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    stock = AutoModelForCausalLM.from_pretrained(base, **kwargs).eval()
    if not dequantize:  # a dequantized load is a plain model and drops the quantization_config
        assert stock.config.quantization_config.quant_method == "compressed-tensors"
    assert not any(type(m).__module__.startswith("lowrank_ops") for m in stock.modules())
    probe = _tokens(2, 16, seed=3)
    with torch.no_grad():
        stock_logits = stock(probe).logits  # the compressed route decompresses on the first forward
    reference = load_compressed(saved)
    layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLowRankLinear)}
    for name, module in layers.items():
        assert torch.equal(stock.get_submodule(name).weight, module.dequantized_weight())
    with torch.no_grad():
        assert torch.equal(stock_logits, to_dense(load_compressed(saved), residual=False)(probe).logits)
    if dequantize:
        from peft import PeftModel

        served = PeftModel.from_pretrained(stock, adapter).eval()
        with torch.no_grad():
            torch.testing.assert_close(served(probe).logits, reference(probe).logits, rtol=1e-5, atol=1e-5)


def test_cli_export_lora_writes_the_compressed_tensors_base(exported, tmp_path, capsys):
    from lowrank_ops.cli import main

    saved, _, _ = exported
    assert main(["export-lora", str(saved), "--out", str(tmp_path / "ad"), "--base-out", str(tmp_path / "base"),
                 "--base-format", "compressed-tensors"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "compressed-tensors pack-quantized (int4 group 16)" in printed
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    # written again over its own output (the marker file makes it a lowrank-ops output)
    assert main(["export-lora", str(saved), "--out", str(tmp_path / "ad"), "--base-out", str(tmp_path / "base"),
                 "--base-format", "compressed-tensors"]) == 0  # fmt: skip


@pytest.mark.parametrize("base", ["int2-g16", "int8-g32"])
def test_stock_transformers_loads_2_and_8_bit_bases_exactly(tmp_path, base):
    """The other bit widths the format holds (vLLM's CPU kernel runs only 4-bit ones): every weight W_hat exactly."""
    pytest.importorskip("compressed_tensors", reason="transformers loads compressed-tensors checkpoints with it")
    from transformers import AutoModelForCausalLM

    saved = _saved(tmp_path, tiny_llama_gqa, BaseResidualConfig(base=base, rank=4, **COMMON))
    export_saved_model(saved, tmp_path / "ad", base_out=tmp_path / "base", base_format="compressed-tensors")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        stock(_tokens(1, 8))  # the packed route decompresses on the first forward
    layers = {n: m for n, m in load_compressed(saved).named_modules() if isinstance(m, QuantLowRankLinear)}
    assert layers and all(torch.equal(stock.get_submodule(n).weight, m.dequantized_weight()) for n, m in layers.items())
