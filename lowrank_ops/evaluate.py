"""Perplexity of a causal LM on fixed token windows (the package's one evaluation protocol).

Given windows (N, L) of token ids (from `lowrank_ops.data.tokenize_to_sequences`: non-overlapping, each starting
with BOS), each window is one independent forward pass (no state carried between windows, no padding, no attention
mask). In window i, position t predicts token t+1, so a window gives L - 1 predictions and the first token is only
context:

    NLL   = - sum_i sum_{t=0}^{L-2} log softmax(logits[i, t])[ids[i, t+1]]
    ppl   = exp(NLL / (N * (L - 1)))

i.e. exp of the mean next-token negative log-likelihood over every predicted token of every window (a token-
weighted mean; all windows have the same length, so it equals the mean of the per-window means). The log-softmax
is taken in float32 whatever the model's dtype (fp16/bf16 logits are upcast), each window's sum is added to a
float64 total, and exp is taken in float64. The batch size changes only speed, not the value (up to float32
rounding inside the model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def perplexity(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) of `model` over all predicted tokens of all windows (see the module docstring).

    model: any Hugging Face causal LM (called as model(input_ids=..., use_cache=False) and read through
        `.logits`, shape (B, L, vocab)). It is put in eval mode for the evaluation and its mode restored after.
    sequences: LongTensor (N, L) of token ids, N >= 1, L >= 2.
    device: where the windows are sent; default: the device of the model's first parameter.
    Returns a float; inf if the mean NLL overflows exp, nan if the model produced NaN.
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dtype != torch.long or sequences.dim() != 2:
        raise ValueError(
            "perplexity: sequences must be a LongTensor of token ids shaped (N, seq_len), got "
            f"{type(sequences).__name__} {getattr(sequences, 'dtype', '')} {tuple(getattr(sequences, 'shape', ()))}"
        )
    n, seq_len = sequences.shape
    if n < 1 or seq_len < 2:
        raise ValueError(f"perplexity: sequences.shape={(n, seq_len)} needs N >= 1 windows of seq_len >= 2 tokens")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"perplexity: batch_size={batch_size!r} must be an int >= 1")
    device = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
            # the bar counts the tokens read (N L: what --eval-tokens budgets and the summary reports); the
            # perplexity averages over the N (L - 1) predicted ones
            with tqdm(total=n * seq_len, desc="perplexity", unit="tok", disable=not progress) as bar:
                for start in range(0, n, batch_size):
                    ids = sequences[start : start + batch_size].to(device)
                    logits = model(input_ids=ids, use_cache=False).logits
                    if logits.shape[:2] != ids.shape:
                        raise ValueError(
                            f"perplexity: the model returned logits of shape {tuple(logits.shape)} for input_ids of "
                            f"shape {tuple(ids.shape)}; expected (batch, seq_len, vocab)"
                        )
                    # one window at a time, so only (L - 1, vocab) is ever upcast to float32
                    for row in range(ids.shape[0]):
                        nll = F.cross_entropy(logits[row, :-1].float(), ids[row, 1:], reduction="sum")
                        total += nll.double()
                    bar.update(ids.numel())
    finally:
        model.train(was_training)
    mean_nll = total.item() / (n * (seq_len - 1))
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
