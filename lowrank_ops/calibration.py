"""Calibration: stream token windows through a model and fill the engine's input-statistics accumulators
of the targeted layers through forward pre-hooks. No activation is kept; hooks are always removed.

Layers called one after another on the very same input tensor (q/k/v of an attention block, gate/up of a
gated MLP) share one accumulator: the Gram costs tokens * n^2 per accumulator, so sharing cuts calibration
work and memory by about 2x on Llama-style blocks. Sharing is detected on the first batch by object identity
with the previous hooked layer's input (only that one tensor is kept alive, so freed memory reused by a later
tensor can never be mistaken for the same input) and checked on every later batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.engine import InputStatistics
from lowrank_ops.surgery import linear_weight


class StatisticsHooks:
    """Forward pre-hooks that feed each target's input into its (possibly shared) accumulator."""

    def __init__(self, model: nn.Module, target_names: list[str], gram: bool, stats_device: torch.device | None):
        self.model, self.gram, self.stats_device = model, gram, stats_device
        self.stats: dict[str, InputStatistics] = {}
        self._owner: dict[str, str] = {}  # target -> target whose accumulator it shares (itself if none)
        self._previous: tuple[torch.Tensor, str] | None = None  # (input, owner) of the last hooked call
        self._first_batch = True
        self._handles = [model.get_submodule(name).register_forward_pre_hook(self._hook(name)) for name in target_names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args):
            x = args[0]
            same_as_previous = self._previous is not None and self._previous[0] is x
            if self._first_batch:
                self._owner[name] = self._previous[1] if same_as_previous else name
            owner = self._owner[name]
            if owner != name:
                if not (same_as_previous and self._previous[1] == owner):
                    raise RuntimeError(f"calibration: {name} stopped sharing its input with {owner}")
                return None
            self._previous = (x, name)
            if name not in self.stats:
                n_features = linear_weight(module).shape[1]
                device = self.stats_device or x.device
                self.stats[name] = InputStatistics(n_features, gram=self.gram, device=device, name=name)
            self.stats[name].update(x.detach())
            return None

        return hook

    def end_batch(self) -> None:
        self._first_batch = False
        self._previous = None

    def shared_stats(self) -> dict[str, InputStatistics]:
        return {name: self.stats[owner] for name, owner in self._owner.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()  # not inference_mode: the statistics must stay usable in autograd code later
def collect_input_statistics(
    model: nn.Module,
    target_names: list[str],
    sequences: torch.Tensor,
    *,
    gram: bool,
    batch_size: int = 4,
    stats_device: torch.device | None = None,
    progress: bool = True,
) -> dict[str, InputStatistics]:
    """Run `sequences` (N, seq_len) token ids through `model` in batches; return target -> statistics.

    gram=True also accumulates X^T X (needed by whitening / EoRA); mean|x| is always kept.
    The statistics live on `stats_device` (default: where the activations are).
    """
    if sequences.dim() != 2 or sequences.shape[0] == 0:
        raise ValueError(
            f"collect_input_statistics: sequences.shape={tuple(sequences.shape)} must be (N >= 1, seq_len)"
        )
    device = next(model.parameters()).device
    hooks = StatisticsHooks(model, list(target_names), gram, stats_device)
    try:
        batches: Iterable[torch.Tensor] = sequences.split(batch_size)
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model(batch.to(device), use_cache=False)
            hooks.end_batch()
    finally:
        hooks.remove()
    return hooks.shared_stats()


def calibration_windows(calibration: torch.Tensor | None, calib_tokens: int, needed_by: str) -> torch.Tensor:
    """The first calib_tokens // seq_len windows (at least one) of `calibration` token ids (N, seq_len).

    `needed_by` names what needs the data, for the error raised when none is given."""
    if calibration is None:
        raise ValueError(f"compress_: {needed_by} needs calibration token ids (N, seq_len); pass calibration=...")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError("compress_: calibration must be a LongTensor of token ids with shape (N, seq_len)")
    return calibration[: max(1, calib_tokens // calibration.shape[1])]
