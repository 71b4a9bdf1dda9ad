"""Command line: `lowrank-ops <command>` (also `python -m lowrank_ops <command>`).

Commands:
  compress  calibrate and compress a causal LM (default: SmolLM2-135M), evaluate perplexity, save
  eval      perplexity of a saved compressed model (or any model) on the Wikipedia test split
  env       versions, GPU, and which backends are available (and why not)
  demo      factor real nn.Linear layers of the default model at a few ranks: error, param ratio, timing
  export-lora  write the low-rank residual of a saved eora model as a PEFT LoRA adapter (and its base)
  bench-e2e  prefill and decode latency of compressed variants against the dense model (`bench-e2e --help`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from lowrank_ops.env import env_report, format_env_report

    report = env_report()
    print(json.dumps(report, indent=2) if args.json else format_env_report(report))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lowrank_ops.demo import run_demo

    run_demo(device=args.device, dtype=args.dtype, ratios=args.param_ratios, layer=args.layer)
    return 0


def config_from_args(args: argparse.Namespace):
    """The compression config that `compress`'s arguments describe: the one place the CLI maps flags to fields
    (every rule between fields is the config's own)."""
    from lowrank_ops.configs import BaseResidualConfig, BasisConfig, LowRankConfig, SwscConfig

    common = dict(targets=args.targets, ignore=args.ignore, calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                  batch_size=args.batch_size, device=args.device, sequential=args.sequential)  # fmt: skip
    if args.target_data is not None and args.method != "basis":
        raise ValueError(f"--target-data is used by --method basis only, not --method {args.method}")
    if args.method == "eora":
        return BaseResidualConfig(base=args.base, rank=_option(args, "rank", BaseResidualConfig),
                                  residual=_option(args, "residual", BaseResidualConfig), **common)  # fmt: skip
    if args.method == "swsc":
        bits = args.bits if args.bits is not None or args.clusters is not None else SwscConfig().bits
        return SwscConfig(shared=args.shared, clusters=args.clusters, bits=bits,
                          rank=_option(args, "rank", SwscConfig), residual=_option(args, "residual", SwscConfig),
                          weighted=not args.unweighted, **common)  # fmt: skip
    if args.method == "basis":
        return BasisConfig(param_ratio=args.param_ratio, basis=args.basis, score=args.score, new_rank=args.new_rank,
                           train_steps=args.train_steps, lr=args.lr, alpha=args.alpha, align=args.align,
                           **common)  # fmt: skip
    return LowRankConfig(method=args.method, param_ratio=args.param_ratio, allocator=args.allocator,
                         alpha=args.alpha, align=args.align, **common)  # fmt: skip


def _cmd_compress(args: argparse.Namespace) -> int:
    from lowrank_ops.pipeline import run_compression

    config = config_from_args(args)
    result = run_compression(args.model, config, args.out, evaluate=not args.no_eval, eval_tokens=args.eval_tokens,
                             evaluate_dense=not args.no_dense_eval, target_data=args.target_data,
                             dtype=args.dtype)  # fmt: skip
    print(_summary(result))
    if args.out:
        print(f"saved to {args.out}")
    return 0


def _option(args: argparse.Namespace, name: str, config_class):
    """An option shared by several methods (--rank, --residual): its value, or the method's own default."""
    value = getattr(args, name)
    return getattr(config_class(), name) if value is None else value


def _summary(result: dict) -> str:
    compression, variant = result["compression"], result["variant"]
    # quantized / shared-channel layers: bits per weight is the headline (their parameter count is not their size)
    bits = compression.get("bits_per_weight")
    size_name, size = ("bits/w", bits) if bits is not None else ("kept", compression["param_ratio"])
    dense_size = 16.0 if bits is not None else 1.0
    lines = [result["layer_table"], "", f"{'variant':40s} {size_name:>6s} {'perplexity':>11s} {'seconds':>8s}"]
    if "dense" in result:
        lines.append(f"{'dense':40s} {dense_size:6.3f} {result['dense']['perplexity']:11.3f}")
    ppl = result.get("compressed", {}).get("perplexity")
    ppl_text = "-" if ppl is None else f"{ppl:.3f}"  # "-": --no-eval
    lines.append(f"{variant:40s} {size:6.3f} {ppl_text:>11s} {compression['seconds']['total']:8.1f}")
    meaning = ("bits/w = storage bits per targeted weight, floats counted at 16 bits (the dense row too)"
               if bits is not None else "kept = fraction of the targeted Linear parameters")  # fmt: skip
    lines.append(f"model: {result['model']}; {meaning}")
    if "compressed" in result:
        ev = result["compressed"]
        lines.append(f"perplexity on {ev['tokens']} Wikipedia test tokens, windows of {ev['seq_len']} (BOS-prefixed)")
    if "compressed_target" in result:
        ev = result["compressed_target"]
        dense = result.get("dense_target", {}).get("perplexity")
        before = "(dense not evaluated)" if dense is None else f"dense {dense:.3f} ->"
        lines.append(f"target data {result['target_data']}: perplexity {before} {ev['perplexity']:.3f} on "
                     f"{ev['tokens']} tokens of its test split")  # fmt: skip
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    from lowrank_ops.compress import resolve_device
    from lowrank_ops.pipeline import evaluate_perplexity, load_model, model_dtype

    if (args.model is None) == (args.model_option is None):
        raise ValueError("eval: give the model once, as `eval MODEL` or `eval --model MODEL`")
    args.model = args.model or args.model_option

    device = resolve_device(args.device)
    model, tokenizer, source = load_model(args.model, device, model_dtype(args.dtype, device))
    ev = evaluate_perplexity(model, tokenizer, args.seq_len, args.eval_tokens, args.batch_size)
    print(f"{source}: perplexity {ev['perplexity']:.3f} on {ev['tokens']} Wikipedia test tokens "
          f"(windows of {ev['seq_len']}, BOS-prefixed), {ev['seconds']:.1f} s")  # fmt: skip
    if args.json:
        print(json.dumps(ev))
    return 0


def _cmd_export_lora(args: argparse.Namespace) -> int:
    from lowrank_ops.peft_export import export_saved_model

    summary = export_saved_model(args.model, args.out, base_out=args.base_out, base_model_name_or_path=args.base_model)
    size = summary["bytes"] / 2**20
    print(f"LoRA adapter: {summary['layers']} layers (ranks {summary['ranks']}, {summary['skipped_rank_0']} rank-0 "
          f"layers skipped), {summary['dtype']}, {size:.2f} MiB -> {summary['adapter']}")  # fmt: skip
    if "base" in summary:
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
    comp.add_argument("--model", default=DEFAULT_MODEL, help="'default' (SmolLM2-135M), a model directory or a hub id")
    comp.add_argument("--method", default=d.method.value, choices=[*Method.values(), "eora", "swsc", "basis"])
    e, w = BaseResidualConfig(), SwscConfig()
    comp.add_argument("--base", default=e.base,
                      help="eora: compressed base, e.g. int4-g128, int3-g128, gptq-int4-g128, 2:4-wanda")  # fmt: skip
    comp.add_argument("--rank", type=int, default=None,
                      help=f"eora / swsc: rank of the residual, 0: none (default {e.rank} / {w.rank})")  # fmt: skip
    comp.add_argument("--residual", default=None, choices=Residual.values(),
                      help=f"eora / swsc: residual method (default {e.residual} / {w.residual})")  # fmt: skip
    comp.add_argument("--clusters", type=int, default=None, help="swsc: shared channels K per layer")
    comp.add_argument("--bits", type=float, default=None,
                      help=f"swsc: bits per weight per layer instead of --clusters (default {w.bits})")  # fmt: skip
    comp.add_argument("--shared", default=w.shared.value, choices=SharedDim.values(), help="swsc: which channels share")
    comp.add_argument("--unweighted", action="store_true",
                      help="swsc: plain k-means (default: input channels weighted by (mean|x|)^2)")  # fmt: skip
    comp.add_argument(
        "--param-ratio",
        type=float,
        default=d.param_ratio,
        help="fraction of the targeted Linear parameters KEPT, in (0, 1]",
    )
    comp.add_argument("--allocator", default=d.allocator.value, choices=Allocator.values())
    from lowrank_ops.configs import BasisConfig

    b = BasisConfig()
    comp.add_argument("--target-data", nargs="+", default=None, metavar="PATH",
                      help="basis: target-application text, 'python-stdlib' (default: this interpreter's standard "
                           "library, split by file), 'wikipedia', or UTF-8 files (split 50/20/10/20%% into "
                           "calibration / train / held-out / test)")  # fmt: skip
    comp.add_argument("--basis", default=b.basis.value, choices=Method.values(),
                      help="basis: the decomposition whose bases are selected (whiten: SVD of W S with "
                           "S S^T = the target Gram)")  # fmt: skip
    comp.add_argument("--score", default=b.score.value, choices=BasisScore.values(),
                      help="basis: energy (target output energy), taylor (|s dL/ds|) or fisher "
                           "(mean (s dL/ds)^2)")  # fmt: skip
    comp.add_argument("--train-steps", type=int, default=b.train_steps,
                      help="basis: Adam steps re-learning s on target data, held-out early stopping "
                           "(0: training-free)")  # fmt: skip
    comp.add_argument("--new-rank", type=int, default=b.new_rank,
                      help="basis: new bases per layer from the target residual's eigen-directions (EoRA), paid "
                           "from --param-ratio")  # fmt: skip
    comp.add_argument("--lr", type=float, default=b.lr, help="basis: relative Adam learning rate of the re-learning")
    comp.add_argument("--alpha", type=float, default=d.alpha, help="ASVD exponent of mean|x|")
    comp.add_argument("--align", type=int, default=d.align, help="ranks are multiples of this")
    comp.add_argument("--targets", nargs="+", default=None, help="class names, qualified names or re:<regex>")
    comp.add_argument(
        "--ignore", nargs="+", default=None, help="patterns to leave dense (default: lm_head, embeddings)"
    )
    comp.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    comp.add_argument("--seq-len", type=int, default=d.seq_len)
    comp.add_argument("--batch-size", type=int, default=d.batch_size)
    comp.add_argument("--device", default=d.device, choices=Device.values())
    comp.add_argument("--dtype", default="auto", choices=["auto", *MODEL_DTYPES],
                      help="weights / activations while compressing and in the saved model (auto: float32 on a CPU, "
                      "bfloat16 on a GPU)")  # fmt: skip
    comp.add_argument(
        "--sequential",
        action="store_true",
        help="one decoder layer at a time, each calibrated on the compressed layers before it (every method that "
             "calibrates; a GPTQ base is then sequential GPTQ)",
    )
    comp.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    comp.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    comp.add_argument("--no-dense-eval", action="store_true", help="skip the dense model's perplexity")
    comp.add_argument("--out", default=None, help="directory to save the compressed model into (atomically)")
    comp.set_defaults(func=_cmd_compress)
    ev = sub.add_parser("eval", help="perplexity on the Wikipedia test split")
    ev.add_argument("model", nargs="?", help="a directory written by compress, a model directory, a hub id or "
                    "'default'")  # fmt: skip
    ev.add_argument("--model", dest="model_option", metavar="MODEL", help="the same, as an option (like compress)")
    ev.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS)
    ev.add_argument("--seq-len", type=int, default=d.seq_len)
    ev.add_argument("--batch-size", type=int, default=d.batch_size)
    ev.add_argument("--device", default="auto", choices=Device.values())
    ev.add_argument("--dtype", default="auto", choices=["auto", *MODEL_DTYPES],
                    help="auto: float32 on a CPU, bfloat16 on a GPU")  # fmt: skip
    ev.add_argument("--json", action="store_true", help="also print the result as JSON")
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
        "--param-ratios", type=float, nargs="+", default=[0.9, 0.6, 0.3], help="fractions of parameters kept"
    )
    demo.add_argument("--layer", type=int, default=0, help="decoder layer whose projections are factored")
    demo.set_defaults(func=_cmd_demo)
    lora = sub.add_parser("export-lora", help="export the residual of a saved eora model as a PEFT LoRA adapter")
    lora.add_argument("model", help="a directory written by compress --method eora --out")
    lora.add_argument("--out", required=True, help="adapter directory (adapter_model.safetensors, adapter_config.json)")
    lora.add_argument("--base-out", default=None,
                      help="also write the base the adapter is served on (dequantised / pruned, no residual) as a "
                           "plain Hugging Face model directory")  # fmt: skip
    lora.add_argument("--base-model", default=None,
                      help="base_model_name_or_path recorded in adapter_config.json (default: --base-out)")  # fmt: skip
    lora.set_defaults(func=_cmd_export_lora)
    # Its options belong to lowrank_ops.e2e (shared with benchmarks/bench_e2e.py): main() passes them through.
    sub.add_parser("bench-e2e", add_help=False,
                   help="prefill / decode latency of compressed variants vs dense (see bench-e2e --help)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench-e2e"]:
        from lowrank_ops.e2e import main as bench_e2e

        return bench_e2e(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> int:
    """The `lowrank-ops` command: `main`, with a user's mistake (ValueError, FileNotFoundError: a bad option, a
    missing model) printed as one line and exit status 2 instead of a traceback; LOWRANK_OPS_DEBUG=1 re-raises."""
    try:
        return main()
    except KeyboardInterrupt:
        print("lowrank-ops: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        if os.environ.get("LOWRANK_OPS_DEBUG") == "1":
            raise
        print(f"lowrank-ops: error: {exc}\n(LOWRANK_OPS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
