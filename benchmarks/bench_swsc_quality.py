"""Quality of SWSC (shared channels + low-rank residual) against round-to-nearest at equal bits (issue 6, part 5).

    python benchmarks/bench_swsc_quality.py --out benchmarks/results [--bits 3 2] [--ranks 0 16]

For the default model (SmolLM2-135M) and the Wikipedia test split: dense perplexity, RTN int<b>-g128 (asymmetric,
fp16 scale and zero per group of 128: b + 0.25 bits per weight, counted as if packed tightly -- the layout stores
int2 / int3 codes in 4-bit slots), and SWSC variants whose per-layer budget is the same b + 0.25 bits per weight
(codebook + int32 index + residual factors, 16-bit values; `lowrank_ops.algorithms.swsc`):

    paper        plain k-means of the rows, plain SVD residual (Zeng et al. 2025)
    weighted     k-means weighted by (mean |x|)^2 per input channel, plain SVD residual
    whitened     plain k-means, residual whitened by the calibration Gram (EoRA)
    both         weighted k-means and whitened residual
    columns      shared columns (input channels): plain k-means of W's columns, plain SVD residual
    columns-weighted  shared columns, each input channel a k-means point weighted by (mean |x|)^2

each at every residual rank of --ranks (a rank buys fewer clusters at the same bits). Every configuration starts
from a fresh copy of the model. Writes swsc_quality-<device>.json, a Markdown table and a PNG. `--merge` keeps the
rows of an existing results file for this device and measures only missing (variant, rank, bits) entries.
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
from lowrank_ops.configs import BaseResidualConfig, SwscConfig  # noqa: E402
from lowrank_ops.pipeline import DEFAULT_MODEL, evaluate_perplexity, load_model, text_windows  # noqa: E402

RTN_GROUP = 128
VARIANTS = {
    "paper": dict(weighted=False, residual="svd"),
    "weighted": dict(weighted=True, residual="svd"),
    "whitened": dict(weighted=False, residual="eora"),
    "both": dict(weighted=True, residual="eora"),
    "columns": dict(shared="columns", weighted=False, residual="svd"),
    "columns-weighted": dict(shared="columns", weighted=True, residual="svd"),
}


def rtn_bits(bits: int) -> float:
    """Bits per weight of RTN int<bits>-g128 with an fp16 scale and an fp16 zero per group."""
    return bits + 32 / RTN_GROUP


def markdown_table(rows: list[dict], header: dict) -> str:
    first = rows[0]
    lines = [
        f"Perplexity on {first['eval_tokens']} Wikipedia test tokens (windows of {first['seq_len']}, BOS-prefixed); "
        f"{header['device']}; model {first['model']}. Bits per weight of the targeted Linear layers.",
        "",
        "| variant | residual rank | budget bits | stored bits | perplexity | compression s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        rank = "" if row["rank"] is None else str(row["rank"])
        lines.append(
            f"| {row['variant']} | {rank} | {row['budget_bits']:.2f} | {row['bits_per_weight']:.3f} "
            f"| {row['perplexity']:.2f} | {row['compression_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 2], help="RTN code widths to match")
    parser.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[0, 16],
        help="SWSC residual ranks (32 does not fit SmolLM2's 192 x 576 k/v layers at 3.25 bits)",
    )
    parser.add_argument("--kmeans-iters", type=int, default=25, help="Lloyd iteration cap (CPU time: ~1 s per layer "
                        "at 50)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing results file (this device); measure only missing entries")
    args = parser.parse_args(argv)

    header = bench_header()
    header["plot"] = {"x": "bits_per_weight", "y": "perplexity", "line": "label", "panel_cols": "model",
                      "shape_keys": [], "log_y": True}  # fmt: skip
    rows = resumed_rows(args.out, "swsc_quality", header, args.merge,
                        dict(eval_tokens=args.eval_tokens, seq_len=args.seq_len))  # fmt: skip
    done = {(row["variant"], row["rank"], row["budget_bits"]) for row in rows}
    device = resolve_device(args.device)
    pristine, tokenizer, source = load_model(args.model, device)
    calibration = text_windows(tokenizer, "calibration", args.seq_len, args.calib_tokens)
    common = dict(model=source, eval_tokens=args.eval_tokens, seq_len=args.seq_len, device=str(device))
    if ("dense", None, 16.0) not in done:
        dense = evaluate_perplexity(pristine, tokenizer, args.seq_len, args.eval_tokens, batch_size=4, progress=False)
        rows.insert(0, dict(common, variant="dense", label="dense", rank=None, budget_bits=16.0, bits_per_weight=16.0,
                            perplexity=dense["perplexity"], compression_seconds=0.0))  # fmt: skip
        print(f"dense: perplexity {dense['perplexity']:.3f}", flush=True)
    calib = dict(calib_tokens=args.calib_tokens, seq_len=args.seq_len, device=args.device)

    def run(variant: str, rank: int | None, budget: float, config) -> None:
        if (variant, rank, budget) in done:
            return
        report, ppl, seconds = compress_and_evaluate(pristine, tokenizer, config, calibration, args.seq_len,
                                                     args.eval_tokens)  # fmt: skip
        rtn = config.kind == BaseResidualConfig.kind
        stored = budget if rtn else report.bits_per_weight
        label = f"rtn g{RTN_GROUP}" if rtn else f"{variant} r{rank}"  # one line per method
        rows.append(dict(common, variant=variant, label=label, rank=rank, budget_bits=budget, bits_per_weight=stored,
                         perplexity=ppl, compression_seconds=seconds,
                         config=config.to_dict()))  # fmt: skip
        print(f"{variant:22s} rank {rank!s:4s} {budget:.2f} bits (stored {stored:.3f}): perplexity "
              f"{ppl:.3f}, compression {seconds:.1f} s", flush=True)  # fmt: skip
        write_results(args.out, "swsc_quality", header, rows)

    for bits in args.bits:
        budget = rtn_bits(bits)
        rtn_config = BaseResidualConfig(base=f"int{bits}-g{RTN_GROUP}", rank=0, **calib)
        run(f"rtn int{bits}-g{RTN_GROUP}", None, budget, rtn_config)
        for name in args.variants:
            for rank in args.ranks:
                config = SwscConfig(bits=budget, rank=rank, n_iter=args.kmeans_iters, **VARIANTS[name], **calib)
                if rank == 0 and config.residual == "eora":
                    continue  # no residual: identical to the svd-residual variant
                run(f"swsc {name}", rank, budget, config)

    path = write_results(args.out, "swsc_quality", header, rows)
    finish_results(path, markdown_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
