"""End-to-end prefill and decode latency of compressed variants against the dense model (issue 8).

    python benchmarks/bench_e2e.py --model llama2-7b --out benchmarks/results
    python benchmarks/bench_e2e.py --model default --out benchmarks/results          # SmolLM2-135M (CPU or GPU)

The same as `lowrank-ops bench-e2e`; everything lives in lowrank_ops/e2e.py (see its docstring for the method).
Writes e2e-<model>-<device>.json (rows + header), .md (tables) and .png (speedup versus bytes kept).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness.py

from harness import export_git_revision  # noqa: E402

from lowrank_ops.e2e import main  # noqa: E402

if __name__ == "__main__":
    export_git_revision()  # the library reads the checkout's sha from the environment; it never runs git itself
    sys.exit(main())
