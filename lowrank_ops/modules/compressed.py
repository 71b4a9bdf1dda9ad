"""`CompressedLinear`, the base of every compressed drop-in layer: the registry of compressed module classes and the
manifest round trip each class owns.

A saved model's manifest (`lowrank_ops.serialization`) holds one entry per compressed layer: the common fields below
plus what the class adds in `_manifest_fields`; `from_manifest` rebuilds an empty module of the same shape (on the
current default device, the meta device when loading) for the saved tensors to be assigned to. Subclassing registers
a class by name, so serialization, the CLI and the benchmarks never switch on module types.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn


def manifest_entries(model: nn.Module) -> dict[str, dict]:
    """Module name -> manifest entry of every compressed module in `model`, in model order."""
    return {name: module.manifest_entry() for name, module in model.named_modules()
            if isinstance(module, CompressedLinear)}  # fmt: skip


class CompressedLinear(nn.Module):
    """A Linear layer's compressed replacement: `in_features`, `out_features`, `rank`, `bias` (like nn.Linear),
    `dense_class` (the class it replaced: "Linear", or transformers' "Conv1D") and `to_linear()`."""

    registry: ClassVar[dict[str, type[CompressedLinear]]] = {}
    lora_residual: ClassVar[bool] = False
    """True when the module is a base plus a residual U V that serves as a LoRA adapter on that base
    (`lowrank_ops.peft_export`; `to_linear(residual=False)` is the base)."""

    dense_class: str = "Linear"
    in_features: int
    out_features: int
    rank: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CompressedLinear.registry[cls.__name__] = cls

    def manifest_entry(self) -> dict:
        """This layer's manifest entry (`from_manifest` inverts it)."""
        return {
            "module": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
            "dense_class": self.dense_class,
            **self._manifest_fields(),
        }

    def _manifest_fields(self) -> dict:
        """What the class adds to the common manifest fields."""
        return {}

    @classmethod
    def from_manifest(cls, name: str, entry: dict) -> CompressedLinear:
        """An empty module of the class that `entry` names, shaped as `entry` says (tensors unfilled)."""
        kind = entry.get("module")
        module_class = cls.registry.get(kind)
        if module_class is None:
            raise ValueError(f"load_compressed: layer {name} has unknown module {kind!r} "
                             f"(known: {sorted(cls.registry)})")  # fmt: skip
        module = module_class._empty(name, entry)
        module.dense_class = entry.get("dense_class", "Linear")
        return module

    @classmethod
    def _empty(cls, name: str, entry: dict) -> CompressedLinear:
        raise NotImplementedError

    def check_loaded(self, where: str) -> None:
        """Consistency checks of tensors assigned from a file (the 2:4 pattern, index ranges); ValueError naming
        `where`. Default: none."""

    def to_linear(self, residual: bool = True) -> nn.Linear:
        """The dense nn.Linear this module computes (residual=False: its base only, for `lora_residual` modules)."""
        raise NotImplementedError
