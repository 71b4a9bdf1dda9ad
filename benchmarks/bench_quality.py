"""Quality of the low-rank methods on a real model: perplexity versus param ratio (issue 4's acceptance grid).

    python benchmarks/bench_quality.py --out benchmarks/results [--ratios 0.95 0.9 0.8] [--eval-tokens 16384]

For the default model (SmolLM2-135M) and the Wikipedia test split: dense perplexity, then each
(method, allocator) of GRID at each param ratio (fraction of the targeted Linear parameters kept), with
compression time on this machine. Writes quality-<device>.json (rows + header), a Markdown table and a PNG.
The model is loaded once and every configuration starts from a fresh copy of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_header  # noqa: E402
from quality_common import compress_and_evaluate, finish_results, resumed_rows  # noqa: E402

from lowrank_ops.benchmarking import write_results  # noqa: E402
from lowrank_ops.compress import resolve_device  # noqa: E402
from lowrank_ops.configs import LowRankConfig  # noqa: E402
from lowrank_ops.pipeline import DEFAULT_MODEL, evaluate_perplexity, load_model, text_windows  # noqa: E402

GRID = [("svd", "uniform"), ("asvd", "uniform"), ("asvd", "sensitivity"), ("whiten", "uniform"), ("whiten", "loss"),
        ("whiten", "fisher")]


def markdown_table(rows: list[dict], header: dict) -> str:
    lines = [
        f"Perplexity on {rows[0]['eval_tokens']} Wikipedia test tokens "
        f"(windows of {rows[0]['seq_len']}, BOS-prefixed); "
        f"{header['device']}; model {rows[0]['model']}.",
        "",
        "| method | allocator | target ratio | kept ratio | perplexity | compression s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['allocator'] or ''} | {row['target_ratio']:.2f} | {row['param_ratio']:.4f} "
            f"| {row['perplexity']:.2f} | {row['compression_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.95, 0.9, 0.8])
    parser.add_argument("--grid", nargs="+", default=[f"{m}:{a}" for m, a in GRID], help="method:allocator entries")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing results file (this device); measure only missing entries")
    args = parser.parse_args(argv)

    header = bench_header()
    rows = resumed_rows(args.out, "quality", header, args.merge, dict(eval_tokens=args.eval_tokens,
                                                                     seq_len=args.seq_len))  # fmt: skip
    done = {(row["method"], row["allocator"], row["target_ratio"]) for row in rows}
    device = resolve_device(args.device)
    pristine, tokenizer, source = load_model(args.model, device)
    calibration = text_windows(tokenizer, "calibration", args.seq_len, args.calib_tokens)
    common = dict(model=source, eval_tokens=args.eval_tokens, seq_len=args.seq_len)
    if ("dense", None, 1.0) not in done:
        dense = evaluate_perplexity(pristine, tokenizer, args.seq_len, args.eval_tokens, batch_size=4)
        rows.insert(0, dict(common, method="dense", allocator=None, variant="dense", target_ratio=1.0,
                            param_ratio=1.0, perplexity=dense["perplexity"], compression_seconds=0.0))  # fmt: skip
        print(f"dense: perplexity {dense['perplexity']:.3f}", flush=True)
    header["plot"] = {"x": "param_ratio", "y": "perplexity", "line": "variant", "panel_cols": "model",
                      "shape_keys": [], "log_y": True}  # fmt: skip
    path = write_results(args.out, "quality", header, rows)
    for entry in args.grid:
        method, allocator = entry.split(":")
        for ratio in args.ratios:
            if (method, allocator, ratio) in done:
                continue
            config = LowRankConfig(
                method=method, allocator=allocator, param_ratio=ratio, calib_tokens=args.calib_tokens,
                seq_len=args.seq_len, device=args.device,
            )  # fmt: skip
            report, ppl, seconds = compress_and_evaluate(pristine, tokenizer, config, calibration, args.seq_len,
                                                         args.eval_tokens)  # fmt: skip
            rows.append(dict(common, method=method, allocator=allocator, variant=entry, target_ratio=ratio,
                             param_ratio=report.param_ratio, perplexity=ppl, compression_seconds=seconds,
                             ranks={layer.name: layer.rank for layer in report.layers}))  # fmt: skip
            print(f"{method:7s} {allocator:11s} ratio {ratio:.2f} (kept {report.param_ratio:.4f}): "
                  f"perplexity {ppl:.3f}, compression {seconds:.1f} s", flush=True)  # fmt: skip
            path = write_results(args.out, "quality", header, rows)
    finish_results(path, markdown_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
