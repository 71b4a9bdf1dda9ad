"""Quality of a compressed base plus a low-rank residual on a real model: perplexity per base, residual and rank
(issue 5, part 5).

    python benchmarks/bench_eora_quality.py --out benchmarks/results [--bases int3-g128 2:4-wanda] [--ranks 32 64]

For the default model (SmolLM2-135M) and the Wikipedia test split: dense perplexity, then for every base of --bases
(default int4-g128 RTN, gptq-int4-g128, int3-g128 RTN, 2:4-wanda) the base alone (residual "none") and the base with
each residual of --residuals (svd: plain SVD of the error, ZeroQuant-V2 / LoRC; lqer: mean-|x| scaled, LQER; eora:
eigenspace of the calibration Gram, EoRA) at every rank of --ranks (default 32, 64, 128; each must stay below every
layer's break-even rank, 144 for SmolLM2's 192 x 576 k/v projections). Every configuration starts from a fresh copy
of the model and recomputes its base (GPTQ is the slow one). The model ships as Q4_1 (4-bit, blocks of 32), so 4-bit
bases are nearly lossless for that reason alone: the int3 and 2:4 rows carry the evidence. Writes
eora_quality-<device>.json (rewritten after every row), a Markdown table and a PNG. `--merge` keeps the rows of an
existing results file for this device and measures only the missing (base, residual, rank) configurations (same
--calib-tokens / --eval-tokens required), so the grid can be filled over several runs. Bits per weight count the
packed codes as stored and every float (scales, zero points, residual factors, a 2:4 base stored dense, the dense
row) at 16 bits, the deployment width, whatever dtype the run used (`lowrank_ops.compress.REPORT_VALUE_BITS`); the
nominal compressed 2:4 size is reported apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_header  # noqa: E402
from quality_common import compress_and_evaluate, finish_results, resumed_rows  # noqa: E402

from lowrank_ops.benchmarking import write_results  # noqa: E402
from lowrank_ops.compress import REPORT_VALUE_BITS, resolve_device  # noqa: E402
from lowrank_ops.configs import BaseResidualConfig  # noqa: E402
from lowrank_ops.pipeline import DEFAULT_MODEL, evaluate_perplexity, load_model, text_windows  # noqa: E402

BASES = ["int4-g128", "gptq-int4-g128", "int3-g128", "2:4-wanda"]
RESIDUALS = ["svd", "lqer", "eora"]
RANKS = [32, 64, 128]


def _nominal_bits(report) -> float | None:
    """Bits per targeted weight in the compressed 2:4 format (2:4 bases only), weighted like report.bits_per_weight."""
    layers = report.layers
    if not layers or getattr(layers[0], "nominal_2to4_bits_per_weight", None) is None:
        return None
    total = sum(layer.nominal_2to4_bits_per_weight * layer.out_features * layer.in_features for layer in layers)
    return total / report.targeted_params


def markdown_table(rows: list[dict], header: dict) -> str:
    first = rows[0]
    ranks = sorted({row["rank"] for row in rows if row["rank"] is not None})
    lines = [
        f"Perplexity on {first['eval_tokens']} Wikipedia test tokens (windows of {first['seq_len']}, BOS-prefixed); "
        f"{header['device']}; model {first['model']}; {first['calib_tokens']} calibration tokens.",
        "",
        "| base | residual | " + " | ".join(["none"] + [f"r={r}" for r in ranks]) + " |",
        "|---|---|" + "---|" * (len(ranks) + 1),
    ]
    by_key = {(row["base"], row["residual"], row["rank"]): row["perplexity"] for row in rows}
    for base in dict.fromkeys(row["base"] for row in rows):
        if base == "dense":
            lines.append(f"| dense | | {by_key[('dense', 'none', None)]:.2f} |" + " |" * len(ranks))
            continue
        none = by_key.get((base, "none", None))
        for residual in dict.fromkeys(row["residual"] for row in rows if row["base"] == base and row["rank"]):
            cells = [f"{none:.2f}" if none is not None else ""]
            cells += [f"{by_key[(base, residual, r)]:.2f}" if (base, residual, r) in by_key else "" for r in ranks]
            lines.append(f"| {base} | {residual} | " + " | ".join(cells) + " |")
        if not any(row["base"] == base and row["rank"] for row in rows) and none is not None:
            lines.append(f"| {base} | none | {none:.2f} |" + " |" * len(ranks))
    lines += ["", "| base | residual | rank | bits/w | nominal 2:4 bits/w | perplexity | compression s |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        rank = "" if row["rank"] is None else str(row["rank"])
        nominal = row.get("nominal_2to4_bits_per_weight")
        nominal = "" if nominal is None else f"{nominal:.3f}"
        lines.append(f"| {row['base']} | {row['residual']} | {rank} | {row['bits_per_weight']:.3f} | {nominal} "
                     f"| {row['perplexity']:.2f} | {row['compression_seconds']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--bases", nargs="+", default=BASES, help="base specs (lowrank_ops.algorithms.eora)")
    parser.add_argument("--residuals", nargs="+", default=RESIDUALS, choices=RESIDUALS)
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS, help="residual ranks (>= 1)")
    parser.add_argument("--no-base-only", action="store_true", help="skip the base-without-residual rows")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--merge", action="store_true", help="keep the rows of an existing results file (this device)")
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.ranks):
        parser.error(f"--ranks {args.ranks}: every rank must be >= 1 (the base alone is the 'none' row)")
    calib = dict(calib_tokens=args.calib_tokens, seq_len=args.seq_len, device=args.device)
    grid = []  # every config is built (and so validated) before any work
    for base in args.bases:
        if not args.no_base_only:
            grid.append((base, "none", None, BaseResidualConfig(base=base, rank=0, residual="svd", **calib)))
        grid += [(base, res, r, BaseResidualConfig(base=base, rank=r, residual=res, **calib))
                 for res in args.residuals for r in args.ranks]  # fmt: skip

    header = bench_header()
    header["plot"] = {"x": "rank", "y": "perplexity", "line": "residual", "panel_cols": "base", "shape_keys": [],
                      "log_y": True}  # fmt: skip
    protocol = dict(calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens, seq_len=args.seq_len,
                    value_bits=REPORT_VALUE_BITS)  # fmt: skip
    rows = resumed_rows(args.out, "eora_quality", header, args.merge, protocol)
    done = {(row["base"], row["residual"], row["rank"]) for row in rows}
    grid = [entry for entry in grid if entry[:3] not in done]
    device = resolve_device(args.device)
    pristine, tokenizer, source = load_model(args.model, device)
    calibration = text_windows(tokenizer, "calibration", args.seq_len, args.calib_tokens)
    common = dict(model=source, device=str(device), **protocol)
    if ("dense", "none", None) not in done:
        dense = evaluate_perplexity(pristine, tokenizer, args.seq_len, args.eval_tokens, batch_size=4, progress=False)
        rows.insert(0, dict(common, base="dense", residual="none", rank=None, variant="dense",
                            bits_per_weight=float(REPORT_VALUE_BITS), nominal_2to4_bits_per_weight=None,
                            perplexity=dense["perplexity"], compression_seconds=0.0))  # fmt: skip
        print(f"dense: perplexity {dense['perplexity']:.3f}", flush=True)
    print(f"{len(grid)} configurations to measure ({len(rows)} rows kept)", flush=True)
    path = write_results(args.out, "eora_quality", header, rows)
    for base, residual, rank, config in grid:
        report, ppl, seconds = compress_and_evaluate(pristine, tokenizer, config, calibration, args.seq_len,
                                                     args.eval_tokens)  # fmt: skip
        nominal = _nominal_bits(report)
        rows.append(dict(common, base=base, residual=residual, rank=rank, variant=f"{base} + {residual}",
                         bits_per_weight=report.bits_per_weight, nominal_2to4_bits_per_weight=nominal,
                         perplexity=ppl, compression_seconds=seconds,
                         ranks=sorted({layer.rank for layer in report.layers}), config=config.to_dict()))  # fmt: skip
        print(f"{base:16s} {residual:5s} rank {rank!s:4s}: perplexity {ppl:.3f}, "
              f"{report.bits_per_weight:.3f} bits/w, compression {seconds:.1f} s", flush=True)  # fmt: skip
        path = write_results(args.out, "eora_quality", header, rows)

    finish_results(path, markdown_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
