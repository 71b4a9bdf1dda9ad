"""Save / load compressed Hugging Face models, and convert them back to dense.

A saved directory holds
    config.json           the model's transformers config (save_pretrained)
    model.safetensors     the full state dict (factors under <layer>.u / <layer>.v / <layer>.bias, and <layer>.s for a
                          LowRankLinear whose coefficients are not folded; a QuantLowRankLinear
                          adds its packed base <layer>.qweight / .scales / .zeros, layout of lowrank_ops.quant_format;
                          a SparseLowRankLinear its dense 2:4-pruned base <layer>.weight (pattern checked on load);
                          a SharedChannelLinear its <layer>.codebook and int32 <layer>.index)
    lowrank_ops.json      the manifest: format version, compression config, per-layer modules and ranks,
                          package / torch / transformers versions, the source model
    tokenizer files       when a tokenizer is given
It is written into a temporary sibling directory and renamed at the end, so an interrupted save leaves
nothing half-written. `load_compressed` rebuilds the model from the config on the meta device, swaps in the
compressed modules named by the manifest and assigns the saved tensors: the round trip is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from lowrank_ops.integrations.transformers import attach_quantization_config, quantization_config_dict
from lowrank_ops.modules import CompressedLinear
from lowrank_ops.modules.compressed import manifest_entries
from lowrank_ops.outputs import BASE_MARKER, output_directory, reserve_output
from lowrank_ops.surgery import is_linear_like, replace_module

MANIFEST = "lowrank_ops.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"  # the tensors in shards (lowrank_ops.streaming writes one per layer)
FORMAT_VERSION = 1


def _versions() -> dict:
    import transformers

    from lowrank_ops._version import __version__

    return {"lowrank_ops": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, *, config=None, tokenizer=None, source=None,
                    extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Write `model` (with its compressed layers) to `out_dir` atomically; returns the path.

    extra_files: file name -> text written into the same directory (e.g. evaluation results).
    The rules of `lowrank_ops.outputs`: an existing `out_dir` is replaced (in one atomic step) only when it is a
    previous lowrank-ops output or empty, unless overwrite=True; never when it is or contains `source` (a path); a
    second process saving to the same `out_dir` meanwhile gets ValueError at once."""
    from safetensors.torch import save_file

    if not getattr(model.config, "architectures", None):  # a model loaded from GGUF has none; save_pretrained
        model.config.architectures = [type(model).__name__]  # records it, and vLLM picks its model class by it
    with output_directory(out_dir, overwrite=overwrite, protect=(source,)) as tmp:
        tensors, dropped = unique_state_dict(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", **dropped})
        write_description(tmp, model.config, manifest_entries(model), config, source, tokenizer, extra_files)
    return Path(out_dir)


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`model.state_dict()` as a safetensors file holds it: each tensor once, contiguous. A tensor reached under
    several names (tied input / output embeddings) is kept under its first name in module order, the input
    embedding's (model.embed_tokens.weight), as save_pretrained and the layer-by-layer writer store it: vLLM loads a
    tied model's embedding from that name only: it skips lm_head.weight, and with the file safetensors' save_model
    writes (the alphabetically first name, lm_head.weight) vLLM 0.32 served SmolLM2 with an uninitialised embedding,
    silently: token 0 at every step. Returns (tensors, {dropped name: kept name})."""
    tensors: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if tensor.numel():
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype,
                   tuple(tensor.shape), tuple(tensor.stride()))  # fmt: skip
            if key in first:
                dropped[name] = first[key]
                continue
            first[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, dropped


def write_description(directory: Path, hf_config, layers: dict[str, dict], config=None, source=None, tokenizer=None,
                      extra_files: dict[str, str] | None = None) -> None:  # fmt: skip
    """Everything of a saved model but its tensors, into `directory`: config.json with the quantization_config that
    transformers' from_pretrained reads, the lowrank_ops.json manifest (`layers`: the compressed modules' entries),
    the tokenizer and `extra_files` (name -> text)."""
    config_dict = None if config is None else config.to_dict()
    hf_config.save_pretrained(directory)
    config_json = json.loads((directory / "config.json").read_text())
    config_json["quantization_config"] = quantization_config_dict(layers, config_dict)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    manifest = {"format_version": FORMAT_VERSION, "config": config_dict, "layers": layers, "versions": _versions(),
                "source": source, "weights_sha256": {file.name: _sha256(file)
                                                     for file in sorted(directory.glob("*.safetensors"))}}  # fmt: skip
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_digest(path: str | os.PathLike, manifest: dict) -> None:
    """ValueError unless every tensor file has the sha256 the manifest recorded when it was saved (a flipped byte in a
    tensor is otherwise a silently different model). Manifests written before the digest existed have none: nothing
    to check. About 1 s per GB here."""
    path = Path(path)
    digests = manifest.get("weights_sha256")
    if digests is None:
        return
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise ValueError(f"load_compressed: {path / MANIFEST}: weights_sha256 must map file names to hex digests")
    for name, expected in digests.items():
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise ValueError(f"load_compressed: {path / MANIFEST} lists {name!r} in weights_sha256; no such file")
        if _sha256(file) != expected:
            raise ValueError(f"load_compressed: {file} does not match its sha256 in {MANIFEST} (changed or corrupted "
                             "after it was saved)")  # fmt: skip


def read_manifest(path: str | os.PathLike) -> dict:
    """The lowrank_ops.json manifest of a directory written by save_compressed, checked (format version, weights)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"load_compressed: {path} has no {MANIFEST}; not a directory written by save_compressed"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"load_compressed: {manifest_path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), dict):
        raise ValueError(f"load_compressed: {manifest_path} must be a JSON object with a 'layers' object (one entry "
                         "per compressed layer)")  # fmt: skip
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"load_compressed: {manifest_path} has format_version={manifest.get('format_version')}, "
                         f"this lowrank_ops reads {FORMAT_VERSION}")  # fmt: skip
    if not (path / WEIGHTS).is_file() and not (path / SHARD_INDEX).is_file():
        raise FileNotFoundError(f"load_compressed: {path} has no weights file {WEIGHTS} (nor {SHARD_INDEX})")
    return manifest


_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
                    with_manifest: bool = False):  # fmt: skip
    """Rebuild the model saved by `save_compressed` (bit-exact when dtype is None). Returns the model, or
    (model, manifest) with with_manifest=True (`read_manifest` reads the manifest alone)."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest = read_manifest(path)
    check_weights_digest(path, manifest)
    if not (path / WEIGHTS).is_file():  # sharded: transformers reads the shards, through lowrank_ops' quantizer
        model = AutoModelForCausalLM.from_pretrained(path, device_map=None).to(device)
        model = (model if dtype is None else model.to(dtype)).eval()
        return (model, manifest) if with_manifest else model
    hf_config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    try:
        with safe_open(str(path / WEIGHTS), "pt") as weights:
            saved_dtypes = {key: weights.get_slice(key).get_dtype() for key in weights.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (truncated or corrupt header)
        raise ValueError(f"load_compressed: {path / WEIGHTS} is not a readable safetensors file "
                         f"({str(exc).splitlines()[0]})") from None  # fmt: skip
    where = f"load_compressed: {path / MANIFEST}"
    linear_layers = {name for name, module in model.named_modules() if is_linear_like(module)}
    with torch.device("meta"):
        for name, entry in manifest["layers"].items():
            if name not in linear_layers:
                raise ValueError(f"{where}: layer {name} is not a Linear / Conv1D layer of "
                                 f"{type(model).__name__}")  # fmt: skip
            replace_module(model, name, CompressedLinear.from_manifest(name, entry, where=where))
    model.to_empty(device=device)
    # to_empty gives every parameter its own storage (torch 2.13), untying lm_head from the input embedding; the
    # file holds a tied tensor once (under either name: files saved before unique_state_dict kept lm_head.weight),
    # so tie again before loading.
    model.tie_weights()
    # Every float tensor in the dtype it was saved in: the skeleton follows the config's dtype and the compressed
    # modules the default one, either of which can differ from the file (a model cast to bf16 after loading).
    for key, tensor in model.state_dict(keep_vars=True).items():
        saved = _SAFETENSORS_FLOATS.get(saved_dtypes.get(key))
        if saved is not None and tensor.is_floating_point() and tensor.dtype != saved:
            tensor.data = torch.empty_like(tensor.data, dtype=saved)
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    except Exception as exc:  # noqa: BLE001 - a SafetensorError while reading tensor data (a truncated file)
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"load_compressed: {path / WEIGHTS} cannot be read ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise ValueError(f"{where}: {WEIGHTS} and the manifest disagree: missing tensors {sorted(missing)[:3]}, "
                         f"unexpected tensors {sorted(unexpected)[:3]} (a layer missing from the manifest?)")
    _recompute_non_persistent_buffers(model, hf_config, device)
    if dtype is not None:
        model.to(dtype)
    return (model.eval(), manifest) if with_manifest else model.eval()


def _recompute_non_persistent_buffers(model: nn.Module, hf_config, device) -> None:
    """Buffers not in the state dict (rotary inv_freq) were left uninitialised by to_empty: rebuild them
    from a reference model built on CPU from the same config."""
    missing = [name for name, _ in model.named_buffers() if name not in model.state_dict()]
    if not missing:
        return
    from transformers import AutoModelForCausalLM

    with torch.device("cpu"):
        reference = AutoModelForCausalLM.from_config(hf_config)
    reference_buffers = dict(reference.named_buffers())
    for name in missing:
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[buffer_name] = reference_buffers[name].to(device)


def to_dense(model: nn.Module, residual: bool = True) -> nn.Module:
    """Replace every compressed module (CompressedLinear) by its dense layer (nn.Linear, or transformers' Conv1D where
    the original layer was one) in place, so that `save_pretrained` writes a plain model. Returns the model.

    residual=False: modules whose residual is a LoRA adapter on their base (`lora_residual`: QuantLowRankLinear,
    SparseLowRankLinear) become their BASE only (W_hat, without U V): the model a LoRA export of the residuals
    (`lowrank_ops.peft_export`) is served on. Other modules convert whole."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, CompressedLinear):
            continue
        dense = module.to_linear(residual=residual or not module.lora_residual)
        if module.dense_class == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            conv = Conv1D(module.out_features, module.in_features).to(
                dtype=dense.weight.dtype, device=dense.weight.device
            )
            with torch.no_grad():
                conv.weight.copy_(dense.weight.t())
                conv.bias.copy_(dense.bias if dense.bias is not None else torch.zeros_like(conv.bias))
            dense = conv
        replace_module(model, name, dense)
    attach_quantization_config(model, None)  # no compressed module left: config.json must not claim any
    return model


def saved_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model directory, or None when it holds none."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def save_dense(model: nn.Module, out_dir: str | os.PathLike, *, residual: bool = True, tokenizer=None, source=None,
               overwrite: bool = False, where: str = "save_dense") -> Path:  # fmt: skip
    """`to_dense(model, residual)` (in place), written with save_pretrained into `out_dir` by the rules of
    `lowrank_ops.outputs` (atomic, locked, never over `source`), with the tokenizer and the marker file
    lowrank_ops_base.json (who wrote it, from which source) that lets a later run replace it. Returns the path."""
    from lowrank_ops._version import __version__

    to_dense(model, residual=residual)
    with output_directory(out_dir, overwrite=overwrite, protect=(source,), where=where) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        marker = {"written_by": f"lowrank_ops {where}", "lowrank_ops": __version__, "residual": residual,
                  "source": None if source is None else str(Path(source).resolve())}  # fmt: skip
        (tmp / BASE_MARKER).write_text(json.dumps(marker, indent=2))
    return Path(out_dir)


def export_dense(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`lowrank-ops to-dense`: the compressed model saved at `path` as a plain Hugging Face model in `out_dir` (each
    compressed layer replaced by its dense weight, residual included; the saved dtype kept), with its tokenizer.
    `out_dir` is checked and locked before the model loads."""
    path = Path(path)
    with reserve_output(out_dir, overwrite=overwrite, protect=(path,), where="to-dense"):
        model = load_compressed(path)
        return save_dense(model, out_dir, tokenizer=saved_tokenizer(path), source=path, overwrite=overwrite,
                          where="to-dense")  # fmt: skip
