"""Scale measurements (issue 18): peak memory of one-shot against layer-by-layer compression of a ~1B-parameter
random-weight Llama, and one process against two (torchrun, gloo) on the default model.

    python benchmarks/bench_large.py --out benchmarks/results memory       # TinyLlama's shape, random bf16 weights
    python benchmarks/bench_large.py --out benchmarks/results processes    # SmolLM2-135M, 1 vs 2 processes

memory: builds a Llama with TinyLlama-1.1B's shape (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads;
the default model's tokenizer and vocabulary, 49152) with random weights, saves it as a bf16 safetensors checkpoint,
then runs `compress --method whiten --param-ratio 0.9` on it in a child process twice, in memory and with
--layer-by-layer, recording each child's peak RSS (`os.wait4`), wall time and compression time. Random weights:
the perplexity means nothing and is not evaluated.
processes: `compress --method whiten --allocator loss --param-ratio 0.9` on the default model in one process and
under `torchrun --nproc-per-node 2` (gloo), both saved; compares the ranks and the effective weights (W' = U V) of
every layer and records the wall times. On a 2-core CPU a single process already uses both cores (torch threads), so
the ratio says what the split costs or saves here, not what N GPUs would give.
Writes large-<device>.json and a Markdown table beside it.
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

TINYLLAMA_SHAPE = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                       num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip


def _anonymous_rss_kb(pid: int) -> int:
    """RssAnon of `pid` and its descendants (kB; Linux /proc): the process's own memory, without the file-backed
    pages of memory-mapped checkpoints that ru_maxrss also counts."""
    total, pids = 0, [pid]
    while pids:
        current = pids.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:")), 0)
        pids += [int(child) for child in children]
    return total


def run(command: list[str], env: dict | None = None) -> dict:
    """Run `command` as a child; its peak RSS (GB, ru_maxrss: the largest process, file pages included), its peak
    anonymous RSS (GB, summed over its processes, sampled every 0.5 s) and wall time. Raises when it fails."""
    tic = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **(env or {})})  # fmt: skip
        peak_anonymous = 0
        while True:
            done, status, usage = os.wait4(child.pid, os.WNOHANG)  # wait4: the child's ru_maxrss
            if done:
                break
            peak_anonymous = max(peak_anonymous, _anonymous_rss_kb(child.pid))
            time.sleep(0.5)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-4000:]}")
    return {"peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "peak_anonymous_rss_gb": peak_anonymous * 1024 / 1e9,
            "wall_seconds": time.perf_counter() - tic}


def make_random_llama(directory: Path, layers: int) -> int:
    """A TinyLlama-shaped Llama with random bf16 weights and the default model's tokenizer; returns its parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowrank_ops.assets import load_default_model

    _, tokenizer = load_default_model(dtype=torch.float32, device="cpu")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16",
                         **{**TINYLLAMA_SHAPE, "num_hidden_layers": layers})  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def memory(args, header) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        source = Path(tmp) / "tinyllama-random"
        params = make_random_llama(source, args.layers)
        flags = ["--model", str(source), "--method", "whiten", "--param-ratio", "0.9", "--dtype", "bfloat16",
                 "--calib-tokens", str(args.calib_tokens), "--seq-len", "256", "--batch-size", "2", "--no-eval",
                 "--no-dense-eval"]  # fmt: skip
        for mode, extra in (("layer-by-layer", ["--layer-by-layer"]), ("one-shot", [])):
            out = Path(tmp) / mode
            row = run([sys.executable, "-m", "lowrank_ops", "compress", *flags, *extra, "--out", str(out)])
            result = json.loads((out / "results.json").read_text())
            row.update(case="tinyllama-shape-random-bf16", mode=mode, parameters=params, args=flags + extra,
                       compression_seconds=result["compression"]["seconds"]["total"],
                       param_ratio=result["compression"]["param_ratio"])  # fmt: skip
            rows.append(row)
            print(f"{mode:15s} peak RSS {row['peak_rss_gb']:.2f} GB, {row['wall_seconds']:.0f} s", flush=True)
            write_results(args.out, "large", header, rows)
    return rows


def processes(args, header) -> list[dict]:
    from lowrank_ops.serialization import load_compressed

    rows, models = [], {}
    flags = ["--method", "whiten", "--allocator", "loss", "--param-ratio", "0.9", "--no-eval", "--no-dense-eval",
             "--calib-tokens", str(args.calib_tokens)]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for world in (1, 2):
            out = Path(tmp) / f"world{world}"
            launcher = [sys.executable, "-m", "lowrank_ops"] if world == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "-m", "lowrank_ops"]
            row = run([*launcher, "compress", *flags, "--out", str(out)])
            result = json.loads((out / "results.json").read_text())
            row.update(case="smollm2-whiten-loss-0.9", mode=f"{world} process(es)", world_size=result["world_size"],
                       args=flags, compression_seconds=result["compression"]["seconds"]["total"],
                       ranks=[layer["rank"] for layer in result["compression"]["layers"]])  # fmt: skip
            models[world] = load_compressed(out)
            rows.append(row)
            print(f"{world} process(es): {row['wall_seconds']:.0f} s (compression {row['compression_seconds']:.0f} s)",
                  flush=True)  # fmt: skip
        worst = 0.0
        for name, module in models[1].named_modules():
            if hasattr(module, "to_linear") and hasattr(module, "u"):
                a = module.to_linear().weight.double()
                b = models[2].get_submodule(name).to_linear().weight.double()
                worst = max(worst, ((a - b).norm() / a.norm()).item())
        rows[-1].update(same_ranks=rows[0]["ranks"] == rows[1]["ranks"], max_relative_weight_difference=worst,
                        wall_time_ratio=rows[1]["wall_seconds"] / rows[0]["wall_seconds"])  # fmt: skip
        print(f"same ranks: {rows[-1]['same_ranks']}, max relative weight difference {worst:.2e}", flush=True)
    return rows


def markdown(header: dict, rows: list[dict]) -> str:
    lines = [f"# Scale measurements ({header['device']})", "", "`benchmarks/bench_large.py`; peak RSS of the whole "
             "child process (Python, torch, model, statistics).", "",
             "| case | mode | peak RSS (GB) | wall (s) | compression (s) | notes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        notes = []
        if "parameters" in row:
            notes.append(f"{row['parameters'] / 1e9:.2f} B parameters")
        if "peak_anonymous_rss_gb" in row:
            notes.append(f"peak anonymous RSS {row['peak_anonymous_rss_gb']:.2f} GB")
        if "same_ranks" in row:
            notes.append(f"same ranks: {row['same_ranks']}, max relative difference of W' "
                         f"{row['max_relative_weight_difference']:.1e}, wall-time ratio {row['wall_time_ratio']:.2f}")
        lines.append(f"| {row['case']} | {row['mode']} | {row['peak_rss_gb']:.2f} | {row['wall_seconds']:.0f} | "
                     f"{row['compression_seconds']:.0f} | {'; '.join(notes)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="+", choices=["memory", "processes"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22, help="memory: decoder layers (22: TinyLlama's)")
    parser.add_argument("--tmp", default=None, help="where the temporary checkpoints go (several GB for memory)")
    args = parser.parse_args(argv)
    header = bench_header()
    rows: list[dict] = []
    for what in args.what:
        rows += {"memory": memory, "processes": processes}[what](args, header)
        path = write_results(args.out, "large", header, rows)
        path.with_suffix(".md").write_text(markdown(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
