"""On paper (issue 18, point 3c): time and memory to compress Llama-2-7B and a 70B Llama with whiten + fisher on one
H100 and on eight, one-shot against layer-by-layer. An estimate, not a measurement: nothing here ran on a GPU.

    python benchmarks/estimate_large.py --out benchmarks/results

Every term is a count divided by a rate; the rates are the H100 anchors of docs/FACTS.md where one exists (marked
"measured") and the H100 SXM datasheet otherwise (marked "datasheet"), so each time is a floor for its term:
- calibration forward: 2 x (Linear parameters) x T + attention 4 x layers x T x seq_len x hidden, at the measured
  bf16 GEMM rate;
- Gram statistics X^T X, accumulated in float64 (the engine's default): 2 n^2 T per distinct input of a decoder layer
  (attention in, o_proj in, MLP in, down_proj in) at the datasheet FP64 tensor-core rate;
- decompositions: one full SVD of W S per target, scaled from the measured gesvda 4096^2 fp32 time by m n min(m, n);
  the engine falls back to gesvd (10x slower at 4096^2, measured) when gesvda fails its accuracy check;
- fisher scores: forward + backward (3 x forward flops) over the score tokens with every target at full rank;
- sequential / layer-by-layer: a dense forward sweep for the statistics and a second sweep for the refit (two SVDs
  and two calibration passes per target), plus the checkpoint read from disk once per sweep at the datasheet NVMe
  rate; one-shot: one of each;
- eight GPUs (torch.distributed, NCCL): calibration windows and SVDs split eight ways (fits by cost; in sequential
  mode a decoder layer's 7 fits are what there is to split), Grams all-reduced over NVLink (ring: 2 x bytes / rate).
Memory: one-shot holds the bf16 model, every target's Grams (float64) and, for fisher, every target's full-rank factors
(float32); layer-by-layer holds the outside tensors, one decoder layer and its full-rank factors, that layer's Grams
and the calibration hidden states (T x hidden, bf16); fisher's forward sweep spills each layer's Grams and score-window
inputs to disk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1e9
RATES = {  # per second; (value, source)
    "bf16_gemm_flops": (690e12, "measured (docs/FACTS.md: bf16 GEMM 8192^3, 690-800 TFLOP/s; the low end)"),
    "fp64_flops": (67e12, "datasheet (H100 SXM FP64 tensor core)"),
    "nvlink_bytes": (450e9, "datasheet (H100 SXM NVLink, one direction)"),
    "disk_bytes": (3e9, "assumed (one NVMe drive, sequential read)"),
}
SVD_4096_SECONDS = (0.13, "measured (docs/FACTS.md: torch.linalg.svd gesvda 4096^2 fp32)")
MODELS = {
    "Llama-2-7B": dict(layers=32, hidden=4096, intermediate=11008, kv=4096, vocab=32000, tied=False),
    "Llama-70B (Llama-2/3 shape, GQA 8 KV heads)": dict(layers=80, hidden=8192, intermediate=28672, kv=1024,
                                                         vocab=128256, tied=False),
}


def targets(model: dict) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's Linear layers: q, k, v, o, gate, up, down."""
    h, f, kv = model["hidden"], model["intermediate"], model["kv"]
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def estimate(model: dict, tokens: int, score_tokens: int, seq_len: int, gpus: int, layer_by_layer: bool) -> dict:
    L, h, f = model["layers"], model["hidden"], model["intermediate"]
    shapes = targets(model)
    linear = sum(m * n for m, n in shapes)  # per layer
    full_rank = sum(min(m, n) * (m + n) for m, n in shapes)  # parameters of the full-rank factors, per layer
    outside = model["vocab"] * h * (1 if model["tied"] else 2)
    inputs = [h, h, h, f]  # distinct inputs of one layer: attention, o_proj, MLP, down_proj
    gram_bytes = 8 * sum(n * n for n in inputs)  # per layer, float64
    sweeps = 2 if layer_by_layer else 1

    forward = 2 * linear * L * tokens + 4 * L * tokens * seq_len * h
    t_forward = sweeps * forward / RATES["bf16_gemm_flops"][0] / gpus
    t_gram = sweeps * 2 * sum(n * n for n in inputs) * L * tokens / RATES["fp64_flops"][0] / gpus
    svd_one = sum(SVD_4096_SECONDS[0] * m * n * min(m, n) / 4096**3 for m, n in shapes)  # per layer
    per_gpu_fits = max(1, min(gpus, len(shapes))) if layer_by_layer else gpus
    t_svd = sweeps * L * svd_one / per_gpu_fits
    t_scores = 3 * 2 * full_rank * L * score_tokens / RATES["bf16_gemm_flops"][0]
    t_allreduce = 0.0 if gpus == 1 else sweeps * L * 2 * gram_bytes / RATES["nvlink_bytes"][0]
    weights_bytes = 2 * (linear * L + outside)
    t_disk = sweeps * weights_bytes / RATES["disk_bytes"][0] if layer_by_layer else 0.0
    seconds = dict(calibration_forward=t_forward, gram_statistics=t_gram, decompositions=t_svd, fisher_scores=t_scores,
                   gram_all_reduce=t_allreduce, checkpoint_reads=t_disk)  # fmt: skip
    hidden_states = tokens * h * 2 / gpus  # bf16; with 8 GPUs each holds its share of the windows
    if layer_by_layer:
        memory = dict(outside_tensors=2 * outside, one_layer=2 * linear, one_layer_full_rank_factors=4 * full_rank,
                      one_layer_grams=gram_bytes, calibration_hidden_states=hidden_states)  # fmt: skip
        disk = dict(spilled_grams=gram_bytes * L, spilled_score_inputs=L * score_tokens * h * 4)
    else:
        memory = dict(model=weights_bytes, all_grams=gram_bytes * L, all_full_rank_factors=4 * full_rank * L,
                      batch_activations=4 * 2 * seq_len * (4 * h + 2 * f))  # fmt: skip
        disk = {}
    return dict(seconds=seconds, total_seconds=sum(seconds.values()), memory_gb={k: v / GB for k, v in memory.items()},
                peak_memory_gb=sum(memory.values()) / GB, disk_gb={k: v / GB for k, v in disk.items()},
                parameters=linear * L + outside)  # fmt: skip


def markdown(rows: list[dict], args) -> str:
    lines = ["# Compressing 7B and 70B models: an estimate on paper, not a measurement", "",
             f"`benchmarks/estimate_large.py`: whiten + fisher, {args.tokens} calibration tokens (seq_len "
             f"{args.seq_len}), {args.score_tokens} score tokens. Each time is a floor (counts / rates; the rates and "
             "their sources are in the JSON and the script's docstring). Memory is per GPU.", "",
             "| model | GPUs | mode | time (min) | largest term | peak memory (GB) | fits 80 GB | disk spill (GB) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        est = row["estimate"]
        term = max(est["seconds"], key=est["seconds"].get)
        lines.append(f"| {row['model']} | {row['gpus']} | {row['mode']} | {est['total_seconds'] / 60:.1f} | {term} | "
                     f"{est['peak_memory_gb']:.0f} | {'yes' if est['peak_memory_gb'] < 80 else 'no'} | "
                     f"{sum(est['disk_gb'].values()):.0f} |")  # fmt: skip
    lines += ["", "What the table assumes that the code does not do yet: layer-by-layer mode runs in one process "
              "(`--layer-by-layer` under torchrun is not built), so its 8-GPU rows are what the two modes would "
              "give combined; one-shot under torchrun holds the whole model in every process. The SVDs bound the "
              "time everywhere (a layer's 7 fits spread over at most 7 GPUs in layer-by-layer mode); one-shot fails "
              "on memory through the float64 Grams and fisher's full-rank factors of every layer, and layer-by-layer "
              "fisher spills every layer's float64 Grams to disk (`gram_dtype=float32` halves both, at ~1e-7 "
              "relative rounding of the statistics)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (GPTQ's 128 x 2048)")
    parser.add_argument("--score-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    rows = []
    for name, model in MODELS.items():
        for gpus in (1, 8):
            for mode in ("one-shot", "layer-by-layer"):
                rows.append(dict(model=name, gpus=gpus, mode=mode,
                                 estimate=estimate(model, args.tokens, args.score_tokens, args.seq_len, gpus,
                                                   mode == "layer-by-layer")))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(kind="estimate on paper, not a measurement", device="H100 SXM (anchors and datasheet; not run)",
                  rates={k: {"per_second": v, "source": s} for k, (v, s) in RATES.items()},
                  svd_4096_seconds={"value": SVD_4096_SECONDS[0], "source": SVD_4096_SECONDS[1]},
                  args=vars(args), models=MODELS, rows=rows)  # fmt: skip
    (out / "large-estimate-h100.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "large-estimate-h100.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
