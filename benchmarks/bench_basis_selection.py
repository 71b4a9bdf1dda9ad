"""Application-specific basis selection on a real model (issue 7's acceptance table).

    nice -n 5 python benchmarks/bench_basis_selection.py --out benchmarks/results [--ratios 0.8 0.6]

Target application: Python code, the running interpreter's standard library split by file
(`lowrank_ops.data.python_stdlib_split`: calibration / train / held-out / test files are disjoint). For the default
model (SmolLM2-135M) and each param ratio (fraction of the targeted Linear parameters kept), every variant is
evaluated on the code test files AND on the Wikipedia test articles:

- asvd-wiki:     ASVD (alpha 0.5) + ASVD's sensitivity allocator, calibrated on Wikipedia (the general-purpose model),
- asvd-code:     the same calibrated on the code calibration files,
- basis-<score>: basis selection, training-free (whitened basis on the code Gram; score energy / taylor / fisher),
- basis-relearn: basis selection + `--new-rank` new bases per layer + `--train-steps` steps re-learning s on the code
                 train files with early stopping on the held-out files.

Writes basis_selection-<device>.json (rows + header, rewritten after every row so an interrupted run keeps what it
measured), a Markdown table and a PNG. The model is loaded once and every variant starts from a fresh copy.
`--merge` keeps the rows of an existing results file for this device and measures only the missing (variant, ratio)
pairs, so an interrupted run can be resumed (or its variants spread over several runs).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import bench_header, load_previous_rows  # noqa: E402

from lowrank_ops.benchmarking import write_results  # noqa: E402
from lowrank_ops.compress import compress_, resolve_device  # noqa: E402
from lowrank_ops.configs import BasisConfig, LowRankConfig  # noqa: E402
from lowrank_ops.evaluate import perplexity  # noqa: E402
from lowrank_ops.pipeline import DEFAULT_MODEL, load_model, target_windows, text_windows  # noqa: E402

VARIANTS = ("basis-fisher", "asvd-code", "basis-relearn", "asvd-wiki", "basis-energy", "basis-taylor")
TABLE_ORDER = ("dense", "asvd-wiki", "asvd-code", "basis-energy", "basis-taylor", "basis-fisher", "basis-relearn")


def ordered(rows: list[dict]) -> list[dict]:
    """Dense first, then by ratio (descending) and TABLE_ORDER."""
    return sorted(rows, key=lambda r: (r["variant"] != "dense", -r["target_ratio"], TABLE_ORDER.index(r["variant"])))


def markdown_table(rows: list[dict], header: dict, args) -> str:
    first = ordered(rows)[0]
    lines = [
        f"Perplexity on {first['code_tokens']} tokens of Python standard-library test files (code) and "
        f"{first['wiki_tokens']} Wikipedia test tokens (windows of {first['seq_len']}, BOS-prefixed); "
        f"{header['device']}; model {first['model']}. Calibration {args.calib_tokens} tokens; re-learning: "
        f"{args.train_tokens} train / {args.heldout_tokens} held-out code tokens.",
        "",
        "| variant | calibrated on | target ratio | kept ratio | code ppl | Wikipedia ppl | compression s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ordered(rows):
        lines.append(
            f"| {row['variant']} | {row['calibration']} | {row['target_ratio']:.2f} | {row['param_ratio']:.4f} "
            f"| {row['code_ppl']:.2f} | {row['wiki_ppl']:.2f} | {row['compression_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def config_for(variant: str, ratio: float, args):
    common = dict(calib_tokens=args.calib_tokens, seq_len=args.seq_len, batch_size=args.batch_size, device=args.device)
    if variant.startswith("asvd"):
        return LowRankConfig(method="asvd", allocator="sensitivity", param_ratio=ratio, **common)
    if variant == "basis-relearn":
        return BasisConfig(param_ratio=ratio, score=args.relearn_score, score_tokens=args.score_tokens,
                           new_rank=args.new_rank, train_steps=args.train_steps, lr=args.lr,
                           eval_every=args.eval_every, **{**common, "batch_size": args.train_batch_size})  # fmt: skip
    score = variant.removeprefix("basis-")
    return BasisConfig(param_ratio=ratio, score=score, score_tokens=args.score_tokens, **common)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.6])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--score-tokens", type=int, default=4096)
    parser.add_argument("--train-tokens", type=int, default=16384)
    parser.add_argument("--heldout-tokens", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--train-batch-size", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--new-rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--relearn-score", default="fisher", choices=["energy", "taylor", "fisher"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--merge", action="store_true", help="keep the rows of an existing results file (this device)")
    args = parser.parse_args(argv)

    header = bench_header()
    header["plot"] = {"x": "param_ratio", "y": "code_ppl", "line": "variant", "panel_cols": "model",
                      "shape_keys": [], "log_y": True}  # fmt: skip
    device = resolve_device(args.device)
    pristine, tokenizer, source = load_model(args.model, device)
    budgets = {"calibration": args.calib_tokens, "train": args.train_tokens, "heldout": args.heldout_tokens,
               "test": args.eval_tokens}  # fmt: skip
    code = target_windows(tokenizer, "python-stdlib", args.seq_len, budgets)
    wiki_calibration = text_windows(tokenizer, "calibration", args.seq_len, args.calib_tokens)
    wiki_test = text_windows(tokenizer, "test", args.seq_len, args.eval_tokens)

    def evaluate(model) -> dict:
        return {
            "code_ppl": perplexity(model, code["test"], batch_size=args.batch_size, progress=False),
            "wiki_ppl": perplexity(model, wiki_test, batch_size=args.batch_size, progress=False),
        }

    common = dict(model=source, seq_len=args.seq_len, code_tokens=int(code["test"].numel()),
                  wiki_tokens=int(wiki_test.numel()))  # fmt: skip
    rows = load_previous_rows(args.out, "basis_selection", header, args.merge)
    done = {(row["variant"], row["target_ratio"]) for row in rows}
    if ("dense", 1.0) not in done:
        rows.append(dict(common, variant="dense", calibration="", target_ratio=1.0, param_ratio=1.0,
                         compression_seconds=0.0, **evaluate(pristine)))  # fmt: skip
        print(f"dense: code {rows[-1]['code_ppl']:.3f}, wikipedia {rows[-1]['wiki_ppl']:.3f}", flush=True)
    path = write_results(args.out, "basis_selection", header, ordered(rows))
    for variant in args.variants:
        for ratio in args.ratios:
            if (variant, ratio) in done:
                continue
            model = copy.deepcopy(pristine)
            config = config_for(variant, ratio, args)
            on_wiki = variant == "asvd-wiki"
            calibration = wiki_calibration if on_wiki else code["calibration"]
            extra = {"train": code["train"], "heldout": code["heldout"]} if variant == "basis-relearn" else {}
            tic = time.perf_counter()
            report = compress_(model, config, calibration, progress=False, **extra)
            seconds = time.perf_counter() - tic
            row = dict(common, variant=variant, calibration="wikipedia" if on_wiki else "code", target_ratio=ratio,
                       param_ratio=report.param_ratio, compression_seconds=seconds, **evaluate(model),
                       config=config.to_dict(), stage_seconds=report.seconds,
                       layers=[{k: v for k, v in vars(layer).items() if k not in ("out_features", "in_features")}
                               for layer in report.layers])  # fmt: skip
            if getattr(report, "training", None):
                row["training"] = report.training
            rows.append(row)
            print(f"{variant:14s} ratio {ratio:.2f} (kept {report.param_ratio:.4f}): code {row['code_ppl']:.3f}, "
                  f"wikipedia {row['wiki_ppl']:.3f}, compression {seconds:.1f} s "
                  f"({', '.join(f'{k} {v:.0f}' for k, v in report.seconds.items())})", flush=True)  # fmt: skip
            del model
            path = write_results(args.out, "basis_selection", header, ordered(rows))
            path.with_suffix(".md").write_text(markdown_table(rows, header, args))
    try:
        from plot import plot_results

        plot_results(path, path.with_suffix(".png"))
    except Exception as exc:  # the numbers matter more than the picture
        print(f"plot skipped: {exc}")
    print(markdown_table(rows, header, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
