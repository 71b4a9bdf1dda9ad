"""The command line and env_report: what a user sees first."""

import json
import re
import sys
from pathlib import Path

import pytest

from lowrank_ops import env_report
from lowrank_ops.cli import build_parser, config_from_args, main


def test_env_report_names_versions_and_why_backends_are_unavailable():
    report = env_report()
    assert report["torch"] and report["triton"] and "lowrank_matmul" in report["backends"]
    status = report["backends"]["lowrank_matmul"]
    assert status["torch"] == "available"
    if report["gpu"] is None:
        assert report["device"] == "cpu"
        assert "CUDA" in status["cuda"] or "cuda" in status["cuda"]
    assert status["cuda"] != "available" or report["cuda_extension"] == "built"


def test_env_command_prints_text_and_json(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "lowrank_matmul:" in text and "GPU:" in text
    assert main(["env", "--json"]) == 0
    assert "backends" in json.loads(capsys.readouterr().out)


def test_compress_arguments_are_validated_before_any_work():
    args = build_parser().parse_args(["compress", "--method", "asvd", "--param-ratio", "0.8", "--sequential"])
    assert args.method == "asvd" and args.param_ratio == 0.8 and args.sequential
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--method", "pca"])
    with pytest.raises(ValueError, match="param_ratio=1.5 must be in"):
        main(["compress", "--param-ratio", "1.5", "--no-eval"])


def test_eora_arguments():
    args = build_parser().parse_args(["compress", "--method", "eora", "--base", "gptq-int4-g128", "--rank", "32"])
    assert (args.method, args.base, args.rank, args.residual) == ("eora", "gptq-int4-g128", 32, None)  # None: default
    with pytest.raises(ValueError, match="base"):
        main(["compress", "--method", "eora", "--base", "int5-g7", "--no-eval"])


def test_swsc_arguments_are_validated_before_any_work():
    args = build_parser().parse_args(["compress", "--method", "swsc", "--clusters", "64", "--rank", "16"])
    assert (args.method, args.clusters, args.rank, args.shared) == ("swsc", 64, 16, None)  # None: not given
    assert config_from_args(args).shared == "rows"  # the config's default
    with pytest.raises(ValueError, match="give exactly one of clusters or bits"):
        main(["compress", "--method", "swsc", "--clusters", "64", "--bits", "3", "--no-eval"])
    with pytest.raises(ValueError, match="clusters=0 must be an int >= 1"):
        main(["compress", "--method", "swsc", "--clusters", "0", "--no-eval"])


def test_summary_headlines_bits_for_quantized_layers_and_param_ratio_otherwise():
    from lowrank_ops.cli import _summary

    result = {"model": "m", "layer_table": "table", "dense": {"perplexity": 10.0},
              "compressed": {"perplexity": 12.0, "tokens": 64, "seq_len": 32},
              "variant": "int4-g128 + eora r=8",
              "compression": {"param_ratio": 1.05, "bits_per_weight": 4.6, "seconds": {"total": 1.0}}}  # fmt: skip
    text = _summary(result)
    assert "bits/w" in text and " 4.600 " in text and "1.050" not in text
    result["variant"] = "whiten / loss"
    result["compression"] = {"param_ratio": 0.9, "bits_per_weight": None, "seconds": {"total": 1.0}}
    text = _summary(result)
    assert "kept" in text and " 0.900 " in text
    del result["compressed"]  # --no-eval
    assert "nan" not in _summary(result) and "0.900        -           -" in _summary(result)  # MB, perplexity


def test_summary_of_a_target_run_without_dense_evaluation_says_so():
    from lowrank_ops.cli import _summary

    result = {"model": "m", "layer_table": "table", "target_data": ["wikipedia"],
              "compressed": {"perplexity": 12.0, "tokens": 64, "seq_len": 32},
              "compressed_target": {"perplexity": 11.5, "tokens": 64},
              "variant": "basis whiten/fisher +0",
              "compression": {"param_ratio": 0.9, "bits_per_weight": None, "seconds": {"total": 1.0}}}  # fmt: skip
    text = _summary(result)
    assert "perplexity (dense not evaluated) 11.500" in text and "nan" not in text
    result["dense_target"] = {"perplexity": 10.0}
    assert "perplexity dense 10.000 -> 11.500" in _summary(result)


def test_eval_takes_the_model_as_argument_or_option_once():
    with pytest.raises(ValueError, match="give the model once"):
        main(["eval"])
    with pytest.raises(ValueError, match="give the model once"):
        main(["eval", "a", "--model", "b"])
    with pytest.raises(FileNotFoundError, match="without weights"):
        main(["eval", "--model", str(Path(__file__).parent)])  # a directory, but not a model


def test_command_prints_a_users_mistake_in_one_line(monkeypatch, capsys):
    from lowrank_ops.cli import entry

    monkeypatch.setattr(sys, "argv", ["lowrank-ops", "compress", "--method", "swsc", "--clusters", "0", "--no-eval"])
    assert entry() == 2
    err = capsys.readouterr().err
    assert err.startswith("lowrank-ops: error: ") and "clusters=0 must be an int >= 1" in err and "Traceback" not in err
    monkeypatch.setenv("LOWRANK_OPS_DEBUG", "1")
    with pytest.raises(ValueError, match="clusters=0"):
        entry()


def test_model_dtype_auto_is_float32_on_cpu_and_bfloat16_on_gpu():
    import torch

    from lowrank_ops.pipeline import model_dtype

    assert model_dtype("auto", torch.device("cpu")) is torch.float32
    assert model_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert model_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="dtype='int8' must be 'auto' or one of"):
        model_dtype("int8", torch.device("cpu"))


def test_compress_and_eval_run_in_the_requested_dtype(tmp_path, capsys):
    import torch
    from tiny_models import tiny_llama_gqa, word_tokenizer

    from lowrank_ops.serialization import load_compressed

    source, out = tmp_path / "tiny", tmp_path / "bf16"
    tiny_llama_gqa().save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    common = ["--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--eval-tokens", "64"]
    assert main(["compress", "--model", str(source), "--method", "whiten", "--param-ratio", "0.8", "--calib-tokens",
                 "128", "--dtype", "bfloat16", "--out", str(out), *common]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["dtype"] == "bfloat16"
    model = load_compressed(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--dtype", "float32", *common[:-2]]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("method, flags, ignored", [
    ("whiten", ["--rank", "5"], "--rank (eora/swsc)"),
    ("svd", ["--base", "int4-g128"], "--base (eora)"),
    ("asvd", ["--clusters", "4", "--unweighted"], "--clusters (swsc), --unweighted (swsc)"),
    ("eora", ["--allocator", "loss"], "--allocator (svd/asvd/whiten)"),
    ("swsc", ["--param-ratio", "0.5", "--clusters", "4"], "--param-ratio (svd/asvd/whiten/basis)"),
    ("whiten", ["--alpha", "0.7"], "--alpha (asvd/basis)"),
    ("basis", ["--alpha", "0.7"], "--alpha (read by --basis asvd only)"),
    ("eora", ["--score", "fisher", "--target-data", "wikipedia"], "--target-data (basis), --score (basis)"),
])  # fmt: skip
def test_a_flag_the_method_would_ignore_is_an_error_before_any_work(method, flags, ignored):
    args = build_parser().parse_args(["compress", "--model", "/nonexistent", "--method", method, *flags])
    with pytest.raises(ValueError, match=f"--method {method} ignores {re.escape(ignored)}; drop"):
        config_from_args(args)
    with pytest.raises(ValueError, match="ignores"):  # before the model (which does not exist) is looked at
        main(["compress", "--model", "/nonexistent", "--method", method, *flags])


def test_method_flags_not_given_take_the_method_defaults_and_given_ones_are_honoured():
    from lowrank_ops.configs import BaseResidualConfig, LowRankConfig, SwscConfig

    parse = build_parser().parse_args
    assert config_from_args(parse(["compress", "--method", "whiten"])) == LowRankConfig(method="whiten")
    assert config_from_args(parse(["compress", "--method", "eora"])) == BaseResidualConfig()
    assert config_from_args(parse(["compress", "--method", "swsc"])) == SwscConfig()
    basis = config_from_args(parse(["compress", "--method", "basis", "--basis", "asvd", "--alpha", "0.7"]))
    assert (basis.basis, basis.alpha, basis.param_ratio) == ("asvd", 0.7, LowRankConfig().param_ratio)
    swsc = config_from_args(parse(["compress", "--method", "swsc", "--clusters", "4", "--rank", "8", "--unweighted"]))
    assert (swsc.clusters, swsc.bits, swsc.rank, swsc.weighted) == (4, None, 8, False)


def _saved_tiny(tmp_path, nan=False):
    import torch
    from tiny_models import tiny_llama_gqa, word_tokenizer

    model = tiny_llama_gqa()  # context: max_position_embeddings=64
    if nan:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    source = tmp_path / "tiny"
    model.save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    return source


def test_seq_len_beyond_the_model_context_is_refused_before_loading(tmp_path, monkeypatch):
    import lowrank_ops.pipeline as pipeline

    source = _saved_tiny(tmp_path)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded before the --seq-len check"))
    compress = ["compress", "--model", str(source), "--no-eval", "--calib-tokens", "200000"]
    for command in (compress, ["eval", str(source)]):
        with pytest.raises(ValueError, match="seq_len=100000 exceeds the context of .*tiny \\(64 tokens"):
            main([*command, "--seq-len", "100000"])


def test_seq_len_is_checked_after_loading_when_the_config_is_not_on_disk(tmp_path, monkeypatch):
    from tiny_models import tiny_llama_gqa, word_tokenizer

    import lowrank_ops.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (tiny_llama_gqa(), word_tokenizer(), "default model"))
    monkeypatch.setattr(pipeline, "compress_", lambda *a, **k: pytest.fail("calibrated before the --seq-len check"))
    with pytest.raises(ValueError, match="seq_len=128 exceeds the context of default model \\(64 tokens"):
        main(["compress", "--seq-len", "128", "--device", "cpu", "--no-eval"])


def test_a_model_with_nan_weights_is_refused_before_compressing(tmp_path, monkeypatch, capsys):
    from lowrank_ops.cli import entry

    source = _saved_tiny(tmp_path, nan=True)
    args = ["lowrank-ops", "compress", "--model", str(source), "--method", "svd", "--seq-len", "32", "--device", "cpu",
            "--out", str(tmp_path / "out")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", args)
    assert entry() == 2
    err = capsys.readouterr().err
    assert "weight model.layers.1.mlp.up_proj.weight (80, 48) holds 1 NaN / Inf value(s)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    monkeypatch.setattr(sys, "argv", ["lowrank-ops", "eval", str(source), "--seq-len", "32", "--device", "cpu"])
    assert entry() == 2 and "holds 1 NaN / Inf" in capsys.readouterr().err


def test_a_non_finite_perplexity_is_an_error_and_never_written(tmp_path, monkeypatch):
    import lowrank_ops.evaluate as evaluate

    source = _saved_tiny(tmp_path)
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: float("nan"))
    with pytest.raises(ValueError, match="perplexity is nan on the Wikipedia test split"):
        main(["compress", "--model", str(source), "--method", "svd", "--seq-len", "32", "--device", "cpu",
              "--eval-tokens", "64", "--no-dense-eval", "--out", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_targets_that_match_nothing_fail_before_loading(tmp_path, monkeypatch):
    import lowrank_ops.pipeline as pipeline

    source = _saved_tiny(tmp_path)
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded before the --targets check"))
    with pytest.raises(ValueError, match=r"targets=\['re:.*nothing_here'\] .* match no Linear/Conv1D layer"):
        main(["compress", "--model", str(source), "--targets", "re:.*nothing_here", "--seq-len", "32", "--no-eval"])


def test_every_option_of_every_command_has_help_naming_its_default():
    import argparse

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            shown = command._get_formatter()._expand_help(action)
            default = action.default
            if default is None or isinstance(default, bool):
                continue
            values = default if isinstance(default, list) else [default]
            assert all(str(v) in shown for v in values), f"{name} {action.option_strings}: no default {default}"


def test_the_perplexity_bar_counts_the_tokens_the_summary_reports(capsys):
    from tiny_models import tiny_llama_gqa, word_tokenizer

    from lowrank_ops.cli import _evaluated_tokens
    from lowrank_ops.pipeline import evaluate_perplexity

    ev = evaluate_perplexity(tiny_llama_gqa(), word_tokenizer(), 32, 96, 2)
    bar = capsys.readouterr().err
    assert ev["tokens"] == 96 and f"{ev['tokens']}/{ev['tokens']}" in bar  # issue 17: the bar said 93 (3 x 31)
    assert _evaluated_tokens(ev) == ("perplexity on 96 Wikipedia test tokens: 3 windows of 32, each BOS-prefixed, "
                                     "93 tokens predicted")  # fmt: skip


def test_summary_gives_the_saved_size_in_megabytes():
    from lowrank_ops.cli import _summary

    result = {"model": "m", "layer_table": "table", "dense": {"perplexity": 10.0}, "dtype": "float32",
              "compressed": {"perplexity": 12.0, "tokens": 64, "seq_len": 32}, "variant": "whiten / loss",
              "bytes": {"dense": 538_000_000, "compressed": 471_250_000},
              "compression": {"param_ratio": 0.9, "bits_per_weight": None, "seconds": {"total": 1.0}}}  # fmt: skip
    rows = _summary(result).splitlines()
    assert "MB" in rows[2].split() and "   538.0      10.000" in rows[3] and "   471.2      12.000" in rows[4]
    assert "MB = 10^6 bytes of the whole model's tensors as saved (float32" in _summary(result)


def test_compress_records_sizes_and_eval_writes_a_result_file_that_plot_draws(tmp_path, capsys):
    from lowrank_ops.pipeline import RESULTS_FILE, safetensors_bytes
    from lowrank_ops.plots import RESULTS_FILE as PLOTS_RESULTS_FILE

    assert PLOTS_RESULTS_FILE == RESULTS_FILE
    source, out = _saved_tiny(tmp_path), tmp_path / "w08"
    common = ["--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--eval-tokens", "64"]
    assert main(["compress", "--model", str(source), "--method", "whiten", "--param-ratio", "0.6", "--align", "4",
                 "--calib-tokens", "128", "--out", str(out), *common]) == 0  # fmt: skip
    record = json.loads((out / RESULTS_FILE).read_text())
    assert record["bytes"] == {"dense": safetensors_bytes(source), "compressed": safetensors_bytes(out)}
    assert record["bytes"]["compressed"] < record["bytes"]["dense"]
    capsys.readouterr()

    result_file = tmp_path / "eval-w08.json"
    assert main(["eval", str(out), "--out", str(result_file), *common]) == 0
    assert f"{record['bytes']['compressed'] / 1e6:.1f} MB" in capsys.readouterr().out
    evaluated = json.loads(result_file.read_text())
    assert evaluated["compressed"]["perplexity"] == pytest.approx(record["compressed"]["perplexity"], rel=1e-6)
    assert evaluated["variant"] == record["variant"] and evaluated["compression"] == record["compression"]
    assert evaluated["bytes"] == {"compressed": record["bytes"]["compressed"]}
    dense_file = tmp_path / "eval-dense.json"
    assert main(["eval", str(source), "--out", str(dense_file), *common]) == 0
    assert json.loads(dense_file.read_text())["variant"] == "dense"
    assert main(["eval", str(source), "--out", str(dense_file), *common]) == 0  # its own earlier result: replaced
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(ValueError, match="not written by lowrank-ops eval; give --overwrite"):
        main(["eval", str(source), "--out", str(tmp_path / "notes.json"), *common])
    with pytest.raises(ValueError, match="inside the evaluated model's directory"):
        main(["eval", str(out), "--out", str(out / "eval.json"), *common])
    with pytest.raises(ValueError, match="is a directory"):
        main(["eval", str(out), "--out", str(tmp_path), *common])

    png = tmp_path / "runs.png"
    assert main(["plot", str(out), str(dense_file), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob(".runs*"))
    with pytest.raises(FileNotFoundError, match="neither a compress --out directory"):
        main(["plot", str(source), "--out", str(png)])


def test_to_dense_writes_a_plain_hugging_face_model_of_a_low_rank_run(tmp_path, capsys):
    import torch
    from tiny_models import tiny_llama_gqa
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_ops.configs import LowRankConfig
    from lowrank_ops.modules import CompressedLinear
    from lowrank_ops.serialization import load_compressed, save_compressed

    model = tiny_llama_gqa()
    from lowrank_ops import compress_

    compress_(model, LowRankConfig(method="svd", param_ratio=0.6, align=4, device="cpu"), progress=False)
    source = save_compressed(model, tmp_path / "low", source="tiny", tokenizer=_word_tokenizer())
    dense_dir = tmp_path / "dense"
    assert main(["to-dense", str(source), "--out", str(dense_dir)]) == 0
    assert str(dense_dir) in capsys.readouterr().out
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()  # no lowrank_ops quantization_config left
    assert not any(isinstance(m, CompressedLinear) for m in dense.modules())
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(dense_dir).bos_token == "<s>"
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dense(tokens).logits, load_compressed(source)(tokens).logits, rtol=1e-5, atol=1e-5)
    assert main(["to-dense", str(source), "--out", str(dense_dir)]) == 0  # its own earlier output: replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite"):
        main(["to-dense", str(source), "--out", str(tmp_path / "other")])
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def _word_tokenizer():
    from tiny_models import word_tokenizer

    return word_tokenizer()


def test_warnings_print_as_one_line_each_between_progress_bars_and_are_counted_at_the_end(tmp_path, capsys):
    source = _saved_tiny(tmp_path)
    # 16 calibration tokens for 48 input channels: the Gram is singular, Cholesky needs damping
    assert main(["compress", "--model", str(source), "--method", "whiten", "--param-ratio", "0.6", "--align", "4",
                 "--calib-tokens", "16", "--seq-len", "16", "--device", "cpu", "--no-eval"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "WhiteningDampingWarning" in line]
    assert len(lines) >= 2 and all(line.startswith("warning: WhiteningDampingWarning: ") for line in lines[:-1])
    assert ".py:" not in err and "warnings.warn" not in err
    assert re.fullmatch(r"lowrank-ops: \d+ warning\(s\) during the run \(\d+ WhiteningDampingWarning\), each printed "
                        r"above", lines[-1])  # fmt: skip
