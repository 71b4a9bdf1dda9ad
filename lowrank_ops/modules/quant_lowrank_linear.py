"""QuantLowRankLinear: a drop-in nn.Linear whose weight is a packed group-wise quantized base plus a low-rank residual.

Forward: y = dequant(W_hat) x + U (V x) + b through `torch.ops.lowrank_ops.quant_lowrank_matmul` (fused Triton
kernels on GPU, torch elsewhere). W_hat is frozen (buffers); the residual factors and the bias are parameters.

state_dict keys (stable; checkpoints rely on them), layout of `lowrank_ops.quant_format` (LAYOUT_VERSION 1):
    qweight  int32 (out_features, ceil(in_features / 8)) for bits 3 / 4, uint8 (out_features, in_features) for 8
    scales   (out_features, ceil(in_features / group_size))   the activation dtype of the layer
    zeros    (out_features, ceil(in_features / group_size))   same dtype as scales (integers in [0, 2^bits - 1])
    v        (rank, in_features)    the residual's shrink factor (only when rank > 0)
    u        (out_features, rank)   the residual's expand factor (only when rank > 0)
    bias     (out_features,)        only when bias=True

The stored scales and zeros DEFINE W_hat: casting the module to another dtype (`module.to(torch.bfloat16)`) rounds
the scales and so changes W_hat slightly; a residual fitted against the old W_hat then no longer matches exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_ops.modules._base_residual import (
    check_residual_parts,
    check_residual_rank,
    copy_residual_parts,
    dense_linear,
)
from lowrank_ops.modules.compressed import CompressedLinear, entry_choice, entry_int
from lowrank_ops.ops.quant_lowrank_matmul import quant_lowrank_matmul
from lowrank_ops.quant_format import (
    LAYOUT_VERSION,
    SUPPORTED_BITS,
    PackedQuantWeight,
    check_format_args,
    check_packed,
    dequantize,
    num_groups,
    packed_width,
    qweight_dtype,
    unpack_qweight,
)


class QuantLowRankLinear(CompressedLinear):
    """y = dequant(W_hat) x + U (V x) + b with a packed (bits, group_size) base and an optional rank-r residual.

    Args mirror nn.Linear plus bits (2, 3, 4 or 8), group_size (>= 1, a multiple of 8 for bits <= 4) and rank
    (0 <= rank < the break-even rank m n / (m + n); 0 = base only). `dtype` is the activation dtype: scales, zeros,
    v, u and bias are stored in it. A fresh module is a placeholder with W_hat = 0 and a zero residual
    (u = 0, v uniform as nn.Linear's weight, the LoRA convention); fill it with `from_packed` or `load_state_dict`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        rank: int = 0,
        bias: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        where = "QuantLowRankLinear"
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name}={value!r} must be an int >= 1")
        check_format_args(where, bits, group_size)
        check_residual_rank(rank, in_features, out_features, where)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rank = bits, group_size, rank
        factory = {"dtype": dtype, "device": device}
        groups = num_groups(in_features, group_size)
        self.register_buffer(
            "qweight",
            torch.zeros(out_features, packed_width(in_features, bits), dtype=qweight_dtype(bits), device=device),
        )
        self.register_buffer("scales", torch.ones(out_features, groups, **factory))
        self.register_buffer("zeros", torch.zeros(out_features, groups, **factory))
        if rank > 0:
            self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.u = nn.Parameter(torch.zeros(out_features, rank, **factory))
        else:
            self.v = self.u = None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if rank > 0:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.v, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_lowrank_matmul(
            x, self.qweight, self.scales, self.zeros, self.v, self.u, self.bias, self.bits, self.group_size
        )

    # ------------------------------------------------------------------------------------------------------------

    @property
    def packed(self) -> PackedQuantWeight:
        """The base as a PackedQuantWeight (sharing the buffers, no copy)."""
        return PackedQuantWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                 (self.out_features, self.in_features), LAYOUT_VERSION)  # fmt: skip

    @property
    def storage_bytes(self) -> int:
        """Bytes of the stored weight: packed codes + scales + zeros + residual factors (bias excluded)."""
        tensors = [self.qweight, self.scales, self.zeros] + ([self.u, self.v] if self.rank else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bits_per_weight(self) -> float:
        """8 * storage_bytes / (out_features * in_features): codes as stored (2- and 3-bit codes occupy 4-bit slots in
        layout v1), scales, zeros and the residual factors, per entry of the dense weight."""
        return 8.0 * self.storage_bytes / (self.out_features * self.in_features)

    def bits_per_weight_at(self, value_bits: int) -> float:
        """bits_per_weight with the float tensors (scales, zeros, factors) counted at `value_bits` each."""
        floats = [self.scales, self.zeros] + ([self.u, self.v] if self.rank else [])
        bits = 8 * self.qweight.numel() * self.qweight.element_size() + value_bits * sum(t.numel() for t in floats)
        return bits / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, rank={self.rank}, bias={self.bias is not None}, "
            f"bits_per_weight={self.bits_per_weight:.3f}"
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_hat (out_features, in_features) in `dtype` (default: the scales' dtype), the op's own dequantisation."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features, dtype)

    @classmethod
    def from_packed(
        cls,
        packed: PackedQuantWeight,
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> QuantLowRankLinear:
        """A module holding `packed` (checked: layout version, shapes) and the residual U (m, r), V (r, n).

        The module's dtype is the packed scales' dtype; u, v and bias are cast to it. u and v: both or neither
        (rank 0 factors (m, 0) / (0, n) count as neither). Tensors are copied onto the packed weight's device.
        """
        where = "QuantLowRankLinear.from_packed"
        check_packed(packed, where)
        m, n = packed.shape
        rank = check_residual_parts(u, v, bias, m, n, where)
        dtype, device = packed.scales.dtype, packed.qweight.device
        module = cls(n, m, packed.bits, packed.group_size, rank, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            module.qweight.copy_(packed.qweight)
            module.scales.copy_(packed.scales)
            module.zeros.copy_(packed.zeros)
        copy_residual_parts(module, u, v, bias)
        return module

    lora_residual = True

    def _manifest_fields(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "layout_version": self.packed.layout_version,
                "dtype": str(self.scales.dtype).removeprefix("torch.")}  # fmt: skip

    @classmethod
    def check_manifest_entry(cls, name: str, entry: dict, where: str = "load_compressed") -> None:
        super().check_manifest_entry(name, entry, where)
        if entry.get("layout_version") != LAYOUT_VERSION:
            raise ValueError(f"{where}: layer {name} was packed with layout_version="
                             f"{entry.get('layout_version')!r}, this lowrank_ops reads {LAYOUT_VERSION}")  # fmt: skip
        entry_choice(entry, "bits", name, where, SUPPORTED_BITS)
        entry_int(entry, "group_size", name, where, 1)
        entry_choice(entry, "dtype", name, where, ("float16", "bfloat16", "float32", "float64"), optional=True)
        try:
            check_format_args(f"{where}: layer {name}", entry["bits"], entry["group_size"])
            check_residual_rank(entry["rank"], entry["in_features"], entry["out_features"], f"{where}: layer {name}")
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    def _check_values(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Finite floats, and codes / zeros inside [0, 2^bits - 1] (a 3-bit code lives in a 4-bit slot, so a corrupt
        file can hold 8..15 there; zeros are integers of the code range)."""
        super()._check_values(tensors, where)
        top = 2**self.bits - 1
        qweight, zeros = tensors.get("qweight"), tensors.get("zeros")
        if qweight is not None and qweight.device.type != "meta":
            high = int(unpack_qweight(qweight, self.bits, self.in_features).max()) if qweight.numel() else 0
            if high > top:
                raise ValueError(f"{where}: tensor qweight holds code {high}, outside [0, {top}] for bits={self.bits}")
        if zeros is not None and zeros.device.type != "meta" and zeros.numel():
            z = zeros.to(torch.float32)
            if bool((z < 0).any() or (z > top).any() or (z != z.round()).any()):
                raise ValueError(f"{where}: tensor zeros holds values outside the integers [0, {top}] for "
                                 f"bits={self.bits} (range found [{float(z.min())}, {float(z.max())}])")  # fmt: skip

    @classmethod
    def _empty(cls, name: str, entry: dict) -> QuantLowRankLinear:
        # built in the default dtype like the rest of the model: the saved fp16 / bf16 scales load into it exactly,
        # so W_hat is unchanged ("dtype" in the entry records what was saved)
        return cls(entry["in_features"], entry["out_features"], entry["bits"], entry["group_size"], entry["rank"],
                   bias=entry["bias"])  # fmt: skip

    def to_linear(self, residual: bool = True) -> nn.Linear:
        """The dense layer with W = W_hat + U V (computed in float32 at least, cast to the module's dtype);
        residual=False: W = W_hat, the base a LoRA export of the residual is served on (`peft_export`)."""
        compute = torch.promote_types(self.scales.dtype, torch.float32)
        return dense_linear(self, self.dequantized_weight(compute), self.scales.dtype, residual)
