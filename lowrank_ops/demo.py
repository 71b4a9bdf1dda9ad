"""The demo behind `make demo`: factor real nn.Linear layers of the default model at a few param ratios.

For each projection of one decoder layer of SmolLM2-135M (q, k, v, o, gate, up, down; GQA shapes), and each
param ratio, it prints the rank, the kept fraction, the relative weight error ||W - UV||_F / ||W||_F, the
relative output error on Gaussian inputs, and the time of one forward of the dense layer and of the
LowRankLinear at decode (M = 1) and prefill (M = 512) on the available device. CPU timings are labelled CPU.
Plain truncated SVD, so the errors are what activation-unaware factoring gives (the compression job of a
later issue uses calibration data).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowrank_ops.assets import default_model_gguf_path, load_gguf_weights
from lowrank_ops.benchmarking import environment_header, sets_to_exceed_l2, time_op
from lowrank_ops.modules import LowRankLinear

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
DEMO_ROWS = (1, 512)
DEMO_TARGET_MS = 30  # per timing; the demo times 2 x 28 modules, keep it under a minute on a 2-core CPU


def run_demo(device: str | None = None, dtype: str | None = None, ratios=(0.9, 0.6, 0.3), layer: int = 0) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    header = environment_header()
    path = default_model_gguf_path()
    names = [f"blk.{layer}.{p}.weight" for p in PROJECTIONS]
    weights = load_gguf_weights(path, names)
    print(f"lowrank-ops demo: {path.name}, decoder layer {layer}, {dtype}, timed on {header['device']}")
    print(f"{'layer':12s} {'shape':>10s} {'ratio':>6s} {'rank':>5s} {'kept':>6s} {'W err':>7s} {'y err':>7s} "
          + " ".join(f"{'dense M=' + str(m):>12s} {'lowrank':>8s}" for m in DEMO_ROWS) + "  (us)")  # fmt: skip
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name, weight in weights.items():
        m, n = weight.shape
        dense = nn.Linear(n, m, bias=False)
        with torch.no_grad():
            dense.weight.copy_(weight)
        x = torch.randn(64, n, generator=generator)
        y = dense(x)
        dense_fast = dense.to(device=device, dtype=dtype)
        dense_us = {rows_: _time_module(dense_fast, rows_, n, device, dtype) for rows_ in DEMO_ROWS}
        dense.to(device="cpu", dtype=torch.float32)
        for ratio in ratios:
            low = LowRankLinear.from_linear(dense, param_ratio=ratio)
            weight_err = ((low.to_linear().weight - weight).norm() / weight.norm()).item()
            with torch.no_grad():
                output_err = ((low(x) - y).norm() / y.norm()).item()
            low_fast = low.to(device=device, dtype=dtype)
            low_us = {rows_: _time_module(low_fast, rows_, n, device, dtype) for rows_ in DEMO_ROWS}
            short = name.split(".")[2]
            timing = " ".join(f"{dense_us[r]:12.1f} {low_us[r]:8.1f}" for r in DEMO_ROWS)
            print(f"{short:12s} {f'{m}x{n}':>10s} {ratio:6.2f} {low.rank:5d} {low.param_ratio:6.3f} "
                  f"{weight_err:7.4f} {output_err:7.4f} {timing}")  # fmt: skip
            rows.append(dict(layer=name, m=m, n=n, param_ratio_target=ratio, rank=low.rank, param_ratio=low.param_ratio,
                             weight_rel_error=weight_err, output_rel_error=output_err,
                             dense_us=dense_us, lowrank_us=low_us))  # fmt: skip
    print(f"timings: medians on {header['device']}; param ratio = fraction of parameters kept")
    return rows


def _time_module(module: nn.Module, rows: int, n: int, device: torch.device, dtype: torch.dtype) -> float:
    """Median us of module(x) for x (rows, n). On GPU, copies of the module are rotated so that the working set
    exceeds L2 (the layers of a 135M model would otherwise be timed from cache)."""
    x = torch.randn(rows, n, device=device, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    copies = (
        [module] + [copy.deepcopy(module) for _ in range(sets_to_exceed_l2(weight_bytes) - 1)]
        if device.type == "cuda"
        else [module]
    )
    with torch.no_grad():
        timing = time_op(
            lambda mod, inp: mod(inp),
            make_args=lambda i: (copies[i], x),
            n_weight_sets=len(copies),
            device=device,
            target_ms=DEMO_TARGET_MS,
            min_samples=5,
        )
    return timing["median_us"]
