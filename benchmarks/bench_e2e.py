"""End-to-end prefill and decode latency of compressed variants against the dense model (issue 8).

    python benchmarks/bench_e2e.py --model llama2-7b --out benchmarks/results
    python benchmarks/bench_e2e.py --model default --out benchmarks/results          # SmolLM2-135M (CPU or GPU)

The same as `lowrank-ops bench-e2e`; everything lives in lowrank_ops/e2e.py (see its docstring for the method).
Writes e2e-<model>-<device>.json (rows + header), .md (tables) and .png (speedup versus bytes kept).
"""

import sys

from lowrank_ops.e2e import main

if __name__ == "__main__":
    sys.exit(main())
