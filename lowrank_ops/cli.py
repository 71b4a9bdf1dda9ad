"""Command line: `lowrank-ops <command>` (also `python -m lowrank_ops <command>`).

Commands:
  compress  calibrate and compress a causal LM (default: SmolLM2-135M), evaluate perplexity, save
  eval      perplexity of a saved compressed model (or any model) on the Wikipedia test split
  env       versions, GPU, and which backends are available (and why not)
  demo      factor real nn.Linear layers of the default model at a few ranks: error, param ratio, timing
  export-lora  write the low-rank residual of a saved eora model as a PEFT LoRA adapter (and its base)
  to-dense  write a saved compressed model as a plain (dense) Hugging Face model
  plot      draw runs into a PNG: perplexity against size, per-layer ranks
  bench-e2e  prefill and decode latency of compressed variants against the dense model (`bench-e2e --help`)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import warnings


def _cmd_env(args: argparse.Namespace) -> int:
    from lowrank_ops.env import env_report, format_env_report

    report = env_report()
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lowrank_ops.demo import run_demo

    run_demo(device=args.device, dtype=args.dtype, ratios=args.param_ratios, layer=args.layer)
    return 0


_LOWRANK = ("svd", "asvd", "whiten")
_METHOD_FLAGS = {
    # option dest: (flag, the --method values that read it); None = not given (its default is None in build_parser)
    "base": ("--base", ("eora",)),
    "rank": ("--rank", ("eora", "swsc")),
    "residual": ("--residual", ("eora", "swsc")),
    "clusters": ("--clusters", ("swsc",)),
    "bits": ("--bits", ("swsc",)),
    "shared": ("--shared", ("swsc",)),
    "unweighted": ("--unweighted", ("swsc",)),
    "param_ratio": ("--param-ratio", (*_LOWRANK, "basis")),
    "allocator": ("--allocator", _LOWRANK),
    "alpha": ("--alpha", ("asvd", "basis")),
    "align": ("--align", (*_LOWRANK, "basis")),
    "target_data": ("--target-data", ("basis",)),
    "basis": ("--basis", ("basis",)),
    "score": ("--score", ("basis",)),
    "train_steps": ("--train-steps", ("basis",)),
    "new_rank": ("--new-rank", ("basis",)),
    "lr": ("--lr", ("basis",)),
}


def check_method_flags(args: argparse.Namespace) -> None:
    """ValueError when a flag is given that the chosen --method would ignore (the run would not be what was asked)."""
    ignored = [flag for dest, (flag, methods) in _METHOD_FLAGS.items()
               if getattr(args, dest, None) not in (None, False) and args.method not in methods]  # fmt: skip
    if args.method == "basis" and args.alpha is not None and (args.basis or "whiten") != "asvd":
        ignored.append("--alpha (read by --basis asvd only)")
    if ignored:
        users = {flag: "/".join(methods) for flag, methods in _METHOD_FLAGS.values()}
        detail = ", ".join(f"{flag} ({users[flag]})" if flag in users else flag for flag in ignored)
        raise ValueError(f"compress: --method {args.method} ignores {detail}; drop the flag(s) or choose a method "
                         "that reads them")  # fmt: skip


def config_from_args(args: argparse.Namespace):
    """The compression config that `compress`'s arguments describe: the one place the CLI maps flags to fields
    (every rule between fields is the config's own). A flag the method would ignore is an error
    (`check_method_flags`); a method flag not given takes the method config's default."""
    from lowrank_ops.configs import BaseResidualConfig, BasisConfig, LowRankConfig, SwscConfig

    check_method_flags(args)
    common = dict(targets=args.targets, ignore=args.ignore, calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, device=args.device, sequential=args.sequential)  # fmt: skip
    if args.method == "eora":
        return BaseResidualConfig(base=_option(args, "base", BaseResidualConfig),
                                  rank=_option(args, "rank", BaseResidualConfig),
                                  residual=_option(args, "residual", BaseResidualConfig), **common)  # fmt: skip
    if args.method == "swsc":
        bits = args.bits if args.bits is not None or args.clusters is not None else SwscConfig().bits
        return SwscConfig(shared=_option(args, "shared", SwscConfig), clusters=args.clusters, bits=bits,
                          rank=_option(args, "rank", SwscConfig), residual=_option(args, "residual", SwscConfig),
                          weighted=not args.unweighted, **common)  # fmt: skip
    # --param-ratio / --alpha / --align not given: LowRankConfig's defaults for basis too (the CLI's defaults so far)
    if args.method == "basis":
        return BasisConfig(param_ratio=_option(args, "param_ratio", LowRankConfig),
                           basis=_option(args, "basis", BasisConfig), score=_option(args, "score", BasisConfig),
                           new_rank=_option(args, "new_rank", BasisConfig),
                           train_steps=_option(args, "train_steps", BasisConfig), lr=_option(args, "lr", BasisConfig),
                           alpha=_option(args, "alpha", LowRankConfig), align=_option(args, "align", LowRankConfig),
                           **common)  # fmt: skip
    return LowRankConfig(method=args.method, param_ratio=_option(args, "param_ratio", LowRankConfig),
                         allocator=_option(args, "allocator", LowRankConfig),
                         alpha=_option(args, "alpha", LowRankConfig), align=_option(args, "align", LowRankConfig),
                         **common)  # fmt: skip


def _cmd_compress(args: argparse.Namespace) -> int:
    from lowrank_ops.pipeline import run_compression

    config = config_from_args(args)
    result = run_compression(args.model, config, args.out, evaluate=not args.no_eval, eval_tokens=args.eval_tokens,
                             evaluate_dense=not args.no_dense_eval, target_data=args.target_data,
                             dtype=args.dtype, overwrite=args.overwrite,
                             layer_by_layer=args.layer_by_layer)  # fmt: skip
    if result is None:  # a process of a torchrun job other than the first: the first one reports and saves
        return 0
    print(_summary(result))
    if args.out is not None:
        print(f"saved to {args.out}")
    return 0


def _option(args: argparse.Namespace, name: str, config_class):
    """A method option (--rank, --residual, ...): its value, or the method config's own default when not given."""
    value = getattr(args, name)
    return getattr(config_class(), name) if value is None else value


def _summary(result: dict) -> str:
    compression, variant = result["compression"], result["variant"]
    # quantized / shared-channel layers: bits per weight is the headline (their parameter count is not their size)
    bits = compression.get("bits_per_weight")
    size_name, size = ("bits/w", bits) if bits is not None else ("kept", compression["param_ratio"])
    dense_size = 16.0 if bits is not None else 1.0
    megabytes = {name: f"{count / 1e6:8.1f}" for name, count in result.get("bytes", {}).items()}
    lines = [result["layer_table"], "",
             f"{'variant':40s} {size_name:>6s} {'MB':>8s} {'perplexity':>11s} {'seconds':>8s}"]  # fmt: skip
    if "dense" in result:
        lines.append(f"{'dense':40s} {dense_size:6.3f} {megabytes.get('dense', '-'):>8s} "
                     f"{result['dense']['perplexity']:11.3f}")  # fmt: skip
    ppl = result.get("compressed", {}).get("perplexity")
    ppl_text = "-" if ppl is None else f"{ppl:.3f}"  # "-": --no-eval
    lines.append(f"{variant:40s} {size:6.3f} {megabytes.get('compressed', '-'):>8s} {ppl_text:>11s} "
                 f"{compression['seconds']['total']:8.1f}")  # fmt: skip
    meaning = ("bits/w = storage bits per targeted weight, floats counted at 16 bits (the dense row too)"
               if bits is not None else "kept = fraction of the targeted Linear parameters")  # fmt: skip
    lines.append(f"model: {result['model']}; {meaning}")
    if "bytes" in result:
        lines.append(f"MB = 10^6 bytes of the whole model's tensors as saved ({result.get('dtype', 'its dtype')}, "
                     "embeddings included)")  # fmt: skip
    if "compressed" in result:
        lines.append(_evaluated_tokens(result["compressed"]))
    if "compressed_target" in result:
        ev = result["compressed_target"]
        dense = result.get("dense_target", {}).get("perplexity")
        before = "(dense not evaluated)" if dense is None else f"dense {dense:.3f} ->"
        lines.append(f"target data {result['target_data']}: perplexity {before} {ev['perplexity']:.3f} on "
                     f"{ev['tokens']} tokens of its test split")  # fmt: skip
    return "\n".join(lines)


def _evaluated_tokens(ev: dict) -> str:
    """What a perplexity was measured on: the tokens read (what the progress bar counts) and those predicted."""
    windows = ev["tokens"] // ev["seq_len"]
    return (f"perplexity on {ev['tokens']} Wikipedia test tokens: {windows} windows of {ev['seq_len']}, each "
            f"BOS-prefixed, {ev['tokens'] - windows} tokens predicted")  # fmt: skip


def _cmd_eval(args: argparse.Namespace) -> int:
    from lowrank_ops.pipeline import run_evaluation

    if (args.model is None) == (args.model_option is None):
        raise ValueError("eval: give the model once, as `eval MODEL` or `eval --model MODEL`")
    result = run_evaluation(args.model or args.model_option, seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype, out=args.out,
                            overwrite=args.overwrite)  # fmt: skip
    key = "compressed" if "compressed" in result else "dense"
    ev = result[key]
    print(f"{result['model']}: perplexity {ev['perplexity']:.3f}, {result['bytes'][key] / 1e6:.1f} MB, "
          f"{ev['seconds']:.1f} s")  # fmt: skip
    print(_evaluated_tokens(ev))
    if args.out is not None:
        print(f"result written to {args.out}")
    if args.json:
        print(json.dumps(ev))
    return 0


def _cmd_to_dense(args: argparse.Namespace) -> int:
    from lowrank_ops.serialization import export_dense

    out = export_dense(args.model, args.out, overwrite=args.overwrite)
    print(f"dense Hugging Face model of {args.model} written to {out}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from lowrank_ops.plots import plot_runs

    print(f"plot written to {plot_runs(args.runs, args.out)}")
    return 0


def _cmd_export_lora(args: argparse.Namespace) -> int:
    from lowrank_ops.peft_export import export_saved_model

    summary = export_saved_model(args.model, args.out, base_out=args.base_out, base_model_name_or_path=args.base_model,
                                 base_format=args.base_format, overwrite=args.overwrite)  # fmt: skip
    size = summary["bytes"] / 2**20
    print(f"LoRA adapter: {summary['layers']} layers (ranks {summary['ranks']}, {summary['skipped_rank_0']} rank-0 "
          f"layers skipped), {summary['dtype']}, {size:.2f} MiB -> {summary['adapter']}")  # fmt: skip
    if summary.get("base_format") == "compressed-tensors":
        schemes = ", ".join(f"int{bits} group {group}" for bits, group in summary["base_groups"])
        print(f"base (quantized, without the residual) as compressed-tensors pack-quantized ({schemes}), for stock "
              f"transformers / vLLM: {summary['base']}")  # fmt: skip
        if any(bits != 4 for bits, _ in summary["base_groups"]):
            print("note: vLLM's CPU build runs 4-bit bases only (its CPUWNA16 kernel); transformers loads every width")
    elif "base" in summary:
        print(f"base (dequantised / pruned, without the residual): {summary['base']}")
    else:
        print("serve it on the base written by --base-out (to_dense(model, residual=False)), not on the original model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-ops", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from lowrank_ops.configs import BaseResidualConfig, LowRankConfig, SwscConfig
    from lowrank_ops.options import Allocator, BasisScore, Device, Method, Residual, SharedDim
    from lowrank_ops.pipeline import DEFAULT_EVAL_TOKENS, DEFAULT_MODEL, MODEL_DTYPES

    d = LowRankConfig()
    comp = sub.add_parser("compress", help="calibrate, compress, evaluate and save a causal LM")
    comp.add_argument("--model", default=DEFAULT_MODEL,
                      help="'default' (SmolLM2-135M, the default), a model directory or a hub id")
    comp.add_argument("--method", default=d.method.value, choices=[*Method.values(), "eora", "swsc", "basis"],
                      help="svd / asvd / whiten: low rank; eora: quantized or 2:4 base + residual; swsc: shared "
                           "channels + residual; basis: application-specific basis selection (default %(default)s)")

    e, w = BaseResidualConfig(), SwscConfig()
    comp.add_argument("--base", default=None,
                      help=f"eora: compressed base, e.g. int4-g128, int3-g128, gptq-int4-g128, 2:4-wanda (default "
                           f"{e.base})")  # fmt: skip
    comp.add_argument("--rank", type=int, default=None,
                      help=f"eora / swsc: rank of the residual, 0: none (default {e.rank} / {w.rank})")  # fmt: skip
    comp.add_argument("--residual", default=None, choices=Residual.values(),
                      help=f"eora / swsc: residual method (default {e.residual} / {w.residual})")  # fmt: skip
    comp.add_argument("--clusters", type=int, default=None,
                      help="swsc: shared channels K per layer (default: the largest K that fits --bits)")
    comp.add_argument("--bits", type=float, default=None,
                      help=f"swsc: bits per weight per layer instead of --clusters (default {w.bits})")  # fmt: skip
    comp.add_argument("--shared", default=None, choices=SharedDim.values(),
                      help=f"swsc: which channels share (default {w.shared})")  # fmt: skip
    comp.add_argument("--unweighted", action="store_true", default=None,
                      help="swsc: plain k-means (default: input channels weighted by (mean|x|)^2)")  # fmt: skip
    comp.add_argument(
        "--param-ratio",
        type=float,
        default=None,
        help=f"svd / asvd / whiten / basis: fraction of the targeted Linear parameters KEPT, in (0, 1] (default "
             f"{d.param_ratio})",
    )
    comp.add_argument("--allocator", default=None, choices=Allocator.values(),
                      help=f"svd / asvd / whiten: rank allocation (default {d.allocator})")  # fmt: skip
    from lowrank_ops.configs import BasisConfig

    b = BasisConfig()
    comp.add_argument("--target-data", nargs="+", default=None, metavar="PATH",
                      help="basis: target-application text, 'python-stdlib' (default: this interpreter's standard "
                           "library, split by file), 'wikipedia', or UTF-8 files (split 50/20/10/20%% into "
                           "calibration / train / held-out / test)")  # fmt: skip
    comp.add_argument("--basis", default=None, choices=Method.values(),
                      help="basis: the decomposition whose bases are selected (whiten: SVD of W S with "
                           f"S S^T = the target Gram; default {b.basis})")  # fmt: skip
    comp.add_argument("--score", default=None, choices=BasisScore.values(),
                      help="basis: energy (target output energy), taylor (|s dL/ds|) or fisher "
                           f"(mean (s dL/ds)^2); default {b.score}")  # fmt: skip
    comp.add_argument("--train-steps", type=int, default=None,
                      help="basis: Adam steps re-learning s on target data, held-out early stopping "
                           f"(0: training-free; default {b.train_steps})")  # fmt: skip
    comp.add_argument("--new-rank", type=int, default=None,
                      help="basis: new bases per layer from the target residual's eigen-directions (EoRA), paid "
                           f"from --param-ratio (default {b.new_rank})")  # fmt: skip
    comp.add_argument("--lr", type=float, default=None,
                      help=f"basis: relative Adam learning rate of the re-learning (default {b.lr})")  # fmt: skip
    comp.add_argument("--alpha", type=float, default=None,
                      help=f"asvd (and basis with --basis asvd): exponent of mean|x| (default {d.alpha})")  # fmt: skip
    comp.add_argument("--align", type=int, default=None,
                      help=f"svd / asvd / whiten / basis: ranks are multiples of this (default {d.align})")  # fmt: skip
    comp.add_argument("--targets", nargs="+", default=None,
                      help="layers to compress: class names, qualified names or re:<regex> (default: the model "
                           "family's projections)")  # fmt: skip
    comp.add_argument(
        "--ignore", nargs="+", default=None, help="patterns to leave dense (default: lm_head, embeddings)"
    )
    comp.add_argument("--calib-tokens", type=int, default=d.calib_tokens,
                      help="calibration tokens from the Wikipedia calibration split (basis: from the target data's "
                           "calibration split) (default %(default)s)")  # fmt: skip
    comp.add_argument("--seq-len", type=int, default=d.seq_len,
                      help="tokens per window, calibration and evaluation alike, each window BOS-prefixed; at most "
                           "the model's context (default %(default)s)")  # fmt: skip
    comp.add_argument("--batch-size", type=int, default=d.batch_size,
                      help="windows per forward pass while calibrating and evaluating: speed and memory only "
                           "(default %(default)s)")  # fmt: skip
    comp.add_argument("--device", default=d.device, choices=Device.values(),
                      help="auto: cuda when available, else cpu (default %(default)s)")
    comp.add_argument("--dtype", default="auto", choices=["auto", *MODEL_DTYPES],
                      help="weights / activations while compressing and in the saved model (auto: float32 on a CPU, "
                      "bfloat16 on a GPU) (default %(default)s)")  # fmt: skip
    comp.add_argument(
        "--sequential",
        action="store_true",
        help="one decoder layer at a time, each calibrated on the compressed layers before it (every method that "
             "calibrates; a GPTQ base is then sequential GPTQ)",
    )
    comp.add_argument("--layer-by-layer", action="store_true",
                      help="for models larger than memory: read each decoder layer from the checkpoint (a safetensors "
                           "directory) when it is compressed and write it out at once (implies --sequential; needs "
                           "--out; per-layer allocators only)")  # fmt: skip
    comp.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                      help="at most this many Wikipedia test tokens for perplexity (whole windows of --seq-len) "
                           "(default %(default)s)")  # fmt: skip
    comp.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    comp.add_argument("--no-dense-eval", action="store_true", help="skip the dense model's perplexity")
    comp.add_argument("--out", default=None,
                      help="directory to save the compressed model into (atomically; checked and locked before any "
                           "work; an existing directory is replaced only if lowrank-ops wrote it, see --overwrite)")
    comp.add_argument("--overwrite", action="store_true",
                      help="allow --out to replace an existing directory that lowrank-ops did not write")
    comp.set_defaults(func=_cmd_compress)
    ev = sub.add_parser("eval", help="perplexity on the Wikipedia test split")
    ev.add_argument("model", nargs="?", help="a directory written by compress, a model directory, a hub id or "
                    "'default'")  # fmt: skip
    ev.add_argument("--model", dest="model_option", metavar="MODEL", help="the same, as an option (like compress)")
    ev.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                    help="at most this many Wikipedia test tokens (whole windows of --seq-len) (default %(default)s)")
    ev.add_argument("--seq-len", type=int, default=d.seq_len,
                    help="tokens per window, each BOS-prefixed (default %(default)s)")
    ev.add_argument("--batch-size", type=int, default=d.batch_size,
                    help="windows per forward pass: speed and memory only (default %(default)s)")
    ev.add_argument("--device", default="auto", choices=Device.values(),
                    help="auto: cuda when available, else cpu (default %(default)s)")
    ev.add_argument("--dtype", default="auto", choices=["auto", *MODEL_DTYPES],
                    help="auto: float32 on a CPU, bfloat16 on a GPU (default %(default)s)")  # fmt: skip
    ev.add_argument("--json", action="store_true", help="also print the evaluation as JSON")
    ev.add_argument("--out", default=None, metavar="FILE",
                    help="write the result as JSON (the keys of compress's results.json; `plot` reads it); an "
                         "existing file is replaced only if eval wrote it, see --overwrite")  # fmt: skip
    ev.add_argument("--overwrite", action="store_true", help="allow --out to replace a file eval did not write")
    ev.set_defaults(func=_cmd_eval)
    env = sub.add_parser("env", help="versions, GPU and available backends")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=_cmd_env)
    demo = sub.add_parser("demo", help="factor real layers of the default model and print error, ratio, timing")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="activation dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    demo.add_argument(
        "--param-ratios", type=float, nargs="+", default=[0.9, 0.6, 0.3],
        help="fractions of parameters kept (default 0.9 0.6 0.3)",
    )
    demo.add_argument("--layer", type=int, default=0,
                      help="decoder layer whose projections are factored (default %(default)s)")  # fmt: skip
    demo.set_defaults(func=_cmd_demo)
    lora = sub.add_parser("export-lora", help="export the residual of a saved eora model as a PEFT LoRA adapter")
    lora.add_argument("model", help="a directory written by compress --method eora --out")
    lora.add_argument("--out", required=True, help="adapter directory (adapter_model.safetensors, adapter_config.json)")
    lora.add_argument("--base-out", default=None,
                      help="also write the base the adapter is served on (dequantised / pruned, no residual) as a "
                           "plain Hugging Face model directory")  # fmt: skip
    lora.add_argument("--base-format", default="dense", choices=["dense", "compressed-tensors"],
                      help="how --base-out is written: dense (dequantised weights, any base) or compressed-tensors "
                           "(the int2 / int4 / int8 codes packed as compressed-tensors pack-quantized, which stock "
                           "transformers with the compressed-tensors package and vLLM load without lowrank-ops; "
                           "quantized bases of nn.Linear layers only) (default %(default)s)")  # fmt: skip
    lora.add_argument("--overwrite", action="store_true",
                      help="allow --out / --base-out to replace existing directories that lowrank-ops did not write")
    lora.add_argument("--base-model", default=None,
                      help="base_model_name_or_path recorded in adapter_config.json, e.g. the hub id the base is "
                           "uploaded to (default: --base-out relative to the working directory)")  # fmt: skip
    lora.set_defaults(func=_cmd_export_lora)
    dense = sub.add_parser("to-dense", help="write a saved compressed model as a plain Hugging Face model")
    dense.add_argument("model", help="a directory written by compress --out")
    dense.add_argument("--out", required=True,
                       help="directory of the dense model (atomically; replaced only if lowrank-ops wrote it, see "
                            "--overwrite)")  # fmt: skip
    dense.add_argument("--overwrite", action="store_true",
                       help="allow --out to replace an existing directory that lowrank-ops did not write")
    dense.set_defaults(func=_cmd_to_dense)
    plot = sub.add_parser("plot", help="PNG of runs: perplexity against size, per-layer ranks of the first run")
    plot.add_argument("runs", nargs="+", metavar="RUN",
                      help="compress --out directories or eval --out files; the first with a layer table gives the "
                           "ranks panel")  # fmt: skip
    plot.add_argument("--out", required=True, help="the PNG file to write")
    plot.set_defaults(func=_cmd_plot)
    # Its options belong to lowrank_ops.e2e (shared with benchmarks/bench_e2e.py): main() passes them through.
    sub.add_parser("bench-e2e", add_help=False,
                   help="prefill / decode latency of compressed variants vs dense (see bench-e2e --help)")  # fmt: skip
    return parser


@contextlib.contextmanager
def warnings_as_lines():
    """Python warnings (Gram damping, ...) while a command runs: each as one line on stderr written through tqdm (a
    progress bar stays whole; no file path), then one line counting them by kind when the command ends."""
    from tqdm.auto import tqdm

    counts: collections.Counter[str] = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        counts[category.__name__] += 1
        tqdm.write(f"warning: {category.__name__}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            yield
        finally:
            if counts:
                kinds = ", ".join(f"{count} {name}" for name, count in counts.most_common())
                print(f"lowrank-ops: {counts.total()} warning(s) during the run ({kinds}), each printed above",
                      file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with warnings_as_lines():
        if argv[:1] == ["bench-e2e"]:
            from lowrank_ops.e2e import main as bench_e2e

            return bench_e2e(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that the same clean-up runs (temporary output removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def entry() -> int:
    """The `lowrank-ops` command: `main`, with a user's mistake (ValueError, FileNotFoundError: a bad option, a
    missing model) printed as one line and exit status 2 instead of a traceback; LOWRANK_OPS_DEBUG=1 re-raises.
    SIGINT and SIGTERM interrupt alike (temporary outputs removed, nothing half-written): exit 128 + the signal."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return main()
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print(f"lowrank-ops: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("LOWRANK_OPS_DEBUG") == "1":
            raise
        print(f"lowrank-ops: error: {exc}\n(LOWRANK_OPS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(entry())
