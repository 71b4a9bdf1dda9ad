"""End-to-end latency harness (lowrank_ops/e2e.py): variants, layer swapping, the static-cache decoder, the rows
and files a run writes. Timing values are not asserted (no timed tests); their presence, their baseline and the
decoder's correctness are."""

import contextlib
import json

import pytest
import torch
from torch import nn

from lowrank_ops import e2e
from lowrank_ops.assets import tiny_llama
from lowrank_ops.modules import LowRankLinear, QuantLowRankLinear, SharedChannelLinear
from lowrank_ops.surgery import find_targets


def small_llama():
    return tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2)


@pytest.mark.parametrize(
    ("name", "kind", "field", "value"),
    [("dense", "dense", "rank", 0), ("saved", "saved", "rank", 0), ("lowrank-0.8", "lowrank", "param_ratio", 0.8),
     ("int4-g128-r64", "quant", "group_size", 128), ("INT8-g32-r0", "quant", "bits", 8),
     ("swsc-k0.25-r16", "swsc", "cluster_fraction", 0.25), ("swsc-k1-r0", "swsc", "rank", 0)],
)  # fmt: skip
def test_parse_variant(name, kind, field, value):
    variant = e2e.parse_variant(name)
    assert variant.kind == kind and getattr(variant, field) == value


@pytest.mark.parametrize(
    ("name", "match"),
    [("lowrank-1.0", "param ratio"), ("lowrank-0", "param ratio"), ("swsc-k1.5-r8", "cluster fraction"),
     ("int5-g128-r64", "bits"), ("int4-g12-r8", "group_size"), ("svd-0.8", "expected dense"), ("", "expected")],
)  # fmt: skip
def test_parse_variant_rejects(name, match):
    with pytest.raises(ValueError, match=match):
        e2e.parse_variant(name)


@pytest.mark.parametrize(
    ("name", "cls"), [("lowrank-0.5", LowRankLinear), ("int4-g32-r8", QuantLowRankLinear),
                      ("swsc-k0.25-r8", SharedChannelLinear)]
)  # fmt: skip
def test_build_layer_keeps_shape_dtype_and_bias(name, cls):
    layer = nn.Linear(96, 80, bias=True)
    new = e2e.build_layer(e2e.parse_variant(name), layer, torch.Generator().manual_seed(0))
    assert isinstance(new, cls)
    x = torch.randn(3, 96)
    y = new(x)
    assert y.shape == (3, 80) and y.dtype == layer.weight.dtype and torch.isfinite(y).all()
    assert torch.equal(new.bias, layer.bias)
    kept = e2e.tensor_bytes(new, include_bias=False) / e2e.tensor_bytes(layer, include_bias=False)
    assert 0 < kept < 1


def test_swapped_layers_restores_the_originals_even_on_error():
    model = small_llama()
    names = list(find_targets(model))
    before = {n: model.get_submodule(n) for n in names}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with e2e.swapped_layers(model, names, lambda _, layer: e2e._InputView(layer.out_features),
                                torch.device("cpu")):
            assert all(isinstance(model.get_submodule(n), e2e._InputView) for n in names)
            raise RuntimeError("boom")
    assert all(model.get_submodule(n) is before[n] for n in names)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@contextlib.contextmanager
def no_host_reads():
    """Make every way of reading a tensor's value on the host raise: a CUDA graph capture fails on them."""
    names = ["__bool__", "item", "__int__", "__index__", "__float__", "tolist"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(self, *args, **kwargs):
        raise AssertionError("the decode step read a tensor on the host")

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def test_no_host_reads_catches_a_host_read():
    with pytest.raises(AssertionError, match="host"), no_host_reads():
        bool(torch.ones(1) > 0)


@pytest.mark.parametrize("variant", ["dense", "lowrank-0.5"])
def test_static_decoder_matches_full_forward_and_never_reads_the_host(variant):
    """Greedy decoding with the static cache reproduces the logits of a cache-free forward over the whole
    sequence at every step, and its step is capturable (no host reads)."""
    model = small_llama()
    names = list(find_targets(model))
    generator = torch.Generator().manual_seed(1)
    swap = (contextlib.nullcontext() if variant == "dense" else
            e2e.swapped_layers(model, names, lambda _, layer: e2e.build_layer(e2e.parse_variant(variant), layer,
                                                                              generator)))  # fmt: skip
    batch, prompt, steps = 2, 7, 4
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(2))
    with swap, torch.inference_mode():
        decoder = e2e.StaticDecoder(model, batch, prompt, steps, torch.device("cpu"))
        decoder.prefill(ids)
        sequence = torch.cat([ids, decoder.token.clone()], dim=1)
        for _ in range(steps - 1):
            with no_host_reads():
                logits = decoder.step()
            reference = model(input_ids=sequence, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits[:, -1], reference, rtol=1e-4, atol=1e-4)
            assert torch.equal(decoder.token[:, 0], reference.argmax(-1))
            sequence = torch.cat([sequence, decoder.token.clone()], dim=1)
        # prefill empties the cache in place: decoding again from the same prompt gives the same first token
        first = sequence[:, prompt].clone()
        decoder.prefill(ids)
        assert torch.equal(decoder.token[:, 0], first)


def test_grid_rejects_bad_values():
    with pytest.raises(ValueError, match="new_tokens"):
        e2e.Grid((1,), (8,), (1,), decode_prompt=8, new_tokens=1)
    with pytest.raises(ValueError, match="prefill_batches"):
        e2e.Grid((0,), (8,), (1,), decode_prompt=8, new_tokens=4)


def test_measure_variant_rows_and_speedups():
    model = small_llama()
    names = list(find_targets(model))
    grid = e2e.Grid(prefill_batches=(1,), prompt_lens=(8,), decode_batches=(1, 2), decode_prompt=6, new_tokens=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for name in ("dense", "lowrank-0.5", "int4-g32-r8"):
        rows += e2e.measure_variant(model, e2e.parse_variant(name), names, grid, target_ms=1.0, log=lambda s: None)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model is left as it was
    e2e.add_speedups(rows)
    assert len(rows) == 3 * 3 and not any(r.get("error") for r in rows)
    for r in rows:
        assert r["speedup"] is not None and r["speedup"] > 0
        time_key = "median_ms" if r["phase"] == "prefill" else "median_us"
        assert r[time_key] > 0 and r["model_bytes"] > 0
        if r["kind"] == "dense":
            assert r["speedup"] == 1.0 and r["bytes_kept"] == 1.0
        else:
            assert 0 < r["bytes_kept"] < 1
        if r["phase"] == "decode":
            assert r["layers_us"] == pytest.approx(r["median_us"] - r["rest_us"])
            assert r["layer_share"] < 1 and r["tokens_per_s"] > 0
    lowrank = next(r for r in rows if r["variant"] == "lowrank-0.5")
    assert lowrank["param_ratio"] == 0.5 and lowrank["bytes_kept"] <= 0.5


def test_profile_attributes_decode_time_to_ops():
    model = small_llama()
    grid = e2e.Grid(prefill_batches=(1,), prompt_lens=(8,), decode_batches=(2,), decode_prompt=6, new_tokens=3)
    rows = e2e.measure_variant(model, e2e.parse_variant("lowrank-0.5"), list(find_targets(model)), grid,
                               target_ms=1.0, layer_share=False, profile_steps=2, log=lambda s: None)  # fmt: skip
    profile = next(r for r in rows if r["phase"] == "decode")["profile"]
    assert 0 < len(profile) <= 12 and all(k["us_per_step"] > 0 and 0 < k["share"] <= 1 for k in profile)
    assert [k["us_per_step"] for k in profile] == sorted((k["us_per_step"] for k in profile), reverse=True)
    # 14 targeted layers, one op call each per step
    assert any(k["name"] == "lowrank_ops::lowrank_matmul" and k["calls_per_step"] == 14 for k in profile)
    assert "decode profile" in e2e.markdown_table(e2e.add_speedups(rows), _header())


def _header():
    return {"model": "tiny", "dtype": "float32", "device": "CPU only (test)", "git_sha": "abc", "git_dirty": False,
            "date_utc": "2026-01-01T00:00:00Z"}


def test_a_failing_measurement_becomes_an_error_row(monkeypatch):
    model = small_llama()
    names = list(find_targets(model))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated failure at this batch")

    monkeypatch.setattr(e2e, "time_decode", out_of_memory)
    grid = e2e.Grid(prefill_batches=(1,), prompt_lens=(8,), decode_batches=(1,), decode_prompt=6, new_tokens=3)
    rows = e2e.measure_variant(model, e2e.parse_variant("dense"), names, grid, target_ms=1.0, log=lambda s: None)
    decode = next(r for r in rows if r["phase"] == "decode")
    assert "simulated failure" in decode["error"] and "layer_share" not in decode
    assert next(r for r in rows if r["phase"] == "prefill").get("median_ms") is not None


def test_cli_bench_e2e_writes_json_markdown_and_png(tmp_path):
    from lowrank_ops.cli import main

    model_dir = tmp_path / "tiny"
    small_llama().save_pretrained(model_dir)
    out = tmp_path / "results"
    rc = main(["bench-e2e", "--model", str(model_dir), "--out", str(out), "--variants", "lowrank-0.5,swsc-k0.5-r8",
               "--prompt-lens", "8", "--decode-batches", "1", "--decode-prompt", "6", "--new-tokens", "3",
               "--target-ms", "1"])  # fmt: skip
    assert rc == 0
    path = out / "e2e-tiny-cpu.json"
    data = json.loads(path.read_text())
    assert data["header"]["device_slug"] == "cpu" and data["header"]["variants"][0] == "dense"
    assert {r["variant"] for r in data["rows"]} == {"dense", "lowrank-0.5", "swsc-k0.5-r8"}
    markdown = path.with_suffix(".md").read_text()
    assert "| lowrank-0.5 |" in markdown and "CPU only" in markdown
    assert path.with_suffix(".png").stat().st_size > 0


def test_cli_bench_e2e_names_a_non_default_dtype_and_reports_tokens_per_second(tmp_path):
    """bf16 on the CPU: the int4 variant runs quant_lowrank_matmul's cpu backend where it is available; the files
    carry the dtype, the device line the core count, the markdown a tokens/s table."""
    import os

    from lowrank_ops.cli import main

    model_dir = tmp_path / "tiny"
    small_llama().save_pretrained(model_dir)
    out = tmp_path / "results"
    rc = main(["bench-e2e", "--model", str(model_dir), "--out", str(out), "--variants", "int4-g32-r4", "--dtype",
               "bfloat16", "--device", "cpu", "--prompt-lens", "8", "--decode-batches", "1,2", "--decode-prompt", "6",
               "--new-tokens", "3", "--target-ms", "1", "--no-layer-share", "--no-plot"])  # fmt: skip
    assert rc == 0
    path = out / "e2e-tiny-bfloat16-cpu.json"
    data = json.loads(path.read_text())
    assert data["header"]["dtype"] == "bfloat16" and f"{os.cpu_count()}-core" in data["header"]["device"]
    markdown = path.with_suffix(".md").read_text()
    assert "**decode throughput**" in markdown and "| int4-g32-r4 |" in markdown


def test_cli_bench_e2e_bad_input(tmp_path):
    from lowrank_ops.cli import main

    with pytest.raises(ValueError, match="expected dense"):
        main(["bench-e2e", "--model", "x", "--out", str(tmp_path), "--variants", "lowrank"])
    with pytest.raises(FileNotFoundError, match="cannot load"):
        main(["bench-e2e", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--layers"):
        e2e.build_model("default", torch.device("cpu"), torch.float32, layers=2)


def _saved_compressed_model(tmp_path):
    from lowrank_ops.compress import compress_
    from lowrank_ops.configs import LowRankConfig
    from lowrank_ops.serialization import save_compressed

    model = small_llama()
    config = LowRankConfig(method="svd", param_ratio=0.5, allocator="loss", align=4, device="cpu")
    report = compress_(model, config, progress=False)
    return save_compressed(model, tmp_path / "saved", config=config, source="tiny"), model, report


def test_a_saved_model_is_measured_against_its_own_dense_form(tmp_path):
    path, compressed, report = _saved_compressed_model(tmp_path)
    model, source, saved = e2e.build_model(str(path), torch.device("cpu"), torch.float32)
    assert "saved lowrank model" in source and saved and all(isinstance(m, LowRankLinear) for m in saved.values())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # the model comes back dense
    names = list(find_targets(model))
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits
        torch.testing.assert_close(dense_logits, compressed(ids).logits, rtol=1e-4, atol=1e-4)  # to_linear: same map
        with e2e.swapped_layers(model, list(saved), lambda name, layer: saved[name]):
            assert torch.equal(model(ids).logits, compressed(ids).logits)  # the saved layers, bit for bit
    grid = e2e.Grid(prefill_batches=(1,), prompt_lens=(8,), decode_batches=(1,), decode_prompt=6, new_tokens=3)
    rows = []
    for name in ("dense", "saved"):
        rows += e2e.measure_variant(model, e2e.parse_variant(name), names, grid, target_ms=1.0, layer_share=False,
                                    saved_layers=saved, log=lambda s: None)  # fmt: skip
    kept = {r["variant"]: r["bytes_kept"] for r in rows}
    assert kept["dense"] == 1.0 and kept["saved"] == pytest.approx(report.param_ratio)
    assert not any(r.get("error") for r in rows)
    with pytest.raises(ValueError, match="needs a model directory"):
        e2e.measure_variant(model, e2e.parse_variant("saved"), names, grid, log=lambda s: None)


def test_cli_defaults_to_dense_and_saved_for_a_saved_model_and_refuses_saved_otherwise(tmp_path):
    from lowrank_ops.cli import main

    path, _, _ = _saved_compressed_model(tmp_path)
    out = tmp_path / "results"
    assert main(["bench-e2e", "--model", str(path), "--out", str(out), "--prompt-lens", "8", "--decode-batches", "1",
                 "--decode-prompt", "6", "--new-tokens", "3", "--target-ms", "1", "--no-plot"]) == 0  # fmt: skip
    rows = json.loads((out / "e2e-saved-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dense", "saved", "saved"]
    assert "`saved` layers are the saved model's own" in (out / "e2e-saved-cpu.md").read_text()
    with pytest.raises(ValueError, match="variant 'saved' needs --model"):
        main(["bench-e2e", "--model", str(tmp_path / "elsewhere"), "--out", str(out), "--variants", "saved"])


def test_a_variant_that_cannot_be_built_is_reported_and_the_others_are_measured(tmp_path, monkeypatch):
    from lowrank_ops.cli import main

    model_dir = tmp_path / "tiny"
    small_llama().save_pretrained(model_dir)
    real = e2e.build_layer

    def build(variant, layer, generator):
        if variant.kind == "swsc":
            raise RuntimeError("simulated build failure")
        return real(variant, layer, generator)

    monkeypatch.setattr(e2e, "build_layer", build)
    out = tmp_path / "results"
    rc = main(["bench-e2e", "--model", str(model_dir), "--out", str(out), "--variants", "lowrank-0.5,swsc-k0.5-r8",
               "--prompt-lens", "8", "--decode-batches", "1", "--decode-prompt", "6", "--new-tokens", "3",
               "--target-ms", "1", "--no-layer-share", "--no-plot"])  # fmt: skip
    assert rc == 1
    rows = json.loads((out / "e2e-tiny-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows if not r.get("error")] == ["dense", "dense", "lowrank-0.5", "lowrank-0.5"]
    assert "simulated build failure" in next(r for r in rows if r["variant"] == "swsc-k0.5-r8")["error"]
    assert "variants not measured**: swsc-k0.5-r8" in (out / "e2e-tiny-cpu.md").read_text()


def test_the_int4_residual_is_capped_below_each_layers_break_even():
    layer = nn.Linear(48, 24)  # break-even 24 * 48 / 72 = 16
    new = e2e.build_layer(e2e.parse_variant("int4-g16-r64"), layer, torch.Generator().manual_seed(0))
    assert new.rank == 15
