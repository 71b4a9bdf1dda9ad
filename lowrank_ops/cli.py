"""Command line: `lowrank-ops <command>` (also `python -m lowrank_ops <command>`).

Commands:
  env    versions, GPU, and which backends are available (and why not)
  demo   factor real nn.Linear layers of the default model at a few ranks: error, param ratio, timing
"""

from __future__ import annotations

import argparse
import json
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-ops", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
