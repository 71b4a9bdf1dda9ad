"""Compression of a model larger than memory: decoder layers read from the checkpoint one at a time and written out
as soon as they are compressed (`compress_from_disk`, `lowrank-ops compress --layer-by-layer`).

    skeleton: the model built from its config with parameters on the meta device (no memory), buffers real
    outside the decoder layers (embeddings, final norm, lm_head): read from the checkpoint onto the device, written
        to the output's first shard
    decoder layer i (the sequential driver, lowrank_ops.compress.sequential, with `DiskLayers` as its LayerIO):
        read its tensors from the checkpoint's safetensors files (memory-mapped) onto the device -> calibrate on the
        outputs of the compressed layers before it -> compress -> compute its outputs -> write its tensors (compressed
        modules included) to shard i + 1 -> back to the meta device
    the description: config.json (with its quantization_config), lowrank_ops.json, model.safetensors.index.json

Peak memory: the outside tensors, one decoder layer before and after compression, its calibration statistics and
the calibration activations (windows x seq_len x hidden). The output is the sharded form of the saved format:
`load_compressed` and `AutoModelForCausalLM.from_pretrained` open it.

Every method whose global step works per decoder layer runs this way, and the "fisher" allocator, whose scores come
from a forward and a backward sweep over the decoder layers read from disk one at a time before the compressing pass
(`compress.sequential_scores`). The "sensitivity" allocator (perplexity probes of the whole model) and basis
selection (which folds and may re-learn coefficients over the whole model) need the whole model in memory and are
refused with the reason.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from lowrank_ops.compress import CompressionReport, compress_, resolve_device
from lowrank_ops.compress.method import method_for
from lowrank_ops.compress.sequential import LayerIO, decoder_layers
from lowrank_ops.configs import BasisConfig, CompressionConfig
from lowrank_ops.modules.compressed import manifest_entries
from lowrank_ops.outputs import output_directory
from lowrank_ops.serialization import SHARD_INDEX, WEIGHTS, write_description


class CheckpointTensors:
    """Tensor name -> its file among a checkpoint's safetensors (one file, or shards with an index); each tensor is
    read on demand from a memory map."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / SHARD_INDEX
        if index.is_file():
            files = {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (model_dir / WEIGHTS).is_file():
            with safe_open(str(model_dir / WEIGHTS), "pt") as handle:
                files = dict.fromkeys(handle.keys(), model_dir / WEIGHTS)
        else:
            raise FileNotFoundError(f"compress_from_disk: {model_dir} has no {WEIGHTS} nor {SHARD_INDEX} (the "
                                    "layer-by-layer mode reads safetensors checkpoints)")  # fmt: skip
        self.files = files
        self._handles = {path: safe_open(str(path), "pt") for path in set(files.values())}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
        tensor = self._handles[self.files[name]].get_tensor(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers that hold memory (not on the meta device; tied ones once)."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_meta or tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Set parameter or buffer `key` (dotted, relative to `module`) to `tensor`, keeping the Module objects."""
    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


class _ShardWriter:
    """Writes shard files into the output directory and remembers which tensor went where."""

    def __init__(self, directory: Path, shards: int):
        self.directory, self.shards, self.weight_map, self.count = directory, shards, {}, 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.count += 1
        name = f"model-{self.count:05d}-of-{self.shards:05d}.safetensors"
        unique: dict[int, str] = {}
        out = {}
        for key, tensor in tensors.items():
            if tensor.untyped_storage().data_ptr() in unique:  # a tied tensor is stored once
                continue
            unique[tensor.untyped_storage().data_ptr()] = key
            out[key] = tensor.detach().contiguous().cpu()
        save_file(out, str(self.directory / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(out, name))

    def write_index(self) -> None:
        total = sum((self.directory / file).stat().st_size for file in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / SHARD_INDEX).write_text(json.dumps(index, indent=2))


class DiskLayers(LayerIO):
    """The sequential driver's LayerIO for a model on the meta device: a layer is read from the checkpoint when it is
    needed and written to the output, then dropped, when it is done."""

    def __init__(self, tensors: CheckpointTensors, writer: _ShardWriter, model: nn.Module, prefix: str,
                 dtype: torch.dtype | None):  # fmt: skip
        self.tensors, self.writer, self.model, self.prefix, self.dtype = tensors, writer, model, prefix, dtype
        self.entries: dict[str, dict] = {}
        self.peak_resident_bytes = 0  # the most parameter / buffer bytes the model held at once (not on meta)

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        prefix = f"{self.prefix}.{index}."
        for key in layer.state_dict():
            if prefix + key not in self.tensors:
                raise ValueError(f"compress_from_disk: the checkpoint has no tensor {prefix + key}")
            _assign(layer, key, self.tensors.get(prefix + key, device, self.dtype))

    def release(self, index: int, layer: nn.Module, home: torch.device) -> None:
        prefix = f"{self.prefix}.{index}."
        self.writer.write({prefix + key: value for key, value in layer.state_dict().items()})
        self.entries.update({prefix + name: entry for name, entry in manifest_entries(layer).items()})
        self.drop(index, layer, home)  # the layer's memory is freed; the model keeps its (compressed) structure

    def drop(self, index: int, layer: nn.Module, home: torch.device) -> None:
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident_bytes(self.model))
        layer.to("meta")


def check_streamable(config: CompressionConfig) -> None:
    """ValueError when `config` needs the whole model at once (module docstring)."""
    if isinstance(config, BasisConfig):
        raise ValueError("compress_from_disk: basis selection folds (and may re-learn) coefficients over the whole "
                         "model; run it without --layer-by-layer")  # fmt: skip
    method = method_for(config)
    if method.whole_model_selection() and not method.layer_by_layer_selection():
        raise ValueError(f"compress_from_disk: {config.describe()} selects on the whole model at once (perplexity "
                         "probes); use the fisher, loss or uniform allocator with --layer-by-layer")


def compress_from_disk(model_dir: str | os.PathLike, config: CompressionConfig, calibration: torch.Tensor, out_dir,
                       *, tokenizer=None, dtype: torch.dtype | None = None, progress: bool = True,
                       overwrite: bool = False, extra_files: dict[str, str] | None = None,
                       ) -> CompressionReport:  # fmt: skip
    """Compress the safetensors checkpoint in `model_dir` layer by layer into `out_dir` (module docstring); returns
    the report. config runs in sequential mode whatever its `sequential` says; dtype: the weights' dtype while
    compressing and in the output (None: as stored)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = copy.deepcopy(config)
    config.sequential = True
    config.validate()
    check_streamable(config)
    device = resolve_device(config.device)
    tensors = CheckpointTensors(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    hf_config.__dict__.pop("quantization_config", None)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) computed for real
        model = AutoModelForCausalLM.from_config(hf_config)
    model.eval()
    layers_name, layers = decoder_layers(model)
    outside = {key: value for key, value in model.state_dict().items() if not key.startswith(layers_name + ".")}
    for key in outside:
        if key in tensors:
            _assign(model, key, tensors.get(key, device, dtype))
    model.tie_weights()  # a tied lm_head is stored once, under the embedding's name
    missing = [key for key, value in model.state_dict().items()
               if not key.startswith(layers_name + ".") and value.is_meta]  # fmt: skip
    if missing:
        raise ValueError(f"compress_from_disk: the checkpoint has no tensor for {missing[:3]}")
    with output_directory(out_dir, overwrite=overwrite, protect=(model_dir,), where="compress_from_disk") as tmp:
        writer = _ShardWriter(tmp, len(layers) + 1)
        writer.write({key: value for key, value in model.state_dict().items()
                      if not key.startswith(layers_name + ".")})  # fmt: skip
        io = DiskLayers(tensors, writer, model, layers_name, dtype)
        report = compress_(model, config, calibration, progress=progress, layer_io=io)
        writer.write_index()
        write_description(tmp, model.config, io.entries, config, str(model_dir), tokenizer, extra_files)
    return report
