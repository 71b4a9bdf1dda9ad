"""`CompressedLinear`, the base of every compressed drop-in layer: the registry of compressed module classes and the
manifest round trip each class owns.

A saved model's manifest (`lowrank_ops.serialization`) holds one entry per compressed layer: the common fields below
plus what the class adds in `_manifest_fields`; `from_manifest` rebuilds an empty module of the same shape (on the
current default device, the meta device when loading) for the saved tensors to be assigned to. Subclassing registers
a class by name, so serialization, the CLI and the benchmarks never switch on module types.

Loading validates (issue 21): `check_manifest_entry` (each class extends it) checks every key, type and range of an
entry before a module is built from it; a load pre-hook checks the tensors handed to `load_state_dict` for this module
(every one present once any is, and no other; shapes and integer dtypes equal to the module's; floats finite; then
the class's value checks, `_check_values`: code ranges, index ranges) before anything is copied in; `check_loaded`
runs the same value checks on tensors assigned without load_state_dict (transformers' from_pretrained). Every failure
is one ValueError line naming the caller's `where` (the file), the layer or tensor, and the problem.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

DENSE_CLASSES = ("Linear", "Conv1D")


def entry_int(entry: dict, key: str, name: str, where: str, minimum: int, maximum: int | None = None) -> int:
    """entry[key] as an int in [minimum, maximum], else ValueError naming `where`, the layer and the key."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
            (maximum is not None and value > maximum):  # fmt: skip
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{where}: layer {name}: {key}={value!r} must be an int {bound}")
    return value


def entry_choice(entry: dict, key: str, name: str, where: str, choices: tuple, optional: bool = False):
    """entry[key] when it is one of `choices` (or absent when optional), else ValueError."""
    if optional and key not in entry:
        return None
    value = entry.get(key)
    if isinstance(value, bool) != isinstance(choices[0], bool) or value not in choices:
        raise ValueError(f"{where}: layer {name}: {key}={value!r} must be one of {list(choices)}")
    return value


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own (non-recursive) persistent parameters and buffers by local name."""
    tensors = {k: t for k, t in module._parameters.items() if t is not None}
    tensors.update({k: t for k, t in module._buffers.items()
                    if t is not None and k not in module._non_persistent_buffers_set})  # fmt: skip
    return tensors


def _check_incoming_tensors(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                            error_msgs) -> None:  # fmt: skip
    """Load pre-hook of every CompressedLinear: the tensors for this module, checked before any is copied in."""
    own = _own_tensors(module)
    extra = [key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix):]
             and key[len(prefix):] not in own]  # fmt: skip
    if not extra and not any(prefix + key in state_dict for key in own):
        return  # nothing for this module in this state dict (a partial load of other modules)
    where = f"{type(module).__name__}.load_state_dict"
    if extra:
        raise ValueError(f"{where}: tensor {extra[0]} does not belong to the layer (it holds {sorted(own)})")
    incoming = {}
    for key, tensor in own.items():
        full = prefix + key
        if full not in state_dict:
            raise ValueError(f"{where}: tensor {full} is missing (the layer's other tensors are present)")
        value = state_dict[full]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {full} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{where}: tensor {full} has shape {tuple(value.shape)}, the layer needs "
                             f"{tuple(tensor.shape)}")  # fmt: skip
        if value.is_floating_point() != tensor.is_floating_point() or \
                (not tensor.is_floating_point() and value.dtype != tensor.dtype):  # fmt: skip
            raise ValueError(f"{where}: tensor {full} has dtype {value.dtype}, the layer needs "
                             f"{'a floating dtype' if tensor.is_floating_point() else tensor.dtype}")  # fmt: skip
        incoming[key] = value
    floats = {key: value.dtype for key, value in incoming.items() if value.is_floating_point()}
    if len(set(floats.values())) > 1:  # a module is saved in one dtype; mixed ones fail in its op at the first call
        found = ", ".join(f"{key} {str(dtype).removeprefix('torch.')}" for key, dtype in floats.items())
        raise ValueError(f"{where}: {prefix.rstrip('.') or 'layer'}: its floating tensors must share one dtype, got "
                         f"{found}")  # fmt: skip
    module._check_values(incoming, f"{where}: {prefix.rstrip('.') or 'layer'}")


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

    def __init__(self):
        super().__init__()
        self.register_load_state_dict_pre_hook(_check_incoming_tensors)

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
    def from_manifest(cls, name: str, entry: dict, where: str = "load_compressed") -> CompressedLinear:
        """An empty module of the class that `entry` names, shaped as `entry` says (tensors unfilled), after
        `check_manifest_entry`; `where` names the caller and the file in errors."""
        kind = entry.get("module") if isinstance(entry, dict) else None
        module_class = cls.registry.get(kind) if isinstance(kind, str) else None
        if module_class is None:
            raise ValueError(f"{where}: layer {name} has unknown module {kind!r} "
                             f"(known: {sorted(cls.registry)})")  # fmt: skip
        module_class.check_manifest_entry(name, entry, where)
        module = module_class._empty(name, entry)
        module.dense_class = entry.get("dense_class", "Linear")
        return module

    @classmethod
    def check_manifest_entry(cls, name: str, entry: dict, where: str = "load_compressed") -> None:
        """ValueError (naming `where`, the layer and the key) unless `entry` is a well-formed manifest entry of this
        class: every key present, of its type and in its range. Subclasses extend it with their own fields."""
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: layer {name}: the entry must be a JSON object, got {type(entry).__name__}")
        if entry.get("module") != cls.__name__:
            raise ValueError(f"{where}: layer {name}: module={entry.get('module')!r} is not {cls.__name__}")
        entry_int(entry, "in_features", name, where, 1)
        entry_int(entry, "out_features", name, where, 1)
        entry_int(entry, "rank", name, where, 0)
        entry_choice(entry, "bias", name, where, (True, False))
        entry_choice(entry, "dense_class", name, where, DENSE_CLASSES, optional=True)

    @classmethod
    def _empty(cls, name: str, entry: dict) -> CompressedLinear:
        raise NotImplementedError

    def _check_values(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Value checks of this module's tensors (local name -> tensor), before they are loaded: every floating
        tensor finite; subclasses add theirs (code ranges, index ranges, the 2:4 pattern)."""
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                count = int((~torch.isfinite(tensor)).sum())
                raise ValueError(f"{where}: tensor {key} holds {count} NaN / Inf value(s)")

    def check_loaded(self, where: str) -> None:
        """Consistency checks of tensors assigned from a file (finite floats, the 2:4 pattern, code and index
        ranges); ValueError naming `where`. For loaders that bypass load_state_dict's pre-hook."""
        self._check_values(_own_tensors(self), where)

    def to_linear(self, residual: bool = True) -> nn.Linear:
        """The dense nn.Linear this module computes (residual=False: its base only, for `lora_residual` modules)."""
        raise NotImplementedError
