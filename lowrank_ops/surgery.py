"""Model surgery: find the Linear layers of a Hugging Face causal LM and swap them for compressed modules.

Knows nothing about the math. A target pattern is one of
- a class name: "Linear", "Conv1D" (transformers' GPT-2 layer, weight stored transposed as (in, out)),
- a fully qualified module name: "model.layers.0.mlp.up_proj",
- a regex on the qualified name, prefixed "re:": "re:.*\\.mlp\\..*".
`targets` selects, `ignore` removes; only nn.Linear and Conv1D can be targeted. Matching nothing raises.
Defaults come from the model family (config.model_type), with a generic fallback (every Linear/Conv1D);
embeddings and lm_head are never targeted by default (reported apart in parameter accounting).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

LLAMA_LIKE = r"re:.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{family: (LLAMA_LIKE,) for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "opt": (r"re:.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$",),
    "gpt2": (r"re:.*\.(c_attn|c_proj|c_fc)$",),
}  # fmt: skip
GENERIC_TARGETS = ("Linear", "Conv1D")
DEFAULT_IGNORE = ("re:(.*\\.)?lm_head$", "re:.*embed.*")


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (matched by class name so transformers stays an optional import)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """Target patterns of the model's family, or every Linear/Conv1D for an unknown family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(model_type, GENERIC_TARGETS)


def find_targets(
    model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """Qualified name -> module of every targeted nn.Linear / Conv1D, in model order.

    `targets=None` uses the family defaults; `ignore=None` excludes lm_head and embeddings (pass [] to
    ignore nothing). Raises ValueError if a pattern is malformed or nothing matches.
    """
    targets = tuple(default_targets(model) if targets is None else targets)
    ignore = tuple(DEFAULT_IGNORE if ignore is None else ignore)
    for pattern in (*targets, *ignore):
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"find_targets: pattern {pattern!r} must be a non-empty string")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ValueError(f"find_targets: pattern {pattern!r} is not a valid regex ({exc})") from None
    found = {
        name: module
        for name, module in model.named_modules()
        if is_linear_like(module)
        and any(_matches(p, name, module) for p in targets)
        and not any(_matches(p, name, module) for p in ignore)
    }
    if not found:
        linear_names = [n for n, m in model.named_modules() if is_linear_like(m)][:6]
        raise ValueError(
            f"find_targets: targets={list(targets)} (ignore={list(ignore)}) match no Linear/Conv1D layer of "
            f"{type(model).__name__}; its Linear layers include {linear_names}"
        )
    return found


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) like nn.Linear (a transposed view for Conv1D; no copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise TypeError(f"linear_weight: expected nn.Linear or Conv1D, got {type(module).__name__}")


def as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear sharing nothing with `module` and computing the same map (Conv1D transposed)."""
    weight = linear_weight(module).detach()
    bias = module.bias
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put `new_module` at qualified `name`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new_module)
    return old


def embedding_parameter_count(model: nn.Module) -> int:
    """Parameters of nn.Embedding layers and lm_head, shared (tied) tensors counted once."""
    tensors = {
        id(m.weight): m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Embedding) or (n.rpartition(".")[2] == "lm_head" and hasattr(m, "weight"))
    }
    return sum(tensors.values())
