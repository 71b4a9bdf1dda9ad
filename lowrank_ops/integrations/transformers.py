"""transformers integration: `AutoModelForCausalLM.from_pretrained(dir)` opens a model saved by lowrank-ops.

`import lowrank_ops` registers quantization method "lowrank_ops" with transformers (`register_quantization_config`,
`register_quantizer`). A saved model's config.json carries

    "quantization_config": {"quant_method": "lowrank_ops", "format_version": 1,
                            "modules": {<module name>: <manifest entry of CompressedLinear>, ...},
                            "config": <the compression config's dict, or null>}

and its tensors under the Hugging Face module names (`<name>.u`, `<name>.v`, `<name>.qweight`, ...). Before the
weights load, the quantizer swaps every listed module for an empty compressed module of the same class and shape
(`CompressedLinear.from_manifest`), so transformers assigns the saved tensors to them as they are: the result equals
`lowrank_ops.load_compressed(dir)` tensor for tensor. After loading, every module's own consistency check runs (the
2:4 pattern, codebook index ranges). `save_pretrained` writes the same quantization_config back.

Without `import lowrank_ops`, transformers does not know the method: it logs "Unknown quantization type, got
lowrank_ops ... we will skip the quantization", builds the dense architecture and reports the compressed layers'
weights as missing (randomly initialised). transformers offers no way for a checkpoint to make that an error; the
README says so at the top of its loading section, and `tests/test_transformers_integration.py` pins what the user
then sees.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lowrank_ops.modules import CompressedLinear
from lowrank_ops.modules.compressed import manifest_entries
from lowrank_ops.surgery import replace_module

QUANT_METHOD = "lowrank_ops"
FORMAT_VERSION = 1
"""Format of the per-module entries (`CompressedLinear.manifest_entry`)."""

_log = logging.getLogger(__name__)


def quantization_config_dict(modules: dict[str, dict], config: dict | None) -> dict:
    """What config.json's "quantization_config" holds for a model whose compressed modules are `modules`."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": modules, "config": config}


def attach_quantization_config(model: nn.Module, config: dict | None) -> None:
    """Set `model.config.quantization_config` to describe the compressed modules `model` holds now (a Hugging Face
    model; others are left alone), so that `model.save_pretrained` writes a directory `from_pretrained` opens. A model
    with no compressed module left (after `to_dense`) loses it, and the marks `from_pretrained` left on it, so that it
    saves as the plain model it is."""
    if getattr(model, "config", None) is None or not hasattr(model.config, "to_dict"):
        return
    entries = manifest_entries(model)
    if entries:
        model.config.quantization_config = quantization_config_dict(entries, config)
        return
    current = getattr(model.config, "quantization_config", None)
    method = current.get("quant_method") if isinstance(current, dict) else getattr(current, "quant_method", None)
    if method == QUANT_METHOD:
        del model.config.quantization_config
        for mark in ("hf_quantizer", "quantization_method"):
            if hasattr(model, mark):
                delattr(model, mark)
        if hasattr(model, "is_quantized"):
            model.is_quantized = False


def check_quantization_config(data: dict, where: str) -> dict[str, dict]:
    """The module entries of a quantization_config dict, after checking its method and version."""
    if data.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{where}: quant_method={data.get('quant_method')!r}, expected {QUANT_METHOD!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: format_version={data.get('format_version')!r}; this lowrank_ops reads "
                         f"{FORMAT_VERSION}")  # fmt: skip
    modules = data.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{where}: 'modules' must map module names to entries, got {type(modules).__name__}")
    return modules


def _register() -> bool:
    """Register the config and the quantizer; False (with one log line) where this transformers has no such API."""
    try:
        from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as exc:  # transformers < 4.46 or without quantizers
        _log.info("lowrank_ops: transformers has no quantizer registry (%s); from_pretrained cannot open saved "
                  "models, use lowrank_ops.load_compressed", exc)  # fmt: skip
        return False
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:  # this module imported twice (e.g. reloaded)
        return True

    @register_quantization_config(QUANT_METHOD)
    class LowrankOpsConfig(QuantizationConfigMixin):
        """config.json's quantization_config of a lowrank-ops model (module docstring)."""

        def __init__(self, modules: dict | None = None, format_version: int = FORMAT_VERSION,
                     config: dict | None = None, **kwargs):  # fmt: skip
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.modules = modules or {}
            self.config = config
            check_quantization_config(self.to_dict(), "quantization_config")

        def to_dict(self) -> dict:
            return quantization_config_dict(dict(self.modules), self.config) | {"format_version": self.format_version}

    @register_quantizer(QUANT_METHOD)
    class LowrankOpsQuantizer(HfQuantizer):
        """Opens models that lowrank-ops compressed (it compresses nothing itself: use `lowrank_ops.compress_`)."""

        requires_calibration = True  # pre-compressed checkpoints only

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs):
            with torch.device("meta"):
                for name, entry in self.quantization_config.modules.items():
                    replace_module(model, name, CompressedLinear.from_manifest(name, entry))
                    # Parents of a compressed layer skip their own weight init: every tensor comes from the file, and
                    # some inits reach into the child (GPT-2 rescales `c_proj.weight`, which a factored layer lacks).
                    parent, _, _ = name.rpartition(".")
                    if parent:
                        model.get_submodule(parent)._is_hf_initialized = True
            return model

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs):
            for name, module in model.named_modules():
                if isinstance(module, CompressedLinear):
                    module.check_loaded(f"from_pretrained: layer {name}")
            return model

        def is_serializable(self, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True  # the ops have autograd for x and the factors (PEFT on top works)

    return True


REGISTERED = _register()
