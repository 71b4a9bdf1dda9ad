"""What the perplexity benchmarks (bench_quality, bench_swsc_quality, bench_eora_quality) share: compressing a fresh
copy of the model and evaluating it, resuming a results file (--merge), and finishing one (Markdown table, PNG)."""

from __future__ import annotations

import copy
import time
from pathlib import Path

from harness import load_previous_rows, plot_results

from lowrank_ops.compress import compress_
from lowrank_ops.pipeline import evaluate_perplexity


def compress_and_evaluate(pristine, tokenizer, config, calibration, seq_len: int, eval_tokens: int):
    """(report, perplexity, compression seconds) of `config` applied to a deep copy of `pristine`."""
    model = copy.deepcopy(pristine)
    tic = time.perf_counter()
    report = compress_(model, config, calibration, progress=False)
    seconds = time.perf_counter() - tic
    ev = evaluate_perplexity(model, tokenizer, seq_len, eval_tokens, batch_size=4, progress=False)
    return report, ev["perplexity"], seconds


def finish_results(path: Path, markdown: str) -> None:
    """Write the Markdown table next to the JSON results, draw the PNG (the numbers matter more than the picture:
    a plotting failure is reported, not raised) and print the table."""
    path.with_suffix(".md").write_text(markdown)
    try:
        plot_results(path, path.with_suffix(".png"))
    except Exception as exc:
        print(f"plot skipped: {exc}")
    print(markdown)


def resumed_rows(out_dir, bench: str, header: dict, merge: bool, protocol: dict) -> list[dict]:
    """The rows of an existing results file to keep (`--merge`), after checking that they were measured with the
    same `protocol` (e.g. eval_tokens, seq_len): mixing protocols in one table would compare unlike numbers."""
    rows = load_previous_rows(out_dir, bench, header, merge)
    for row in rows:
        different = {k: row.get(k) for k, v in protocol.items() if row.get(k) != v}
        if different:
            raise SystemExit(f"--merge: the existing rows of {bench} were measured with {different}, this run with "
                             f"{ {k: protocol[k] for k in different} }; pass the same values")
    return rows
