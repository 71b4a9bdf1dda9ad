"""Sequential (layer-by-layer) calibration and compression for models larger than the device.

Only one decoder layer is on the compute device at a time:
1. the decoder layers stay where they are (usually CPU); everything else (embeddings, rotary tables, final
   norm, lm_head) moves to the device;
2. the calibration batches run until the first decoder layer, whose inputs (positional args and kwargs such as
   the attention mask and rotary embeddings) are captured, and the forward is stopped there;
3. for each layer in order: move it to the device, run the captured inputs through it with the statistics
   hooks of its targets, factor and swap its targets, recompute its outputs with the COMPRESSED layer (so the
   next layer is calibrated on the inputs it will see at inference), and move it back.
The captured hidden states of all calibration windows stay on the device (tokens x hidden x 4 bytes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.calibration import StatisticsHooks
from lowrank_ops.surgery import is_linear_like


class LayerIO:
    """How the sequential driver brings decoder layer `index` to the compute device and puts it away once it is
    compressed and its outputs are computed. This default moves it there and back; `lowrank_ops.streaming` reads it
    from the checkpoint's files and writes it out instead, so only one decoder layer is ever in memory."""

    def load(self, index: int, layer: nn.Module, device: torch.device) -> None:
        layer.to(device)

    def release(self, index: int, layer: nn.Module, home: torch.device) -> None:
        layer.to(home)

    def drop(self, index: int, layer: nn.Module, home: torch.device) -> None:
        """Put away a layer that was only read (a scoring pass): nothing of it is kept or written."""
        layer.to(home)


class _StopForward(Exception):
    """Raised by the capture hook to end a forward at the first decoder layer."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder layers: the longest ModuleList whose every entry
    holds a Linear-like layer (model.layers for Llama, transformer.h for GPT-2, decoder.layers for OPT)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(any(is_linear_like(m) for m in layer.modules()) for layer in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError(f"sequential: {type(model).__name__} has no ModuleList of decoder layers")
    return best


def move_all_but_layers(model: nn.Module, layers_name: str, layers: nn.ModuleList, device: torch.device) -> None:
    parent_name, _, attr = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, layers)


@torch.no_grad()
def capture_first_layer_inputs(model, first_layer: nn.Module, calibration: torch.Tensor, batch_size: int, device):
    captured: list[tuple[list, dict]] = []

    def hook(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def hidden_states_of(output) -> torch.Tensor:
    """A decoder layer's output hidden states (some transformers models return a tuple, others the tensor)."""
    return output[0] if isinstance(output, tuple) else output


def hidden_states_in(args: list, kwargs: dict) -> torch.Tensor:
    """The hidden states among a decoder layer's captured inputs (first positional argument, or the keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def set_hidden_states(args: list, kwargs: dict, value: torch.Tensor) -> None:
    if args:
        args[0] = value
    else:
        kwargs["hidden_states"] = value


@torch.no_grad()
def compress_sequentially(
    model: nn.Module,
    targets: dict[str, nn.Module],
    calibration: torch.Tensor,
    *,
    gram: bool,
    batch_size: int,
    device: torch.device,
    compress_layer: Callable[[dict[str, nn.Module], dict], list],
    progress: bool = True,
    layer_io: LayerIO | None = None,
) -> list:
    """Calibrate and compress decoder layer by layer; `compress_layer(layer_targets, layer_stats)` factors and
    swaps one layer's targets and returns its report rows. Returns all rows in model order. `layer_io` brings each
    layer in and puts it away (default: moves it to `device` and back). `targets` is consumed: a layer's entries are
    removed once it is compressed, so the replaced modules (and their weights) are freed as the driver goes."""
    layer_io = layer_io or LayerIO()
    layers_name, layers = decoder_layers(model)
    home = next(layers[0].parameters()).device
    outside = [name for name in targets if not name.startswith(layers_name + ".")]
    if outside:
        raise ValueError(f"sequential: targets {outside[:3]} are outside the decoder layers {layers_name}.*")
    move_all_but_layers(model, layers_name, layers, device)
    rows = []
    try:
        inputs = capture_first_layer_inputs(model, layers[0], calibration, batch_size, device)
        for index, layer in enumerate(tqdm(layers, desc="sequential", unit="layer", disable=not progress)):
            prefix = f"{layers_name}.{index}."
            layer_targets = {name: targets.pop(name) for name in list(targets) if name.startswith(prefix)}
            layer_io.load(index, layer, device)
            hooks = StatisticsHooks(model, list(layer_targets), gram, None)
            try:
                for args, kwargs in inputs:
                    layer(*args, **kwargs)
                    hooks.end_batch()
            finally:
                hooks.remove()
            rows.extend(compress_layer(layer_targets, hooks.shared_stats()))
            for args, kwargs in inputs:  # the next layer sees what the compressed layer produces
                out = layer(*args, **kwargs)
                set_hidden_states(args, kwargs, hidden_states_of(out))
            layer_io.release(index, layer, home)
    finally:
        move_all_but_layers(model, layers_name, layers, home)
    return rows
