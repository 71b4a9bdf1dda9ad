"""SparseLowRankLinear: a drop-in nn.Linear whose weight is a 2:4-pruned base, stored dense, plus a low-rank residual.

Forward: y = W_pruned x + U (V x) + b, as F.linear for the base and `torch.ops.lowrank_ops.lowrank_matmul` for the
residual. The base is stored DENSE (issue 5: "stored dense"): no sparse kernel runs and no memory is saved yet; the
module exists so that a 2:4 base plus its EoRA / SVD / LQER residual can be compressed, evaluated, saved, loaded
and exported like the quantized bases. W_pruned is frozen (a buffer); the residual factors and the bias are
parameters, as in QuantLowRankLinear.

The 2:4 pattern (`lowrank_ops.algorithms.quantize.prune_2to4`): along the input dimension, every run of 4
consecutive columns j = 4k .. 4k + 3 of every row holds at most 2 non-zeros (a tail run of L = in_features mod 4
columns at most ceil(L / 2)). It is checked when the module is built from a weight (`from_pruned`) and whenever a
state dict is loaded, so a file whose base is not 2:4-sparse is rejected rather than run.

state_dict keys (stable; checkpoints rely on them):
    weight  (out_features, in_features)  the 2:4-pruned base, dense, in the layer's dtype (a buffer)
    v       (rank, in_features)          the residual's shrink factor (only when rank > 0)
    u       (out_features, rank)         the residual's expand factor (only when rank > 0)
    bias    (out_features,)              only when bias=True

Storage accounting: `storage_bytes` / `bits_per_weight` count what is stored (the dense base: 16 bits per weight in
fp16 / bf16, 32 in fp32, plus the factors). `nominal_2to4_bytes` / `nominal_2to4_bits_per_weight` give what the
compressed 2:4 format of sparse tensor cores would take -- the kept values plus a 2-bit position per kept value
(4 bits of metadata per run of 4), i.e. 9 bits per weight for fp16 -- labelled nominal: nothing here stores it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ops.formats import two_of_four_violation
from lowrank_ops.modules._base_residual import (
    check_residual_parts,
    check_residual_rank,
    copy_residual_parts,
    dense_linear,
)
from lowrank_ops.modules.compressed import CompressedLinear, entry_choice
from lowrank_ops.ops.lowrank_matmul import lowrank_matmul

PATTERN = "2:4"
_METADATA_BITS_PER_KEPT = 2  # the position of a kept value inside its run of 4 (cuSPARSELt / CUTLASS 2:4 metadata)


def check_two_of_four(weight: torch.Tensor, where: str, name: str = "weight") -> None:
    """ValueError naming the first row and run of `weight` (out, in) that break the 2:4 pattern (module docstring).
    Meta tensors (a module built before its state dict is loaded) are not checked."""
    if weight.device.type == "meta":
        return
    bad = two_of_four_violation(weight)
    if bad is not None:
        row, column, count = bad
        allowed = 2 if column + 4 <= weight.shape[1] else (weight.shape[1] - column + 1) // 2
        raise ValueError(
            f"{where}: {name} (shape {tuple(weight.shape)}) is not 2:4 sparse: row {row}, columns "
            f"{column}..{min(column + 4, weight.shape[1]) - 1} hold {count} non-zeros, at most {allowed} allowed "
            f"(prune it with lowrank_ops.algorithms.quantize.prune_2to4; a file written otherwise is corrupt)"
        )


class SparseLowRankLinear(CompressedLinear):
    """y = W_pruned x + U (V x) + b with a 2:4-pruned base W_pruned stored dense and an optional rank-r residual.

    Args mirror nn.Linear plus rank (0 <= rank < the break-even rank m n / (m + n); 0 = base only). `dtype` is the
    layer's dtype: the base, v, u and bias are stored in it. A fresh module is a placeholder with W_pruned = 0 and a
    zero residual (u = 0, v uniform as nn.Linear's weight, the LoRA convention); fill it with `from_pruned` or
    `load_state_dict`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 0, bias: bool = True, dtype=None, device=None):
        super().__init__()
        where = "SparseLowRankLinear"
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name}={value!r} must be an int >= 1")
        check_residual_rank(rank, in_features, out_features, where)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"dtype": dtype, "device": device}
        self.register_buffer("weight", torch.zeros(out_features, in_features, **factory))
        if rank > 0:
            self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.u = nn.Parameter(torch.zeros(out_features, rank, **factory))
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.v, -bound, bound)
        else:
            self.v = self.u = None
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_load_state_dict_pre_hook(_check_loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.rank:
            y = y + lowrank_matmul(x, self.v, self.u)
        return y

    # ------------------------------------------------------------------------------------------------------------

    @property
    def storage_bytes(self) -> int:
        """Bytes of the stored weight: the DENSE base + residual factors (bias excluded)."""
        tensors = [self.weight] + ([self.u, self.v] if self.rank else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bits_per_weight(self) -> float:
        """8 * storage_bytes / (out_features * in_features): what is stored, the dense base included."""
        return 8.0 * self.storage_bytes / (self.out_features * self.in_features)

    def bits_per_weight_at(self, value_bits: int) -> float:
        """bits_per_weight with every value (dense base, factors) counted at `value_bits`."""
        values = self.weight.numel() + (self.u.numel() + self.v.numel() if self.rank else 0)
        return value_bits * values / (self.out_features * self.in_features)

    @property
    def nominal_2to4_bytes(self) -> int:
        """NOMINAL bytes in the compressed 2:4 format (not what this module stores): the kept slots (2 per run of 4,
        ceil(L / 2) in a tail run of L) in the layer's dtype plus 2 bits of metadata per kept slot, plus the
        residual factors."""
        return -(-self._nominal_2to4_bits(8 * self.weight.element_size()) // 8)

    def _nominal_2to4_bits(self, value_bits: int) -> int:
        n = self.in_features
        kept = self.out_features * (2 * (n // 4) + (n % 4 + 1) // 2)
        factors = self.u.numel() + self.v.numel() if self.rank else 0
        return value_bits * (kept + factors) + kept * _METADATA_BITS_PER_KEPT

    @property
    def nominal_2to4_bits_per_weight(self) -> float:
        """8 * nominal_2to4_bytes / (out_features * in_features) (NOMINAL: see nominal_2to4_bytes)."""
        return 8.0 * self.nominal_2to4_bytes / (self.out_features * self.in_features)

    def nominal_2to4_bits_per_weight_at(self, value_bits: int) -> float:
        """nominal_2to4_bits_per_weight with values (kept slots, factors) counted at `value_bits`."""
        return self._nominal_2to4_bits(value_bits) / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, pattern={PATTERN}, rank={self.rank}, "
            f"bias={self.bias is not None}, bits_per_weight={self.bits_per_weight:.3f} (dense storage; nominal 2:4 "
            f"{self.nominal_2to4_bits_per_weight:.3f})"
        )

    def check_pattern(self, where: str = "SparseLowRankLinear") -> None:
        """Raise ValueError unless the stored base satisfies the 2:4 pattern."""
        check_two_of_four(self.weight, where)

    @classmethod
    def from_pruned(
        cls,
        weight: torch.Tensor,
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> SparseLowRankLinear:
        """A module holding the 2:4-pruned `weight` (m, n) (checked) and the residual U (m, r), V (r, n).

        The module's dtype and device are the weight's; u, v and bias are cast to its dtype and copied onto its
        device. u and v: both or neither (rank 0 factors (m, 0) / (0, n) count as neither).
        """
        where = "SparseLowRankLinear.from_pruned"
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(f"{where}: weight must be a floating (out_features, in_features) torch.Tensor, got "
                            f"{type(weight).__name__} {getattr(weight, 'shape', '')}")  # fmt: skip
        check_two_of_four(weight, where)
        m, n = weight.shape
        rank = check_residual_parts(u, v, bias, m, n, where)
        module = cls(n, m, rank, bias=bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.weight.copy_(weight.detach())
        copy_residual_parts(module, u, v, bias)
        return module

    lora_residual = True

    def check_loaded(self, where: str) -> None:
        super().check_loaded(where)
        self.check_pattern(where)

    def _manifest_fields(self) -> dict:
        return {"pattern": "2:4", "storage": "dense", "dtype": str(self.weight.dtype).removeprefix("torch.")}

    @classmethod
    def check_manifest_entry(cls, name: str, entry: dict, where: str = "load_compressed") -> None:
        super().check_manifest_entry(name, entry, where)
        if entry.get("pattern") != "2:4":  # the pattern itself is checked when the state dict is loaded
            raise ValueError(f"{where}: layer {name} has pattern={entry.get('pattern')!r}; "
                             "SparseLowRankLinear reads '2:4'")  # fmt: skip
        entry_choice(entry, "storage", name, where, ("dense",), optional=True)
        entry_choice(entry, "dtype", name, where, ("float16", "bfloat16", "float32", "float64"), optional=True)
        try:
            check_residual_rank(entry["rank"], entry["in_features"], entry["out_features"], f"{where}: layer {name}")
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def _empty(cls, name: str, entry: dict) -> SparseLowRankLinear:
        return cls(entry["in_features"], entry["out_features"], entry["rank"], bias=entry["bias"])

    def to_linear(self, residual: bool = True) -> nn.Linear:
        """The dense layer with W = W_pruned + U V (computed in float32 at least, cast to the module's dtype);
        residual=False: W = W_pruned, the base a LoRA export of the residual is served on (`peft_export`)."""
        return dense_linear(self, self.weight, self.weight.dtype, residual)


def _check_loaded_weight(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
    """Load pre-hook: reject a base that breaks the 2:4 pattern before it is copied in, naming its key."""
    weight = state_dict.get(prefix + "weight")
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2:
        check_two_of_four(weight, "SparseLowRankLinear.load_state_dict", name=prefix + "weight")
