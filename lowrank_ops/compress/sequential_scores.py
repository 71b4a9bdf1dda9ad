"""Gradient scores of every target's bases with one decoder layer in memory at a time: the "fisher" allocator in
sequential and layer-by-layer mode.

One-shot scoring (`compress.factoring.select_by_score`) runs a forward and a backward pass per score window b through
the whole model with every target swapped for its full-rank factors W = U diag(s) V^T, and reads dL_b/ds. The same
gradients come from two sweeps over the decoder layers, each layer brought in by the sequential driver's `LayerIO`
and dropped again:
1. forward over the dense model: layer l's input statistics over all calibration windows (for its whitened factors)
   and its input h_l for each score window, both written to a temporary file (activation checkpoints on disk);
2. the tail: g_L = dL_b/dh_L for each score window through the final norm, lm_head and the loss (the model's own
   forward with a stand-in for its decoder layers that returns h_L);
3. backward, l = L-1 .. 0: layer l's targets swapped for their full-rank factors with coefficients s, its forward
   recomputed from h_l and back-propagated from g_{l+1}: dL_b/ds for its targets, and g_l = dL_b/dh_l.
A decoder layer after l computes W x whether W is dense or factored at full rank, so these are the one-shot
gradients up to rounding and the selection is one-shot fisher's (tests/test_sequential_scores.py compares them).

Memory: one decoder layer and its statistics, the calibration activations of one layer (as the sequential driver),
and g for the score windows (score tokens x hidden). Disk: per layer its statistics and its score-window inputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.basis_selection import GradientScores, select_bases
from lowrank_ops.calibration import StatisticsHooks
from lowrank_ops.compress.factoring import BasisPlan, OnlyTraining, factor_layer, lm_loss, lowrank_module
from lowrank_ops.compress.sequential import (
    LayerIO,
    capture_first_layer_inputs,
    decoder_layers,
    hidden_states_in,
    hidden_states_of,
    move_all_but_layers,
    set_hidden_states,
)
from lowrank_ops.surgery import linear_weight


class _GivenOutput(nn.Module):
    """Stands in for the decoder layers in the tail pass: returns `value` (as a tuple when the real layers do)."""

    def __init__(self, tuple_output: bool, attention_type: str | None):
        super().__init__()
        self.value, self.tuple_output = None, tuple_output
        if attention_type is not None:  # models that pick a mask per layer read it (sliding-window layers)
            self.attention_type = attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return (self.value,) if self.tuple_output else self.value


def _layer_targets(targets: dict[str, nn.Module], prefix: str) -> dict[str, nn.Module]:
    return {name: module for name, module in targets.items() if name.startswith(prefix)}


@torch.no_grad()
def _forward_sweep(run, targets, layers_name, layers, layer_io, gram: bool, home, spill: Path, stats_inputs,
                   score_inputs) -> bool:  # fmt: skip
    """Step 1 of the module docstring; leaves h_L of the score windows in `score_inputs`. Returns whether the decoder
    layers return tuples."""
    tuple_output = False
    for index, layer in enumerate(tqdm(layers, desc="fisher forward", unit="layer", disable=not run.progress)):
        layer_io.load(index, layer, run.device)
        names = list(_layer_targets(targets, f"{layers_name}.{index}."))
        hooks = StatisticsHooks(run.model, names, gram, None)
        try:
            for args, kwargs in stats_inputs:
                set_hidden_states(args, kwargs, hidden_states_of(layer(*args, **kwargs)))
                hooks.end_batch()
        finally:
            hooks.remove()
        stats = hooks.shared_stats()
        run.world.all_reduce_statistics(stats)
        checkpoints = [hidden_states_in(args, kwargs).cpu() for args, kwargs in score_inputs]
        torch.save({"stats": stats, "inputs": checkpoints}, spill / f"layer-{index}.pt")
        for args, kwargs in score_inputs:
            set_hidden_states(args, kwargs, hidden_states_of(out := layer(*args, **kwargs)))
        tuple_output = isinstance(out, tuple)
        layer_io.drop(index, layer, home)
    return tuple_output


def _tail_gradients(run, layers_name, layers, score_windows, score_inputs, tuple_output) -> list[torch.Tensor]:
    """Step 2: dL_b/dh_L of each score window."""
    parent_name, _, attr = layers_name.rpartition(".")
    parent = run.model.get_submodule(parent_name) if parent_name else run.model
    stand_in = _GivenOutput(tuple_output, getattr(layers[-1], "attention_type", None))
    setattr(parent, attr, nn.ModuleList([stand_in]))
    grads = []
    try:
        with OnlyTraining(run.model, []):
            for window, (args, kwargs) in zip(score_windows.split(1), score_inputs, strict=True):
                stand_in.value = hidden_states_in(args, kwargs).detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(lm_loss(run.model, window.to(run.model_device)), stand_in.value)
                grads.append(grad)
    finally:
        setattr(parent, attr, layers)
    return grads


def _backward_sweep(run, targets, layers_name, layers, layer_io, home, spill: Path, score_inputs, grads, basis,
                    alpha, kind) -> dict[str, torch.Tensor]:  # fmt: skip
    """Step 3: the scores of every target's bases."""
    scores = {}
    for index in tqdm(reversed(range(len(layers))), total=len(layers), desc="fisher backward", unit="layer",
                      disable=not run.progress):  # fmt: skip
        layer = layers[index]
        saved = torch.load(spill / f"layer-{index}.pt", weights_only=False)
        layer_io.load(index, layer, run.device)
        originals = _layer_targets(targets, f"{layers_name}.{index}.")
        full = {}
        try:
            for name, original in originals.items():
                factors = factor_layer(run, original, saved["stats"].get(name), basis, alpha)
                full[name] = lowrank_module(original, factors, min(linear_weight(original).shape)).add_coefficients()
                run.replace(name, full[name])
            coefficients = [module.s for module in full.values()]
            accumulators = {name: GradientScores(module.rank) for name, module in full.items()}
            with OnlyTraining(layer, coefficients):
                for b, (args, kwargs) in enumerate(score_inputs):
                    x = saved["inputs"][b].to(run.device).requires_grad_(index > 0)
                    set_hidden_states(args, kwargs, x)
                    wrt = [*coefficients, x] if index > 0 else coefficients
                    result = torch.autograd.grad(hidden_states_of(layer(*args, **kwargs)), wrt, grads[b])
                    for (name, module), grad in zip(full.items(), result, strict=False):
                        accumulators[name].update(module.s, grad)
                    if index > 0:
                        grads[b] = result[-1]
            scores.update({name: accumulator.score(kind) for name, accumulator in accumulators.items()})
        finally:
            for name, original in originals.items():
                run.replace(name, original)
            run.clear_caches()
            layer_io.drop(index, layer, home)
    return scores


def select_by_score_layer_by_layer(run, targets: dict[str, nn.Module], layer_io: LayerIO, *, basis: str,
                                   alpha: float, gram: bool, kind: str, ratio: float, align: int,
                                   score_tokens: int) -> BasisPlan:  # fmt: skip
    """The ranks one-shot selection by `kind` ("fisher" / "taylor") scores would give, from the sweeps of the module
    docstring; the model is left as it was (each layer put away by `layer_io.drop`)."""
    layers_name, layers = decoder_layers(run.model)
    home = next(layers[0].parameters()).device  # meta when the layers are read from disk
    outside_home = run.model.get_input_embeddings().weight.device
    score_windows = run.windows[: max(1, score_tokens // run.windows.shape[1])]
    move_all_but_layers(run.model, layers_name, layers, run.device)
    try:
        stats_inputs = capture_first_layer_inputs(run.model, layers[0], run.local_windows, run.config.batch_size,
                                                  run.device)  # fmt: skip
        score_inputs = capture_first_layer_inputs(run.model, layers[0], score_windows, 1, run.device)
        with tempfile.TemporaryDirectory(prefix="lowrank-ops-scores-") as spill:
            tuple_output = _forward_sweep(run, targets, layers_name, layers, layer_io, gram, home, Path(spill),
                                          stats_inputs, score_inputs)  # fmt: skip
            del stats_inputs
            grads = _tail_gradients(run, layers_name, layers, score_windows, score_inputs, tuple_output)
            scores = _backward_sweep(run, targets, layers_name, layers, layer_io, home, Path(spill), score_inputs,
                                     grads, basis, alpha, kind)  # fmt: skip
    finally:
        move_all_but_layers(run.model, layers_name, layers, outside_home)
    names = list(targets)
    shapes = [tuple(linear_weight(targets[name]).shape) for name in names]
    selection = select_bases(shapes, [scores[name] for name in names], ratio, align, relative=False)
    return BasisPlan(dict(zip(names, selection.ranks, strict=True)))
