"""Output safety (issue 21): nothing a user owns is destroyed, one writer per output, atomic replacement, temporary
directories of dead writers removed, SIGTERM like SIGINT, permissions from the umask, and the CLI's checks made
before any work. The kill tests run a writer in a subprocess that loads lowrank_ops/outputs.py alone (stdlib only), so
dozens of kills fit in a few seconds."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lowrank_ops import outputs
from lowrank_ops.cli import main
from lowrank_ops.outputs import OutputLocked, check_output, is_lowrank_output, output_directory, reserve_output

OUTPUTS_FILE = Path(outputs.__file__)


def _strays(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.lowrank-"))


def _write_ours(tmp: Path, text: str = "new") -> None:
    (tmp / "lowrank_ops.json").write_text(json.dumps({"text": text}))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_manifest_name_agrees_with_serialization():
    from lowrank_ops.serialization import MANIFEST

    assert outputs.MANIFEST_FILE == MANIFEST


# ---- ownership: never replace what lowrank-ops did not write -------------------------------------------------------


def test_a_foreign_directory_is_refused_and_kept_unless_overwrite(in_tmp):
    notes = in_tmp / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="notes exists and is not a lowrank-ops output .* --overwrite"):
        with output_directory(notes) as tmp:
            _write_ours(tmp)
    assert (notes / "thesis.tex").read_text() == "years of work" and _strays(in_tmp, "notes") == []
    with output_directory(notes, overwrite=True) as tmp:
        _write_ours(tmp)
    assert not (notes / "thesis.tex").exists() and is_lowrank_output(notes)


def test_a_previous_output_and_an_empty_directory_are_replaced(in_tmp):
    out = in_tmp / "out"
    out.mkdir()  # empty: nothing to lose
    with output_directory(out) as tmp:
        _write_ours(tmp, "first")
    with output_directory(out) as tmp:
        _write_ours(tmp, "second")
    assert json.loads((out / "lowrank_ops.json").read_text()) == {"text": "second"}
    assert _strays(in_tmp) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_a_symlink_the_working_directory_and_empty_paths_are_always_refused(in_tmp, overwrite):
    (in_tmp / "existing.txt").write_text("keep me")
    (in_tmp / "real").mkdir()
    (in_tmp / "link").symlink_to(in_tmp / "real")
    cases = {"existing.txt": "exists and is not a directory", "link": "symbolic link", "": "empty",
             ".": "working directory", "..": "working directory", "/": "working directory",
             "existing.txt/sub": "is not a directory"}  # fmt: skip
    for target, message in cases.items():
        with pytest.raises(ValueError, match=message):
            check_output(target, overwrite=overwrite)
    assert (in_tmp / "existing.txt").read_text() == "keep me"
    assert sorted(p.name for p in in_tmp.iterdir()) == ["existing.txt", "link", "real"]


def test_the_source_model_directory_is_protected(in_tmp):
    source = in_tmp / "models" / "m"
    source.mkdir(parents=True)
    _write_ours(source)  # even a lowrank-ops output, when it is the source being read
    for target in (source, in_tmp / "models"):
        with pytest.raises(ValueError, match="is or contains the source model"):
            check_output(target, overwrite=True, protect=[source])
    check_output(source / "compressed", protect=[source])  # inside the source: destroys nothing


def test_an_unwritable_parent_is_refused_before_any_work(in_tmp, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == in_tmp / "ro" else real_access(p, mode))
    (in_tmp / "ro").mkdir()
    with pytest.raises(ValueError, match="ro is not writable"):
        check_output(in_tmp / "ro" / "out" / "deeper")


def test_a_lowrank_lora_adapter_is_ours_and_a_foreign_adapter_is_not(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name, metadata in (("ours", {"format": "pt", "lowrank_ops": "1"}), ("peft", {"format": "pt"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
        save_file({"a": torch.ones(2)}, str(tmp_path / name / "adapter_model.safetensors"), metadata=metadata)
    assert is_lowrank_output(tmp_path / "ours") and not is_lowrank_output(tmp_path / "peft")


# ---- one writer, temporary directories, permissions, fsync ---------------------------------------------------------


_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("outputs", sys.argv[1])
    outputs = importlib.util.module_from_spec(spec); spec.loader.exec_module(outputs)
    with outputs.reserve_output(sys.argv[2]):
        print("locked", flush=True)
        time.sleep(30)
""")


def test_a_second_writer_fails_at_once_naming_the_holder(in_tmp):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(OUTPUTS_FILE), str(in_tmp / "out")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        tic = time.perf_counter()
        with pytest.raises(OutputLocked, match=f"being written by another process \\(pid {holder.pid},") as info:
            with output_directory(in_tmp / "out") as tmp:
                _write_ours(tmp)
        assert time.perf_counter() - tic < 1 and "\n" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    with output_directory(in_tmp / "out") as tmp:  # the lock dies with its holder
        _write_ours(tmp)
    assert is_lowrank_output(in_tmp / "out") and _strays(in_tmp) == []


def test_reservations_are_reentrant_within_one_process(in_tmp):
    with reserve_output(in_tmp / "out") as outer:
        with reserve_output(in_tmp / "out") as inner:
            assert inner is outer
        with output_directory(in_tmp / "out") as tmp:
            _write_ours(tmp)
    assert is_lowrank_output(in_tmp / "out")


def test_an_exception_or_interrupt_removes_the_temporary_directory_and_keeps_the_old_output(in_tmp):
    out = in_tmp / "out"
    with output_directory(out) as tmp:
        _write_ours(tmp, "old")
    for exc in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(exc):
            with output_directory(out) as tmp:
                _write_ours(tmp, "half")
                raise exc()
        assert json.loads((out / "lowrank_ops.json").read_text()) == {"text": "old"} and _strays(in_tmp) == []


def test_temporary_directories_of_dead_writers_are_removed_and_a_lost_output_restored(in_tmp):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale_tmp = in_tmp / f".out.lowrank-tmp.{dead_pid}.0badc0de"
    mine = in_tmp / f".out.lowrank-tmp.{os.getpid()}.12345678"  # a live writer's: kept
    old = in_tmp / f".out.lowrank-old.{dead_pid}.0badbeef"  # a fallback commit killed between its two renames
    for d in (stale_tmp, mine, old):
        d.mkdir()
    _write_ours(old, "previous")
    with reserve_output(in_tmp / "out"):
        assert json.loads((in_tmp / "out" / "lowrank_ops.json").read_text()) == {"text": "previous"}
    assert _strays(in_tmp) == [mine.name]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_permissions_follow_the_umask_and_everything_is_fsynced(in_tmp, monkeypatch, umask):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    previous = os.umask(umask)
    try:
        with output_directory(in_tmp / "out") as tmp:
            _write_ours(tmp)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
    finally:
        os.umask(previous)
    assert (in_tmp / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    names = {Path(p).name for p in synced}
    assert {"lowrank_ops.json", "f", "sub", in_tmp.name}.issubset(names)


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_uses_one_exchange_or_the_documented_fallback(in_tmp, monkeypatch, exchange):
    monkeypatch.setattr(outputs, "use_renameat2", exchange)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    for text in ("one", "two"):
        with output_directory(in_tmp / "out") as tmp:
            _write_ours(tmp, text)
    assert json.loads((in_tmp / "out" / "lowrank_ops.json").read_text()) == {"text": "two"}
    assert len(renames) == (0 if exchange else 3)  # fallback: new -> out, then out -> old, new -> out
    assert _strays(in_tmp) == []


# ---- kills: SIGKILL at many points of a save leaves the old or the new complete output -----------------------------


_WRITER = textwrap.dedent("""
    import hashlib, importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("outputs", sys.argv[1])
    outputs = importlib.util.module_from_spec(spec); spec.loader.exec_module(outputs)
    outputs.use_renameat2 = sys.argv[3] == "exchange"
    print("ready", flush=True)
    for i in range(10**6):
        with outputs.output_directory(sys.argv[2]) as tmp:
            payload = os.urandom(1 << 18)
            for k in range(4):
                (tmp / f"part{k}.bin").write_bytes(payload)
            digest = hashlib.sha256(payload).hexdigest()
            (tmp / "lowrank_ops.json").write_text(json.dumps({"iteration": i, "sha256": digest}))
""")


def _complete(out: Path) -> bool:
    import hashlib

    manifest = json.loads((out / "lowrank_ops.json").read_text())
    return all(hashlib.sha256((out / f"part{k}.bin").read_bytes()).hexdigest() == manifest["sha256"]
               for k in range(4))  # fmt: skip


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_sigkill_during_saves_leaves_a_complete_output_and_no_stray_after_the_next_run(in_tmp, mode):
    out, rng, iterations = in_tmp / "out", random.Random(21), []
    for _ in range(15):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(OUTPUTS_FILE), str(out), mode],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        with reserve_output(out):  # the next run: restores a lost output, removes what the dead writer left
            pass
        assert _strays(in_tmp) == []
        if out.exists():
            assert _complete(out)
            iterations.append(json.loads((out / "lowrank_ops.json").read_text())["iteration"])
    assert iterations, "no kill landed after a first complete save: the test exercised nothing"


_CLI_WRITER = textwrap.dedent("""
    import sys, time
    import lowrank_ops.cli as cli
    from lowrank_ops.outputs import output_directory

    def fake_main(argv=None):
        with output_directory(sys.argv[1]) as tmp:
            (tmp / "lowrank_ops.json").write_text("{}")
            print("writing", flush=True)
            time.sleep(30)
        return 0

    cli.main = fake_main
    sys.exit(cli.entry())
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_cli_handles_sigterm_like_sigint(in_tmp, signum):
    writer = subprocess.Popen([sys.executable, "-c", _CLI_WRITER, str(in_tmp / "out")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signum)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 128 + signum and f"interrupted ({signal.Signals(signum).name})" in err
    assert not (in_tmp / "out").exists() and _strays(in_tmp) == []


# ---- the writers: save_compressed, the LoRA export, compress --out -------------------------------------------------


def _tiny_source(tmp_path: Path) -> Path:
    from tiny_models import tiny_llama_gqa, word_tokenizer

    source = tmp_path / "tiny"
    tiny_llama_gqa().save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    return source


COMMON = ["--seq-len", "32", "--batch-size", "4", "--device", "cpu", "--calib-tokens", "128", "--no-eval"]


def test_compress_refuses_bad_outputs_before_loading_the_model(in_tmp, monkeypatch):
    import lowrank_ops.pipeline as pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    (in_tmp / "notes").mkdir()
    (in_tmp / "notes" / "todo.txt").write_text("mine")
    (in_tmp / "existing.txt").write_text("mine")
    model = _tiny_source(in_tmp)
    cases = {"notes": "not a lowrank-ops output", "existing.txt": "not a directory", "": "empty",
             ".": "working directory", str(model): "source model"}  # fmt: skip
    for out, message in cases.items():
        with pytest.raises(ValueError, match=message):
            main(["compress", "--model", str(model), "--method", "svd", "--out", out, *COMMON])
    assert (in_tmp / "notes" / "todo.txt").read_text() == "mine" and (in_tmp / "existing.txt").read_text() == "mine"
    assert (model / "config.json").is_file() and not list(in_tmp.glob(".*lowrank-tmp*"))


def test_compress_writes_replaces_its_own_output_and_overwrites_only_when_told(in_tmp, capsys):
    from lowrank_ops.serialization import load_compressed

    model, out = _tiny_source(in_tmp), in_tmp / "out"
    args = ["compress", "--model", str(model), "--method", "svd", "--param-ratio", "0.5", "--out", str(out), *COMMON]
    assert main(args) == 0
    assert main([*args[:-len(COMMON)], *COMMON]) == 0  # again: a previous output is replaced
    load_compressed(out)
    (in_tmp / "mine").mkdir()
    (in_tmp / "mine" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="not a lowrank-ops output"):
        main([*args[:-len(COMMON) - 2], "--out", str(in_tmp / "mine"), *COMMON])
    assert main([*args[:-len(COMMON) - 2], "--out", str(in_tmp / "mine"), "--overwrite", *COMMON]) == 0
    assert not (in_tmp / "mine" / "data.csv").exists() and is_lowrank_output(in_tmp / "mine")
    assert _strays(in_tmp) == [] and _strays(in_tmp, "mine") == []


def test_save_compressed_api_refuses_a_foreign_directory_unless_overwrite(in_tmp):
    from tiny_models import tiny_llama_gqa

    from lowrank_ops import LowRankConfig, compress_
    from lowrank_ops.serialization import save_compressed

    model = tiny_llama_gqa()
    compress_(model, LowRankConfig(method="svd", param_ratio=0.5, device="cpu"), progress=False)
    (in_tmp / "mine").mkdir()
    (in_tmp / "mine" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a lowrank-ops output"):
        save_compressed(model, in_tmp / "mine")
    assert (in_tmp / "mine" / "keep.txt").exists()
    save_compressed(model, in_tmp / "mine", overwrite=True)
    assert is_lowrank_output(in_tmp / "mine")


def test_lora_export_refuses_foreign_outputs_and_replaces_its_own(in_tmp, capsys):
    model, compressed = _tiny_source(in_tmp), in_tmp / "compressed"
    assert main(["compress", "--model", str(model), "--method", "eora", "--base", "int4-g32", "--rank", "8",
                 "--out", str(compressed), *COMMON]) == 0  # fmt: skip
    adapter, base = in_tmp / "adapter", in_tmp / "base"
    export = ["export-lora", str(compressed), "--out", str(adapter), "--base-out", str(base)]
    assert main(export) == 0 and main(export) == 0  # the second run replaces the first's adapter and base
    assert (base / "lowrank_ops_base.json").is_file() and is_lowrank_output(adapter)
    for flag in ("--out", "--base-out"):
        with pytest.raises(ValueError, match="is or contains the source model"):
            main([*export[:2], "--out", str(adapter), "--base-out", str(base), flag, str(compressed)])
    with pytest.raises(ValueError, match="must be separate directories"):
        main(["export-lora", str(compressed), "--out", str(adapter), "--base-out", str(adapter)])
    (in_tmp / "peft").mkdir()
    (in_tmp / "peft" / "adapter_config.json").write_text("{}")  # somebody else's adapter
    with pytest.raises(ValueError, match="not a lowrank-ops output"):
        main(["export-lora", str(compressed), "--out", str(in_tmp / "peft")])
    assert (in_tmp / "peft" / "adapter_config.json").read_text() == "{}"
    assert main(["export-lora", str(compressed), "--out", str(in_tmp / "peft"), "--overwrite"]) == 0


_SAVE_WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from tiny_models import tiny_llama_gqa
    from lowrank_ops import LowRankConfig, compress_
    from lowrank_ops.serialization import save_compressed

    model = tiny_llama_gqa()
    compress_(model, LowRankConfig(method="svd", param_ratio=0.5, device="cpu"), progress=False)
    print("ready", flush=True)
    for i in range(10**6):
        save_compressed(model, sys.argv[1], extra_files={"iteration.txt": str(i)})
""")


def test_sigkill_during_save_compressed_leaves_a_loadable_model(in_tmp):
    import torch

    from lowrank_ops.serialization import load_compressed

    out, rng, logits = in_tmp / "out", random.Random(7), None
    probe = torch.arange(32).reshape(2, 16) % 128
    for _ in range(2):  # each writer imports torch and transformers (~8 s here); the kill points are above
        writer = subprocess.Popen([sys.executable, "-c", _SAVE_WRITER, str(out), str(Path(__file__).parent)],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        with reserve_output(out):
            pass
        assert _strays(in_tmp) == []
        model = load_compressed(out)  # one save takes 30-50 ms here: by 0.2 s a complete output is there
        with torch.no_grad():
            current = model(probe).logits
        assert logits is None or torch.equal(current, logits)
        logits = current
