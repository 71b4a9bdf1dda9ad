"""Export the low-rank residual of a compressed model as a PEFT LoRA adapter, to serve on top of its base.

A QuantLowRankLinear or SparseLowRankLinear layer computes y = W_hat x + U (V x) + b. A LoRA layer computes
y = base(x) + scaling * B (A x) with A (r, in) and B (out, r). So with A = V, B = U and scaling = 1 the residual is
a LoRA adapter on the base layer x -> W_hat x + b, and any engine that reads PEFT adapters can serve it on the
compressed base. `export_lora_adapter` writes, atomically (temporary directory, then rename):

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight = V (r, in_features)
                                base_model.model.<module path>.lora_B.weight = U (out_features, r)
                                in the layer's dtype; one pair per layer with rank >= 1 (rank-0 layers are skipped)
    adapter_config.json         LoraConfig: peft_type "LORA", task_type "CAUSAL_LM", r = lora_alpha = the largest
                                rank, target_modules = the full module paths, rank_pattern and alpha_pattern with
                                every exported module mapped to its own rank

Scaling (checked against peft 0.21.2, `peft.tuners.lora.layer.LoraLayer.update_layer`): scaling = lora_alpha / r per
module (use_rslora False, else lora_alpha / sqrt(r)), where r and lora_alpha of a module come from rank_pattern /
alpha_pattern when a key matches it and from the global r / lora_alpha otherwise. Every module gets its own rank as
both r and alpha, so its scaling is exactly 1.0 (r / r in floating point); an engine that ignores the patterns and
reads the ranks from the tensor shapes still computes lora_alpha / r = 1 with the global pair, since r = lora_alpha.

Pattern keys are full module paths. peft >= 0.14 (`peft.utils.other.get_pattern_key`) matches a key k as the regex
(.*\\.)?(k)$ against the module path, and returns the first key that matches; older releases matched .*\\.k$ and
fell back to the exact path. A full path matches its own module under both rules; `export_lora_adapter` checks that
it matches no OTHER module of the model (a path that is a dotted suffix of another, or one that a regex '.' would
let match a sibling) and raises otherwise. target_modules (a list: exact path or dotted suffix) is checked the same
way.

fan_in_fan_out: LoRA's A and B have the shapes above whether the base layer is nn.Linear or GPT-2's Conv1D (which
stores its weight (in, out)); fan_in_fan_out only tells peft to transpose B A when MERGING into a Conv1D weight. So
the factors are never transposed, and fan_in_fan_out is True when the exported layers were Conv1D (peft sets it per
layer anyway, with a warning, if the flag disagrees with the layer's class).

The base to serve on: `to_dense(model, residual=False)` (the dequantised / pruned base with its bias, in the
original layer classes) and save_pretrained, or the CLI `lowrank-ops export-lora DIR --out ADAPTER --base-out BASE`.
The residual was fitted to the error of exactly that base: on any other base (the original model, another
quantizer's int4) the adapter does not compensate anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from lowrank_ops.modules import CompressedLinear, QuantLowRankLinear
from lowrank_ops.outputs import BASE_MARKER, output_directory, reserve_output

BASE_FORMATS = ("dense", "compressed-tensors")  # what `export_saved_model(base_format=...)` writes the base as
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KEY_PREFIX = "base_model.model."


def _is_residual_module(module: nn.Module) -> bool:
    """A base plus a residual that serves as a LoRA adapter on the base (`CompressedLinear.lora_residual`)."""
    return isinstance(module, CompressedLinear) and module.lora_residual


def residual_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> module of every base-plus-residual layer (`lora_residual`) with rank >= 1, in model order."""
    return {name: module for name, module in model.named_modules() if _is_residual_module(module) and module.rank > 0}


def check_unambiguous_paths(module_names: list[str], targets: list[str], where: str = "export_lora_adapter") -> None:
    """ValueError unless every target path, read as a peft pattern key ((.*\\.)?(path)$) or as a target_modules entry
    (exact path or dotted suffix), matches no module of `module_names` but its own."""
    for target in targets:
        pattern = re.compile(rf"(.*\.)?({target})$")
        clash = next((name for name in module_names if name != target and pattern.match(name)), None)
        if clash is not None:
            raise ValueError(
                f"{where}: the module path {target!r} would also match module {clash!r} as a peft rank_pattern / "
                f"target_modules key; the adapter cannot name it unambiguously"
            )


def lora_adapter_config(ranks: dict[str, int], fan_in_fan_out: bool, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json of a residual adapter: ranks = module path -> rank (>= 1); scaling 1 everywhere."""
    if not ranks:
        raise ValueError("lora_adapter_config: no module to adapt (every rank is 0)")
    top = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": top,
        "lora_alpha": top,
        "target_modules": list(ranks),
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_lora_adapter(
    model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None, *, overwrite: bool = False
) -> Path:
    """Write the residuals U V of `model`'s QuantLowRankLinear / SparseLowRankLinear layers as a PEFT LoRA adapter
    (module docstring) into `out_dir`, atomically; returns the path.

    base_model_name_or_path: recorded in adapter_config.json; it should name the model holding the compressed BASE
    (`to_dense(model, residual=False)`), not the original one. Layers of rank 0 are skipped; a model without any
    residual raises ValueError, as does a layer path that peft could not match unambiguously. An existing `out_dir`
    that is not a lowrank-ops output is never replaced unless overwrite=True (`lowrank_ops.outputs`).
    """
    from safetensors.torch import save_file

    from lowrank_ops._version import __version__

    where = "export_lora_adapter"
    layers = residual_layers(model)
    if not layers:
        raise ValueError(
            f"{where}: the model has no QuantLowRankLinear / SparseLowRankLinear layer with a residual (rank >= 1); "
            f"nothing to export"
        )
    check_unambiguous_paths([name for name, _ in model.named_modules()], list(layers), where)
    classes = {getattr(module, "dense_class", "Linear") for module in layers.values()}
    tensors = {}
    for name, module in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = module.v.detach().contiguous().cpu()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = module.u.detach().contiguous().cpu()
    config = lora_adapter_config({name: module.rank for name, module in layers.items()}, classes == {"Conv1D"},
                                 base_model_name_or_path)  # fmt: skip
    with output_directory(out_dir, overwrite=overwrite, where=where) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "lowrank_ops": __version__})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def read_lora_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter_config, {module path: (A (r, in), B (out, r))}) of an adapter written by `export_lora_adapter`."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"read_lora_adapter: {path} has no {name}; not a LoRA adapter directory")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    factors = {}
    for key, a in tensors.items():
        if key.startswith(KEY_PREFIX) and key.endswith(".lora_A.weight"):
            name = key[len(KEY_PREFIX) : -len(".lora_A.weight")]
            factors[name] = (a, tensors[f"{KEY_PREFIX}{name}.lora_B.weight"])
    return config, factors


def export_saved_model(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_out: str | os.PathLike | None = None,
    base_model_name_or_path: str | None = None,
    base_format: str = "dense",
    overwrite: bool = False,
) -> dict:
    """`export_lora_adapter` for a directory written by save_compressed (the CLI's `export-lora`).

    The model is loaded in the dtype its base-plus-residual layers were saved in (so the adapter keeps it). With
    `base_out` the serving base (`to_dense(model, residual=False)`, plus the directory's tokenizer when it has one)
    is also written there with save_pretrained, atomically, with a marker file (lowrank_ops_base.json) that lets a
    later export replace it, and the adapter's base_model_name_or_path names it unless `base_model_name_or_path` is
    given: as a path relative to the working directory (what transformers records for `from_pretrained("runs/base")`,
    so the pair moves with the tree it sits in; AutoPeftModelForCausalLM resolves it from that directory). Both outputs
    are checked and locked before the model loads (`lowrank_ops.outputs`: never the source directory, never a
    directory lowrank-ops did not write unless overwrite=True). Returns a summary dict.

    base_format "compressed-tensors": the base is written with its quantized layers packed as compressed-tensors
    (`save_compressed_tensors_base`), which stock transformers (with the `compressed-tensors` package) and vLLM load
    without lowrank_ops, instead of dense; it needs `base_out`, and a model whose layers it cannot hold is refused
    before anything is written.
    """
    path = Path(path)
    where = "export-lora"
    if base_format not in BASE_FORMATS:
        raise ValueError(f"{where}: base_format={base_format!r} must be one of {BASE_FORMATS}")
    if base_format != "dense" and base_out is None:
        raise ValueError(f"{where}: --base-format {base_format} describes the base written by --base-out; give "
                         "--base-out")  # fmt: skip
    with contextlib.ExitStack() as outputs:
        outputs.enter_context(reserve_output(out_dir, overwrite=overwrite, protect=(path,), where=where))
        if base_out is not None:
            out_real, base_real = Path(out_dir).resolve(), Path(base_out).resolve()
            if out_real == base_real or out_real in base_real.parents or base_real in out_real.parents:
                raise ValueError(f"{where}: the adapter directory {out_dir} and --base-out {base_out} must be "
                                 "separate directories, neither inside the other")  # fmt: skip
            outputs.enter_context(reserve_output(base_out, overwrite=overwrite, protect=(path,), where=where))
        return _export_saved_model(path, out_dir, base_out, base_model_name_or_path, base_format, overwrite)


def _export_saved_model(path: Path, out_dir, base_out, base_model_name_or_path, base_format: str,
                        overwrite: bool) -> dict:  # fmt: skip
    from lowrank_ops.serialization import load_compressed, read_manifest, save_dense, saved_tokenizer

    manifest = read_manifest(path)
    kinds = {name for name, cls in CompressedLinear.registry.items() if cls.lora_residual}
    dtypes = {entry.get("dtype") for entry in manifest["layers"].values() if entry["module"] in kinds}
    dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 and None not in dtypes else None
    if base_format == "compressed-tensors":  # refused before the model loads
        from lowrank_ops.compressed_tensors_format import check_layers

        check_layers(manifest["layers"], "export-lora --base-format compressed-tensors")
    model = load_compressed(path, dtype=dtype)
    if base_model_name_or_path is None and base_out is not None:
        base_model_name_or_path = os.path.relpath(base_out)  # as transformers records a path it loaded from
    layers = residual_layers(model)
    export_lora_adapter(model, out_dir, base_model_name_or_path, overwrite=overwrite)
    summary = {
        "adapter": str(out_dir),
        "layers": len(layers),
        "ranks": sorted({module.rank for module in layers.values()}),
        "skipped_rank_0": sum(1 for m in model.modules() if _is_residual_module(m) and m.rank == 0),
        "dtype": str(next(iter(layers.values())).u.dtype).removeprefix("torch."),
        "bytes": (Path(out_dir) / ADAPTER_WEIGHTS).stat().st_size,
        "base_model_name_or_path": base_model_name_or_path,
    }
    if base_out is not None:
        tokenizer = saved_tokenizer(path)
        if base_format == "compressed-tensors":
            groups = save_compressed_tensors_base(model, base_out, tokenizer=tokenizer, source=path,
                                                  overwrite=overwrite)  # fmt: skip
            summary.update(base_groups=sorted(groups))
        else:
            save_dense(model, base_out, residual=False, tokenizer=tokenizer, source=path, overwrite=overwrite,
                       where="export-lora --base-out")  # fmt: skip
        summary.update(base=str(base_out), base_format=base_format, base_tokenizer=tokenizer is not None)
    return summary


class PackedLinearTensors(nn.Module):
    """A placeholder holding one layer's compressed-tensors tensors (buffers named as the format names them) and its
    bias, so that `save_pretrained` writes them under the layer's Hugging Face name. It has no forward."""

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone())


def save_compressed_tensors_base(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, source=None,
                                 overwrite: bool = False) -> dict[tuple[int, int], list[str]]:  # fmt: skip
    """Write the base of `model` (every QuantLowRankLinear without its residual) as a compressed-tensors
    pack-quantized checkpoint (`lowrank_ops.compressed_tensors_format`) into `out_dir`, atomically, with the tokenizer
    and the marker file lowrank_ops_base.json; transformers (with the `compressed-tensors` package) and vLLM load it
    without lowrank_ops, with W_hat bit for bit. Modifies `model` in place (its compressed layers become placeholders
    holding the packed tensors). Returns {(bits, exported group size): [layer names]}."""
    from lowrank_ops._version import __version__
    from lowrank_ops.compressed_tensors_format import (
        check_layers,
        export_group_size,
        quantization_config,
        to_compressed_tensors,
    )
    from lowrank_ops.integrations.transformers import attach_quantization_config
    from lowrank_ops.modules.compressed import manifest_entries
    from lowrank_ops.surgery import replace_module

    where = "export-lora --base-format compressed-tensors"
    check_layers(manifest_entries(model), where)
    schemes: dict[tuple[int, int], list[str]] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLowRankLinear):
            continue
        tensors = to_compressed_tensors(module.packed, f"{where}: layer {name}")
        replace_module(model, name, PackedLinearTensors(tensors, module.bias))
        key = (module.bits, export_group_size(module.in_features, module.group_size))
        schemes.setdefault(key, []).append(name)
    attach_quantization_config(model, None)  # drops the lowrank_ops quantization_config and marks
    model.config.quantization_config = quantization_config(schemes)
    with output_directory(out_dir, overwrite=overwrite, protect=(source,), where=where) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        marker = {"written_by": f"lowrank_ops {where}", "lowrank_ops": __version__, "residual": False,
                  "format": "compressed-tensors",
                  "source": None if source is None else str(Path(source).resolve())}  # fmt: skip
        (tmp / BASE_MARKER).write_text(json.dumps(marker, indent=2))
    return schemes
