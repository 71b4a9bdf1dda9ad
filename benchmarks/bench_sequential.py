"""Sequential against one-shot compression on the default model: peak memory, time and perplexity per method.

    python benchmarks/bench_sequential.py --out benchmarks/results [--cases swsc basis] [--eval-tokens 16384]

Each case runs `python -m lowrank_ops compress ... --no-dense-eval` twice in a child process, once as given and once
with --sequential, and records the child's peak resident memory (`os.wait4`'s ru_maxrss: the whole process, Python,
torch and the model included), its wall time and the compressed model's Wikipedia test perplexity (the package's
protocol). Writes sequential-<device>.json (rewritten after every run, keeping the rows of cases not rerun) and a
Markdown table beside it. On a CPU the model stays in host memory in both modes (the compute device is the host), so
the memory difference is the calibration statistics and activations the sequential driver does not hold at once, not
the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness.py

from harness import bench_header  # noqa: E402

from lowrank_ops.benchmarking import write_results  # noqa: E402

CASES = {
    "whiten-fisher-0.9": ["--method", "whiten", "--allocator", "fisher", "--param-ratio", "0.9"],
    "whiten-loss-0.9": ["--method", "whiten", "--allocator", "loss", "--param-ratio", "0.9"],
    "swsc-columns-3.25bits": ["--method", "swsc", "--shared", "columns", "--bits", "3.25", "--rank", "0"],
    "basis-stdlib-0.8": ["--method", "basis", "--param-ratio", "0.8"],
    "eora-gptq-int4-r64": ["--method", "eora", "--base", "gptq-int4-g128", "--rank", "64"],
}


def run_child(args: list[str]) -> dict:
    """Run `python -m lowrank_ops compress <args>` into a temporary --out; its results.json plus peak RSS and time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        tic = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "lowrank_ops", "compress", *args, "--out", str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        log = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - tic
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"compress {' '.join(args)} failed ({child.returncode}):\n{log[-4000:]}")
        result = json.loads((out / "results.json").read_text())
    return {"peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "wall_seconds": seconds,
            "perplexity": result["compressed"]["perplexity"], "eval_tokens": result["compressed"]["tokens"],
            "param_ratio": result["compression"]["param_ratio"],
            "bits_per_weight": result["compression"]["bits_per_weight"],
            "compression_seconds": result["compression"]["seconds"]["total"]}  # fmt: skip


def markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"# Sequential vs one-shot compression ({header['device']})", "",
             "SmolLM2-135M (fp32 on CPU), Wikipedia test perplexity; peak RSS of the whole `compress` process. "
             "`benchmarks/bench_sequential.py`.", "",
             "| case | mode | perplexity | kept / bits per weight | peak RSS (GB) | compression (s) | wall (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        size = f"{row['bits_per_weight']:.3f} bits" if row["bits_per_weight"] else f"{row['param_ratio']:.4f} kept"
        lines.append(f"| {row['case']} | {row['mode']} | {row['perplexity']:.3f} | {size} | {row['peak_rss_gb']:.2f} | "
                     f"{row['compression_seconds']:.0f} | {row['wall_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def kept_rows(path: Path, cases: list[str]) -> list[dict]:
    """The committed rows of the cases this run does not redo, so a run of some cases adds to the table."""
    if not path.exists():
        return []
    return [row for row in json.loads(path.read_text())["rows"] if row["case"] not in cases]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more compress arguments for every run")
    args = parser.parse_args(argv)
    header = bench_header()
    rows = kept_rows(Path(args.out) / f"sequential-{header['device_slug']}.json", args.cases)
    for case in args.cases:
        for mode in ("one-shot", "sequential"):
            flags = [*CASES[case], "--no-dense-eval", "--eval-tokens", str(args.eval_tokens), *args.extra]
            row = {"case": case, "mode": mode, "args": flags,
                   **run_child([*flags, "--sequential"] if mode == "sequential" else flags)}  # fmt: skip
            rows.append(row)
            print(f"{case:22s} {mode:10s} perplexity {row['perplexity']:9.3f}  peak RSS {row['peak_rss_gb']:.2f} GB  "
                  f"{row['wall_seconds']:.0f} s", flush=True)  # fmt: skip
            path = write_results(args.out, "sequential", header, rows)
            path.with_suffix(".md").write_text(markdown(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
